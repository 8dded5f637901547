"""The lm-eval task behind ``pg19_ppl``, ``proofpile_ppl`` and ``local_ppl``.

One request per document, of the request type ``loglikelihood_sliding`` (lm-eval's
evaluator calls ``getattr(lm, request_type)``): the model scores all windows of all
documents itself (``pieval.sliding_window_lm.SlidingWindowMixin``), because lm-eval's
``loglikelihood_rolling`` has no stride. Metrics per window W: ``token_ppl_W``,
``window_ppl_W``, ``bpb_W``, ``scored_tokens_W``.

Run-time settings come from the task metadata (YAML ``metadata`` < ``--metadata``; lm-eval
also merges model_args in, which are not read as settings): ``SlidingWindowConfig``
(``windows``, ``stride``, ``max_doc_tokens``, ``head_chunk_tokens``) and ``CorpusConfig``
(``data_path``, ``max_docs``, ``min_doc_tokens``, ``sample_seed`` and, for hub data,
``dataset``, ``dataset_config``, ``dataset_split``, ``dataset_revision``, ``text_field``).
What was actually run (windows, documents, truncation) is written back
into the metadata, so it lands in the results JSON's ``configs`` section.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import datasets
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

from pieval import task_settings
from pieval.documents import Document, HubSource, iter_documents
from pieval.errors import UserError
from pieval.perplexity import SlidingWindowConfig
from pieval.perplexity_metrics import AGGREGATIONS, doc_metrics, metric_names, metric_prefix
from pieval.sliding_window_lm import REQUEST_TYPE

TASKS = ("pg19_ppl", "proofpile_ppl", "local_ppl")
task_settings.register(*TASKS)(SlidingWindowConfig)


@task_settings.register(*TASKS)
@dataclass(frozen=True)
class CorpusConfig:
    """Which documents to score: local ``data_path`` if given, else the hub dataset."""

    data_path: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "test"
    dataset_revision: str | None = None
    text_field: str = "text"
    max_docs: int | None = None
    # Keep only documents with at least this many tokens of the model's tokenizer
    # (proof-pile: >= 32768, paper Sec. 3.2); needs `pretrained` or `tokenizer`.
    min_doc_tokens: int = 0
    # With max_docs: a seeded random sample of the eligible documents (the paper's "128
    # random documents"); None takes the first max_docs.
    sample_seed: int | None = None

    WRITES = ("scoring", "corpus", "documents")  # what was run, for the results' configs

    def __post_init__(self) -> None:
        problems = [
            task_settings.optional_string(k, getattr(self, k))
            for k in ("data_path", "dataset", "dataset_config", "dataset_revision")
        ]
        problems += [task_settings.string(k, getattr(self, k)) for k in ("dataset_split", "text_field")]
        problems.append(task_settings.optional_positive_int("max_docs", self.max_docs))
        if not isinstance(self.min_doc_tokens, int) or isinstance(self.min_doc_tokens, bool) or self.min_doc_tokens < 0:
            problems.append(f"min_doc_tokens must be an integer >= 0 (got {self.min_doc_tokens!r})")
        if self.sample_seed is not None and (not isinstance(self.sample_seed, int) or isinstance(self.sample_seed, bool)):
            problems.append(f"sample_seed must be an integer or null (got {self.sample_seed!r})")
        if not self.data_path and not self.dataset:
            problems.append(
                "no data: pass local documents with --metadata '{\"data_path\": \"/path/to/docs\"}' "
                "(a .txt file, a directory of .txt files, a .jsonl with a 'text' field, or .parquet)"
            )
        task_settings.raise_problems("perplexity", problems)

    def hub(self) -> HubSource | None:
        if not self.dataset:
            return None
        return HubSource(self.dataset, self.dataset_config, self.dataset_split, self.dataset_revision, self.text_field)


def settings_from_metadata(metadata: dict, task: str = "perplexity") -> tuple[SlidingWindowConfig, CorpusConfig]:
    """The task's typed settings; metadata also carries model_args and lm-eval keys (not read)."""
    return (
        task_settings.from_metadata(SlidingWindowConfig, metadata, task),
        task_settings.from_metadata(CorpusConfig, metadata, task),
    )


@dataclass
class Selection:
    documents: list[Document]
    empty_skipped: int = 0  # documents with no text at all
    below_min_tokens_skipped: int = 0
    eligible: int = 0  # documents that passed the filters, before max_docs


def select_documents(docs: Iterable[Document], corpus: CorpusConfig, count_tokens=None) -> Selection:
    """Skip empty documents, apply ``min_doc_tokens`` and ``max_docs`` (first N or a seeded sample)."""
    sel = Selection([])
    sampling = corpus.max_docs is not None and corpus.sample_seed is not None
    for doc in docs:
        if not doc.text:
            sel.empty_skipped += 1
            continue
        # A token covers at least one UTF-8 byte (SentencePiece may add one prefix piece), so
        # the byte count rules out most short documents without tokenizing them.
        if corpus.min_doc_tokens and (
            len(doc.text.encode("utf-8")) + 1 < corpus.min_doc_tokens or count_tokens(doc.text) < corpus.min_doc_tokens
        ):
            sel.below_min_tokens_skipped += 1
            continue
        sel.eligible += 1
        sel.documents.append(doc)
        if not sampling and corpus.max_docs is not None and len(sel.documents) == corpus.max_docs:
            break
    if sampling and len(sel.documents) > corpus.max_docs:
        keep = sorted(random.Random(corpus.sample_seed).sample(range(len(sel.documents)), corpus.max_docs))
        sel.documents = [sel.documents[i] for i in keep]
    return sel


def unsupported_model(model: object) -> UserError:
    """What a model without ``loglikelihood_sliding`` gets when lm-eval dispatches these tasks' requests."""
    return UserError(
        f"model class {type(model).__name__} cannot score strided sliding-window perplexity "
        f"(request type {REQUEST_TYPE!r}, used by pg19_ppl, proofpile_ppl and local_ppl; lm-eval's "
        "loglikelihood_rolling has no stride): run these tasks with --model pi_llama "
        "(any RoPE LLaMA checkpoint; scaling_factor is optional)"
    )


class SlidingWindowPerplexityTask(ConfigurableTask):
    """A YAML's ``class: !function pieval.perplexity_task.SlidingWindowPerplexityTask``."""

    OUTPUT_TYPE = REQUEST_TYPE

    def __init__(self, config: dict) -> None:
        config = {k: v for k, v in config.items() if k != "class"}
        metadata = dict(config.get("metadata") or {})
        self.scoring, self.corpus = settings_from_metadata(metadata, config.get("task", "perplexity"))
        self._tokenizer_source = metadata.get("tokenizer") or metadata.get("pretrained")
        # the model's own revision/trust_remote_code (model_args) load the same tokenizer it uses
        self._tokenizer_kwargs = {k: metadata[k] for k in ("revision", "trust_remote_code") if metadata.get(k) is not None}
        self._windows: set[int] = set(self.scoring.windows or ())
        self._run = Counter()
        self._shorter: Counter = Counter()
        super().__init__(
            config=config
            | {
                "metadata": metadata,
                "test_split": "test",
                "output_type": None,
                "metric_list": [],  # named per window at run time: see aggregation()
                "num_fewshot": 0,
            }
        )

    # ------------------------------------------------------------------ data

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        sel = select_documents(
            iter_documents(self.corpus.data_path, self.corpus.hub(), self.corpus.text_field),
            self.corpus,
            self._token_counter() if self.corpus.min_doc_tokens else None,
        )
        if not sel.documents:
            raise UserError(
                f"{self.config.task}: no documents to score ({sel.empty_skipped} empty, "
                f"{sel.below_min_tokens_skipped} shorter than min_doc_tokens={self.corpus.min_doc_tokens}) in "
                f"{self.corpus.data_path or self.corpus.dataset}"
            )
        rows = [{"doc_id": d.doc_id, "text": d.text} for d in sel.documents]
        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
        self.config.metadata.update(
            {
                "scoring": self.scoring.to_request(),
                "corpus": asdict(self.corpus),
                "documents": {
                    "selected": len(sel.documents),
                    "eligible": sel.eligible,
                    "empty_skipped": sel.empty_skipped,
                    "below_min_tokens_skipped": sel.below_min_tokens_skipped,
                },
            }
        )

    def _token_counter(self):
        if not self._tokenizer_source:
            raise UserError(
                f"{self.config.task}: min_doc_tokens={self.corpus.min_doc_tokens} counts tokens with the "
                "model's tokenizer, but none is known: pass model_args pretrained=PATH, or "
                "--metadata '{\"tokenizer\": \"PATH\"}', or --metadata '{\"min_doc_tokens\": 0}'"
            )
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self._tokenizer_source, **self._tokenizer_kwargs)
        return lambda text: len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    def fewshot_docs(self):
        return None  # perplexity is zero-shot; no sampler is built

    # ------------------------------------------------------------------ requests

    def doc_to_text(self, doc, doc_to_text=None) -> str:
        return ""

    def doc_to_target(self, doc, doc_to_target=None) -> str:
        return ""  # the document itself is the request; logging it twice would double the samples

    def fewshot_context(self, doc, num_fewshot, **kwargs) -> str:
        if num_fewshot:
            raise UserError(f"{self.config.task} is a perplexity task: --num_fewshot must be 0 (got {num_fewshot})")
        return ""

    def construct_requests(self, doc: dict, ctx: str, **kwargs) -> Instance:
        for key in ("apply_chat_template", "chat_template"):
            kwargs.pop(key, None)
        arguments = (doc["text"], self.scoring.to_request())
        return Instance(request_type=REQUEST_TYPE, doc=doc, arguments=arguments, idx=0, **kwargs)

    # ------------------------------------------------------------------ results

    def process_results(self, doc: dict, results: list[dict]) -> dict:
        (result,) = results
        windows = sorted(int(w) for w in result["windows"])
        self._windows.update(windows)
        self._run["scored"] += 1
        self._run["truncated"] += result["truncated"]
        self._run["no_tokens"] += result["doc_tokens"] == 0
        for w in windows:
            self._shorter[w] += result["scored_tokens"] < w - 1
        self.config.metadata["scoring"]["windows"] = sorted(self._windows)
        self.config.metadata["documents"].update(
            {
                "scored": self._run["scored"],
                "truncated": self._run["truncated"],
                "without_tokens": self._run["no_tokens"],
                "shorter_than_window": {str(w): self._shorter[w] for w in sorted(self._shorter)},
            }
        )
        return doc_metrics(result)

    def aggregation(self) -> dict:
        return {name: AGGREGATIONS[metric_prefix(name)][0] for name in metric_names(sorted(self._windows))}

    def higher_is_better(self) -> dict:
        return {name: AGGREGATIONS[metric_prefix(name)][1] for name in metric_names(sorted(self._windows))}

