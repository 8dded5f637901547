"""Who was evaluated, how, and on what: the identity and provenance of one measured row.

Everything comes from the results JSON alone, so a leaderboard can be rebuilt anywhere:
lm-eval's own sections (``config``, ``configs.<task>``, versions, ``date``) plus the
``config.pieval`` dict that the `pi_llama` backend adds (`PILlama.get_model_info`). A
checkpoint `pieval finetune` made carries its facts (`pieval.facts`: method, steps, base
model, base window, ...) in its config.json, and `pi_llama` copies them to
``config.pieval.finetune``; no checkpoint folder is read, so deleting one changes no row.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from pieval import rope
from pieval.errors import UserError
from pieval.leaderboard.results import ResultsFile
from pieval.protocol import GOVREPORT_MAX_DOC_TOKENS, PASSKEY_SEED

# config.pieval keys a measured row cannot do without (a row without them is not written).
REQUIRED_PIEVAL = (
    "pretrained",
    "rope_type",
    "factor",
    "theta",
    "base_window",
    "context_length",
    "dtype",
    "attn_implementation",
    "pieval_version",
)

# Provenance columns, in the order they appear in every table (after the metric columns).
COLUMNS = (
    "model_revision",
    "model_sha",
    "rope_type",
    "factor",
    "theta",
    "dtype",
    "attn_implementation",
    "dataset",
    "dataset_revision",
    "docs",
    "stride",
    "truncation",
    "seed",
    "lm_eval_version",
    "transformers_version",
    "torch_version",
    "pieval_version",
    "date",
    "results_file",
)

# Method labels that name no rope method (those are `pieval.rope.METHODS`' labels).
BASE = "base"  # the base model as saved: not extended, not fine-tuned
DIRECT = "FT"  # fine-tuned at L' without interpolation (the paper's label)


class ProvenanceError(UserError):
    """A results file that lacks what a measured row must record."""


@dataclass(frozen=True, order=True)
class RowId:
    """The columns that identify a model in every table (before its metrics)."""

    model: str  # the evaluated checkpoint (path or hub id, as passed to pretrained=)
    base_model: str  # the model it was fine-tuned from; == model when not fine-tuned
    method: str  # base / FT / PI / ntk / yarn / ...
    L: int  # trained window of the base model
    L_prime: int  # evaluated context window L'
    steps: int  # fine-tune steps (0 = not fine-tuned)


def _pieval(rf: ResultsFile) -> dict:
    return rf.data["config"].get("pieval") or {}


def _finetune(rf: ResultsFile) -> dict:
    """The checkpoint's fine-tune facts (`pieval.facts`), ``{}`` for a model pieval did not fine-tune."""
    ft = _pieval(rf).get("finetune")
    return ft if isinstance(ft, dict) else {}


def method_label(pieval: dict, finetune: dict) -> str:
    """The rope method's label; as saved: its rope type's when extended (PI for linear), else FT
    for a checkpoint fine-tuned without interpolation, else base."""
    method = rope.method_name(pieval.get("rope_method") or rope.AS_SAVED)
    if method in rope.METHODS:
        return rope.METHODS[method].label
    if float(pieval.get("factor") or 1.0) > 1.0:
        return rope.label_of_rope_type(str(pieval.get("rope_type")))
    if finetune and int(finetune.get("steps", 0)) > 0:
        return DIRECT
    return BASE


def missing(rf: ResultsFile) -> list[str]:
    """The provenance fields this results file lacks (empty = a row may be written)."""
    pv = _pieval(rf)
    gone = [f"config.pieval.{k} missing" for k in REQUIRED_PIEVAL if pv.get(k) in (None, "")]
    if not pv:
        gone = [f"no config.pieval: the run used --model {rf.data['config'].get('model')}, not pi_llama"]
    gone += [f"{k} missing" for k in ("lm_eval_version", "transformers_version", "date") if rf.data.get(k) in (None, "")]
    if _torch_version(rf) is None:
        gone.append("torch version missing (pretty_env_info)")
    return gone


def require(rf: ResultsFile) -> None:
    gone = missing(rf)
    if gone:
        raise ProvenanceError(
            f"{rf.label}: no provenance ({'; '.join(gone)}); its rows are not written. "
            "Evaluate with `lm_eval --model pi_llama ...`, which records them"
        )


def row_id(rf: ResultsFile) -> RowId:
    require(rf)
    pv, ft = _pieval(rf), _finetune(rf)
    model = str(pv["pretrained"])
    return RowId(
        model=model,
        base_model=str(ft.get("base_model") or model),
        method=method_label(pv, ft),
        L=int(ft.get("base_window") or pv["base_window"]),
        L_prime=int(pv["context_length"]),
        steps=int(ft.get("steps", 0)),
    )


_TORCH_RE = re.compile(r"^PyTorch version: (\S+)", re.MULTILINE)


def _torch_version(rf: ResultsFile) -> str | None:
    m = _TORCH_RE.search(str(rf.data.get("pretty_env_info") or ""))
    return m.group(1) if m else _pieval(rf).get("torch_version")


def _first(*values):
    return next((v for v in values if v not in (None, "", [], {})), None)


def _n_samples(rf: ResultsFile, task: str):
    return (rf.data.get("n-samples", {}).get(task) or {}).get("effective")


def _truncation(max_doc_tokens, cut=None) -> str:
    if not max_doc_tokens:
        return "none"
    return f"first {max_doc_tokens} tokens" + (f" ({cut} docs cut)" if cut is not None else "")



# What each kind of task records about its data (the task metadata written into the
# results JSON's ``configs`` section); a task that does not use a field leaves it empty.
# Each function is the ``fields`` of one or more entries of `tables.TABLES`.
TASK_FIELD_DEFAULTS = {"dataset": None, "dataset_revision": None, "docs": None, "stride": None, "truncation": "none", "seed": None}


def perplexity_fields(rf: ResultsFile, task: str) -> dict:
    meta = rf.task_metadata(task)
    corpus, scoring, documents = meta.get("corpus") or {}, meta.get("scoring") or {}, meta.get("documents") or {}
    data_path = _first(corpus.get("data_path"), meta.get("data_path"))
    hub = _first(corpus.get("dataset"), meta.get("dataset"))
    if not data_path and hub:
        hub = ":".join(str(p) for p in (hub, corpus.get("dataset_config"), corpus.get("dataset_split")) if p)
    return {
        "dataset": data_path or hub,
        "dataset_revision": _first(corpus.get("dataset_revision"), meta.get("dataset_revision")),
        "docs": _first(documents.get("scored"), _n_samples(rf, task)),
        "stride": _first(scoring.get("stride"), meta.get("stride")),
        "truncation": _truncation(_first(scoring.get("max_doc_tokens"), meta.get("max_doc_tokens")), documents.get("truncated")),
        "seed": corpus.get("sample_seed") if corpus.get("max_docs") else None,
    }


def passkey_fields(rf: ResultsFile, task: str) -> dict:
    meta = rf.task_metadata(task)
    return {
        "dataset": "generated passkey prompts",
        "docs": _n_samples(rf, task),
        "seed": meta.get("seed", PASSKEY_SEED),  # the task's default when --metadata gave none
    }


def govreport_fields(rf: ResultsFile, task: str) -> dict:
    meta = rf.task_metadata(task)
    return {
        "dataset": meta.get("data_path") or f"tau/scrolls:gov_report:{meta.get('split') or 'validation'}",
        "dataset_revision": None if meta.get("data_path") else meta.get("revision") or "main",
        "docs": _n_samples(rf, task),
        "truncation": _truncation(meta.get("max_doc_tokens", GOVREPORT_MAX_DOC_TOKENS)),
        "seed": rf.data["config"].get("random_seed"),
    }


def lmeval_task_fields(rf: ResultsFile, task: str) -> dict:
    cfg = rf.data["configs"].get(task) or {}
    name = ":".join(str(p) for p in (cfg.get("dataset_path"), cfg.get("dataset_name")) if p) or None
    return {
        "dataset": name,
        "dataset_revision": (cfg.get("dataset_kwargs") or {}).get("revision"),
        "docs": _n_samples(rf, task),
        "seed": rf.data["config"].get("random_seed"),
    }


def _date(rf: ResultsFile) -> str:
    d = rf.data["date"]
    if isinstance(d, (int, float)):
        return datetime.fromtimestamp(d, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(d)


def columns(rf: ResultsFile, task: str, fields: Callable[[ResultsFile, str], dict]) -> dict[str, object]:
    """The provenance columns of ``task``'s row; ``fields``: its table's (`tables.Table.fields`)."""
    require(rf)
    pv, cfg = _pieval(rf), rf.data["config"]
    task_fields = {**TASK_FIELD_DEFAULTS, **fields(rf, task)}
    return {
        "model_revision": cfg.get("model_revision"),
        "model_sha": _first(pv.get("model_sha"), cfg.get("model_sha")),
        "rope_type": pv["rope_type"],
        "factor": float(pv["factor"]),
        "theta": float(pv["theta"]),
        "dtype": pv["dtype"],
        "attn_implementation": pv["attn_implementation"],
        **task_fields,
        "lm_eval_version": rf.data["lm_eval_version"],
        "transformers_version": rf.data["transformers_version"],
        "torch_version": _torch_version(rf),
        "pieval_version": pv["pieval_version"],
        "date": _date(rf),
        "results_file": rf.label,
    }
