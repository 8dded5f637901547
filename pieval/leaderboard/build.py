"""Results directories -> every leaderboard table, then deterministic CSV files.

Same inputs, same bytes: rows in a fixed order (measured before reference, then by model,
method, windows, steps; stable sort), one float format per kind of column, ``\\n`` line ends,
and each file written atomically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pieval import atomic
from pieval.leaderboard import reference, tables
from pieval.leaderboard.results import Problem, ResultsFile, iter_results

METRIC_FORMAT = "{:.4f}"  # perplexity, accuracy %, ROUGE %, passkey success rate
# Row order: measured before reference; per base model the paper's order of methods
# (base, direct fine-tuning, PI, other rope methods), then windows and steps.
_SOURCE_ORDER = {"measured": 0, "reference": 1}
METHOD_ORDER = {"base": 0, "FT": 1, "PI": 2}


@dataclass
class Leaderboard:
    tables: dict[str, pd.DataFrame]  # file stem -> rows (measured and reference)
    metric_columns: dict[str, list[str]]  # file stem -> its metric columns
    files: list[ResultsFile] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def measured_rows(self) -> int:
        return sum(int((t["source"] == "measured").sum()) for t in self.tables.values())


def build(roots: list[str | Path], with_reference: bool = True) -> Leaderboard:
    problems: list[Problem] = []
    files = list(iter_results(roots, problems))
    cells = tables.collect(files, problems)
    board = Leaderboard({}, {}, files, problems)

    def add(name: str, key_columns: tuple[str, ...], value_columns: list[str], measured: list, ref: pd.DataFrame | None):
        frame = tables.assemble(measured, key_columns, value_columns, problems)
        if with_reference and ref is not None and len(ref):
            frame = pd.concat([frame, ref], ignore_index=True) if len(frame) else ref
        if len(frame):
            board.tables[name] = _sorted(frame, key_columns)
            board.metric_columns[name] = value_columns

    ppl = cells["perplexity"]
    datasets = {c.key[0] for c in ppl} | (set(reference.data()["perplexity"]) if with_reference else set())
    for dataset in sorted(datasets):
        mine = [c for c in ppl if c.key[0] == dataset]
        ref_windows = reference.data()["perplexity"].get(dataset, {}).get("windows", []) if with_reference else []
        windows = [str(w) for w in sorted({int(c.column) for c in mine} | set(ref_windows))]
        measured = [tables.Cell(c.rid, (), c.column, c.value, c.date, c.prov) for c in mine]
        add(f"ppl_{dataset}", (), windows, measured, reference.perplexity(dataset, (), windows))

    add("ppl_vs_steps", ("benchmark", "window"), ["ppl"], tables.ppl_vs_steps(ppl), reference.ppl_vs_steps(("benchmark", "window")))
    add("passkey", ("length",), list(tables.PASSKEY_METRICS), cells["passkey"], reference.passkey(("length",)))
    add("govreport", (), list(tables.ROUGE_METRICS), cells["govreport"], reference.govreport())
    ow = list(tables.ORIGINAL_WINDOW_COLUMNS)
    add("original_window", (), ow, cells["original_window"], reference.original_window(ow))
    return board


def _sorted(frame: pd.DataFrame, key_columns: tuple[str, ...]) -> pd.DataFrame:
    order = frame.assign(
        _source=frame["source"].map(_SOURCE_ORDER), _method=frame["method"].map(lambda m: METHOD_ORDER.get(m, 3))
    )
    by = ["_source", "base_model", "_method", "method", "L", "L'", "steps", "model", *key_columns]
    order = order.sort_values(by, kind="mergesort", na_position="last", key=_sort_key)
    return order.drop(columns=["_source", "_method"]).reset_index(drop=True)


def _sort_key(col: pd.Series) -> pd.Series:
    # a column mixing numbers and text sorts as text; numbers stay numeric
    if col.dtype == object:
        return col.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return col


def _cell(value, column: str, metric_columns: set[str]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        return value
    if column in tables.INT_COLUMNS:
        return str(int(value))
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if column in metric_columns:
        return METRIC_FORMAT.format(value)
    if isinstance(value, float):
        return format(value, ".10g")  # factor, theta: shortest exact form
    return str(value)


def csv_text(frame: pd.DataFrame, metric_columns: list[str]) -> str:
    metrics = set(metric_columns)
    text = frame.apply(lambda col: col.map(lambda v: _cell(v, col.name, metrics))).astype(str)
    return text.to_csv(index=False, lineterminator="\n")


def write(board: Leaderboard, out_dir: str | Path) -> list[Path]:
    """``<out_dir>/<table>.csv`` for every table, each written atomically; returns the paths."""
    out_dir = Path(out_dir)
    paths = []
    for name in sorted(board.tables):
        path = out_dir / f"{name}.csv"
        atomic.write_text(path, csv_text(board.tables[name], board.metric_columns[name]))
        paths.append(path)
    return paths
