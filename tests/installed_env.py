"""Throw-away virtual environments with pieval installed, for tests that run it as a user would.

Only pieval is installed into them (from a wheel built from this checkout, or editable);
the heavy dependencies (torch, lm-eval, transformers) come from the interpreter running
the tests through a one-line ``.pth`` that appends its site-packages. A path added that
way is not scanned for ``.pth`` files, so an editable pieval in the outer environment
stays invisible inside.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOK_PTH = "pieval_lm_eval.pth"
_PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


def clean_environ(**extra: str) -> dict[str, str]:
    """The test process's environment without anything that would redirect imports or the hook."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PIEVAL_LM_EVAL_HOOK"}}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


@dataclass(frozen=True)
class Venv:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        v = sys.version_info
        return self.root / "lib" / f"python{v.major}.{v.minor}" / "site-packages"

    def run(self, *args: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        """``python *args`` in this venv (cwd outside the checkout, so only installed code imports)."""
        return subprocess.run(
            [str(self.python), *args],
            cwd=cwd,
            env=clean_environ(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def make_venv(root: Path) -> Venv:
    """A pip-less venv that imports the test interpreter's packages after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    venv = Venv(root)
    (venv.site_packages / "_outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def build_wheel(out_dir: Path) -> Path:
    """``pip wheel`` of this checkout with the installed hatchling (offline, ~1 s)."""
    subprocess.run(
        [*_PIP, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(out_dir), str(REPO)],
        check=True,
    )
    (wheel,) = out_dir.glob("pieval-*.whl")
    return wheel


def pip_install(venv: Venv, *args: str) -> None:
    subprocess.run(
        [*_PIP, "--python", str(venv.python), "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", *args],
        check=True,
    )
