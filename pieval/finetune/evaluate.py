"""Evaluate checkpoints as the run goes: lm-eval tasks through pieval's `pi_llama` backend.

Layout under ``--output DIR``::

    eval/results.jsonl                 one line per evaluated checkpoint:
                                       {"step", "checkpoint", "tokens", "tasks", "metrics": {task: {metric: value}}}
    eval/table.csv                     the same as a table, one row per step (the paper's Tables 3/4)
    eval/checkpoint-000200/results_<date>.json   lm-eval's full results JSON (what `lm_eval
                                       --output_path` writes), read by `pieval leaderboard`

The checkpoint is loaded from disk by lm-eval exactly as a user would load it, without any
scaling argument: what is measured is what was saved.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from pieval import atomic
from pieval.errors import UserError

EVAL_DIR = "eval"
RESULTS_FILE = "results.jsonl"
TABLE_FILE = "table.csv"


def read_results(output: Path) -> list[dict]:
    path = output / EVAL_DIR / RESULTS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluated_steps(output: Path) -> set[int]:
    return {row["step"] for row in read_results(output)}


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """lm-eval reseeds the global RNGs; keep training's, so evaluating never changes the loss curve."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def task_manager(tasks: list[str], include_path: str | None, metadata: dict | None = None):
    """lm-eval's TaskManager with pieval's tasks (and ``include_path``'s) in it."""
    from lm_eval.tasks import TaskManager

    from pieval import lmeval
    from pieval.paths import tasks_dir

    lmeval.include_tasks()  # a TaskManager with lm-eval's tasks then holds pieval's too
    extra = [include_path] if include_path else []
    # Indexing lm-eval's ~15k built-in tasks takes ~25 s: skip it when pieval's own tasks suffice.
    own = TaskManager(include_path=[str(tasks_dir()), *extra], include_defaults=False, metadata=metadata)
    if all(own.match_tasks([t]) for t in tasks):
        return own
    return TaskManager(include_path=extra or None, metadata=metadata)


def check_tasks(tasks: list[str], include_path: str | None) -> None:
    """Every name in ``tasks`` is a task, group or tag lm-eval knows (globs allowed), else a UserError naming the nearest."""
    if not tasks:
        return
    if include_path and not Path(include_path).expanduser().is_dir():
        raise UserError(f"--eval-include-path {include_path} is not a directory; pass a directory of lm-eval task YAMLs")
    manager = task_manager(tasks, include_path)
    for name in tasks:
        if not manager.match_tasks([name]):
            near = difflib.get_close_matches(name, manager.all_tasks, n=1)
            hint = f"did you mean {near[0]!r}?" if near else "list the known ones with `lm_eval ls tasks`"
            raise UserError(f"--eval-tasks {name!r} is not an lm-eval task (pieval's included): {hint}")


class Evaluator:
    """Runs ``tasks`` on a checkpoint directory and records the metrics for the run."""

    def __init__(
        self,
        output: Path,
        tasks: list[str],
        device: str,
        batch_size: int = 1,
        limit: float | None = None,
        metadata: dict | None = None,
        include_path: str | None = None,
        log_samples: bool = False,
    ):
        self.output, self.tasks, self.device = output, tasks, device
        self.batch_size, self.limit, self.metadata, self.include_path = batch_size, limit, metadata or {}, include_path
        self.log_samples = log_samples

    def _task_manager(self, metadata: dict):
        """A TaskManager carrying ``metadata`` (lm-eval ignores simple_evaluate's when one is passed)."""
        return task_manager(self.tasks, self.include_path, metadata)

    def evaluate(self, checkpoint: Path, step: int, tokens: int) -> dict:
        """Evaluate one checkpoint; append its metrics to eval/results.jsonl and eval/table.csv."""
        import lm_eval
        from lm_eval.loggers import EvaluationTracker

        from pieval import lmeval

        lmeval.activate()  # registers pi_llama (a no-op when the import hook already did)
        tracker = EvaluationTracker()
        model_args = {"pretrained": str(checkpoint)}
        with _rng_kept():
            results = lm_eval.simple_evaluate(
                model="pi_llama",
                model_args=model_args,
                tasks=list(self.tasks),
                batch_size=self.batch_size,
                device=self.device,
                limit=self.limit,
                # as lm-eval's CLI does: model_args reach the tasks as metadata (prompts sized in L')
                task_manager=self._task_manager({**model_args, **self.metadata}),
                log_samples=self.log_samples,
                evaluation_tracker=tracker,
            )
        if results is None:  # non-zero rank of a distributed lm-eval run
            return {}
        full = save_results(tracker, results, self.output / EVAL_DIR / checkpoint.name)
        row = {
            "step": step,
            "checkpoint": checkpoint.name,
            "tokens": tokens,
            "tasks": list(self.tasks),
            "metrics": metrics_of(results),
            "results_file": str(full.relative_to(self.output)),
        }
        rows = [r for r in read_results(self.output) if r["step"] != step] + [row]
        rows.sort(key=lambda r: r["step"])
        atomic.write_text(self.output / EVAL_DIR / RESULTS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
        atomic.write_text(self.output / EVAL_DIR / TABLE_FILE, table_csv(rows))
        return row


def save_results(tracker, results: dict, directory: Path) -> Path:
    """Write ``results`` with lm-eval's own writer (``EvaluationTracker``), as ``lm_eval --output_path``
    does: ``results_<date>.json`` and, when samples were logged, ``samples_<task>_<date>.jsonl``.

    lm-eval writes them in place and only logs a failure; here they are written into a staging
    folder beside ``directory`` and renamed into it, samples first: the results file, which makes
    an evaluation count, appears whole and last, or not at all.
    """
    samples = results.pop("samples", None)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.") as staging:
        tracker.output_path = str(Path(staging) / "results.json")  # a .json path: files go beside it
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"] if samples else ():
            tracker.save_results_samples(task_name=task, samples=samples[task])
        written = sorted(Path(staging).iterdir(), key=lambda p: p.name.startswith("results_"))
        if not written or not written[-1].name.startswith("results_"):
            raise RuntimeError(f"lm-eval did not write the results of {directory.name} (its log says why)")
        for path in written:
            with path.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(path, directory / path.name)
    return directory / written[-1].name


def metrics_of(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results, without stderr entries; the "none" filter unnamed."""
    out = {}
    for task, values in results.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if not filt or "_stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metrics[name if filt == "none" else key] = value
        out[task] = metrics
    return out


def table_csv(rows: list[dict]) -> str:
    """Steps as rows, task/metric as columns: the shape of the paper's Tables 3 and 4."""
    columns = sorted({f"{t}/{m}" for r in rows for t, ms in r["metrics"].items() for m in ms})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "tokens", *columns])
    for r in rows:
        flat = {f"{t}/{m}": v for t, ms in r["metrics"].items() for m, v in ms.items()}
        w.writerow([r["step"], r["tokens"], *(flat.get(c, "") for c in columns)])
    return buf.getvalue()
