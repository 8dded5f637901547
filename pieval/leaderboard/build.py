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
    parts: dict[str, dict[str, str]] = field(default_factory=dict)  # table name -> {part: file stem}

    def measured_rows(self) -> int:
        return sum(int((t["source"] == "measured").sum()) for t in self.tables.values())

    def files_of(self, table: tables.Table) -> list[tuple[str, str]]:
        """(part, file stem) of every file built for ``table``, in part order."""
        return sorted(self.parts.get(table.name, {}).items())


def build(roots: list[str | Path], with_reference: bool = True) -> Leaderboard:
    problems: list[Problem] = []
    files = list(iter_results(roots, problems))
    cells = tables.collect(files, problems)
    board = Leaderboard({}, {}, files, problems)
    for table in tables.TABLES:
        _add(board, table, cells[table.name], table.reference() if with_reference and table.reference else {})
    return board


def _add(board: Leaderboard, table: tables.Table, cells: list[tables.Cell], refs: dict[str, reference.Rows]) -> None:
    """The table's files: one per part (dataset) its measured cells or reference rows have."""
    by_part: dict[str, list[tables.Cell]] = {}
    for cell in cells:
        part, keyed = table.part(cell)
        by_part.setdefault(part, []).append(keyed)
    for part in sorted(set(by_part) | set(refs)):
        mine, ref = by_part.get(part, []), refs.get(part)
        if table.metric_columns is not None:
            value_columns = list(table.metric_columns)
        elif table.column_order is not None:
            value_columns = table.column_order(mine)
        else:
            value_columns = _windows(mine, ref)
        frame = tables.assemble(mine, table.key_columns, value_columns, board.problems)
        if ref is not None and ref.records:
            ref_frame = pd.DataFrame.from_records(ref.records, columns=tables.columns(table.key_columns, value_columns))
            frame = pd.concat([frame, ref_frame], ignore_index=True) if len(frame) else ref_frame
        if len(frame):
            stem = table.stem(part)
            board.tables[stem] = _sorted(frame, table.key_columns)
            board.metric_columns[stem] = value_columns
            board.parts.setdefault(table.name, {})[part] = stem


def _windows(cells: list[tables.Cell], ref: reference.Rows | None) -> list[str]:
    """Every evaluation window measured or in the paper's table, in numeric order."""
    return [str(w) for w in sorted({int(c.column) for c in cells} | {int(w) for w in (ref.columns if ref else ())})]


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
