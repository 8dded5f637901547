"""The leaderboard's figures (PNG + SVG), drawn headless with matplotlib's Agg backend.

Measured rows only: reference rows live at another scale (LLaMA, L = 2048) and stay in the
tables. SVG text is kept as text (``svg.fonttype = none``) so labels are searchable. Each
entry of `tables.TABLES` names its plots: functions here of ``(board, table, out_dir)``.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pieval import atomic  # noqa: E402
from pieval.leaderboard import provenance, tables  # noqa: E402
from pieval.leaderboard.build import METHOD_ORDER, Leaderboard  # noqa: E402
from pieval.leaderboard.heatmap import heat_map  # noqa: E402
from pieval.leaderboard.results import Problem, ResultsError, read_samples  # noqa: E402

RC = {"svg.fonttype": "none", "svg.hashsalt": "pieval", "figure.dpi": 100}
WINDOW_LABEL = "evaluation window W (tokens)"
PPL_LABEL = "perplexity (token-weighted, log scale)"
STEPS_LABEL = "fine-tune steps"
KMAX_LABEL = "passkey k_max (tokens)"
DISTANCE_LABEL = "passkey distance k from the end (tokens)"


def _label(row) -> str:
    steps = f", {int(row['steps'])} steps" if row["steps"] else ""
    context = int(row["L'"])
    return f"{row['model']} {row['method']} L'={context}{steps}"


def save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else {"Software": None})
        path = out_dir / f"{stem}.{ext}"
        atomic.write_bytes(path, buf.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


def _measured(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["source"] == "measured"]


def _each_file(plot: Callable[[pd.DataFrame, list[str], str, Path], list[Path]]):
    """``plot(frame, metric_columns, part, out_dir)`` as a table's plot: once per file with measured rows."""

    def draw(board: Leaderboard, table: tables.Table, out_dir: Path) -> list[Path]:
        paths = []
        for part, stem in board.files_of(table):
            if len(_measured(board.tables[stem])):
                paths += plot(board.tables[stem], board.metric_columns[stem], part, out_dir)
        return paths

    return functools.wraps(plot)(draw)


@_each_file
def ppl_vs_window(frame: pd.DataFrame, windows: list[str], dataset: str, out_dir: Path) -> list[Path]:
    """One line per model: perplexity over evaluation windows; L dashed, L' dotted."""
    rows = _measured(frame)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _, row in rows.iterrows():
        xs = [int(w) for w in windows if tables.is_number(row[w])]
        ax.plot(xs, [float(row[str(w)]) for w in xs], marker="o", label=_label(row))
    for L in sorted(set(rows["L"])):
        ax.axvline(L, color="k", linestyle="--", linewidth=0.8)
        ax.annotate(f" L={int(L)}", (L, 0), xycoords=("data", "axes fraction"), ha="left", va="bottom", fontsize=8)
    for Lp in sorted(set(rows["L'"]) - set(rows["L"])):
        ax.axvline(Lp, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(f"L'={int(Lp)} ", (Lp, 0), xycoords=("data", "axes fraction"), ha="right", va="bottom", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(w) for w in windows], windows)
    _log_y(ax)
    ax.set_xlabel(WINDOW_LABEL)
    ax.set_ylabel(PPL_LABEL)
    ax.set_title(f"{dataset}: perplexity vs evaluation window")
    ax.legend(fontsize=7)
    return save(fig, out_dir, f"ppl_vs_window_{_slug(dataset)}")


def _with_ft_start(rows: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """Direct fine-tuning starts from the unmodified model, whose step-0 row says method "base":
    that row (same base model, L' and group keys) becomes the first point of the FT line."""
    start = rows[(rows["method"] == "base") & (rows["steps"] == 0)]
    keys = ["base_model", "L'", *(k for k in group if k not in ("base_model", "method"))]
    ft = rows.loc[rows["method"] == "FT", keys].drop_duplicates()
    if ft.empty or start.empty:
        return rows
    marked = start.merge(ft, on=keys, how="left", indicator=True)  # one row per start row, in order
    starts_ft = marked["_merge"].eq("both").to_numpy()
    moved = marked[starts_ft].drop(columns="_merge").assign(method="FT")
    return pd.concat([rows.drop(start.index[starts_ft]), moved], ignore_index=True)


def _log_y(ax) -> None:
    """Log scale with plain numbers (28, 100, 300) instead of 3x10^1-style ticks."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))


def _lines(ax, rows: pd.DataFrame, group: list[str], x: str, y: str) -> None:
    rows = _with_ft_start(rows, group)
    for key, g in rows.groupby(group, sort=True):
        g = g.sort_values(x, kind="mergesort")
        ax.plot(g[x].astype(float), g[y].astype(float), marker="o", label=" ".join(str(k) for k in key))


@_each_file
def kmax_vs_steps(frame: pd.DataFrame, metric_columns: list[str], part: str, out_dir: Path) -> list[Path]:
    rows = _measured(frame)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _lines(ax, rows, ["base_model", "method", "length"], "steps", "k_max")
    for length in sorted(set(rows["length"])):
        ax.axhline(length, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel(STEPS_LABEL)
    ax.set_ylabel(KMAX_LABEL)
    ax.set_title("passkey effective window k_max vs fine-tune steps (dotted: target length)")
    ax.legend(fontsize=7, title="base model, method, length")
    return save(fig, out_dir, "kmax_vs_steps")


@_each_file
def ppl_vs_steps(frame: pd.DataFrame, metric_columns: list[str], part: str, out_dir: Path) -> list[Path]:
    rows = _measured(frame)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _lines(ax, rows, ["base_model", "method", "benchmark", "window"], "steps", "ppl")
    _log_y(ax)
    ax.set_xlabel(STEPS_LABEL)
    ax.set_ylabel("perplexity at W = L' (log scale)")
    ax.set_title("perplexity at the target window vs fine-tune steps")
    ax.legend(fontsize=7, title="base model, method, data, W")
    return save(fig, out_dir, "ppl_vs_steps")


def methods(board: Leaderboard, table: tables.Table, out_dir: Path) -> list[Path]:
    """One figure per benchmark: perplexity vs window per method (left), passkey k_max per method (right)."""
    paths = []
    for _, stem in board.files_of(table):
        frame = _measured(board.tables[stem])
        windows = [c for c in board.metric_columns[stem] if c.isdigit()]
        for benchmark, rows in frame.groupby(frame["benchmark"].fillna("passkey"), sort=True):
            paths += _methods_figure(rows, windows, str(benchmark), out_dir)
    return paths


def _methods_figure(rows: pd.DataFrame, windows: list[str], benchmark: str, out_dir: Path) -> list[Path]:
    one_model = rows["model"].nunique() == 1
    labels = [row["method"] if one_model else f"{row['model']} {row['method']}" for _, row in rows.iterrows()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    drawn = False
    for label, (_, row) in zip(labels, rows.iterrows()):
        xs = [int(w) for w in windows if tables.is_number(row.get(w))]
        context = int(row["L'"])
        if xs:
            left.plot(xs, [float(row[str(w)]) for w in xs], marker="o", label=f"{label} (L'={context})")
            drawn = True
    for L in sorted(set(rows["L"])):
        left.axvline(L, color="k", linestyle="--", linewidth=0.8)
    if drawn:
        left.set_xscale("log", base=2)
        left.set_xticks([int(w) for w in windows], windows)
        _log_y(left)
        left.legend(fontsize=7)
    left.set_xlabel(WINDOW_LABEL + ", L dashed")
    left.set_ylabel(PPL_LABEL)
    left.set_title(f"{benchmark}: perplexity vs window, no fine-tuning")
    has_kmax = "k_max" in rows and rows["k_max"].map(tables.is_number).any()
    if has_kmax:
        xs = np.arange(len(rows))
        tested = rows["k_tested"] if "k_tested" in rows else rows["length"]
        right.bar(xs, tested.astype(float), color="none", edgecolor="grey", label="farthest distance tested")
        right.bar(xs, rows["k_max"].astype(float), label="k_max")
        right.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
        if "acc" in rows:  # k_max is 0 as soon as the nearest distance misses: the success rate tells more
            for x, acc in zip(xs, rows["acc"]):
                if tables.is_number(acc):
                    right.annotate(f"acc {float(acc):.2f}", (x, 0), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
        right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)
        lengths = sorted({int(v) for v in rows["length"] if tables.is_number(v)})
        right.set_title(f"passkey k_max at length {', '.join(map(str, lengths))}")
    else:
        right.set_title("no passkey results")
    right.set_ylabel(KMAX_LABEL)
    fig.tight_layout()
    return save(fig, out_dir, f"methods_{_slug(benchmark)}")


def _run_label(rid: provenance.RowId) -> str:
    return f"{rid.model} {rid.method}" + (f" {rid.steps} steps" if rid.steps else "")


def _run_order(rid: provenance.RowId) -> tuple:
    return (rid.base_model, METHOD_ORDER.get(rid.method, len(METHOD_ORDER)), rid.method, rid.L_prime, rid.steps, rid.model)


def passkey_success(board: Leaderboard, problems: list[Problem]) -> dict[int, dict[provenance.RowId, dict[int, float]]]:
    """{length: {run: {k: success rate}}} from the passkey samples logs (--log_samples)."""
    out: dict[int, dict[provenance.RowId, dict[int, float]]] = {}
    for rf in board.files:
        for task, path in sorted(rf.samples.items()):
            if tables.table_of(rf, task) is not tables.BY_NAME["passkey"] or provenance.missing(rf):
                continue
            run = f"no heat map column for {_run_label(provenance.row_id(rf))} ({rf.label})"
            try:
                rates = heat_map(read_samples(rf, task))
            except ResultsError as e:
                problems.append(Problem(str(path), f"{run}: {e}"))
                continue
            except (KeyError, TypeError) as e:
                why = f"{path.name} is not a pieval passkey samples log ({type(e).__name__}: {e})"
                problems.append(Problem(str(path), f"{run}: {why}"))
                continue
            for length, by_k in rates.items():
                out.setdefault(length, {})[provenance.row_id(rf)] = by_k
    return out


def passkey_heatmap(length: int, runs: dict[provenance.RowId, dict[int, float]], out_dir: Path) -> list[Path]:
    """Success rate by distance k (rows) for each run (columns, base model / method / steps order)."""
    ks = sorted({k for by_k in runs.values() for k in by_k})
    order = sorted(runs, key=_run_order)
    grid = np.full((len(ks), len(order)), np.nan)
    for j, rid in enumerate(order):
        for i, k in enumerate(ks):
            grid[i, j] = runs[rid].get(k, np.nan)
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(order), 1.5 + 0.25 * len(ks)))
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(ks)), [str(k) for k in ks], fontsize=7)
    ax.set_xticks(range(len(order)), [_run_label(rid) for rid in order], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(DISTANCE_LABEL)
    ax.set_xlabel(f"model (target length {length})")
    ax.set_title(f"passkey success rate, length {length}")
    fig.colorbar(im, ax=ax, label="success rate")
    return save(fig, out_dir, f"passkey_heatmap_{length}")


def passkey_heatmaps(board: Leaderboard, table: tables.Table, out_dir: Path) -> list[Path]:
    """One heat map per target length, from the samples logs of the table's tasks."""
    paths = []
    for length, runs in sorted(passkey_success(board, board.problems).items()):
        paths += passkey_heatmap(length, runs, out_dir)
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def draw(board: Leaderboard, out_dir: str | Path) -> list[Path]:
    """Every table's plots, in `tables.TABLES` order."""
    out_dir = Path(out_dir)
    paths: list[Path] = []
    with plt.rc_context(RC):
        for table in tables.TABLES:
            for name in table.plots:
                paths += globals()[name](board, table, out_dir)
    return paths
