"""A leaderboard on disk: ``--out`` replaced as a whole, with a manifest of what pieval wrote.

The CSVs, the plots and ``leaderboard.json`` (the files, the inputs, the problems, pieval's
version) are written into a temporary sibling of ``--out`` and swapped in (`atomic.directory`),
so a reader, or a run killed at any point, finds the old set or the new one, never a mix; a
rebuild without ``--plots`` drops the old plots. Files in ``--out`` that pieval did not write
(another leaderboard in a subdirectory, figures of `pieval plot-bound`, notes) are kept. What
pieval wrote is read from the old manifest; for a leaderboard written before the manifest,
CSVs with the leaderboard's header and plots with a leaderboard plot's name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pieval
from pieval import atomic
from pieval.leaderboard import build, tables
from pieval.leaderboard.build import Leaderboard

MANIFEST = "leaderboard.json"
PLOTS_DIR = "plots"
_CSV_HEAD = (",".join(tables.ID_COLUMNS) + ",").encode()
# the plots of leaderboards written before the manifest (a new plot needs no entry here):
# plots/<one of these><anything>.png|svg
_PLOT_PREFIXES = ("ppl_vs_window_", "ppl_vs_steps", "kmax_vs_steps", "passkey_heatmap_")


def publish(board: Leaderboard, out: Path, inputs: list[str], plots: bool, note: Callable[[str], None]) -> list[Path]:
    """Write every table (and with ``plots`` every figure) into ``out`` as one set; the paths.

    The caller holds `pieval.locking.OutputLock` on ``out`` and has called `clean_leftovers`.
    ``note`` gets one line per thing worth telling (files of the old set that had to stay).
    """
    with atomic.directory(out, owned=owned_in(out)) as tmp:
        written = build.write(board, tmp)
        if plots:
            from pieval.leaderboard import plots as figures

            written += figures.draw(board, tmp / PLOTS_DIR)
        files = sorted(p.relative_to(tmp).as_posix() for p in written)
        atomic.write_text(tmp / MANIFEST, manifest_text(board, inputs, plots, files))
    clean_leftovers(out, note)
    return [out / p.relative_to(tmp) for p in written] + [out / MANIFEST]


def manifest_text(board: Leaderboard, inputs: list[str], plots: bool, files: list[str]) -> str:
    manifest = {
        "pieval_version": pieval.__version__,
        "inputs": list(inputs),
        "results_files": [rf.label for rf in board.files],
        "plots": plots,
        "files": files,
        "problems": [{"source": p.source, "message": p.message, "skipped": p.skipped} for p in board.problems],
    }
    return json.dumps(manifest, indent=1) + "\n"


def owned_in(directory: Path) -> Callable[[str], bool]:
    """Whether a file of ``directory`` (a path relative to it, POSIX) belongs to the leaderboard there.

    Decided once, from the files there now: after the swap the old files live elsewhere, and
    a file that appears later is not pieval's.
    """
    listed = _listed(directory)
    files = [p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()] if directory.is_dir() else []
    ours = frozenset(rel for rel in files if _is_ours(directory, rel, listed))
    return ours.__contains__


def _is_ours(directory: Path, rel: str, listed: set[str] | None) -> bool:
    head, _, name = rel.rpartition("/")
    target = atomic.temp_target(name)
    if target is not None:  # a write cut short by a kill: ours if the file it was becoming is
        rel = f"{head}/{target}" if head else target
    if listed is not None:
        return rel in listed
    return _looks_like_ours(directory, rel, by_name=target is not None)


def _listed(directory: Path) -> set[str] | None:
    try:
        files = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {*map(str, files), MANIFEST} if isinstance(files, list) else None


def _looks_like_ours(directory: Path, rel: str, by_name: bool) -> bool:
    if rel == MANIFEST:
        return True
    if re.fullmatch(r"[^/]+\.csv", rel):
        if by_name:
            return True
        try:
            with (directory / rel).open("rb") as f:
                return f.read(len(_CSV_HEAD)) == _CSV_HEAD
        except OSError:
            return False
    head, _, name = rel.partition("/")
    return head == PLOTS_DIR and "/" not in name and name.startswith(_PLOT_PREFIXES) and name.endswith((".png", ".svg"))


def clean_leftovers(out: Path, note: Callable[[str], None]) -> None:
    """Put back or remove what a killed run left beside ``out``; what must stay is noted.

    Call it holding the lock on ``out``: another run's temporary directory looks the same.
    """
    for leftover in atomic.recover(out):
        kept = atomic.retire(leftover, out, owned_in(leftover))
        if kept:
            shown = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
            note(f"kept {leftover}: it holds files pieval did not write ({shown}) and {out} has files of those names")
