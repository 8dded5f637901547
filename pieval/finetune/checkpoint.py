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
    final -> checkpoint-001000  link to the last checkpoint
    eval/                       see pieval.finetune.evaluate

A checkpoint directory is built under a temporary name and renamed into place, so one that
exists is whole. ``training_state/`` is pruned from all but the newest few checkpoints.
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


def prepare_run_dir(output: Path, identity: dict, settings: dict, resume: bool, overwrite: bool) -> None:
    """Refuse a directory holding another run (unless overwrite); record this run in run.json."""
    run_file = output / RUN_FILE
    if output.exists() and not output.is_dir():
        raise RunDirError(f"--output {output} is a file; pass a directory")
    try:
        existing = json.loads(run_file.read_text()) if run_file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        if not overwrite:
            raise RunDirError(f"{run_file} is unreadable; pass --overwrite to start the run in {output} again") from None
        existing = None
    if overwrite:
        _clear_run(output)
    elif existing is not None and renamed(existing.get("identity", {})) != identity:
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
            atomic.write_text(tmp / CONFIG_FILE, json.dumps(settings, indent=1) + "\n")
            atomic.write_text(tmp / STATE_FILE, json.dumps(trainer_state, indent=1) + "\n")
    if accelerator.is_main_process:
        _link_final(output, path)
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


def _link_final(output: Path, path: Path) -> None:
    link = output / FINAL_LINK
    tmp = output / f".{FINAL_LINK}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(path.name, tmp)
    os.replace(tmp, link)


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
