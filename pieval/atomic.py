"""Atomic writes: results, CSVs and checkpoints appear whole or not at all.

An interrupted run must never leave a half-written file that a later step (resume, the
leaderboard) would read as complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_modes(folder: str | Path) -> None:
    """Give the files under ``folder`` the modes an ordinary ``open`` would (0666 & ~umask).

    safetensors writes its files private (0600): a checkpoint another user, or a container
    running as another uid, is meant to load would then be unreadable to it.
    """
    mode = 0o666 & ~_umask()
    for file in Path(folder).rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(mode)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private (0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def directory(path: str | Path, owned: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only if the block succeeds.

    A reader of ``path`` sees the old contents or the new ones, never a mix: the two
    directories are exchanged in one step where the kernel can (Linux ``renameat2``), else by
    two renames, with `recover` putting the old one back after a kill between them.
    ``owned(relative_posix_path)`` says which files of the old directory this writer wrote;
    the others (foreign files) are kept: hard-linked into the new directory before the swap,
    so they never leave ``path``. A foreign file where the new contents have one raises
    `FileExistsError` naming it, before anything is replaced. Without ``owned``, the directory
    is the writer's alone and its old contents are all replaced.
    """
    path = Path(os.path.realpath(path))  # a symlink to a directory keeps pointing at the new one
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if owned is not None and path.is_dir():
            _carry(path, tmp, owned)
        # mkdtemp makes it private (0700); the result keeps the old directory's mode, or is an ordinary one
        if path.is_dir():
            shutil.copymode(path, tmp)
        else:
            tmp.chmod(0o777 & ~_umask())
        if not path.exists():
            os.replace(tmp, path)
            return
        old = tmp if _exchange(tmp, path) else _swap_by_renames(tmp, path, owned is None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if owned is None:
        shutil.rmtree(old, ignore_errors=True)
    else:
        retire(old, path, owned)


def recover(path: str | Path) -> list[Path]:
    """After a killed `directory` run: put the old directory back if the kill came between the
    two renames; return the temporary directories left beside ``path`` (for `retire`).

    Only the holder of a lock on ``path`` may call it: another writer's temporary directory
    looks the same.
    """
    path = Path(os.path.realpath(path))
    old = _old(path)
    if old.is_dir() and not os.path.lexists(path):
        os.replace(old, path)
    leftovers = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    return [p for p in ([old] if old.is_dir() else []) + leftovers if p.is_dir() and not p.is_symlink()]


def retire(old: Path, into: Path, owned: Callable[[str], bool]) -> list[str]:
    """Empty ``old``, a replaced or left-over directory, without losing a file that is not ours.

    A file goes if ``owned`` says this writer wrote it, or if ``into`` holds the same file
    (a hard link carried over); any other file (one that appeared during the run) moves to
    the same place in ``into`` if that is free. Returns what had to stay (``old`` then stays).
    """
    kept: list[str] = []
    for root, dirs, files in os.walk(old, topdown=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            src = Path(root, name)
            rel = src.relative_to(old).as_posix()
            dst = into / rel
            if owned(rel) or _same_file(src, dst):
                os.unlink(src)
            elif not os.path.lexists(dst) and dst.parent.is_dir():
                os.rename(src, dst)
            else:
                kept.append(rel)
        with contextlib.suppress(OSError):
            os.rmdir(root)  # fails while something stays in it
    return kept


def temp_target(name: str) -> str | None:
    """The file name a `write_bytes` temporary file ``name`` was going to become, else None."""
    match = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", name)
    return match.group(1) if match else None


def _swap_by_renames(tmp: Path, path: Path, replace_stale: bool) -> Path:
    old = _old(path)
    if replace_stale:  # a backup left by a kill; with ``owned``, `recover` deals with it first
        shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    return old


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _carry(old: Path, new: Path, owned: Callable[[str], bool]) -> None:
    """Hard-link every foreign file of ``old`` into ``new`` (directories re-made, modes kept)."""
    for root, dirs, files in os.walk(old):
        if not dirs and not files and Path(root) != old:  # an empty directory is no writer's output
            _make_parents(old, new, new / Path(root).relative_to(old))
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            src = Path(root, name)
            rel = src.relative_to(old).as_posix()
            if owned(rel):
                continue
            dst = new / rel
            try:
                _make_parents(old, new, dst.parent)
                os.link(src, dst, follow_symlinks=False)
            except FileExistsError:
                raise FileExistsError(
                    errno.EEXIST, "not written by this program, and where the new contents have a file", str(src)
                ) from None


def _make_parents(old: Path, new: Path, directory: Path) -> None:
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir()
        shutil.copymode(old / d.relative_to(new), d)


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the file system or kernel cannot
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)
