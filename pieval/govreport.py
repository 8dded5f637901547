"""GovReport summarization as the PI paper runs it (Chen et al. 2023, Sec. 3.4).

The document is cut to its first ``max_doc_tokens`` model tokens (15000), put in the paper's
prompt, and the model writes up to ``max_gen_toks`` (1000) tokens, sampled at T=0.5, top-p 0.95
(``--metadata '{"greedy": true}'`` for greedy; every key: ``GovReportSettings``). The whole generation is the summary: unlike
lm-eval's ``scrolls_govreport`` it is not cut at the first newline (a multi-paragraph summary
would lose everything after its first paragraph).

Scores: ROUGE-1/2/L F-measure from ``rouge_score`` with stemming, as fractions in [0, 1]. Each
document gets its own F-measure (the best over its references, when SCROLLS lists several) and a
run reports their mean over documents (a macro average, not ROUGE of the concatenated corpus).

Data: the SCROLLS ``gov_report`` validation split (972 documents) read from the jsonl that the
``tau/scrolls`` hub repo publishes in ``gov_report.zip`` (its loading script no longer runs under
``datasets`` >= 4; ``dataset_split``, ``dataset_revision``), or a local jsonl with ``document`` and
``summary`` fields (``data_path``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from pieval import documents, task_settings
from pieval.errors import UserError
from pieval.protocol import (
    GOVREPORT_MAX_DOC_TOKENS,
    GOVREPORT_MAX_GEN_TOKS,
    GOVREPORT_TEMPERATURE,
    GOVREPORT_TOP_P,
    GOVREPORT_VALIDATION_DOCS,
)
from pieval.task_model import GeneratedPromptTask, TaskModel, check_generation_budget

PROMPT = "Read the following article and then summarize it.\n{document}\nNow summarize the above article.\nSummary:"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

log = logging.getLogger(__name__)

SCROLLS_REPO = "tau/scrolls"
SCROLLS_CONFIG = "gov_report"
SCROLLS_ZIP = "https://huggingface.co/datasets/{repo}/resolve/{revision}/{config}.zip"


@dataclass(frozen=True)
class Report:
    doc_id: str
    document: str
    summaries: tuple[str, ...]  # SCROLLS lists a document once per reference summary


def prompt(document: str) -> str:
    return PROMPT.format(document=document)


def truncate(model: TaskModel, text: str, max_tokens: int) -> tuple[str, int]:
    """The text of the first ``max_tokens`` tokens of ``text`` (cut at a token's end) and their count."""
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return text, len(enc["input_ids"])
    return text[: enc["offset_mapping"][max_tokens - 1][1]], max_tokens


def fit(model: TaskModel, document: str, max_doc_tokens: int, max_gen_toks: int) -> tuple[str, int]:
    """The document cut to ``max_doc_tokens`` and, when the window is known, short enough that
    prompt + generation fit in it (HFLM would otherwise cut the instruction off the front)."""
    text, n = truncate(model, document, max_doc_tokens)
    if model.window is None:
        return text, n
    room = model.window - max_gen_toks
    while (excess := len(model.encode(prompt(text))) - room) > 0:
        if n <= excess:
            raise UserError(
                f"govreport_pi: the prompt's fixed text and max_gen_toks={max_gen_toks} leave no room "
                f"for a document in the model's window of {model.window} tokens: lower max_gen_toks"
            )
        text, n = truncate(model, text, n - excess)
    return text, n


def iter_local(data_path: str) -> Iterator[Report]:
    for doc in documents.iter_local(data_path, text_field="document"):
        summary = (doc.fields or {}).get("summary")
        if isinstance(summary, str):
            summary = [summary]
        if not summary or not all(isinstance(s, str) for s in summary):
            raise documents.DocumentError(
                f"{doc.doc_id}: govreport_pi needs a 'summary' field (a string or a list of strings) "
                "beside 'document'"
            )
        yield Report(doc.doc_id, doc.text, tuple(summary))


def iter_scrolls(split: str = "validation", revision: str = "main") -> Iterator[Report]:
    """SCROLLS gov_report rows, one per document (rows repeated for several references merged)."""
    import datasets

    url = SCROLLS_ZIP.format(repo=SCROLLS_REPO, revision=revision, config=SCROLLS_CONFIG)
    try:
        rows = datasets.load_dataset(
            "json", data_files={split: f"zip://{SCROLLS_CONFIG}/{split}.jsonl::{url}"}, split=split
        )
    except Exception as e:  # offline, hub errors, missing split: all end in the same advice
        raise documents.DocumentError(
            f"govreport_pi cannot load SCROLLS gov_report ({split!r}) from {url}: {type(e).__name__}: {e}. "
            "Offline? Pass local data: a .jsonl with 'document' and 'summary' fields, e.g. "
            "--metadata '{\"data_path\": \"/path/to/gov_report_validation.jsonl\"}'"
        ) from None
    merged: dict[str, tuple[str, list[str]]] = {}
    for row in rows:
        merged.setdefault(row["id"], (row["input"], []))[1].append(row["output"])
    if split == "validation" and len(merged) != GOVREPORT_VALIDATION_DOCS:
        log.warning(
            "SCROLLS gov_report validation has %d documents, not the paper's %d: results are not "
            "comparable with its Table 6", len(merged), GOVREPORT_VALIDATION_DOCS,
        )
    for doc_id, (document, summaries) in merged.items():
        yield Report(doc_id, document, tuple(summaries))


def generate(
    model: TaskModel,
    reports: Iterator[Report],
    max_doc_tokens: int = GOVREPORT_MAX_DOC_TOKENS,
    max_gen_toks: int = GOVREPORT_MAX_GEN_TOKS,
    max_docs: int | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for report in reports:
        if max_docs is not None and len(rows) >= max_docs:
            break
        if not report.document.strip():
            raise documents.DocumentError(f"{report.doc_id}: empty document")
        text, n = fit(model, report.document, max_doc_tokens, max_gen_toks)
        rows.append(
            {
                "doc_id": report.doc_id,
                "document": text,
                "summaries": list(report.summaries),
                "doc_tokens": n,
                "truncated": len(text) < len(report.document),
                "max_gen_toks": max_gen_toks,
            }
        )
    if not rows:
        raise documents.DocumentError("govreport_pi found no documents")
    return rows


@task_settings.register("govreport_pi")
@dataclass(frozen=True)
class GovReportSettings:
    """The govreport_pi task's metadata keys; dataset keys are namespaced (``revision`` is the model's)."""

    data_path: str | None = None  # a local jsonl with "document"/"summary"; None: SCROLLS from the hub
    dataset_split: str = "validation"
    dataset_revision: str = "main"  # of the tau/scrolls hub repo
    max_docs: int | None = None
    max_doc_tokens: int = GOVREPORT_MAX_DOC_TOKENS
    max_gen_toks: int = GOVREPORT_MAX_GEN_TOKS
    greedy: bool = False  # False: the paper's sampling (T=0.5, top-p 0.95)

    DEPRECATED = {"split": "dataset_split"}

    def __post_init__(self) -> None:
        task_settings.raise_problems(
            "govreport_pi",
            [
                task_settings.optional_string("data_path", self.data_path),
                task_settings.string("dataset_split", self.dataset_split),
                task_settings.string("dataset_revision", self.dataset_revision),
                task_settings.optional_positive_int("max_docs", self.max_docs),
                task_settings.positive_int("max_doc_tokens", self.max_doc_tokens),
                task_settings.positive_int("max_gen_toks", self.max_gen_toks),
                task_settings.boolean("greedy", self.greedy),
            ],
        )


def build_dataset(render=None, chat: bool = False, **metadata: Any):
    """The task's documents, fitted to the window as sent after ``render`` (with a chat template too:
    the prompt ends with "Summary:" in the user's turn either way). Keys: ``GovReportSettings``."""
    import datasets

    from pieval import task_model

    settings = task_settings.from_metadata(GovReportSettings, metadata, "govreport_pi")
    model = task_model.from_metadata(metadata, "govreport_pi", render)
    if settings.data_path:
        reports = iter_local(settings.data_path)
    else:
        reports = iter_scrolls(settings.dataset_split, settings.dataset_revision)
    rows = generate(
        model,
        reports,
        max_doc_tokens=settings.max_doc_tokens,
        max_gen_toks=settings.max_gen_toks,
        max_docs=settings.max_docs,
    )
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def doc_to_text(doc: Mapping[str, Any]) -> str:
    return prompt(doc["document"])


@cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure of one summary; the best reference's score per type when several."""
    scores = _scorer().score_multi(references, prediction)
    return {t: scores[t].fmeasure for t in ROUGE_TYPES}


def process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    return rouge(results[0], list(doc["summaries"]))


def generation_kwargs(greedy: bool, max_gen_toks: int) -> dict[str, Any]:
    """The paper's decoding (T=0.5, top-p 0.95), or greedy; never stops early on a newline."""
    if greedy:
        return {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks}
    return {
        "until": [],
        "do_sample": True,
        "temperature": GOVREPORT_TEMPERATURE,
        "top_p": GOVREPORT_TOP_P,
        "max_gen_toks": max_gen_toks,
    }


class GovReportTask(GeneratedPromptTask):
    """``govreport_pi``: decoding and the generation budget come from metadata, like the data."""

    TEXT_FIELD = "document"
    build_dataset = staticmethod(build_dataset)

    def __init__(self, config: dict | None = None):
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(config=config)
        greedy = task_settings.from_metadata(GovReportSettings, self.config.metadata or {}, "govreport_pi").greedy
        self.config.generation_kwargs = generation_kwargs(greedy, self.dataset["test"][0]["max_gen_toks"])

    def construct_requests(self, doc, ctx, **kwargs):
        check_generation_budget("govreport_pi", self.config.generation_kwargs, doc["max_gen_toks"])
        return super().construct_requests(doc, ctx, **kwargs)
