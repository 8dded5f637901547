"""Shared pieces of the benchmark scripts: arguments, models, memory probes, worker processes.

Each benchmark measures every variant in the same invocation and prints ratios. Memory is
measured in a fresh worker process per variant (``run_worker``): a process's RSS high-water
mark cannot go down, and allocator caches left by one variant would hide the next one's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REF_MODEL = REPO / "models" / "kjv-llama-tiny"
RESULT_PREFIX = "RESULT "

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------- arguments


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, seconds: checks that the script runs and agrees with its reference (kept alive by a test); ratios indicative only")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON spec: run one measurement (internal)
    return p


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """``--seed`` and one ``--<field>`` per `Shape` field of the random model; unset fields stay absent (`shape_from`)."""
    p.add_argument("--seed", type=int, default=0)
    for field, default in vars(Shape()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=argparse.SUPPRESS,
                       help=f"random model's shape (default {default})")


def shape_from(args: argparse.Namespace, **overrides) -> "Shape":
    given = {f: getattr(args, f) for f in vars(Shape()) if hasattr(args, f)}
    return Shape(**{**given, **overrides})


def serve_worker(args: argparse.Namespace, worker) -> bool:
    """In a ``--worker`` process, run its spec (one, or a list in one interpreter) and report; else False."""
    if not args.worker:
        return False
    spec = json.loads(args.worker)
    report({"results": [worker(s) for s in spec]} if isinstance(spec, list) else worker(spec))
    return True


def resolve_dtype(name: str, device: str) -> str:
    if name != "auto":
        return name
    return "bfloat16" if device == "cuda" else "float32"


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch; run with --device cpu")


def machine(device: str) -> str:
    """One line naming what produced the numbers (they mean nothing without it)."""
    import torch
    import transformers

    threads = torch.get_num_threads()
    what = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads {threads}"
    if device == "cuda":
        what = f"{torch.cuda.get_device_name()} + {what}"
    return f"machine: {what}; torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}"


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Shape:
    """A LLaMA-shaped decoder; random weights are enough to measure cost."""

    vocab: int = 32000  # LLaMA's vocabulary: what makes full logits expensive
    hidden: int = 256
    intermediate: int = 688  # LLaMA's ~8/3 x hidden
    layers: int = 2
    heads: int = 4
    max_positions: int = 8192

    def config(self, **extra):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **extra,
        )


def random_model(shape: Shape, seed: int, device: str, dtype: str):
    """The same random weights in every process for the same seed (built on CPU, then moved)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(shape.config())
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def reference_model_ready() -> bool:
    return (REF_MODEL / "config.json").exists() and any(REF_MODEL.glob("*.safetensors"))


def resolve_checkpoint(name: str, workdir: Path) -> tuple[Path, str]:
    """(checkpoint dir, description) for --model: a path, ``reference``, ``random`` or ``auto``.

    ``random`` is a stand-in with the reference model's shape and tokenizer (throughput does not
    depend on the weights); ``auto`` is the reference model when its weights exist, else that
    stand-in. The description is printed so a reader knows which one ran.
    """
    if name == "auto":
        name = "reference" if reference_model_ready() else "random"
    if name == "reference":
        if not reference_model_ready():
            sys.exit(f"--model reference: {REF_MODEL} has no weights yet (it may still be training); use --model random")
        return REF_MODEL, f"reference model {REF_MODEL.relative_to(REPO)}"
    if name == "random":
        return save_reference_standin(workdir / "standin"), "random stand-in with the reference model's shape and tokenizer"
    return checkpoint_dir(name, "a Hugging Face checkpoint directory, 'reference' or 'random'"), f"checkpoint {name}"


def checkpoint_dir(name: str, expected: str = "a Hugging Face checkpoint directory") -> Path:
    """``--model NAME`` as a checkpoint folder, or exit naming what to pass."""
    path = Path(name)
    if not (path / "config.json").exists():
        sys.exit(f"--model {name}: no config.json there; pass {expected}")
    return path


def load_checkpoint(path: str, device: str, dtype: str):
    """A saved causal LM as it is (no interpolation), in ``dtype`` on ``device``, for inference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()


def save_reference_standin(out: Path) -> Path:
    """Random weights in the reference model's architecture (models/kjv-llama-tiny/recipe.yaml)."""
    import torch
    import yaml
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    recipe = yaml.safe_load((REF_MODEL / "recipe.yaml").read_text())
    tok = AutoTokenizer.from_pretrained(REF_MODEL)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=recipe["hidden_size"],
        intermediate_size=recipe["intermediate_size"],
        num_hidden_layers=recipe["num_layers"],
        num_attention_heads=recipe["num_heads"],
        num_key_value_heads=recipe["num_heads"],
        max_position_embeddings=recipe["window"],
        rope_parameters={"rope_type": "default", "rope_theta": float(recipe["rope_theta"])},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- measuring


class MemoryProbe:
    """Peak memory of what runs after ``start()``, in MiB, above what was allocated before.

    CPU: the RSS high-water mark (of live tensors with ``LIVE_MEMORY_ENV``). tracemalloc cannot be used: torch allocates tensors outside
    Python's allocator, so tracemalloc reports ~0 for a 400 MB tensor (checked). Writing "5" to
    /proc/self/clear_refs resets the high-water mark (Linux >= 4.0), so a worker can first load
    its model and then measure only the work; where that is refused the worker's whole-process
    ru_maxrss is used instead, which can only overstate the peak (never understate it).
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    """

    def __init__(self, device: str):
        self.device = device
        self.baseline_mb = 0.0
        self.method = ""

    @property
    def started(self) -> bool:
        return bool(self.method)

    def start(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = torch.cuda.memory_allocated() / 2**20
            self.method = "torch.cuda.max_memory_allocated"
            return
        self.baseline_mb = _status_kb("VmRSS") / 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "RSS high-water (VmHWM reset at start)"
        except OSError:
            self.baseline_mb = 0.0  # cannot separate set-up from work: report the process peak
            self.method = "RSS high-water of the whole worker process"

    def peak_mb(self) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.baseline_mb
        return _status_kb("VmHWM") / 1024 - self.baseline_mb


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (these benchmarks measure CPU memory on Linux)")


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class Stopwatch:
    """Wall time of a block, with the GPU's queued work included."""

    def __init__(self, device: str):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._t0


# --------------------------------------------------------------------------- worker processes


# glibc keeps freed blocks below its (self-raising) mmap threshold mapped, and how much of that it
# keeps varies between identical runs (we saw 44-87 MiB for the same pieval run). Mapping every
# block over 64 KiB and returning it on free makes the CPU high-water mark that of live tensors,
# the quantity torch.cuda.max_memory_allocated reports on a GPU; repeated runs then agree to
# ~0.1 MiB. It costs page faults on every allocation, so timings are taken in runs without it.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_worker(script: str, spec: dict, timeout: float | None = None, live_memory: bool = False) -> dict:
    """Run ``script --worker SPEC`` in a fresh interpreter and return the dict it reports.

    ``live_memory``: run it under ``LIVE_MEMORY_ENV`` (for memory measurements on the CPU).
    """
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, **LIVE_MEMORY_ENV} if live_memory else None
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise RuntimeError(f"worker {spec} exited {proc.returncode} without a result:\n{tail}")


def report(result: dict) -> None:
    """A worker's last line: what ``run_worker`` reads back."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- printing


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (pasted as is into benchmarks/README.md)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda items: "| " + " | ".join(s.rjust(w) for s, w in zip(items, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in cells])


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def ratio(a: float, b: float) -> float:
    """a / b, nan (shown as "-") when b is 0: a tiny model's peak above its weights can round to 0 MiB."""
    return a / b if b else float("nan")


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"
