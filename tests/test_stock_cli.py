"""lm-eval's own CLI, as a subprocess, from an installed pieval in a temporary working directory:
``lm_eval --model pi_llama ...`` and ``lm-eval run --config cfg.yaml`` with ``model: pi_llama``
exit 0 and write a results JSON, and pieval's shipped tasks need no ``--include_path``.
(That ``--model hf`` & co. still resolve next to ``pi_llama`` is checked in test_install.py.)

The wheel venv runs ``python -m lm_eval`` (the ``lm_eval`` console script's exact entry
point, lm_eval/__main__.py:cli_evaluate), since console scripts of packages that venv
borrows are not installed in it; the last test runs the real console script of the
interpreter running the tests when pieval is installed there (``make test``).
Each run builds lm-eval's full task index (~25 s on 2 cores).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from installed_env import HOOK_PTH, Venv, build_wheel, clean_environ, make_venv, pip_install

pytestmark = pytest.mark.slow

FIXTURE_TASKS = Path(__file__).parent / "fixtures" / "tasks" / "kjv_rolling"
LIMIT = 2


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Venv:
    venv = make_venv(tmp_path_factory.mktemp("cli") / "venv")
    pip_install(venv, str(build_wheel(tmp_path_factory.mktemp("dist"))))
    return venv


def lm_eval(venv: Venv, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = venv.run("-m", "lm_eval", *args, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def results_json(output_path: Path) -> dict:
    (path,) = output_path.rglob("results_*.json")
    return json.loads(path.read_text())


def check_pi_llama_run(results: dict, task: str, metric: str) -> None:
    value = results["results"][task][metric]
    assert math.isfinite(value) and value > 0
    assert results["config"]["model"] == "pi_llama"
    pieval = results["config"]["pieval"]  # PILlama.get_model_info: the extension was applied
    assert (pieval["factor"], pieval["base_window"], pieval["context_length"]) == (4.0, 256, 1024)


def test_lm_eval_cli_runs_pi_llama(wheel_venv, tiny_llama_dir, tmp_path):
    """A task from --include_path and a shipped pieval task (no include path needed) in one run."""
    docs = tmp_path / "docs.jsonl"
    shutil.copy(FIXTURE_TASKS / "docs.jsonl", docs)
    lm_eval(
        wheel_venv, tmp_path,
        "--model", "pi_llama",
        "--model_args", f"pretrained={tiny_llama_dir},scaling_factor=4",
        "--tasks", "kjv_rolling,local_ppl",
        "--include_path", str(FIXTURE_TASKS),
        "--metadata", json.dumps({"data_path": str(docs), "windows": [256, 1024], "stride": 128}),
        "--limit", str(LIMIT),
        "--output_path", "out",
    )
    results = results_json(tmp_path / "out")
    check_pi_llama_run(results, "kjv_rolling", "word_perplexity,none")
    check_pi_llama_run(results, "local_ppl", "token_ppl_1024,none")
    assert results["n-samples"]["kjv_rolling"]["effective"] == LIMIT


def test_lm_eval_run_config(wheel_venv, tiny_llama_dir, tmp_path):
    config = {
        "model": "pi_llama",
        "model_args": {"pretrained": str(tiny_llama_dir), "scaling_factor": 4},
        "tasks": ["kjv_rolling"],
        "include_path": str(FIXTURE_TASKS),
        "limit": LIMIT,
        "output_path": "out",
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    lm_eval(wheel_venv, tmp_path, "run", "--config", "cfg.yaml")
    check_pi_llama_run(results_json(tmp_path / "out"), "kjv_rolling", "word_perplexity,none")


def test_console_script_of_this_interpreter(tiny_llama_dir, tmp_path):
    script = Path(sys.executable).parent / "lm_eval"
    if not (Path(sysconfig.get_paths()["purelib"]) / HOOK_PTH).is_file() or not script.is_file():
        pytest.skip(f"pieval is not installed in {sys.prefix} (make venv installs it)")
    result = subprocess.run(
        [str(script), "--model", "pi_llama",
         "--model_args", f"pretrained={tiny_llama_dir},scaling_factor=4",
         "--tasks", "kjv_rolling", "--include_path", str(FIXTURE_TASKS),
         "--limit", "1", "--output_path", "out"],
        cwd=tmp_path, env=clean_environ(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    check_pi_llama_run(results_json(tmp_path / "out"), "kjv_rolling", "word_perplexity,none")


def test_bad_model_arg_through_the_cli_is_one_line_not_a_traceback(tiny_llama_dir, tmp_path):
    script = Path(sys.executable).parent / "lm_eval"
    if not (Path(sysconfig.get_paths()["purelib"]) / HOOK_PTH).is_file() or not script.is_file():
        pytest.skip(f"pieval is not installed in {sys.prefix} (make venv installs it)")
    result = subprocess.run(
        [str(script), "--model", "pi_llama", "--model_args", f"pretrained={tiny_llama_dir},rope_method=bogus",
         "--tasks", "kjv_rolling", "--include_path", str(FIXTURE_TASKS), "--limit", "1"],
        cwd=tmp_path, env=clean_environ(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("lm_eval: error:")]
    assert "bogus" in line, line


@pytest.mark.parametrize("flag", ["--metadata", "--model_args"])
def test_malformed_json_argument_is_one_line_not_a_traceback(flag, tiny_llama_dir, tmp_path):
    """lm-eval's own parser rejects it before any model loads; its message is kept, its traceback not."""
    script = Path(sys.executable).parent / "lm_eval"
    if not (Path(sysconfig.get_paths()["purelib"]) / HOOK_PTH).is_file() or not script.is_file():
        pytest.skip(f"pieval is not installed in {sys.prefix} (make venv installs it)")
    args = {"--metadata": ["--model_args", f"pretrained={tiny_llama_dir}", "--metadata", '{"stride": x}'],
            "--model_args": ["--model_args", '{"pretrained": x}']}[flag]  # fmt: skip
    result = subprocess.run(
        [str(script), "--model", "pi_llama", *args, "--tasks", "local_ppl", "--limit", "1"],
        cwd=tmp_path, env=clean_environ(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("lm_eval: error:")]
    assert "Invalid JSON" in line and "double quotes" in line and "x}" in line, line
