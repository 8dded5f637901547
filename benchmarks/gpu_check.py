"""The Python side of the GPU check (``gpu_prepare.sh`` here, ``gpu_check.sh`` there).

The device tool carries at most 64 MiB per call, working tree included, and the real model's
GGUF file is 93.8 MiB: it goes xz-compressed (86 MiB: Q4_1 blocks are nearly random bytes, so
xz saves only 8%, but that 8% is the margin two calls need) and cut in two parts, one per call.
Both part folders hold the same manifest, so the far side can check it joined the parts of one
packing.

    python benchmarks/gpu_check.py split GGUF --first-max BYTES --second-max BYTES   # here
    python benchmarks/gpu_check.py join WORK PART2_DIR OUT_GGUF                       # there
    python benchmarks/gpu_check.py env                  # GPU, versions, what imports
    python benchmarks/gpu_check.py finetune-args ARGS   # pieval finetune's own check of ARGS, no training
    python benchmarks/gpu_check.py summary RUN_DIR      # tokens/s and the evaluation table of a run
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.metadata
import importlib.util
import json
import lzma
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import _common as c

PART_DIRS = (c.REPO / ".gpu-part1", c.REPO / ".gpu-part2")
MANIFEST = "gguf.json"
CHUNK = 1 << 20
# what the stages import from the carried wheels and the image, checked before anything runs
VERSIONS = ("torch", "transformers", "accelerate", "lm_eval", "datasets", "fsspec", "pyarrow", "huggingface_hub",
            "tokenizers", "safetensors", "gguf", "flash_attn")  # fmt: skip
IMPORTS = ("lm_eval", "datasets", "gguf", "pieval.backend", "flash_attn")


# --------------------------------------------------------------------------- the model's file


def _recipe():
    """models/smollm2-135m/make.py as a module: the pinned GGUF's sha256, hashing and the cache live there only."""
    spec = importlib.util.spec_from_file_location("smollm2_make", c.REPO / "models" / "smollm2-135m" / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE = _recipe()
sha256 = MAKE.sha256


def part_name(i: int) -> str:
    return f"gguf.xz.part{i + 1}"


def compressed(gguf: Path, cache: Path) -> Path:
    """``gguf`` xz-compressed, kept in the cache (a minute of one core to make)."""
    out = cache / (gguf.name + ".xz")
    stamp = cache / (gguf.name + ".xz.source-sha256")
    source = sha256(gguf)
    if out.is_file() and stamp.is_file() and stamp.read_text().strip() == source:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / (gguf.name + ".xz.tmp")
    with gguf.open("rb") as src, lzma.open(tmp, "wb", preset=6) as dst:
        shutil.copyfileobj(src, dst, CHUNK)
    os.replace(tmp, out)
    stamp.write_text(source + "\n")
    return out


def split(args) -> int:
    gguf = Path(args.gguf)
    if not gguf.is_file():
        sys.exit(f"split: no GGUF file at {gguf}: run `make real-model` first, or pass its path")
    MAKE.check_hash(gguf, MAKE.GGUF_SHA256)
    xz = compressed(gguf, MAKE.cache_dir() / "gpu")
    size = xz.stat().st_size
    # the same slack in both calls, for files that grow between this packing and the calls
    first = max(0, min(args.first_max, size, (size + args.first_max - args.second_max) // 2))
    if size - first > args.second_max:
        sys.exit(f"split: {xz.name} is {size} bytes, more than the two calls hold ({args.first_max} + "
                 f"{args.second_max}): carry fewer wheels or untracked files")  # fmt: skip
    manifest = {"commit": commit(), "gguf_sha256": MAKE.GGUF_SHA256, "xz_sha256": sha256(xz), "parts": [first, size - first]}
    with xz.open("rb") as src:
        for i, (folder, n) in enumerate(zip(PART_DIRS, manifest["parts"])):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            with (folder / part_name(i)).open("wb") as dst:
                _copy(src, dst, n)
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            print(f"{folder.relative_to(c.REPO)}/{part_name(i)}: {n} bytes")
    return 0


def commit() -> str:
    """The checkout's commit, '+changes' when files differ from it: which scripts the stages will run."""
    git = ["git", "-C", str(c.REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    return head + ("+changes" if dirty.strip() else "")


def _copy(src, dst, n: int) -> None:
    while n:
        block = src.read(min(CHUNK, n))
        if not block:
            raise EOFError("the compressed file ended early")
        dst.write(block)
        n -= len(block)


def join(args) -> int:
    """WORK holds part 1 and its manifest (stage 1 put them there); PART2 is the second carry."""
    work, part2, out = Path(args.work), Path(args.part2), Path(args.out)
    try:
        first, second = (json.loads((d / MANIFEST).read_text()) for d in (work, part2))
    except FileNotFoundError as e:
        sys.exit(f"join: {e.filename} is missing: run stage 1 (it keeps part 1 in {work}), then stage 2 right after it")
    if first != second:
        sys.exit(f"join: the parts in {work} and {part2} come from different packings: run gpu_prepare.sh "
                 "once, then stage 1 and stage 2 with its two folders")  # fmt: skip
    xz = work / "gguf.xz"
    with xz.open("wb") as dst:
        for i, folder in enumerate((work, part2)):
            with (folder / part_name(i)).open("rb") as src:
                shutil.copyfileobj(src, dst, CHUNK)
    if sha256(xz) != first["xz_sha256"]:
        sys.exit(f"join: {xz} has the wrong sha256 (a part cut short in transit?): run gpu_prepare.sh and both stages again")
    with lzma.open(xz, "rb") as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
    xz.unlink()
    got = sha256(out)
    if got != first["gguf_sha256"]:
        sys.exit(f"join: {out} has sha256 {got}, expected {first['gguf_sha256']}")
    print(f"{out}: sha256 {got} (the pinned SmolLM2-135M-Instruct.Q4_1.gguf)")
    return 0


# --------------------------------------------------------------------------- there


def env(args) -> int:
    """One line per fact: the GPU, the versions, and what imports (with the error when not)."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        print(f"nvidia-smi: {(smi.stdout or smi.stderr).strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"nvidia-smi: not run ({e})")
    import torch

    print(f"python {platform.python_version()} ({sys.executable}), {os.cpu_count()} CPU cores")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU 0: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}, "
              f"bf16 {torch.cuda.is_bf16_supported()}")  # fmt: skip
    for dist in VERSIONS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"version {dist}: {version}")
    for module in IMPORTS:
        try:
            importlib.import_module(module)
            print(f"import {module}: ok")
        except Exception as e:  # noqa: BLE001 - what failed is the finding
            print(f"import {module}: FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return 0


def finetune_args(args) -> int:
    """Parse and validate ``pieval finetune`` ARGS exactly as the command would, without training."""
    from pieval.errors import UserError
    from pieval.finetune.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="pieval finetune")
    add_arguments(parser)
    try:
        config = config_from_args(parser.parse_args(args.args))
    except UserError as e:
        sys.exit(f"pieval finetune: error: {e}")
    print(f"pieval finetune settings valid: {config.max_steps} steps x {config.global_batch} sequences, "
          f"lr {config.lr:g}, warm-up {config.warmup_steps}, {config.precision}, eval {','.join(config.eval_tasks)} "
          f"every {config.eval_every} steps")  # fmt: skip
    return 0


def summary(args) -> int:
    """The run's training speed and its evaluations as Markdown tables (what the README would quote)."""
    run = Path(args.run)
    metrics = run / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    if steps:
        rates = [s["tokens_per_s"] for s in steps[1:]] or [steps[0]["tokens_per_s"]]
        print(f"training: {len(steps)} steps, loss {steps[0]['loss']:.4f} (step 1) -> {steps[-1]['loss']:.4f} "
              f"(step {steps[-1]['step']}); median {statistics.median(rates):.0f} tokens/s over steps 2-{steps[-1]['step']}")  # fmt: skip
    else:
        print(f"training: no steps logged in {metrics}")
    table = run / "eval" / "table.csv"
    if not table.is_file():
        print(f"evaluations: none ({table} missing)")
        return 0
    header, *rows = list(csv.reader(table.open()))
    print(c.table(header, [[float(v) if v else float("nan") for v in row] for row in rows]))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="compress the GGUF file and cut it into .gpu-part1/ and .gpu-part2/ (here)")
    s.add_argument("gguf")
    s.add_argument("--first-max", type=int, required=True, help="bytes the first call can carry")
    s.add_argument("--second-max", type=int, required=True, help="bytes the second call can carry")
    j = sub.add_parser("join", help="join the parts, check both sha256s, decompress (there)")
    j.add_argument("work", help="folder holding part 1 and its manifest")
    j.add_argument("part2", help="the carried .gpu-part2 folder")
    j.add_argument("out", help="where the GGUF file goes")
    sub.add_parser("env", help="the GPU, the versions, what imports")
    sub.add_parser("finetune-args", help="validate pieval finetune arguments (all that follow) without training")
    r = sub.add_parser("summary", help="tokens/s and the evaluation table of a pieval finetune run")
    r.add_argument("run")
    args, rest = p.parse_known_args()
    if args.command != "finetune-args" and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.args = rest
    return {"split": split, "join": join, "env": env, "finetune-args": finetune_args, "summary": summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
