"""The run directory: checkpoints written atomically, found again for resume, and run identity.

Layout of ``--output DIR``::

    run.json                    the run's settings; a different run here is refused
    metrics.jsonl               one line per optimizer step: loss, lr, tokens/s
    checkpoint-000200/          a plain Hugging Face checkpoint (the product) ...
        config.json             ... rope_parameters {rope_type: linear, factor, rope_theta}, max_position_embeddings = L',
                                and under "pieval" how it was made (method, L, steps, base model, data, seed:
                                `pieval.facts`), the one record every reader of the checkpoint uses
        model.safetensors, tokenizer files
        finetune_config.json    the resolved settings (hyper-parameters beside the weights)
        trainer_state.json      what resume needs: step, data position, tokens seen, last loss and lr
        training_state/         accelerate's save_state: weights in fp32, optimizer, scheduler, RNG
    final -> checkpoint-001000  link to the last checkpoint of the last run that finished (set at its
                                end only: a failed or killed run leaves it as it was, or absent)
    eval/                       see pieval.finetune.evaluate

A checkpoint directory is built under a temporary name and renamed into place, so one that
exists is whole; resume still checks its weight files (`verify_weights`: a disk can fill, a
copy can be cut) and falls back past a damaged one. ``training_state/`` is pruned from all
but the newest few checkpoints. A run that never took a step (it failed on the way there)
holds nothing worth keeping: the next run into its directory replaces it without --overwrite.
"""

from __future__ import annotations

import copy
import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from pieval import atomic, facts
from pieval.errors import UserError
from pieval.facts import FinetuneFacts
from pieval.finetune.config import renamed

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "finetune_config.json"
STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state"
FINAL_LINK = "final"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunDirError(UserError):
    """--output holds something this run must not overwrite."""


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / f"checkpoint-{step:06d}"


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints (temporary directories never match), oldest first."""
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def started(output: Path) -> bool:
    """Whether the run in ``output`` took an optimizer step (logged one, or saved a checkpoint after one)."""
    return bool(read_metrics(output, up_to_step=1 << 62)) or any(step > 0 for step, _ in checkpoints(output))


def prepare_run_dir(output: Path, identity: dict, settings: dict, resume: bool, overwrite: bool, note=print) -> None:
    """Refuse a directory holding another run (unless overwrite); record this run in run.json.

    A run that never took a step is replaced without --overwrite (``note`` says so), unless
    this is the same run resumed.
    """
    run_file = output / RUN_FILE
    if output.exists() and not output.is_dir():
        raise RunDirError(f"--output {output} is a file; pass a directory")
    try:
        existing = json.loads(run_file.read_text()) if run_file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        if not overwrite:
            raise RunDirError(f"{run_file} is unreadable; pass --overwrite to start the run in {output} again") from None
        existing = None
    if existing is not None and not overwrite and not started(output) and not (resume and same_run(existing, identity)):
        note(f"--output {output} held a run that failed before its first step; starting this one there")
        overwrite = True
    if overwrite:
        _clear_run(output)
    elif existing is not None and not same_run(existing, identity):
        old = renamed(existing.get("identity", {}))
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        shown = ", ".join(f"{k}: {old.get(k)!r} there vs {identity.get(k)!r} now" for k in diff)
        raise RunDirError(
            f"--output {output} holds a different run ({shown}); pass --overwrite to replace it, "
            "or choose another --output"
        )
    elif existing is None and output.is_dir() and any(output.iterdir()):
        raise RunDirError(
            f"--output {output} is not empty and holds no pieval fine-tuning run ({RUN_FILE} missing); "
            "choose an empty or new directory, or pass --overwrite to write into it anyway"
        )
    elif existing is not None and not resume and checkpoints(output):
        raise RunDirError(
            f"--output {output} already holds checkpoints of this run; pass --resume to continue it "
            "or --overwrite to start it again"
        )
    for leftover in output.glob(".checkpoint-*.tmp") if output.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)  # a save cut short by a kill
    atomic.write_text(run_file, json.dumps({"identity": identity, "settings": settings}, indent=1) + "\n")


def same_run(existing: dict, identity: dict) -> bool:
    """Whether run.json's contents ``existing`` record the run of ``identity``."""
    return renamed(existing.get("identity", {})) == identity


def _clear_run(output: Path) -> None:
    """Remove what a pieval run writes, and nothing else a user may keep in the directory."""
    if not output.is_dir():
        return
    for p in output.iterdir():
        ours = _CHECKPOINT.match(p.name) or p.name in (RUN_FILE, METRICS_FILE, FINAL_LINK, "eval", "logs")
        ours = ours or (p.name.startswith(".checkpoint-") and p.name.endswith((".tmp", ".old")))
        if not ours:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextlib.contextmanager
def _shared_tmp_dir(accelerator, path: Path) -> Iterator[Path]:
    """`atomic.directory` on the main process; every process writes into the same temporary dir.

    Two barriers: all writes land before the main process renames the directory into place, and
    no process goes on (e.g. to load the checkpoint for evaluation) before that rename is done.
    """
    from accelerate.utils import broadcast_object_list

    with atomic.directory(path) if accelerator.is_main_process else contextlib.nullcontext() as tmp:
        shared = [str(tmp) if accelerator.is_main_process else None]
        if accelerator.num_processes > 1:
            broadcast_object_list(shared)
        yield Path(shared[0])
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()


def save_checkpoint(
    accelerator, model, tokenizer, output: Path, step: int, settings: dict, trainer_state: dict,
    made: FinetuneFacts, save_dtype: torch.dtype,
) -> Path:
    """Write checkpoint-<step>: HF weights + tokenizer + settings, and the state to resume from.

    ``made`` goes into config.json under `pieval.facts.CONFIG_KEY`.
    """
    path = checkpoint_dir(output, step)
    with _shared_tmp_dir(accelerator, path) as tmp:
        accelerator.save_state(str(tmp / TRAINING_STATE))
        hf_model = accelerator.unwrap_model(model)
        if _is_peft(hf_model):
            # A merged copy, so the adapters in training stay untouched (bit-exact resume).
            state_dict = None
            hf_model = copy.deepcopy(hf_model).merge_and_unload() if accelerator.is_main_process else None
        else:
            state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards; every process must call it
        if accelerator.is_main_process:
            if state_dict is None:
                state_dict = hf_model.state_dict()
            state_dict = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
            train_dtype = hf_model.config.dtype
            hf_model.config.dtype = save_dtype
            setattr(hf_model.config, facts.CONFIG_KEY, made.to_dict())
            try:
                hf_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            finally:
                hf_model.config.dtype = train_dtype
            tokenizer.save_pretrained(tmp)
            atomic.ordinary_modes(tmp)
            atomic.write_text(tmp / CONFIG_FILE, json.dumps(settings, indent=1) + "\n")
            atomic.write_text(tmp / STATE_FILE, json.dumps(trainer_state, indent=1) + "\n")
    return path


def weights_sha(source) -> str | None:
    """sha256 over a local base model's weight files (name and bytes, in name order); None for a hub id.

    Identifies the base model a checkpoint was made from when it has no hub revision.
    """
    root = Path(source.pretrained).expanduser()
    if source.gguf_file is not None:
        files = [root / source.gguf_file]
    elif root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    else:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest() if files else None


def _is_peft(model) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def link_final(output: Path, path: Path) -> None:
    """Point ``final`` at checkpoint ``path`` (atomically: a reader sees the old link or the new one)."""
    link = output / FINAL_LINK
    tmp = output / f".{FINAL_LINK}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(path.name, tmp)
    os.replace(tmp, link)


def drop_final_after(output: Path, step: int) -> None:
    """Remove ``final`` when it names a checkpoint past ``step``: one resume fell back past (damaged), or lost."""
    link = output / FINAL_LINK
    m = _CHECKPOINT.match(os.readlink(link)) if link.is_symlink() else None
    if m and int(m.group(1)) > step:
        link.unlink()


def verify_weights(path: Path) -> None:
    """Raise `DamagedCheckpoint` when a weight file of checkpoint ``path`` is missing or not whole.

    A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte
    range, then the data: its size must be exactly what the header describes. Cheap (headers
    only), and catches what a kill, a full disk or a cut copy leaves.
    """
    index = path / "model.safetensors.index.json"
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    except (ValueError, KeyError, AttributeError) as e:
        raise DamagedCheckpoint(f"{index.name} is unreadable ({type(e).__name__})") from None
    for name in names:
        _check_safetensors(path / name)


class DamagedCheckpoint(ValueError):
    """A checkpoint's weight file that is missing, or shorter or longer than its header says."""


def _check_safetensors(file: Path) -> None:
    if not file.is_file():
        raise DamagedCheckpoint(f"{file.name} is missing")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            if n < 2 or 8 + n > size:
                raise ValueError
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            raise DamagedCheckpoint(f"{file.name} has no readable safetensors header ({size} bytes)") from None
    if size != 8 + n + end:
        raise DamagedCheckpoint(f"{file.name} holds {size} bytes where its header describes {8 + n + end}")


def prune_training_state(output: Path, keep: int) -> None:
    """Drop optimizer/RNG state from all but the newest ``keep`` checkpoints (their weights stay)."""
    if keep <= 0:
        return
    with_state = [p for _, p in checkpoints(output) if (p / TRAINING_STATE).is_dir()]
    for p in with_state[:-keep]:
        shutil.rmtree(p / TRAINING_STATE)


def load_newest(accelerator, output: Path, log) -> dict | None:
    """Restore the newest checkpoint whose state loads; say which ones were skipped and why.

    Returns its trainer state, or None when there is nothing to resume from.
    """
    candidates = [p for _, p in reversed(checkpoints(output))]
    skipped: list[str] = []
    for path in candidates:
        try:
            if not (path / TRAINING_STATE).is_dir():
                raise FileNotFoundError(f"no {TRAINING_STATE}/ (pruned, see --keep-training-state)")
            state = json.loads((path / STATE_FILE).read_text())
            verify_weights(path)  # the product: resuming past a damaged one would leave it damaged
            accelerator.load_state(str(path / TRAINING_STATE))
        except Exception as e:  # any unreadable piece means: not this one, try the previous
            skipped.append(f"{path.name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            log(f"cannot resume from {path.name}: {type(e).__name__}: {e}".splitlines()[0])
            continue
        if skipped:
            log(f"resuming from {path.name} (step {state['step']}), falling back past: {'; '.join(skipped)}")
        else:
            log(f"resuming from {path.name} (step {state['step']})")
        return state
    if candidates:
        raise UserError(
            f"no checkpoint in {output} can be resumed: {'; '.join(skipped)}. "
            "Pass --overwrite to start the run again"
        )
    log(f"--resume: no checkpoint in {output} yet, starting at step 0")
    return None


def read_metrics(output: Path, up_to_step: int) -> list[dict]:
    """The logged steps <= up_to_step (later ones, and a line cut by a kill, belong to the lost run)."""
    path = output / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= up_to_step:
            rows.append(row)
    return rows


def rewrite_metrics(output: Path, rows: list[dict]) -> None:
    atomic.write_text(output / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def append_metrics(output: Path, row: dict) -> None:
    # One short O_APPEND write per step; a kill can only cut the last line, which resume drops.
    with open(output / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
