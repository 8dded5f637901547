"""Atomic writes: whole or not at all, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from pieval import atomic


def test_write_text_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out" / "table.csv"
    atomic.write_text(target, "a,b\n")
    atomic.write_text(target, "c,d\n")
    assert target.read_text() == "c,d\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def test_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic.directory(target) as tmp:
        (tmp / "weights").write_text("v1")
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()
    with pytest.raises(KeyboardInterrupt):
        with atomic.directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise KeyboardInterrupt
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    with atomic.directory(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
