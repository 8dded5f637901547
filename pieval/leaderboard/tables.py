"""lm-eval results -> the paper's tables, one pandas frame each; `TABLES` is the registry of tables.

Every metric value becomes a `Cell` keyed by the model's `RowId`, a table-specific key and a
column; cells of the same row merge across results files (a model's windows may come from
several runs), the newest run winning a cell measured twice. Each row carries the
provenance of the cells it shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import pandas as pd

from pieval import protocol
from pieval.leaderboard import provenance, reference
from pieval.leaderboard.reference import REFERENCE_COLUMN
from pieval.leaderboard.results import Problem, ResultsFile

ID_COLUMNS = ("source", "model", "base_model", "method", "L", "L'", "steps")
INT_COLUMNS = frozenset({"L", "L'", "steps", "length", "k_max", "k_tested", "window", "docs", "stride", "seed"})
ROUGE_METRICS = ("rouge1", "rouge2", "rougeL")
PASSKEY_METRICS = ("k_max", "k_tested", "acc")
# Original-window columns in the paper's order; lm-eval's `race` is RACE-high (dataset_name: high).
ORIGINAL_WINDOW_COLUMNS = ("boolq", "piqa", "race_m", "race_h", "winogrande")
# lm_eval task -> column; RACE-middle appears in the paper's reference rows only.
ORIGINAL_WINDOW_TASK_COLUMN = {t: "race_h" if t == "race" else t for t in protocol.ORIGINAL_WINDOW_TASKS}


@dataclass(frozen=True)
class Cell:
    rid: provenance.RowId
    key: tuple  # the table's extra row key, e.g. (dataset,) or (length,)
    column: str
    value: float
    date: str  # newest wins when a cell is measured twice
    prov: dict = field(compare=False)


def metrics(rf: ResultsFile, task: str) -> dict[str, object]:
    """``{metric: value}`` of one task, lm-eval's ``metric,filter`` keys reduced to the metric.

    The ``none`` filter wins when a task reports several filters of the same metric.
    """
    out: dict[str, object] = {}
    for key, value in sorted(rf.task_results(task).items(), key=lambda kv: kv[0].split(",")[-1] != "none"):
        name, _, filt = key.partition(",")
        if filt and not name.endswith("_stderr"):
            out.setdefault(name, value)
    return out


def _number(value, what: str, rf: ResultsFile, task: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{rf.label}: {task} {what} is {value!r}, not a number") from None


def _suffix_ints(names: Iterable[str], prefix: str) -> list[int]:
    return sorted({int(n[len(prefix) :]) for n in names if n.startswith(prefix) and n[len(prefix) :].isdigit()})


def perplexity_cells(rf: ResultsFile, task: str, prov: dict) -> list[Cell]:
    """``token_ppl_<W>`` of a sliding-window perplexity task, one cell per window W."""
    m = metrics(rf, task)
    windows = sorted({w for p in ("token_ppl_", "window_ppl_", "bpb_", "scored_tokens_") for w in _suffix_ints(m, p)})
    lacking = [w for w in windows if f"token_ppl_{w}" not in m]
    if lacking:
        raise ValueError(
            f"{rf.label}: {task} has no token_ppl_{lacking[0]} (windows {lacking}) though other metrics "
            "of that window are there; re-run the task with pieval's perplexity tasks"
        )
    rid, dataset = provenance.row_id(rf), dataset_name(task)
    return [
        Cell(rid, (dataset,), str(w), _number(m[f"token_ppl_{w}"], f"token_ppl_{w}", rf, task), prov["date"], prov)
        for w in windows
    ]


def passkey_cells(rf: ResultsFile, task: str, prov: dict) -> list[Cell]:
    """k_max, acc and (in results that report it) k_tested, the farthest distance tested, per length."""
    m = metrics(rf, task)
    cells, rid = [], provenance.row_id(rf)
    for length in _suffix_ints(m, "k_max_"):
        if f"acc_{length}" not in m:
            raise ValueError(f"{rf.label}: {task} has k_max_{length} but no acc_{length}")
        for col in PASSKEY_METRICS:
            name = f"{col}_{length}"
            if name in m:
                cells.append(Cell(rid, (length,), col, _number(m[name], name, rf, task), prov["date"], prov))
    return cells


def govreport_cells(rf: ResultsFile, task: str, prov: dict) -> list[Cell]:
    m = metrics(rf, task)
    lacking = [r for r in ROUGE_METRICS if r not in m]
    if lacking:
        raise ValueError(f"{rf.label}: {task} reports {sorted(m)} but not {', '.join(lacking)}")
    rid = provenance.row_id(rf)
    # rouge-score F-measures are fractions; the paper (and this table) shows percent
    return [Cell(rid, (), r, 100.0 * _number(m[r], r, rf, task), prov["date"], prov) for r in ROUGE_METRICS]


def accuracy_cells(column_of: Mapping[str, str]) -> Callable[[ResultsFile, str, dict], list[Cell]]:
    """The cells function of a table of lm-eval tasks that report ``acc``: task -> its column."""

    def cells(rf: ResultsFile, task: str, prov: dict) -> list[Cell]:
        m = metrics(rf, task)
        if "acc" not in m:
            raise ValueError(f"{rf.label}: {task} has no acc metric (has {sorted(m)})")
        value = 100.0 * _number(m["acc"], "acc", rf, task)  # percent, as the paper prints it
        return [Cell(provenance.row_id(rf), (), column_of[task], value, prov["date"], prov)]

    return cells


def dataset_name(task: str) -> str:
    """pg19_ppl -> pg19: the table name ``ppl_<dataset>.csv``."""
    return task.removesuffix("_ppl")


def ppl_vs_steps(ppl_cells: list[Cell]) -> list[Cell]:
    """Perplexity at the target window W = L' of every extended or fine-tuned model (the paper's Table 3).

    An unmodified model run at L' > L is kept too: it is step 0 of direct fine-tuning (FT).
    """
    return [
        Cell(c.rid, (*c.key, int(c.column)), "ppl", c.value, c.date, c.prov)
        for c in ppl_cells
        if int(c.column) == c.rid.L_prime and (c.rid.method != "base" or c.rid.steps > 0 or c.rid.L_prime > c.rid.L)
    ]


# The method comparison (`pieval compare`): after the perplexity windows, how much perplexity
# grew from W = L to the largest window, then passkey at the longest length the run tested.
PPL_GROWTH = "ppl_growth"
COMPARISON_PASSKEY = ("length", "k_max", "k_tested", "acc")


def method_comparison(ppl_cells: list[Cell], passkey_cells: list[Cell]) -> list[Cell]:
    """Every model that was not fine-tuned (as saved, or a rope method at its L'), one row per benchmark.

    ``ppl_growth`` = perplexity at the row's largest window / at W = L: the paper's "direct
    extrapolation explodes, PI stays finite" (Sec. 3.2) as one number per method. Passkey comes
    from the longest length the run tested (compare runs it at L'), so the saved model's row,
    whose L' is its own L, still shows retrieval at the target length.
    """
    ppl = [c for c in ppl_cells if c.rid.steps == 0]
    windows: dict[tuple, dict[int, Cell]] = {}
    for c in ppl:
        windows.setdefault((c.rid, c.key), {})[int(c.column)] = c
    out = list(ppl)
    for (rid, key), by_w in windows.items():
        top = max(by_w)
        if rid.L in by_w and top > rid.L and by_w[rid.L].value > 0:
            c = by_w[top]
            out.append(Cell(rid, key, PPL_GROWTH, c.value / by_w[rid.L].value, c.date, c.prov))
    benchmarks: dict[provenance.RowId, set[tuple]] = {}
    for rid, key in windows:
        benchmarks.setdefault(rid, set()).add(key)
    passkey = [c for c in passkey_cells if c.rid.steps == 0]
    longest = {c.rid: c.key[0] for c in sorted(passkey, key=lambda c: c.key[0])}
    for c in passkey:
        if c.key[0] != longest[c.rid]:
            continue
        for key in sorted(benchmarks.get(c.rid, {(None,)}), key=str):  # a run without perplexity: one row
            if c.column == "k_max":
                out.append(Cell(c.rid, key, "length", float(c.key[0]), c.date, c.prov))
            out.append(Cell(c.rid, key, c.column, c.value, c.date, c.prov))
    return out


def comparison_columns(cells: list[Cell]) -> list[str]:
    names = {c.column for c in cells}
    windows = sorted(int(n) for n in names if n.isdigit())
    return [*map(str, windows), *(n for n in (PPL_GROWTH, *COMPARISON_PASSKEY) if n in names)]


@dataclass(frozen=True)
class Table:
    """One leaderboard table: the tasks it takes, its cells and their provenance, the paper's rows, its plots.

    A table either takes tasks (``takes``, ``cells``, ``fields``) or is drawn from the cells of
    the table named ``of`` (``derive``). `build`, `provenance.columns` and `plots` only iterate
    over `TABLES`, so a new table is one entry there.
    """

    name: str  # CSV file stem; with per_dataset, its prefix: <name>_<dataset>.csv
    key_columns: tuple[str, ...] = ()  # the row key after the model's columns, e.g. ("length",)
    metric_columns: tuple[str, ...] | None = None  # None: one per evaluation window its cells and reference rows have
    takes: Callable[[ResultsFile, str], bool] | None = None  # is this task's result one of this table's?
    cells: Callable[[ResultsFile, str, dict], list[Cell]] | None = None  # (file, task, provenance) -> cells
    fields: Callable[[ResultsFile, str], dict] | None = None  # the task's data provenance (provenance.py)
    of: tuple[str, ...] | None = None  # tables that take tasks, whose cells ``derive`` turns into this one's
    derive: Callable[..., list[Cell]] | None = None  # (cells of each table in ``of``) -> this table's cells
    column_order: Callable[[list[Cell]], list[str]] | None = None  # metric columns when not fixed; default: windows
    per_dataset: bool = False  # one file per dataset: the first element of each cell's key
    reference: Callable[[], dict[str, reference.Rows]] | None = None  # the paper's rows by dataset (reference.WHOLE)
    plots: tuple[str, ...] = ()  # functions of pieval.leaderboard.plots, named so matplotlib loads only for --plots

    def __post_init__(self):
        if (self.of is None) == (self.takes is None) or (self.of is None) != (self.derive is None):
            raise ValueError(f"table {self.name}: give takes, cells and fields, or of and derive")
        if self.of is None and (self.cells is None or self.fields is None):
            raise ValueError(f"table {self.name}: a table that takes tasks needs cells and fields")

    def part(self, cell: Cell) -> tuple[str, Cell]:
        """(the file part a cell goes to, the cell keyed within that file)."""
        if not self.per_dataset:
            return reference.WHOLE, cell
        return cell.key[0], Cell(cell.rid, cell.key[1:], cell.column, cell.value, cell.date, cell.prov)

    def stem(self, part: str) -> str:
        return f"{self.name}_{part}" if self.per_dataset else self.name


def _has_metric(prefix: str) -> Callable[[ResultsFile, str], bool]:
    return lambda rf, task: any(n.startswith(prefix) for n in metrics(rf, task))


def _perplexity_task(rf: ResultsFile, task: str) -> bool:
    return _has_metric("token_ppl_")(rf, task) or task.endswith("_ppl")


# The paper's tables in build order. A task goes to the first table whose ``takes`` accepts it.
TABLES: tuple[Table, ...] = (
    Table(  # Tables 1 and 2
        "ppl",
        takes=_perplexity_task,
        cells=perplexity_cells,
        fields=provenance.perplexity_fields,
        per_dataset=True,
        reference=reference.perplexity,
        plots=("ppl_vs_window",),
    ),
    Table(  # Table 3
        "ppl_vs_steps",
        key_columns=("benchmark", "window"),
        metric_columns=("ppl",),
        of=("ppl",),
        derive=ppl_vs_steps,
        reference=reference.ppl_vs_steps,
        plots=("ppl_vs_steps",),
    ),
    Table(  # Table 4
        "passkey",
        key_columns=("length",),
        metric_columns=PASSKEY_METRICS,
        takes=_has_metric("k_max_"),
        cells=passkey_cells,
        fields=provenance.passkey_fields,
        reference=reference.passkey,
        plots=("kmax_vs_steps", "passkey_heatmaps"),
    ),
    Table(  # Table 6
        "govreport",
        metric_columns=ROUGE_METRICS,
        takes=lambda rf, task: task.startswith("govreport"),
        cells=govreport_cells,
        fields=provenance.govreport_fields,
        reference=reference.govreport,
    ),
    Table(  # Table 5
        "original_window",
        metric_columns=ORIGINAL_WINDOW_COLUMNS,
        takes=lambda rf, task: task in ORIGINAL_WINDOW_TASK_COLUMN,
        cells=accuracy_cells(ORIGINAL_WINDOW_TASK_COLUMN),
        fields=provenance.lmeval_task_fields,
        reference=reference.original_window,
    ),
    Table(  # no table of the paper: rope methods side by side without fine-tuning (`pieval compare`)
        "methods",
        key_columns=("benchmark",),
        of=("ppl", "passkey"),
        derive=method_comparison,
        column_order=comparison_columns,
        plots=("methods",),
    ),
)
BY_NAME = {t.name: t for t in TABLES}


def table_of(rf: ResultsFile, task: str) -> Table | None:
    """Which table a task's results go to (None: a task the leaderboard does not tabulate)."""
    return next((t for t in TABLES if t.takes is not None and t.takes(rf, task)), None)


def collect(files: Iterable[ResultsFile], problems: list[Problem]) -> dict[str, list[Cell]]:
    """All cells by table name; a file or task that cannot give a row becomes a `Problem`."""
    cells: dict[str, list[Cell]] = {t.name: [] for t in TABLES}
    for rf in files:
        tasks = [(t, table_of(rf, t)) for t in sorted(rf.data["results"])]
        tasks = [(t, table) for t, table in tasks if table]
        if not tasks:
            names = ", ".join(sorted(rf.data["results"])) or "none"
            problems.append(Problem(rf.label, f"{rf.label}: none of its tasks ({names}) is one the leaderboard tabulates"))
            continue
        gone = provenance.missing(rf)
        if gone:
            problems.append(
                Problem(
                    rf.label,
                    f"{rf.label}: no provenance ({'; '.join(gone)}), so its rows "
                    f"({', '.join(t for t, _ in tasks)}) are not written; evaluate with `lm_eval --model pi_llama`",
                )
            )
            continue
        for task, table in tasks:
            try:
                cells[table.name] += table.cells(rf, task, provenance.columns(rf, task, table.fields))
            except ValueError as e:
                problems.append(Problem(rf.label, f"{e}; that row is not written"))
    for table in TABLES:
        if table.of is not None:
            cells[table.name] = table.derive(*(cells[name] for name in table.of))
    return cells


def _merge_provenance(provs: dict[str, dict]) -> dict:
    """One provenance per row; a field that differs between the row's cells lists its values, each
    after the columns that have it (``256,512=a.json; 1024=b.json``)."""
    merged = {}
    for col in provenance.COLUMNS:
        groups: dict[str, list[str]] = {}
        for label, p in provs.items():
            v = p.get(col)
            groups.setdefault(repr(v), []).append(label)
        if len(groups) == 1:
            merged[col] = next(iter(provs.values())).get(col)
        else:
            merged[col] = "; ".join(
                f"{','.join(labels)}={'' if provs[labels[0]].get(col) is None else provs[labels[0]].get(col)}"
                for labels in groups.values()
            )
    return merged


def assemble(
    cells: list[Cell], key_columns: tuple[str, ...], value_columns: list[str], problems: list[Problem]
) -> pd.DataFrame:
    """Measured rows: one per (RowId, key); newest cell per column; provenance of the cells shown."""
    rows: dict[tuple, dict[str, Cell]] = {}
    for cell in sorted(cells, key=lambda c: (c.date, c.prov["results_file"])):
        row = rows.setdefault((cell.rid, cell.key), {})
        if cell.column in row:
            old = row[cell.column].prov["results_file"]
            problems.append(
                Problem(
                    old,
                    f"{old}: {cell.column} of {cell.rid.model} superseded by the newer {cell.prov['results_file']}",
                    skipped=False,
                )
            )
        row[cell.column] = cell
    records = []
    for (rid, key), row in rows.items():
        records.append(
            {
                "source": "measured",
                "model": rid.model,
                "base_model": rid.base_model,
                "method": rid.method,
                "L": rid.L,
                "L'": rid.L_prime,
                "steps": rid.steps,
                **dict(zip(key_columns, key)),
                **{col: row[col].value if col in row else None for col in value_columns},
                **_merge_provenance({col: row[col].prov for col in value_columns if col in row}),
            }
        )
    return pd.DataFrame.from_records(records, columns=columns(key_columns, value_columns))


def columns(key_columns: tuple[str, ...], value_columns: list[str]) -> list[str]:
    return [*ID_COLUMNS, *key_columns, *value_columns, *provenance.COLUMNS, REFERENCE_COLUMN]


def is_number(value) -> bool:
    """A numeric cell (reference cells such as ">1000" and empty cells are not)."""
    return isinstance(value, (int, float)) and not math.isnan(value)
