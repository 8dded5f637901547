"""`pieval leaderboard RESULTS_DIR... [--out leaderboards/] [--plots]`."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from pieval.errors import UserError

PROG = "pieval leaderboard"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS_DIR", help="lm_eval --output_path directories (or results_*.json files)")
    parser.add_argument(
        "--out", default="leaderboards", help="directory for the CSV tables, replaced as a whole (default: leaderboards/)"
    )
    parser.add_argument("--plots", action="store_true", help="also draw the plots (PNG + SVG) into OUT/plots/")
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="leave out the paper's reference rows")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any input was skipped (default: report it and go on)")


def run(args: argparse.Namespace) -> int:
    from pieval.leaderboard import build, output
    from pieval.locking import OutputLock

    out = Path(args.out)
    command = " ".join([PROG, *args.results, "--out", args.out, *(["--plots"] if args.plots else [])])
    try:
        _check_out(out)
        with OutputLock(out, command, option="--out") as lock:
            if lock.took_over is not None:
                _say("note", lock.took_over.stale_notice(lock.path))
            output.clean_leftovers(out, lambda line: _say("note", line))
            board = build.build(args.results, with_reference=args.reference)
            for problem in board.problems:
                _say("skipped" if problem.skipped else "note", str(problem))
            if not board.measured_rows():
                skipped = sum(p.skipped for p in board.problems)
                raise UserError(
                    f"no measured row could be built from {', '.join(args.results)} "
                    f"({skipped} input(s) skipped, see above); nothing written to {args.out}"
                )
            seen = len(board.problems)
            paths = output.publish(board, out, args.results, args.plots, lambda line: _say("note", line))
            for problem in board.problems[seen:]:  # found while drawing (the heat maps' samples logs)
                _say("skipped" if problem.skipped else "note", str(problem))
    except OSError as e:
        raise UserError(_cannot_write(out, e)) from None
    for path in paths:
        print(path)
    return 1 if args.strict and any(p.skipped for p in board.problems) else 0


def _say(kind: str, line: str) -> None:
    print(f"{PROG}: {kind}: {line}", file=sys.stderr)


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot be a directory, or that its owner made read-only, before anything is made."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise OSError(errno.EEXIST if path == out else errno.ENOTDIR, "not a directory", str(path))
        if path.exists():
            break
    if out.is_dir() and not os.access(out, os.W_OK):
        raise PermissionError(errno.EACCES, "permission denied", str(out))
    here, real = Path.cwd().resolve(), out.resolve()
    if real == here or real in here.parents:
        # replacing it would swap the directory this process and its shell stand in
        raise UserError(
            f"--out {out} is the current directory or holds it; pass --out a directory of its own (e.g. leaderboards/)"
        )


# errno -> (what went wrong, the fix)
_WHY = {
    errno.EACCES: ("permission denied", "pass --out a directory you can write, whose parent you can write too"),
    errno.EPERM: ("operation not permitted", "pass --out a directory you can write, whose parent you can write too"),
    errno.EROFS: ("read-only file system", "pass --out a directory on a writable file system"),
    errno.ENOSPC: ("no space left on the device", "free some space, or pass --out a directory on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space, or pass --out a directory on another disk"),
    errno.ENOTDIR: ("a file stands where a directory is needed", "pass --out a path whose parents are directories"),
    errno.EBUSY: ("it is in use (a mount point?)", "pass --out a directory below it"),
    errno.EXDEV: ("it is a mount point", "pass --out a directory below it"),
}


def _cannot_write(out: Path, e: OSError) -> str:
    where = f" (at {_shown(Path(e.filename), out)})" if e.filename and Path(e.filename) != out else ""
    if e.errno == errno.EEXIST and e.filename and Path(e.filename) == out:
        return f"cannot write --out {out}: it is a file, not a directory; pass --out a directory (new or a leaderboard's)"
    if e.errno == errno.EEXIST:
        return (
            f"cannot write --out {out}: {e.filename} was not written by pieval leaderboard and is in the way of "
            f"a file it writes; move it out of {out}, or pass another --out"
        )
    why, fix = _WHY.get(e.errno, (e.strerror or str(e), "pass --out another directory"))
    return f"cannot write --out {out}{where}: {why}; {fix}"


def _shown(failed: Path, out: Path) -> str:
    """The failing path as the user knows it: a lock or temporary file beside --out is its parent's."""
    real = Path(os.path.realpath(out))
    if failed == real:
        return str(out)
    if failed.parent == real.parent and failed.name.startswith(f".{real.name}."):
        return f"{real.parent}/, where it writes beside --out"
    return str(failed)
