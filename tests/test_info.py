"""`pieval info PATH` on a base and an already-extended checkpoint.

Two cases run `python -m pieval info` as a subprocess (each pays ~3-7 s of torch import,
which transformers' config module pulls in); the rest call the same CLI entry in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import GPT2Config, LlamaConfig

from pieval import rope
from pieval.cli import main


def pieval_info(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pieval", "info", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """config.json of a LLaMA (window 256) saved as is, extended by PI s=2.5, and a GPT-2 (no RoPE)."""
    root = tmp_path_factory.mktemp("info")
    config = LlamaConfig(max_position_embeddings=256, hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    config.save_pretrained(root / "base")
    rope.apply(config, rope.resolve(config, scaling_factor=2.5))
    config.save_pretrained(root / "pi")
    GPT2Config(n_layer=1).save_pretrained(root / "gpt2")
    # as `pieval finetune --method direct --context-length 1024` saves it (pieval.facts)
    direct = LlamaConfig(max_position_embeddings=1024, hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    direct.pieval = {"method": "direct", "base_window": 256, "factor": 4.0, "context_length": 1024, "steps": 200, "base_model": "base"}
    direct.save_pretrained(root / "direct")
    return root


def test_table_for_an_extended_checkpoint(checkpoints):
    done = pieval_info(str(checkpoints / "pi"))
    assert done.returncode == 0, done.stderr
    rows = dict(line.split("  ", 1) for line in done.stdout.splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["base window L"] == "256"
    assert rows["rope type"] == "linear"
    assert rows["factor s"] == "2.5"
    assert rows["window L'"] == "640"
    assert rows["rope_theta"] == "10000"


def test_json_for_a_base_checkpoint(checkpoints, capsys):
    assert main(["info", str(checkpoints / "base"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {k: info[k] for k in ("base_window", "rope_type", "factor", "context_length", "theta")} == {
        "base_window": 256,
        "rope_type": "default",
        "factor": 1.0,
        "context_length": 256,
        "theta": 10000.0,
    }


def one_line_error(stdout: str, stderr: str) -> str:
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pieval info: error: "), stderr
    return lines[0]


def test_missing_path_is_a_one_line_error(checkpoints):
    done = pieval_info(str(checkpoints / "missing"))
    assert done.returncode == 2
    assert "no checkpoint at '" in one_line_error(done.stdout, done.stderr)


def test_non_rope_checkpoint_is_a_one_line_error(checkpoints, capsys):
    assert main(["info", str(checkpoints / "gpt2")]) == 2
    out = capsys.readouterr()
    assert "model_type='gpt2') has no rotary position embedding" in one_line_error(out.out, out.err)


NO_TORCH = "import sys; from pieval.cli import main; main(['info', sys.argv[1]]); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"


def test_directly_finetuned_checkpoint_without_importing_torch(checkpoints):
    """L is the recorded base window (256), not the window it was fine-tuned at (1024)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(checkpoints / "direct")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    *table, imported = done.stdout.splitlines()
    assert imported == "[]"
    rows = {k.strip(): v.strip() for k, v in (line.split("  ", 1) for line in table)}
    assert (rows["base window L"], rows["factor s"], rows["window L'"]) == ("256", "1", "1024")
    assert rows["fine-tuned"] == "directly to L'=1024, 200 steps from base"
