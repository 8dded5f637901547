"""Find and read lm-eval output directories.

`lm_eval --output_path DIR` writes ``DIR/<model_name_sanitized>/results_<date_id>.json`` and,
with ``--log_samples``, ``samples_<task>_<date_id>.jsonl`` beside it
(``lm_eval.loggers.evaluation_tracker.EvaluationTracker``); a ``--output_path x.json`` run
writes ``x_<date_id>.json``. A bad file never stops the others: it becomes a `Problem`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pieval.errors import UserError

# The sections EvaluationTracker always writes; a JSON file without them came from another tool.
_LMEVAL_SECTIONS = ("results", "configs", "config")


class ResultsError(UserError):
    """An input that is not a readable lm-eval results file or directory."""


@dataclass(frozen=True)
class Problem:
    """Something left out of the leaderboard, and why (shown to the user, never silent)."""

    source: str  # the file or directory, as the user can find it
    message: str  # a whole sentence that names ``source``
    skipped: bool = True  # False: a note (e.g. a value superseded by a newer run), nothing was lost

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class ResultsFile:
    path: Path
    label: str  # the path under the RESULTS_DIR the user gave, prefixed with its name: stable across machines
    data: dict = field(repr=False)
    samples: dict[str, Path] = field(default_factory=dict, repr=False)  # task -> samples_<task>_*.jsonl

    def task_results(self, task: str) -> dict:
        return self.data["results"].get(task, {})

    def task_metadata(self, task: str) -> dict:
        return (self.data["configs"].get(task) or {}).get("metadata") or {}


def load(path: Path, label: str) -> ResultsFile:
    """One results JSON, checked to be lm-eval's; raises `ResultsError` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ResultsError(f"{label} is not UTF-8 text: not an lm-eval results file") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{label} is not valid JSON (line {e.lineno}: {e.msg}); a truncated or foreign file?") from None
    missing = [s for s in _LMEVAL_SECTIONS if not isinstance(data, dict) or not isinstance(data.get(s), dict)]
    if missing:
        raise ResultsError(
            f"{label} is not an lm-eval results file (no {', '.join(repr(s) for s in missing)} section); "
            "pass the --output_path directory of an `lm_eval` run"
        )
    return ResultsFile(path, label, data, _samples_beside(path))


# lm_eval.utils.get_file_datetime / get_file_task_name cut these names the same way (a test runs
# both on the same names); importing lm_eval.utils would pull requests and jinja2 into every
# `pieval leaderboard` run, about a fifth of its time.
def date_id(path: Path) -> str:
    """The ``<date_id>`` of ``results_<date_id>.json``, ``x_<date_id>.json`` or ``samples_<task>_<date_id>.jsonl``."""
    return path.stem.rsplit("_", 1)[-1]


def samples_task(path: Path) -> str:
    """The ``<task>`` of ``samples_<task>_<date_id>.jsonl``; task names may contain underscores."""
    return path.name[len("samples_") : path.name.rfind("_")]


def _samples_beside(path: Path) -> dict[str, Path]:
    return {samples_task(p): p for p in sorted(path.parent.glob(f"samples_*_{date_id(path)}.jsonl"))}


def _results_paths(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.json") if p.name.startswith("results_") or _is_json_output_file(p))


def _is_json_output_file(p: Path) -> bool:
    # `--output_path out.json` names its file out_<date_id>.json; only a JSON whose name has
    # a date id counts, so unrelated JSON files in the tree (configs, tokenizers) are not read.
    stamp = date_id(p)
    return "_" in p.stem and stamp[:4].isdigit() and "T" in stamp


def iter_results(roots: list[str | Path], problems: list[Problem]) -> Iterator[ResultsFile]:
    """Every readable results file under ``roots``, in a stable order; bad inputs go to ``problems``."""
    for root in map(Path, roots):
        if not root.exists():
            problems.append(Problem(str(root), f"{root} does not exist"))
            continue
        paths = _results_paths(root)
        if not paths:
            problems.append(
                Problem(
                    str(root),
                    f"{root} holds no lm-eval results (no results_*.json); pass the --output_path of an `lm_eval` run",
                )
            )
            continue
        base = root.parent
        for path in paths:
            label = path.relative_to(base).as_posix()
            try:
                yield load(path, label)
            except ResultsError as e:
                problems.append(Problem(label, str(e)))


def iter_samples(path: Path) -> Iterator[dict]:
    """The entries of a samples_*.jsonl file (one logged request per line)."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ResultsError(f"{path.name}:{lineno} is not JSON ({e.msg})") from None
