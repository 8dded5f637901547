"""Bad inputs through the real command line: one line of `CASES` per case.

Each case runs its command as a user would (``pieval ...`` or ``lm_eval ...`` as a subprocess,
``python -m``), in a fresh directory ``{tmp}`` that its ``setup`` fills, and requires its exit
status, its message fragment in exactly one line of stderr, no traceback, and, for a refusal
(non-zero status), nothing left behind: ``{tmp}`` holds what ``setup`` made, nothing more.

To add a case, for this command or another one (``lm_eval --model pi_llama``, ``pieval
finetune``, ``pieval info``), add a line: the arguments (``{tmp}``, ``{good}``, ``{bad}`` and
``{repo}`` are filled in), the exit status, the fragment, and if it needs them a ``setup``
(files, a lock holder: it gets ``{tmp}`` and an ExitStack for what must be stopped after),
``unprivileged=True`` (so that permission bits apply even for root), ``mount`` (a directory
under ``{tmp}`` that is a tmpfs for the run, read-only or tiny, in a user namespace) and
``then`` (a check of what the command wrote); it runs in ``cwd`` (default ``{repo}``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_locking import hold

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "results"
GOOD, BAD = FIXTURES / "good", FIXTURES / "bad"
PI_SAMPLES = "pi/models__kjv-llama-tiny/samples_passkey_2026-11-25T10-23-00.jsonl"
PI_RESULTS = "pi/models__kjv-llama-tiny/results_2026-11-25T10-23-00.json"

Setup = Callable[[Path, contextlib.ExitStack], None]


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # the program ("pieval", "lm_eval") and its arguments
    status: int
    message: str  # a fragment of one stderr line
    setup: Setup | None = None
    unprivileged: bool = False  # run where permission bits apply, even for root
    mount: tuple[str, str] | None = None  # (a directory under {tmp}, tmpfs options): mounted so for the run
    then: Callable[[Path], None] | None = None
    writes: bool = False  # a non-zero status that still writes its output (--strict)
    cwd: str = "{repo}"


# ---------------------------------------------------------------- set-ups


def a_file(name: str) -> Setup:
    return lambda tmp, stack: (tmp / name).write_text("not a directory\n")


def read_only_dir(name: str) -> Setup:
    def setup(tmp: Path, stack: contextlib.ExitStack) -> None:
        (tmp / name).mkdir()
        (tmp / name).chmod(0o555)

    return setup


def held(name: str) -> Setup:
    """Another run is writing into {tmp}/name."""

    def setup(tmp: Path, stack: contextlib.ExitStack) -> None:
        proc = hold(tmp / name)
        stack.callback(proc.wait)
        stack.callback(proc.kill)

    return setup


def killed_holder(name: str) -> Setup:
    """A run into {tmp}/name was killed with SIGKILL, its lock file left behind."""

    def setup(tmp: Path, stack: contextlib.ExitStack) -> None:
        proc = hold(tmp / name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    return setup


def cut_samples(keep_lines: int | None = None, cut_last_line: bool = False) -> Setup:
    """{tmp}/pi: the PI run whose lm_eval died while writing its passkey samples log."""

    def setup(tmp: Path, stack: contextlib.ExitStack) -> None:
        shutil.copytree(GOOD / "pi", tmp / "pi")
        path = tmp / PI_SAMPLES
        lines = path.read_bytes().splitlines(keepends=True)
        if keep_lines is not None:
            lines = lines[:keep_lines]
        if cut_last_line:
            lines[-1] = lines[-1][: len(lines[-1]) // 2]
        path.write_bytes(b"".join(lines))

    return setup


def a_foreign_table(name: str) -> Setup:
    """{tmp}/name holds a passkey.csv that pieval did not write."""

    def setup(tmp: Path, stack: contextlib.ExitStack) -> None:
        (tmp / name).mkdir()
        (tmp / name / "passkey.csv").write_text("my passkey notes\n")

    return setup


# ---------------------------------------------------------------- checks of what was written


def no_heat_map_and_the_manifest_says_why(fragment: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        assert (tmp / "lb" / "passkey.csv").is_file()  # the tables are all there
        assert not list((tmp / "lb").glob("plots/passkey_heatmap_*"))
        problems = json.loads((tmp / "lb" / "leaderboard.json").read_text())["problems"]
        assert [p["message"] for p in problems if fragment in p["message"]], problems

    return check


def lock_released(tmp: Path) -> None:
    assert (tmp / "lb" / "passkey.csv").is_file() and not (tmp / ".lb.lock").exists()


LB = ("pieval", "leaderboard", "{good}")
MOUNTED = "-- left in the mounted directory:"
CUT = "the lm_eval run was cut short while writing it; re-run it with --log_samples"

CASES = [
    Case("leaderboard: --out is a file", (*LB, "--out", "{tmp}/file"), 2,
         "pieval leaderboard: error: cannot write --out {tmp}/file: it is a file, not a directory; pass --out a directory",
         setup=a_file("file")),
    Case("leaderboard: --out below a file", (*LB, "--out", "{tmp}/file/board"), 2,
         "error: cannot write --out {tmp}/file/board (at {tmp}/file): a file stands where a directory is needed; "
         "pass --out a path whose parents are directories", setup=a_file("file")),
    Case("leaderboard: --out in a read-only directory", (*LB, "--out", "{tmp}/ro/board"), 2,
         "error: cannot write --out {tmp}/ro/board (at {tmp}/ro/, where it writes beside --out): permission denied; "
         "pass --out a directory you can write", setup=read_only_dir("ro"), unprivileged=True),
    Case("leaderboard: --out a read-only directory", (*LB, "--out", "{tmp}/ro"), 2,
         "error: cannot write --out {tmp}/ro: permission denied; pass --out a directory you can write",
         setup=read_only_dir("ro"), unprivileged=True),
    Case("leaderboard: --out the current directory", (*LB, "--out", "."), 2,
         "error: --out . is the current directory or holds it; pass --out a directory of its own (e.g. leaderboards/)",
         cwd="{tmp}"),
    Case("leaderboard: --out on a read-only file system", (*LB, "--out", "{tmp}/ro/board"), 2,
         "error: cannot write --out {tmp}/ro/board (at {tmp}/ro/, where it writes beside --out): read-only file system; "
         "pass --out a directory on a writable file system", mount=("ro", "ro")),
    Case("leaderboard: --out on a full disk", (*LB, "--out", "{tmp}/full/board"), 2,
         "error: cannot write --out {tmp}/full/board: no space left on the device; free some space, or pass --out "
         "a directory on another disk", mount=("full", "size=8k")),
    Case("leaderboard: a foreign file where a table goes", (*LB, "--out", "{tmp}/lb"), 2,
         "error: cannot write --out {tmp}/lb: {tmp}/lb/passkey.csv was not written by pieval leaderboard and is in the "
         "way of a file it writes; move it out of {tmp}/lb, or pass another --out", setup=a_foreign_table("lb")),
    Case("leaderboard: a second run into the same --out", (*LB, "--out", "{tmp}/lb"), 2,
         "error: {tmp}/lb is being written by pid", setup=held("lb")),
    Case("leaderboard: a second run names the fix", (*LB, "--out", "{tmp}/lb"), 2,
         "; wait for that run to finish, or pass another --out (lock file: {tmp}/.lb.lock)", setup=held("lb")),
    Case("leaderboard: a lock left by a killed run", (*LB, "--out", "{tmp}/lb"), 0,
         "pieval leaderboard: note: took over the lock {tmp}/.lb.lock left by pid", setup=killed_holder("lb"),
         then=lock_released),
    Case("leaderboard: a samples log cut mid-line", ("pieval", "leaderboard", "{tmp}/pi", "--out", "{tmp}/lb", "--plots"), 0,
         f"pieval leaderboard: skipped: no heat map column for models/kjv-llama-tiny PI ({PI_RESULTS}): {PI_SAMPLES} "
         f"ends in a cut-off line; {CUT}", setup=cut_samples(cut_last_line=True),
         then=no_heat_map_and_the_manifest_says_why("ends in a cut-off line")),
    Case("leaderboard: a samples log short of samples, --strict",
         ("pieval", "leaderboard", "{tmp}/pi", "--out", "{tmp}/lb", "--plots", "--strict"), 1,
         f"skipped: no heat map column for models/kjv-llama-tiny PI ({PI_RESULTS}): {PI_SAMPLES} holds 13 of the 16 "
         f"samples its results file counts (n-samples); {CUT}", setup=cut_samples(keep_lines=13),
         then=no_heat_map_and_the_manifest_says_why("holds 13 of the 16"), writes=True),
    Case("leaderboard: nothing to build from", ("pieval", "leaderboard", "{bad}/foreign", "--out", "{tmp}/lb"), 2,
         "error: no measured row could be built from {bad}/foreign (1 input(s) skipped, see above); nothing written to {tmp}/lb"),
]  # fmt: skip


# ---------------------------------------------------------------- pieval finetune on a tiny random LLaMA


@functools.cache
def _tiny_llama() -> Path:
    """Built once per test process (as conftest's ``tiny_llama_dir``), copied into each case's {tmp}."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "kjv-llama-tiny")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix="pieval-tiny-llama-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_llama(*more: Setup) -> Setup:
    """{tmp}/model: the tiny LLaMA (L = 256); then ``more``."""

    def setup(tmp: Path, stack: contextlib.ExitStack) -> None:
        shutil.copytree(_tiny_llama(), tmp / "model")
        for other in more:
            other(tmp, stack)

    return setup


def a_text(name: str, text: str) -> Setup:
    return lambda tmp, stack: (tmp / name).write_text(text)


def a_gpt2_config(tmp: Path, stack: contextlib.ExitStack) -> None:
    """{tmp}/gpt2: a model without rotary positions (its config alone: nothing more may be read)."""
    (tmp / "gpt2").mkdir()
    (tmp / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}))


def a_run_that_never_stepped(tmp: Path, stack: contextlib.ExitStack) -> None:
    """{tmp}/run: what a fine-tune that failed before its first step left (other settings)."""
    (tmp / "run").mkdir()
    (tmp / "run" / "run.json").write_text(json.dumps({"identity": {"lr": 0.5}, "settings": {"lr": 0.5}}))
    (tmp / "run" / "metrics.jsonl").write_text("")


def finished_run(tmp: Path) -> None:
    assert os.readlink(tmp / "run" / "final") == "checkpoint-000001"
    assert not (tmp / ".run.lock").exists()
    assert json.loads((tmp / "run" / "run.json").read_text())["identity"]["lr"] == 0.001


def finetune(*extra: str, model: str = "{tmp}/model", data: str = "{repo}/models/corpus/kjv/train.jsonl.gz") -> tuple[str, ...]:
    return (
        "pieval", "finetune", "--model", model, "--data", data, "--scaling-factor", "4", "--output", "{tmp}/run",
        "--global-batch", "4", "--micro-batch", "2", "--lr", "1e-3", "--max-steps", "1", "--no-progress", *extra,
    )  # fmt: skip


FT = "pieval finetune: error: "
CASES += [
    Case("finetune: an unknown --eval-tasks name", finetune("--eval-tasks", "passkee"), 2,
         f"{FT}--eval-tasks 'passkee' is not an lm-eval task (pieval's included): did you mean 'passkey'?",
         setup=tiny_llama()),
    Case("finetune: --data that does not exist", finetune(data="{tmp}/nope.jsonl"), 2,
         f"{FT}--data {{tmp}}/nope.jsonl does not exist: pass a .txt, .jsonl or .parquet file", setup=tiny_llama()),
    Case("finetune: --data without the text field", finetune(data="{tmp}/rows.jsonl"), 2,
         f"{FT}--data {{tmp}}/rows.jsonl: rows.jsonl:1 has no 'text' field (has ['body']); pass --text-field with the "
         "field that holds the text", setup=tiny_llama(a_text("rows.jsonl", '{"body": "In the beginning"}\n'))),
    Case("finetune: --data shorter than one sequence", finetune(data="{tmp}/small.txt"), 2,
         f"{FT}--data {{tmp}}/small.txt holds only 16 tokens (documents joined by EOS); one training sequence needs "
         "1024 (L'). Use more text or a smaller --context-length/--scaling-factor",
         setup=tiny_llama(a_text("small.txt", "In the beginning God created the heaven and the earth."))),
    Case("finetune: a model without RoPE, refused from its config", finetune(model="{tmp}/gpt2"), 2,
         f"{FT}checkpoint '{{tmp}}/gpt2' (model_type='gpt2') has no rotary position embedding", setup=a_gpt2_config),
    Case("finetune: a second run into the same --output", finetune(), 2,
         f"{FT}{{tmp}}/run is being written by pid", setup=tiny_llama(held("run"))),
    Case("finetune: a second run names the fix", finetune(), 2,
         "; wait for that run to finish, or pass another --output (lock file: {tmp}/.run.lock)",
         setup=tiny_llama(held("run"))),
    Case("finetune: a lock left by a killed run", finetune(), 0,
         "pieval finetune: note: took over the lock {tmp}/.run.lock left by pid", setup=tiny_llama(killed_holder("run")),
         then=finished_run),
    Case("finetune: a run that failed before its first step does not block", finetune(), 0,
         "pieval finetune: note: --output {tmp}/run held a run that failed before its first step; starting this one there",
         setup=tiny_llama(a_run_that_never_stepped), then=finished_run),
]  # fmt: skip


# ---------------------------------------------------------------- lm_eval --model pi_llama and pieval info, on the reference model

TOY = "{repo}/models/kjv-llama-tiny"
HELDOUT = '"data_path": "{repo}/models/corpus/kjv/heldout"'


def lm_eval(model_args: str = "", metadata: str = "", *extra: str, tasks: str = "local_ppl") -> tuple[str, ...]:
    """``lm_eval --model pi_llama`` on the reference model (L = 256), scoring one document."""
    md = ", ".join(m for m in (HELDOUT, '"stride": 128', metadata) if m)
    args = ",".join(a for a in (f"pretrained={TOY}", model_args) if a)
    return ("lm_eval", "--model", "pi_llama", "--model_args", args, "--tasks", tasks, "--limit", "1",
            "--metadata", "{{" + md + "}}", *extra)  # fmt: skip


def an_empty_dir(name: str) -> Setup:
    return lambda tmp, stack: (tmp / name).mkdir()


LM = "lm_eval: error: "
CASES += [
    Case("lm_eval: a misspelt model_arg", lm_eval("scaling_factr=4"), 1,
         f"{LM}model_arg scaling_factr= is an argument of neither pi_llama, lm-eval's hf model nor the model's "
         "from_pretrained: did you mean scaling_factor?"),
    Case("lm_eval: yarn beta_fast <= beta_slow", lm_eval("scaling_factor=2,rope_method=yarn,beta_fast=1,beta_slow=4"), 1,
         f"{LM}beta_fast must be > beta_slow (got beta_fast=1, beta_slow=4)"),
    Case("lm_eval: batch_size=0 in model_args", lm_eval("batch_size=0"), 1,
         f'{LM}batch_size=0 is not a positive integer, "auto" or "auto:N"'),
    Case("lm_eval: --batch_size 0", lm_eval("", "", "--batch_size", "0"), 1,
         f'{LM}batch_size=0 is not a positive integer, "auto" or "auto:N"'),
    Case("lm_eval: malformed --metadata JSON", ("lm_eval", "--model", "pi_llama", "--model_args", f"pretrained={TOY}",
         "--tasks", "local_ppl", "--metadata", '{{"stride": x}}'), 1,
         LM + 'Invalid JSON: {{"stride": x}}. Hint: Use double quotes for JSON strings.'),
    Case("lm_eval: a misspelt metadata key", lm_eval("", '"max_doc_token": 512'), 1,
         f"{LM}local_ppl: unknown metadata key(s) 'max_doc_token': did you mean 'max_doc_tokens'?"),
    Case("lm_eval: strid for stride", lm_eval("", '"strid": 64'), 1,
         f"{LM}local_ppl: unknown metadata key(s) 'strid': did you mean 'stride'?"),
    Case("lm_eval: the default stride on a 256-token window", ("lm_eval", "--model", "pi_llama", "--model_args",
         f"pretrained={TOY}", "--tasks", "local_ppl", "--limit", "1", "--metadata", "{{" + HELDOUT + "}}"), 1,
         "stride 256 > W-1 = 255 for window 256: tokens between windows would never be scored; pass a stride <= 255 "
         """(--metadata '{{"stride": 128}}')"""),
    Case("lm_eval: passkey lengths too short for the prompt", lm_eval("", '"lengths": [48]', tasks="passkey"), 1,
         f"{LM}passkey length 48 cannot hold the prompt: its fixed text is"),
    Case("lm_eval: pretrained= a folder without config.json", ("lm_eval", "--model", "pi_llama", "--model_args",
         "pretrained={tmp}/empty", "--tasks", "local_ppl"), 1,
         f"{LM}'{{tmp}}/empty' has no config.json: pass the folder of a saved model", setup=an_empty_dir("empty")),
    Case("info: a folder without config.json", ("pieval", "info", "{tmp}/empty"), 2,
         "pieval info: error: '{tmp}/empty' has no config.json: pass the folder of a saved model",
         setup=an_empty_dir("empty")),
]  # fmt: skip


# ---------------------------------------------------------------- the runner


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as probe:
        probed = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {probe}"], capture_output=True)
    return probed.returncode == 0


def _unprivileged() -> list[str] | None:
    """A command prefix under which permission bits apply: none needed for a user, for root one
    without the capabilities that override them; None where that cannot be had."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def _command(argv: tuple[str, ...], fill: dict[str, str]) -> list[str]:
    program, *args = (a.format(**fill) for a in argv)
    return [sys.executable, "-m", {"pieval": "pieval", "lm_eval": "lm_eval"}[program], *args]


def _listing(tmp: Path) -> list[str]:
    return sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case):
    if case.mount and not _can_mount():
        pytest.skip("no user namespaces here to mount a file system")
    prefix = _unprivileged() if case.unprivileged else []
    if prefix is None:
        pytest.skip("running as root without setpriv: permission bits do not apply")
    tmp = Path(tempfile.mkdtemp(prefix="pieval-bad-input-"))
    fill = {"tmp": str(tmp), "good": str(GOOD), "bad": str(BAD), "repo": str(REPO)}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        stack.callback(lambda: [p.chmod(0o755) for p in tmp.rglob("*") if p.is_dir() and not p.is_symlink()])
        if case.setup:
            case.setup(tmp, stack)
        before = _listing(tmp)
        command = prefix + _command(case.argv, fill)
        if case.mount:
            where, options = case.mount
            (tmp / where).mkdir()
            before = _listing(tmp)
            # the mount lives as long as the command: what it left there is listed on stdout after it
            script = f'mount -t tmpfs -o {options} tmpfs "$0" || exit 99; "$@"; rc=$?; echo "{MOUNTED}"; '
            script += 'find "$0" -mindepth 1; exit $rc'
            command = ["unshare", "-rm", "sh", "-c", script, str(tmp / where), *command]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        run = subprocess.run(
            command, capture_output=True, text=True, cwd=case.cwd.format(**fill), env=env, timeout=300
        )  # fmt: skip
        message = case.message.format(**fill)
        assert run.returncode == case.status, run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        assert [line for line in run.stderr.splitlines() if message in line], (message, run.stderr)
        if case.status != 0 and not case.writes:
            # the last word is the refusal ("pieval leaderboard: error: ...", "lm_eval: error: ...")
            assert run.stderr.splitlines()[-1].startswith((f"{case.argv[0]} ", f"{case.argv[0]}:")), run.stderr
            assert _listing(tmp) == before  # nothing left behind
            if case.mount:
                assert run.stdout.split(f"{MOUNTED}\n")[-1] == "", run.stdout
        if case.then:
            case.then(tmp)
