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


def test_directory_keeps_the_files_it_does_not_own(tmp_path):
    """With ``owned``, files the writer did not write stay, the same files (hard links), at every step."""
    target = tmp_path / "board"
    (target / "sub").mkdir(parents=True)
    (target / "table.csv").write_text("old")
    (target / "gone.csv").write_text("old")
    (target / "sub" / "notes.txt").write_text("mine")
    (target / "link").symlink_to("sub/notes.txt")
    (target / "empty").mkdir()
    ino = (target / "sub" / "notes.txt").stat().st_ino
    with atomic.directory(target, owned={"table.csv", "gone.csv"}.__contains__) as tmp:
        (tmp / "table.csv").write_text("new")
    listing = sorted(p.relative_to(target).as_posix() for p in target.rglob("*"))
    assert listing == ["empty", "link", "sub", "sub/notes.txt", "table.csv"]
    assert (target / "table.csv").read_text() == "new" and (target / "link").read_text() == "mine"
    assert (target / "sub" / "notes.txt").stat().st_ino == ino
    assert [p.name for p in tmp_path.iterdir()] == ["board"]


def test_directory_refuses_to_replace_a_file_it_does_not_own(tmp_path):
    target = tmp_path / "board"
    target.mkdir()
    (target / "table.csv").write_text("someone else's")
    with pytest.raises(FileExistsError) as refused:
        with atomic.directory(target, owned=lambda rel: False) as tmp:
            (tmp / "table.csv").write_text("new")
    assert refused.value.filename == str(target / "table.csv")
    assert (target / "table.csv").read_text() == "someone else's" and [p.name for p in tmp_path.iterdir()] == ["board"]


def test_without_an_exchange_a_kill_between_the_renames_is_recovered(tmp_path, monkeypatch):
    target = tmp_path / "board"
    target.mkdir()
    (target / "table.csv").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real = os.replace

    def killed_between(src, dst):
        if str(src).endswith(".tmp"):
            raise SystemExit  # stands for a kill: nothing after this runs
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", killed_between)
    with pytest.raises(SystemExit):
        with atomic.directory(target, owned=lambda rel: True) as tmp:
            (tmp / "table.csv").write_text("new")
    monkeypatch.setattr(atomic.os, "replace", real)
    assert (target / "table.csv").read_text() == "old"  # the failed second rename put the old one back
    os.replace(target, tmp_path / ".board.old")  # as a SIGKILL would have left it
    assert atomic.recover(target) == [] and (target / "table.csv").read_text() == "old"


def test_directory_keeps_the_old_mode(tmp_path):
    target = tmp_path / "board"
    target.mkdir(mode=0o750)
    target.chmod(0o750)
    with atomic.directory(target, owned=lambda rel: True) as tmp:
        (tmp / "x").write_text("new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_ordinary_modes_undo_a_private_write(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.safetensors", "sub/b.json"):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o600)
    umask = os.umask(0)
    os.umask(umask)
    atomic.ordinary_modes(tmp_path)
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("a.safetensors", "sub/b.json")} == {0o666 & ~umask}
