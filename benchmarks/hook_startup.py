"""Interpreter start-up: what pieval's ``pieval_lm_eval.pth`` hook adds to every ``python -c pass``.

The hook only puts a finder on ``sys.meta_path`` (``pieval.hook``); it must not import lm-eval or
torch at start-up (tests/test_install.py checks the modules). This measures its cost in time:
``python -c pass`` in this interpreter's environment with the hook on and with
``PIEVAL_LM_EVAL_HOOK=0`` (the ``.pth`` line then returns before importing anything), the runs
interleaved so that load from other processes hits both alike. The project's target: under 20 ms
added, measured as the difference of the medians.

    python benchmarks/hook_startup.py            # 41 runs of each
    python benchmarks/hook_startup.py --quick    # 9 runs of each
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import _common as c

TARGET_MS = 20.0
HOOK_PTH = "pieval_lm_eval.pth"


def startup_ms(hook: bool) -> float:
    env = {**os.environ, "PIEVAL_LM_EVAL_HOOK": "1" if hook else "0"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return (time.perf_counter() - start) * 1000


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, help="runs of each (default 41; quick 9)")
    args = p.parse_args()
    pth = Path(sysconfig.get_paths()["purelib"]) / HOOK_PTH
    if not pth.is_file():
        sys.exit(f"no {HOOK_PTH} in {pth.parent}: install pieval into this interpreter's environment first")
    print(c.machine("cpu"))
    runs = args.runs or (9 if args.quick else 41)
    on, off = [], []
    for _ in range(runs):
        on.append(startup_ms(True))
        off.append(startup_ms(False))
    hook, bare = statistics.median(on), statistics.median(off)
    print(f"python -c pass, median of {runs}: hook on {hook:.1f} ms, hook off {bare:.1f} ms")
    cost = hook - bare
    print(f"RATIO start-up hook on/off: {hook / bare:.3f}x ({cost:+.1f} ms; target < {TARGET_MS:g} ms: "
          f"{c.verdict(cost < TARGET_MS)})")
    # what the time buys nothing of: the hook must not import lm-eval or torch at start-up
    probe = "import sys, json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('pieval', 'lm_eval', 'torch'))))"
    loaded = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PIEVAL_LM_EVAL_HOOK": "1"},
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    ok = loaded == '["pieval", "pieval.hook"]'
    print(f"SAME-IMPORTS at start-up with the hook: {loaded} (expected pieval, pieval.hook only): {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
