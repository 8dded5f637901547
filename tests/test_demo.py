"""The quick demo (`python -m pieval.demo --quick`) runs every step of the paper's loop.

Checks that each step left its files and that the printed PASS/FAIL verdicts are the ones
`claims.check` computes from the written leaderboard CSVs (not asserted by the demo).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import HELDOUT, REPO

pytestmark = pytest.mark.slow


def test_quick_demo_produces_every_step(tiny_llama_dir, tmp_path):
    work, boards = tmp_path / "work", tmp_path / "boards"
    proc = subprocess.run(
        [sys.executable, "-m", "pieval.demo", "--quick", "--model", str(tiny_llama_dir),
         "--heldout", str(HELDOUT), "--work", str(work), "--leaderboards", str(boards)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    base = work / "finetune_direct" / "eval" / "checkpoint-000000"  # the base model, measured once
    assert list(base.rglob("results_*.json")), "base model evaluation"
    assert list(base.rglob("samples_passkey_*.jsonl")), "passkey samples for the heat map"
    for method in ("pi", "direct"):
        run = work / f"finetune_{method}"
        assert (run / "final" / "config.json").is_file(), f"{method} fine-tune checkpoint"
        assert (run / "eval" / "results.jsonl").is_file(), f"{method} evaluation while training"
    for name in ("ppl_local.csv", "passkey.csv", "ppl_vs_steps.csv"):
        assert (boards / name).stat().st_size > 0, name
    assert list((boards / "plots").glob("*.png")) and list((boards / "plots").glob("*.svg"))

    from pieval.leaderboard import claims

    verdicts = claims.check(boards, L=256, L_prime=512, dataset="local")
    printed = proc.stdout.split("the paper's claims", 1)[1]
    for v in verdicts:
        assert str(v) in printed
    assert {v.number for v in verdicts} == {"1", "2", "3a", "3b", "4", "5"}
    assert all(v.status in ("PASS", "FAIL") for v in verdicts), "every claim measured"


def test_side_by_side_steps_share_the_cores_and_a_failure_shows_its_log(tmp_path):
    from pieval.demo import run_together
    from pieval.errors import UserError

    ok = [sys.executable, "-c", "import os; print('threads', os.environ['OMP_NUM_THREADS'])"]
    bad = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    with pytest.raises(UserError, match=r"exit 3\), see .*bad\.log:\nboom"):
        run_together([(ok, tmp_path / "ok.log"), (bad, tmp_path / "bad.log")])
    threads = int((tmp_path / "ok.log").read_text().split()[1])
    assert threads == max(1, (os.cpu_count() or 1) // 2)


def test_the_demo_runs_the_committed_recipe_as_documented():
    # The demo passes its batch to `pieval finetune` over the recipe file's; the two must agree,
    # or the recipe users copy (models/recipes/kjv_tiny_cpu.yaml) is not the one the demo measured.
    import yaml

    from pieval.demo import DemoPlan

    recipe = yaml.safe_load((REPO / "models/recipes/kjv_tiny_cpu.yaml").read_text())
    plan = DemoPlan()
    assert plan.finetune_batch == recipe["global_batch"] == recipe["micro_batch"]
    assert plan.finetune_steps == recipe["max_steps"] == recipe["warmup_steps"] + recipe["decay_steps"]
    assert plan.passkey_trials == 10 and plan.passkey_distances == 32  # the paper's protocol
