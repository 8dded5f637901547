"""The benchmark scripts keep running: each ``--quick`` mode exits 0 and prints its ratio lines.

A benchmark is not a test (its numbers depend on the machine); what is checked here is that the
scripts still run against the current package and that their built-in correctness checks pass:
pieval's perplexity equals the naive full-logit loss's (and the floor's) to 1e-5, batching does
not change it, batched passkey generation gives the same answers, and pieval's first training
step has the Trainer's loss.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
NUMBER = r"([0-9.eE+-]+)"

# script -> (ratio lines that must appear, the correctness line that must say ok)
EXPECTED = {
    "perplexity_memory.py": (
        [r"RATIO memory naive/pieval at W=\d+: " + NUMBER + "x",
         r"RATIO time pieval/floor at W=\d+: " + NUMBER],
        r"SAME-PPL pieval vs naive vs floor: max relative difference " + NUMBER + r" \(tolerance 1e-05\): ok",
    ),
    "stride_throughput.py": (
        [r"RATIO tokens/s S=512 / S=256 \(batch 1\): " + NUMBER + "x",
         r"RATIO tokens/s batch 2 / batch 1 \(S=256\): " + NUMBER + "x"],
        r"SAME-PPL across batch sizes: max relative difference " + NUMBER + r" \(tolerance 1e-05\): ok",
    ),
    "passkey_throughput.py": (
        [r"RATIO prompts/s batch 8 / batch 1: " + NUMBER + "x"],
        r"SAME-ANSWERS batch 8 vs batch 1: (\d+)/\1 identical: ok",
    ),
    "hook_startup.py": (
        [r"RATIO start-up hook on/off: " + NUMBER + "x"],
        r"SAME-IMPORTS at start-up with the hook: .* \(expected pieval, pieval.hook only\): ok",
    ),
    "finetune_memory.py": (
        [r"RATIO memory pieval/floor worst " + NUMBER,
         r"RATIO memory trainer/pieval at L'=\d+: " + NUMBER + "x",
         r"RATIO tokens/s pieval/trainer worst " + NUMBER],
        r"SAME-LOSS pieval vs full vs trainer: max relative difference " + NUMBER + ": ok",
    ),
    "finetune_throughput.py": (
        [r"RATIO tokens/s pieval/Trainer, checkpointing off: " + NUMBER,
         r"RATIO tokens/s pieval/Trainer, checkpointing on: " + NUMBER,
         r"RATIO peak memory pieval checkpointing off/on: " + NUMBER + "x",
         r"RATIO peak memory trainer checkpointing off/on: " + NUMBER + "x"],
        r"SAME-LOSS first step pieval vs Trainer: max difference " + NUMBER + r" \(tolerance 0.0001\): ok",
    ),
}  # fmt: skip


def run_benchmark(script: str, *args: str) -> str:
    """The script's stdout, after checking it exited 0 and named its machine first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, env=env, timeout=600
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert out.startswith("machine: "), out[:500]  # every table names the machine it came from
    return out


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_quick_mode_runs_and_reports(script):
    out = run_benchmark(script, "--quick")
    ratios, correctness = EXPECTED[script]
    for pattern in ratios:
        match = re.search(pattern, out)
        assert match, f"no line matching {pattern!r} in:\n{out[-3000:]}"
        value = float(match.group(1))
        assert math.isfinite(value) and value > 0, match.group(0)
    assert re.search(correctness, out), f"no line matching {correctness!r} in:\n{out[-3000:]}"
    if script == "perplexity_memory.py":
        # a slope from two small windows may come out slightly negative (RSS noise): only finite
        for variant in ("pieval", "naive", "floor"):
            match = re.search(rf"LINEAR memory {variant}: {NUMBER} KiB per window token", out)
            assert match and math.isfinite(float(match.group(1))), out[-3000:]


@pytest.mark.slow
def test_perplexity_memory_on_a_checkpoint(tiny_llama_dir):
    """--model PATH: every worker loads the checkpoint and scores real text, two windows per W.

    The same path on SmolLM2-135M at W = 4096 and 8192 is in benchmarks/README.md (15 minutes of
    CPU; too long for the suite): the tiny checkpoint keeps the path running in seconds.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    out = run_benchmark(
        "perplexity_memory.py", "--model", str(tiny_llama_dir), "--windows", "128", "--stride", "64", "--windows-each", "2"
    )
    shape = f"vocab {config.vocab_size}, {config.num_hidden_layers} layers"
    assert re.search(rf"^model: checkpoint .*{shape}", out, re.M), out[:1000]
    assert re.search(r"W=  128 naive  2 windows", out), out[-3000:]
    assert re.search(EXPECTED["perplexity_memory.py"][1], out), out[-3000:]


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_gpu_check_dry_run(stage, tmp_path):
    """The GPU check runs only where a GPU is lent; its dry run keeps its commands in step with
    the code (stage 2 validates its fine-tuning settings with pieval's own parser)."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), stage, "--dry-run"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DRY RUN" in proc.stdout and (tmp_path / f"{stage}.log").is_file()
    if stage == "stage2":
        assert "pieval finetune settings valid: 200 steps" in proc.stdout, proc.stdout[-3000:]
