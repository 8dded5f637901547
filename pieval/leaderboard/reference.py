"""The paper's own numbers as leaderboard rows (``source=reference``), from package data.

`paper_reference.yaml` ships inside the wheel (it sits in the package). Reference rows share
the measured tables' columns so a user sees their model beside LLaMA-7B PI, but they carry no
provenance columns, only the paper table in ``reference``, and are never merged with measured
rows.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import pandas as pd
import yaml

from pieval.leaderboard import tables

DATA = "paper_reference.yaml"


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
        tables.REFERENCE_COLUMN: f"{data()['citation']} {table}",
    }


def _steps(method: str) -> int | None:
    return data()["steps"].get(method)


def perplexity(dataset: str, key_columns: tuple[str, ...], value_columns: list[str]) -> pd.DataFrame:
    """Tables 1 (pg19) and 2 (proofpile); other datasets have no reference rows."""
    ref = data()["perplexity"].get(dataset)
    records = []
    if ref:
        for r in ref["rows"]:
            row = _row(r, ref["table"], r["method"], r["context_length"], _steps(r["method"]))
            row.update({str(w): v for w, v in zip(ref["windows"], r["ppl"])})
            records.append(row)
    return _frame(records, key_columns, value_columns)


def ppl_vs_steps(key_columns: tuple[str, ...]) -> pd.DataFrame:
    """Table 3: PG-19 perplexity at W = L' after each number of PI fine-tuning steps."""
    ref = data()["ppl_vs_steps"]
    records = [
        {**_row(r, ref["table"], r["method"], r["context_length"], step), "benchmark": ref["dataset"], "window": r["context_length"], "ppl": ppl}
        for r in ref["rows"]
        for step, ppl in zip(ref["steps"], r["ppl"])
    ]
    return _frame(records, key_columns, ["ppl"])


def passkey(key_columns: tuple[str, ...]) -> pd.DataFrame:
    """Table 4: k_max at target length L' after each number of fine-tuning steps."""
    ref = data()["passkey"]
    records = [
        {**_row(r, ref["table"], r["method"], r["context_length"], step), "length": r["context_length"], "k_max": k}
        for r in ref["rows"]
        for step, k in zip(ref["steps"], r["k_max"])
        if k is not None
    ]
    return _frame(records, key_columns, list(tables.PASSKEY_METRICS))


def original_window(value_columns: list[str]) -> pd.DataFrame:
    """Table 5: zero-shot accuracy (%) at the original window."""
    ref = data()["original_window"]
    records = [
        {**_row(r, ref["table"], r["method"], r["context_length"], _steps(r["method"])), **dict(zip(ref["columns"], r["acc"]))}
        for r in ref["rows"]
    ]
    return _frame(records, (), value_columns)


def govreport() -> pd.DataFrame:
    """Table 6: ROUGE-1/2/L (%) on GovReport."""
    ref = data()["govreport"]
    records = [
        {**_row(r, ref["table"], r["method"], r["context_length"], _steps(r["method"])), **dict(zip(tables.ROUGE_METRICS, r["rouge"]))}
        for r in ref["rows"]
    ]
    return _frame(records, (), list(tables.ROUGE_METRICS))


def _frame(records: list[dict], key_columns: tuple[str, ...], value_columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame.from_records(records, columns=tables.columns(key_columns, value_columns))
