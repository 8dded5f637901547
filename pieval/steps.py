"""The commands a user would type, run as subprocesses with one log each (`pieval compare`, `make demo`).

Written here rather than taken from ``subprocess.run``: side-by-side steps share the cores
(``OMP_NUM_THREADS``), a failure shows its log's tail, and an interrupt leaves no orphans, so
every step resumes on the next run.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from pieval.errors import UserError


def run_together(steps: list[tuple[list[str], Path]], cwd: Path | None = None, tail_lines: int = 30) -> None:
    """Run independent steps at once, each on an equal share of the cores.

    The demo's two fine-tunes are single-sequence-wide CPU jobs that scale poorly past one or
    two threads, so side by side they finish in about the time of one. A single step keeps the
    caller's thread settings.
    """
    threads = max(1, (os.cpu_count() or 1) // len(steps))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if len(steps) > 1 else None
    start = time.time()
    procs = []
    try:
        for cmd, log in steps:
            with log.open("w") as f:
                procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env))
        codes = [p.wait() for p in procs]
    finally:  # interrupted: the partial steps leave no results, so a re-run redoes them
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    for code, (cmd, log) in zip(codes, steps):
        if code:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-tail_lines:])
            raise UserError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} failed (exit {code}), see {log}:\n{tail}")
    logs = ", ".join(str(log) for _, log in steps)
    print(f"  done in {time.time() - start:.0f} s (log: {logs})", flush=True)
