"""`pieval.steps`: the subprocess runner `pieval compare` and `make demo` share."""

from __future__ import annotations

import sys

import pytest

from pieval.errors import UserError
from pieval.steps import run_together


def test_a_single_step_keeps_the_callers_threads_runs_in_cwd_and_fails_with_its_logs_tail(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    ok = [sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'], os.getcwd())"]
    run_together([(ok, tmp_path / "ok.log")], cwd=tmp_path)
    threads, cwd = (tmp_path / "ok.log").read_text().split()
    assert threads == "7" and cwd == str(tmp_path)

    bad = [sys.executable, "-c", "import sys; print('\\n'.join(f'line {i}' for i in range(50))); sys.exit(2)"]
    with pytest.raises(UserError, match=r"exit 2\), see .*bad\.log:\nline 45\n") as e:
        run_together([(bad, tmp_path / "bad.log")], tail_lines=5)
    assert "line 44" not in str(e.value) and str(e.value).endswith("line 49")
