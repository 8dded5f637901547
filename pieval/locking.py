"""One writer per output path: a lock file beside the output that names its holder.

Two runs writing into the same directory would interleave their files; the second one is
refused instead, with a message naming the first (pid, host, since when, command). The lock
is an ``fcntl.flock`` on ``<parent>/.<name>.lock``: the kernel releases it when its process
dies, however it dies, so a lock left by a killed run never blocks; the next run takes it
over and says so.

    with OutputLock("leaderboards", "pieval leaderboard runs/ --out leaderboards", option="--out") as lock:
        if lock.took_over is not None:
            print(f"note: {lock.took_over.stale_notice(lock.path)}")
        ...  # write into leaderboards/

`OutputLock.__enter__` raises `LockBusy` (a `UserError`, so the CLI prints it as one line)
while another process holds the lock, and `OSError` when the lock file cannot be made (a
read-only or missing parent: the caller reports it as it reports any failed write).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from pieval.errors import UserError


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a lock, as written into the lock file."""

    pid: int
    host: str
    started: str  # ISO 8601, UTC, seconds
    command: str

    @classmethod
    def me(cls, command: str) -> Holder:
        started = datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        return cls(os.getpid(), socket.gethostname(), started, command)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["command"]))
        except (ValueError, KeyError, TypeError):
            return None  # empty (a holder that has not written yet) or not ours

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started} ({self.command})"

    def stale_notice(self, lock_path: Path) -> str:
        return f"took over the lock {lock_path} left by {self} (that process is gone)"


class LockBusy(UserError):
    """Another live process holds the lock; ``holder`` says who, when the lock file says."""

    def __init__(self, message: str, holder: Holder | None):
        super().__init__(message)
        self.holder = holder


def lock_path(target: str | Path) -> Path:
    """``<parent>/.<name>.lock`` for ``target``, resolved, so every spelling of a path shares one lock."""
    target = Path(os.path.realpath(target))
    return target.with_name(f".{target.name}.lock")


class OutputLock:
    """Exclusive use of ``target`` (a file or directory, existing or not) by one process.

    ``command`` is recorded for a refused second run to show; ``option`` (e.g. ``"--out"``)
    is the flag that message tells the user to change. After ``__enter__``,
    ``took_over`` is the `Holder` of a stale lock file that was taken over (a run that was
    killed), else None. The lock file is removed on exit; the parent directory is created
    if missing. Not re-entrant: a process that locks the same target twice is refused.
    """

    def __init__(self, target: str | Path, command: str, option: str | None = None):
        self.target = Path(target)
        self.path = lock_path(target)
        self.command = command
        self.option = option
        self.took_over: Holder | None = None
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = Holder.parse(_read(self.path))
                who = str(holder) if holder else "another process (it has not written its name yet)"
                elsewhere = f"pass another {self.option}" if self.option else "write elsewhere"
                raise LockBusy(
                    f"{self.target} is being written by {who}; wait for that run to finish, or {elsewhere} "
                    f"(lock file: {self.path})",
                    holder,
                ) from None
            # the previous holder may have removed the file between our open and our lock:
            # then we hold a lock on a deleted file, and must lock the file now at that path
            if _same_file(fd, self.path):
                break
            os.close(fd)
        self.took_over = Holder.parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
        record = json.dumps(asdict(Holder.me(self.command))).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # before unlocking, so no one locks a file that is about to vanish
        os.close(self._fd)  # releases the flock
        self._fd = None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

