"""The paper's own numbers as leaderboard rows (``source=reference``), from package data.

`paper_reference.yaml` ships inside the wheel (it sits in the package). Reference rows share
the measured tables' columns so a user sees their model beside LLaMA-7B PI, but they carry no
provenance columns, only the paper table in ``reference``, and are never merged with measured
rows. Each function here is the ``reference`` of one entry of `tables.TABLES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

DATA = "paper_reference.yaml"
# Last column of every table: the paper table a reference row comes from (empty for measured rows).
REFERENCE_COLUMN = "reference"
# The table's only part when it is not split by dataset (see `tables.Table.per_dataset`).
WHOLE = ""


@dataclass(frozen=True)
class Rows:
    """A paper table's rows as records, and the metric columns that table has (its windows)."""

    records: list[dict]
    columns: tuple[str, ...] = ()


@cache
def data() -> dict:
    return yaml.safe_load(resources.files("pieval.leaderboard").joinpath(DATA).read_text(encoding="utf-8"))


def _row(d: dict, table: str, method: str, context_length: int, steps: int | None) -> dict:
    model = d["model"]
    return {
        "source": "reference",
        "model": model,
        "base_model": model,
        "method": method,
        "L": data()["base_window"],
        "L'": context_length,
        "steps": steps,
        REFERENCE_COLUMN: f"{data()['citation']} {table}",
    }


def _steps(method: str) -> int | None:
    return data()["steps"].get(method)


def perplexity() -> dict[str, Rows]:
    """Tables 1 (pg19) and 2 (proofpile), by dataset; other datasets have no reference rows."""
    out = {}
    for dataset, ref in data()["perplexity"].items():
        records = []
        for r in ref["rows"]:
            row = _row(r, ref["table"], r["method"], r["context_length"], _steps(r["method"]))
            row.update({str(w): v for w, v in zip(ref["windows"], r["ppl"])})
            records.append(row)
        out[dataset] = Rows(records, tuple(str(w) for w in ref["windows"]))
    return out


def ppl_vs_steps() -> dict[str, Rows]:
    """Table 3: PG-19 perplexity at W = L' after each number of PI fine-tuning steps."""
    ref = data()["ppl_vs_steps"]
    records = [
        {**_row(r, ref["table"], r["method"], r["context_length"], step), "benchmark": ref["dataset"], "window": r["context_length"], "ppl": ppl}
        for r in ref["rows"]
        for step, ppl in zip(ref["steps"], r["ppl"])
    ]
    return {WHOLE: Rows(records)}


def passkey() -> dict[str, Rows]:
    """Table 4: k_max at target length L' after each number of fine-tuning steps."""
    ref = data()["passkey"]
    records = [
        {**_row(r, ref["table"], r["method"], r["context_length"], step), "length": r["context_length"], "k_max": k}
        for r in ref["rows"]
        for step, k in zip(ref["steps"], r["k_max"])
        if k is not None
    ]
    return {WHOLE: Rows(records)}


def original_window() -> dict[str, Rows]:
    """Table 5: zero-shot accuracy (%) at the original window."""
    ref = data()["original_window"]
    records = [
        {**_row(r, ref["table"], r["method"], r["context_length"], _steps(r["method"])), **dict(zip(ref["columns"], r["acc"]))}
        for r in ref["rows"]
    ]
    return {WHOLE: Rows(records)}


def govreport() -> dict[str, Rows]:
    """Table 6: ROUGE-1/2/L (%) on GovReport."""
    ref = data()["govreport"]
    records = [
        {**_row(r, ref["table"], r["method"], r["context_length"], _steps(r["method"])), **dict(zip(ref["columns"], r["rouge"]))}
        for r in ref["rows"]
    ]
    return {WHOLE: Rows(records)}
