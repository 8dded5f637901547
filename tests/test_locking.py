"""`pieval.locking.OutputLock`: one writer per path, a named holder, stale locks taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pieval.locking import Holder, LockBusy, OutputLock, lock_path

HOLD = """
import sys, time
from pieval.locking import OutputLock
with OutputLock(sys.argv[1], "holder --out x"):
    print("locked", flush=True)
    time.sleep(60)
"""


def hold(target: Path) -> subprocess.Popen:
    """A process that holds the lock on ``target`` until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path):
    target = tmp_path / "out"
    proc = hold(target)
    try:
        with pytest.raises(LockBusy) as refused:
            with OutputLock(target, "second"):
                pass
    finally:
        proc.kill()
        proc.wait()
    holder = refused.value.holder
    assert (holder.pid, holder.host, holder.command) == (proc.pid, socket.gethostname(), "holder --out x")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{target} is being written by pid {proc.pid} on host {socket.gethostname()} since 20")
    assert message.endswith(f"wait for that run to finish, or write elsewhere (lock file: {lock_path(target)})")


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    target = tmp_path / "out"
    proc = hold(target)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_path(target).exists()  # left behind by the killed process
    with OutputLock(target, "after") as lock:
        assert lock.took_over is not None and lock.took_over.pid == proc.pid
        assert lock.took_over.stale_notice(lock.path).startswith(f"took over the lock {lock.path} left by pid {proc.pid}")
        assert Holder.parse(lock.path.read_text()).pid == os.getpid()
    assert not lock.path.exists()  # a clean exit leaves nothing


def test_released_on_exit_and_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with OutputLock(target, "first") as lock:
            assert json.loads(lock.path.read_text())["command"] == "first"
            raise RuntimeError
    with OutputLock(target, "second") as lock:
        assert lock.took_over is None
    assert list(tmp_path.iterdir()) == []


def test_every_spelling_of_a_path_shares_one_lock(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    assert lock_path("real/out") == lock_path(tmp_path / "link" / "out") == tmp_path / "real" / ".out.lock"


def test_a_holder_that_has_not_written_yet(tmp_path):
    target = tmp_path / "out"
    proc = hold(target)
    try:
        lock_path(target).write_text("")  # as if caught between its lock and its write
        with pytest.raises(LockBusy, match="being written by another process"):
            with OutputLock(target, "second"):
                pass
    finally:
        proc.kill()
        proc.wait()
