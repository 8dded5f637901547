"""`pieval compare`: one stock lm_eval run per method, resumed by settings, tabulated side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pieval.cli import main

SMALL = [
    "--scaling-factor", "2", "--windows", "256,512", "--stride", "128", "--max-docs", "1",
    "--max-doc-tokens", "700", "--passkey-trials", "1", "--passkey-distances", "2",
]  # fmt: skip


def compare(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pieval", "compare", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def results(folder: Path) -> dict:
    (path,) = folder.rglob("results_*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def swept(ref_model_dir, heldout_dir, tmp_path_factory):
    """none and pi, then the same sweep with yarn added (the first two reused)."""
    cwd = tmp_path_factory.mktemp("compare")
    base = ["--model", str(ref_model_dir), "--data", str(heldout_dir), *SMALL, "--output", "runs", "--out", "lb"]
    first = compare(cwd, *base, "--methods", "none,pi")
    assert first.returncode == 0, first.stderr[-3000:]
    second = compare(cwd, *base, "--methods", "none,pi,yarn")
    assert second.returncode == 0, second.stderr[-3000:]
    return cwd, base, first, second


def test_each_method_is_a_stock_lm_eval_run_and_a_row(swept, ref_model_dir):
    cwd, _, first, second = swept
    assert first.stdout.count("$ ") == 3 and "-m lm_eval --model pi_llama" in first.stdout  # two runs + the leaderboard
    assert second.stdout.count("  reused: ") == 2 and "[3/3] yarn" in second.stdout
    rows = pd.read_csv(cwd / "lb" / "methods.csv", dtype=str, keep_default_na=False)
    rows = rows[rows.source == "measured"].set_index("method")
    assert list(rows.index) == ["base", "PI", "yarn"] and set(rows.benchmark) == {"local"}
    assert list(rows["L'"]) == ["256", "512", "512"]  # the saved model runs at its own window, past it at W=512
    for method, folder in (("base", "none"), ("PI", "pi"), ("yarn", "yarn")):
        data = results(cwd / "runs" / folder)
        ppl = {w: data["results"]["local_ppl"][f"token_ppl_{w},none"] for w in (256, 512)}
        row = rows.loc[method]
        assert [float(row["256"]), float(row["512"])] == pytest.approx([ppl[256], ppl[512]], abs=5e-5)
        assert float(row.ppl_growth) == pytest.approx(ppl[512] / ppl[256], abs=5e-5)
        assert row.length == "512"  # passkey at L' for every method, the saved model included
        assert int(row.k_max) == data["results"]["passkey"]["k_max_512,none"]
        assert data["config"]["model_args"]["pretrained"] == str(ref_model_dir)
    assert rows.loc["PI"].rope_type == "linear" and rows.loc["yarn"].rope_type == "yarn"
    assert float(rows.loc["base"].ppl_growth) > 2 * float(rows.loc["PI"].ppl_growth)  # extrapolation vs PI
    assert (cwd / "lb" / "plots" / "methods_local.png").stat().st_size > 1000
    assert "ppl_growth" in second.stdout and "yarn" in second.stdout.splitlines()[-2]  # the table is printed


def test_a_sweep_with_other_settings_is_refused(swept):
    cwd, base, _, _ = swept
    changed = compare(cwd, *[a if a != "256,512" else "256,384,512" for a in base], "--methods", "none")
    assert changed.returncode == 2
    (line,) = changed.stderr.strip().splitlines()
    assert "runs/none holds a none run with other settings" in line and "windows=[256, 512]" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "pi,rope9"], "unknown rope9; use none and any of pi, ntk"),
        (["--methods", "pi,pi"], "names a method twice"),
        (["--knobs", "yarn:beta_fast=-1", "--methods", "yarn"], "beta_fast must be > 0"),
        (["--knobs", "yarn", "--methods", "yarn"], "write METHOD:KEY=VALUE"),
        (["--knobs", "ntk:beta_fast=2", "--methods", "pi"], "ntk is not one of --methods"),
        (["--model-args", "scaling_factor=3"], "--model-args sets scaling_factor"),
        (["--windows", "256,x"], "--windows must be comma-separated ints"),
    ],
)
def test_bad_options_are_one_line_errors(ref_model_dir, heldout_dir, capsys, args, message):
    code = main(["compare", "--model", str(ref_model_dir), "--data", str(heldout_dir), "--scaling-factor", "4", *args, "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_target_window_and_data_are_checked(ref_model_dir, capsys):
    assert main(["compare", "--model", str(ref_model_dir), "--context-length", "256", "--dry-run"]) == 2
    assert "must exceed the checkpoint's trained window L=256" in capsys.readouterr().err
    assert main(["compare", "--model", str(ref_model_dir), "--context-length", "1024", "--dry-run"]) == 2
    assert "local_ppl needs its documents: pass --data PATH" in capsys.readouterr().err


def test_dry_run_prints_the_plan(ref_model_dir, heldout_dir, capsys, tmp_path):
    out = tmp_path / "runs"
    args = ["compare", "--model", str(ref_model_dir), "--data", str(heldout_dir), "--context-length", "1024"]
    assert main([*args, "--knobs", "yarn:beta_fast=16", "--output", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"pretrained={ref_model_dir},max_length=1024 " in text  # the saved model, run past its window
    assert f"rope_method=yarn,context_length=1024,beta_fast=16 " in text
    assert '"windows": [256, 512, 1024], "stride": 128' in text and '"lengths": [1024]' in text
    assert "[5/5] dynamic" in text and not out.exists()  # nothing run, nothing made
