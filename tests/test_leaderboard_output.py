"""`--out` is replaced as a whole: the old leaderboard or the new one, never a mix, even under kill -9.

The old set is a leaderboard with plots of the base runs, the new one all runs without plots
(the rebuild that used to leave old plots beside new CSVs). Foreign files in ``--out`` (a note,
a figure of `pieval plot-bound`, a nested leaderboard) stay through every step.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pieval import atomic
from pieval.cli import main
from pieval.leaderboard import output

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "results"
GOOD, GOLDEN = FIXTURES / "good", FIXTURES / "golden"
FOREIGN = {"NOTES.txt": b"mine\n", "plots/figure2.svg": b"<svg/>", "smollm2/passkey.csv": b"source,model\n"}
OLD_ARGS = [str(GOOD / "base"), "--plots"]
NEW_ARGS = [str(GOOD)]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leaderboard(out: Path, args: list[str]) -> None:
    assert main(["leaderboard", *args, "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The old and the new complete sets (with the foreign files), each written into a fresh --out."""
    root = tmp_path_factory.mktemp("sets")
    for name, args in (("old", OLD_ARGS), ("new", NEW_ARGS)):
        _foreign(root / name)
        leaderboard(root / name, args)
    return snapshot(root / "old"), snapshot(root / "new")


def _foreign(out: Path) -> None:
    for rel, data in FOREIGN.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)


@pytest.fixture
def old_board(tmp_path) -> Path:
    out = tmp_path / "lb"
    _foreign(out)
    leaderboard(out, OLD_ARGS)
    return out


def test_a_rebuild_replaces_the_set_and_keeps_foreign_files(sets, old_board, tmp_path):
    old, new = sets
    assert snapshot(old_board) == old
    assert {"plots/passkey_heatmap_256.png", "leaderboard.json"} <= set(old)
    ino = (old_board / "NOTES.txt").stat().st_ino
    leaderboard(old_board, NEW_ARGS)
    assert snapshot(old_board) == new
    assert not [k for k in new if k.startswith("plots/") and k not in FOREIGN]  # the old plots are gone
    assert (old_board / "NOTES.txt").stat().st_ino == ino  # the very same file, never copied or moved away
    for name in (p.name for p in GOLDEN.glob("*.csv")):
        assert (old_board / name).read_bytes() == (GOLDEN / name).read_bytes()
    manifest = json.loads((old_board / "leaderboard.json").read_text())
    assert manifest["inputs"] == NEW_ARGS and manifest["plots"] is False
    assert set(manifest["files"]) == {k for k in new if k not in FOREIGN and k != "leaderboard.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lb"]  # no temporary directory, lock or backup left


def test_a_leaderboard_from_before_the_manifest_is_replaced_too(sets, old_board):
    (old_board / "leaderboard.json").unlink()
    for plot in (old_board / "plots").glob("methods_*"):  # drawn only since the manifest exists
        plot.unlink()
    leaderboard(old_board, NEW_ARGS)
    assert snapshot(old_board) == sets[1]
    (old_board / "leaderboard.json").unlink()
    leaderboard(old_board, [*NEW_ARGS, "--no-reference"])  # a table the new set does not have goes too
    assert {"ppl_pg19.csv", "ppl_proofpile.csv"}.isdisjoint(snapshot(old_board)) and set(FOREIGN) <= set(snapshot(old_board))


def test_a_foreign_file_where_a_table_goes_is_refused(old_board, tmp_path, capsys):
    (old_board / "leaderboard.json").unlink()  # without it, a CSV without the leaderboard's header is not pieval's
    (old_board / "passkey.csv").write_text("my own passkey notes\n")
    before = snapshot(old_board)
    assert main(["leaderboard", *NEW_ARGS, "--out", str(old_board)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"pieval leaderboard: error: cannot write --out {old_board}: {old_board}/passkey.csv was not written by "
        f"pieval leaderboard and is in the way of a file it writes; move it out of {old_board}, or pass another --out"
    )
    assert snapshot(old_board) == before and sorted(p.name for p in tmp_path.iterdir()) == ["lb"]


def test_a_failed_swap_leaves_the_old_set_and_nothing_else(sets, old_board, tmp_path, monkeypatch, capsys):
    """A write refused at the last step (the file system turned read-only) is one line, and leaves no trace."""

    def refused(a, b):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(b))

    monkeypatch.setattr(atomic, "_exchange", refused)
    assert main(["leaderboard", *NEW_ARGS, "--out", str(old_board)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pieval leaderboard: error: cannot write --out {old_board}: read-only file system; "
        "pass --out a directory on a writable file system"
    )
    assert snapshot(old_board) == sets[0] and sorted(p.name for p in tmp_path.iterdir()) == ["lb"]


# Run the CLI and SIGKILL it at one point: (function of pieval.atomic to wrap, the call that kills).
KILLER = """
import os, signal, sys
from pieval import atomic

name, nth = sys.argv[1], int(sys.argv[2])
real, calls = getattr(atomic, name), []

def dies(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

if name == "_exchange" and nth == 0:  # a file system without an exchange: killed between the two renames
    atomic._exchange = lambda a, b: False
    rename = os.replace
    def between(src, dst):
        if os.path.isdir(src) and str(src).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        rename(src, dst)
    atomic.os.replace = between
else:
    setattr(atomic, name, dies)
from pieval.cli import main
sys.exit(main(sys.argv[3:]))
"""
KILL_POINTS = [
    ("write_bytes", 1),  # the first table, half-written in the temporary directory
    ("write_bytes", 5),
    ("write_bytes", 8),  # the manifest, after every table
    ("_exchange", 1),  # the complete new set, just before the swap
    ("retire", 1),  # just after the swap, the old set not yet removed
]


@pytest.mark.parametrize("point, nth", KILL_POINTS + [("_exchange", 0)])
def test_kill_9_leaves_the_old_or_the_new_set(sets, old_board, tmp_path, point, nth):
    old, new = sets
    run = subprocess.run(
        [sys.executable, "-c", KILLER, point, str(nth), "leaderboard", *NEW_ARGS, "--out", str(old_board)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == -9, run.stderr
    if (point, nth) == ("_exchange", 0):
        assert not old_board.exists()  # between the renames: the old set waits beside --out
        assert main(["leaderboard", str(FIXTURES / "bad" / "foreign"), "--out", str(old_board)]) == 2
        assert snapshot(old_board) == old  # put back by the next run, even one that writes nothing
    else:
        assert snapshot(old_board) in (old, new)
        assert (snapshot(old_board) == new) == (point == "retire")
    leaderboard(old_board, NEW_ARGS)  # the next run cleans up after the killed one
    assert snapshot(old_board) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lb"]


def test_a_file_made_during_the_run_is_not_lost(old_board, tmp_path):
    """A foreign file that appears in the old directory after the carry-over moves into the new one."""
    real = atomic.retire

    def late(old, into, owned):
        (old / "late.txt").write_text("written during the run")
        return real(old, into, owned)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(atomic, "retire", late)
        leaderboard(old_board, NEW_ARGS)
    assert (old_board / "late.txt").read_text() == "written during the run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lb"]


def test_owned_reads_the_manifest_or_the_old_layout(tmp_path):
    """What counts as pieval's in --out: the manifest's files; before the manifest, the old layout."""
    files = {
        "t.csv": "source,model,base_model,method,L,L',steps,x\n", "mine.csv": "a,b\n", "plots/kmax_vs_steps.png": "",
        "plots/figure2.png": "", ".t.csv.ab12cd.tmp": "sour", "sub/t.csv": "source,model,base_model,method,L,L',steps,x\n",
    }  # fmt: skip
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    owned = output.owned_in(tmp_path)
    assert [rel for rel in files if owned(rel)] == ["t.csv", "plots/kmax_vs_steps.png", ".t.csv.ab12cd.tmp"]
    (tmp_path / "leaderboard.json").write_text(json.dumps({"files": ["mine.csv"]}))
    owned = output.owned_in(tmp_path)
    assert [rel for rel in [*files, "leaderboard.json"] if owned(rel)] == ["mine.csv", "leaderboard.json"]
    assert not owned("later.csv")  # decided once: a file that appears afterwards is not pieval's


SLOW = """
import sys, time
from pieval.leaderboard import output
def slow(*args, **kwargs):
    print("building", flush=True)
    time.sleep(60)
output.publish = slow
from pieval.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_leaderboard_into_the_same_out_is_refused(old_board, capsys):
    """While one `pieval leaderboard` writes --out, another is refused with the first one's pid and command."""
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW, "leaderboard", *NEW_ARGS, "--out", str(old_board)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline() == "building\n"
        assert main(["leaderboard", *NEW_ARGS, "--out", str(old_board)]) == 2
    finally:
        first.kill()
        first.wait()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is being written by pid {first.pid} on host " in err, err
    assert f"(pieval leaderboard {NEW_ARGS[0]} --out {old_board}); wait for that run to finish, or pass another --out" in err
    leaderboard(old_board, NEW_ARGS)  # the first one was killed: its lock is taken over
    assert "took over the lock" in capsys.readouterr().err
