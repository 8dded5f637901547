"""Installs as a user gets them: a wheel built from this checkout and an editable install,
each into a fresh venv. pieval's tasks are found in both, the ``.pth`` hook registers
``pi_llama`` without importing torch or lm-eval at start-up (its cost in time is
``benchmarks/hook_startup.py``'s to measure), obeys ``PIEVAL_LM_EVAL_HOOK=0``, and a leftover ``.pth`` stays silent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from installed_env import HOOK_PTH, REPO, Venv, build_wheel, make_venv, pip_install

pytestmark = pytest.mark.slow

# Prints what a fresh interpreter has imported before and after lm-eval's model registry loads.
PROBE = """
import json, sys
out = {"at_startup": sorted(m for m in sys.modules if m.split(".")[0] in ("pieval", "lm_eval", "torch"))}
from lm_eval.api.registry import get_model, model_registry
from lm_eval.models import MODEL_MAPPING
out["builtin_missing"] = sorted(set(MODEL_MAPPING) - set(model_registry.keys()))
out["pi_llama_registered"] = "pi_llama" in model_registry
out["backend_imported"] = "pieval.backend" in sys.modules
out["torch_imported"] = "torch" in sys.modules
if "activate" in sys.argv:
    import pieval.lmeval
    pieval.lmeval.activate()
    out["pi_llama_registered"] = "pi_llama" in model_registry
    out["builtin_missing"] = sorted(set(MODEL_MAPPING) - set(model_registry.keys()))
if "resolve" in sys.argv:  # imports torch: only where the classes themselves are checked
    out["classes"] = [get_model("pi_llama").__name__, get_model("hf").__name__]
from pieval.paths import tasks_dir
out["tasks_dir"] = str(tasks_dir())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory, wheel) -> Venv:
    venv = make_venv(tmp_path_factory.mktemp("wheel") / "venv")
    pip_install(venv, str(wheel))
    return venv


@pytest.fixture(scope="module")
def editable_venv(tmp_path_factory) -> Venv:
    venv = make_venv(tmp_path_factory.mktemp("editable") / "venv")
    pip_install(venv, "--editable", str(REPO))
    return venv


def probe(venv: Venv, cwd: Path, *args: str, **env: str) -> dict:
    result = venv.run("-c", PROBE, *args, cwd=cwd, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_wheel_ships_every_task_file_and_the_hook(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert HOOK_PTH in names  # at the wheel root = site-packages, where .pth files run
    shipped = {
        f"pieval/tasks/{p.relative_to(REPO / 'tasks').as_posix()}"
        for p in (REPO / "tasks").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert shipped and shipped <= names


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_hook_registers_pi_llama_lazily_and_keeps_builtin_models(kind, request, tmp_path):
    venv = request.getfixturevalue(f"{kind}_venv")
    out = probe(venv, tmp_path, "resolve")
    assert out["at_startup"] == ["pieval", "pieval.hook"]  # no lm_eval, no torch at start-up
    assert out["builtin_missing"] == []  # --model hf & co. still resolve
    assert out["pi_llama_registered"] and not out["backend_imported"] and not out["torch_imported"]
    assert out["classes"] == ["PILlama", "HFLM"]
    expected = venv.site_packages / "pieval" / "tasks" if kind == "wheel" else REPO / "tasks"
    assert out["tasks_dir"] == str(expected)
    assert (expected / "passkey" / "passkey.yaml").is_file()


def test_editable_install_has_the_hook_but_no_copy_of_tasks(editable_venv):
    assert (editable_venv.site_packages / HOOK_PTH).is_file()
    assert not (editable_venv.site_packages / "pieval").exists()  # would go stale on the first edit


def test_env_var_switches_the_hook_off(wheel_venv, tmp_path):
    out = probe(wheel_venv, tmp_path, PIEVAL_LM_EVAL_HOOK="0")
    assert out["at_startup"] == []  # the .pth line imported nothing
    assert not out["pi_llama_registered"] and out["builtin_missing"] == []
    on_demand = probe(wheel_venv, tmp_path, "activate", PIEVAL_LM_EVAL_HOOK="0")
    assert on_demand["pi_llama_registered"] and on_demand["builtin_missing"] == []


def test_uninstall_removes_the_pth(tmp_path, wheel):
    venv = make_venv(tmp_path / "venv")
    pip_install(venv, str(wheel))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv.python), "uninstall", "--quiet", "--yes",
                    "pieval"], check=True)
    assert not (venv.site_packages / HOOK_PTH).exists()


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_leftover_pth_is_silent(kind, tmp_path, wheel):
    """The .pth outlives pieval: a deleted package dir, or an editable checkout moved away."""
    venv = make_venv(tmp_path / "venv")
    if kind == "wheel":
        pip_install(venv, str(wheel))
        subprocess.run(["rm", "-r", str(venv.site_packages / "pieval")], check=True)
    else:
        pip_install(venv, "--editable", str(REPO))
        (venv.site_packages / "_pieval.pth").write_text(str(tmp_path / "moved-away") + "\n")
    assert (venv.site_packages / HOOK_PTH).is_file()
    result = venv.run("-c", "import lm_eval.models; print('ok')", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")
