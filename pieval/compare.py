"""`pieval compare`: a checkpoint as saved and each rope method at one L', side by side, without fine-tuning.

Each method is one stock `lm_eval --model pi_llama` run (printed first, so the sweep doubles
as the commands to reproduce one cell), then `pieval leaderboard` over the runs, whose
``methods`` table and plot put the methods in one row each. A run whose results exist is
reused when its recorded model_args and task settings are the ones this sweep asks for, so an
interrupted sweep resumes where it stopped; a different sweep in the same folder is refused.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pieval import loading, protocol, rope
from pieval.errors import UserError
from pieval.steps import run_together

PROG = "pieval compare"
SAVED = "none"  # the checkpoint as saved, run at max_length = L' (direct extrapolation)
DEFAULT_METHODS = (SAVED, "pi", "ntk", "yarn", "dynamic")
DEFAULT_TASKS = ("local_ppl", "passkey")


@dataclass(frozen=True)
class Step:
    """One lm_eval run of the sweep."""

    method: str
    model_args: str
    output: Path
    log: Path

    def command(self, plan: Plan) -> list[str]:
        cmd = [sys.executable, "-m", "lm_eval", "--model", "pi_llama", "--model_args", self.model_args,
               "--tasks", ",".join(plan.tasks), "--metadata", json.dumps(plan.metadata), "--log_samples",
               "--output_path", str(self.output)]  # fmt: skip
        if plan.batch_size:
            cmd += ["--batch_size", str(plan.batch_size)]
        if plan.device:
            cmd += ["--device", plan.device]
        return cmd


@dataclass(frozen=True)
class Plan:
    model: str
    base_window: int
    context_length: int
    tasks: tuple[str, ...]
    metadata: dict
    output: Path
    out: Path
    plots: bool = True
    batch_size: str | None = None
    device: str | None = None
    steps: tuple[Step, ...] = field(default=())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder, hub id or .gguf file (pretrained=)")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help=f"comma-separated: {SAVED} (the checkpoint as saved) and any of {', '.join(rope.METHODS)} "
        f"(default: {','.join(DEFAULT_METHODS)})",
    )  # fmt: skip
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--context-length", type=int, help="the target window L' every method runs at")
    size.add_argument("--scaling-factor", type=float, help="L' = s * L, L the checkpoint's trained window")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="lm-eval tasks (default: local_ppl,passkey)")
    parser.add_argument("--data", help="local_ppl's data_path: a .txt, a folder of .txt, a .jsonl or .parquet (.gz works)")
    parser.add_argument("--windows", help="perplexity windows, comma-separated (default: L, 2L, ... up to L')")
    parser.add_argument("--stride", type=int, help=f"perplexity stride (default: {protocol.STRIDE}, or W/2 below it)")
    parser.add_argument("--max-docs", type=int, help="score only this many documents")
    parser.add_argument("--max-doc-tokens", type=int, help="cut each document to its first N tokens")
    parser.add_argument("--passkey-lengths", help="passkey prompt lengths, comma-separated (default: L')")
    parser.add_argument("--passkey-trials", type=int, help="keys per distance (default: the paper's 10)")
    parser.add_argument("--passkey-distances", type=int, help="distances per length (default: the paper's 32)")
    parser.add_argument("--metadata", default="{}", help="more lm-eval --metadata (JSON); wins over the options above")
    parser.add_argument("--model-args", default="", help="more model_args for every method, e.g. dtype=bfloat16")
    parser.add_argument(
        "--knobs", action="append", default=[], metavar="METHOD:KEY=VALUE[,KEY=VALUE]",
        help="one method's knobs, e.g. yarn:beta_fast=16,beta_slow=2 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--batch-size", help="lm_eval --batch_size")
    parser.add_argument("--device", help="lm_eval --device (e.g. cuda:0)")
    parser.add_argument("--output", help="folder of the runs (default: runs/compare/<model>)")
    parser.add_argument("--out", help="leaderboard folder, replaced as a whole (default: leaderboards/compare/<model>)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")


def _list(text: str | None, what: str, cast=str) -> list:
    if text is None:
        return []
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise UserError(f"--{what} must be comma-separated {cast.__name__}s (got {text!r}), e.g. --{what} 256,512") from None


def _slug(model: str) -> str:
    name = Path(model.rstrip("/")).name if Path(model).exists() else model
    if name in ("hf", "final") and Path(model).exists():  # models/smollm2-135m/hf -> smollm2-135m
        name = Path(model.rstrip("/")).parent.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.removesuffix(".gguf")).strip("_") or "model"


def _knobs(specs: list[str], methods: list[str]) -> dict[str, str]:
    """--knobs METHOD:k=v,k=v -> {method: "k=v,k=v"}, each checked by the method's own rules later."""
    out: dict[str, str] = {}
    for spec in specs:
        method, sep, rest = spec.partition(":")
        method = rope.method_name(method)
        if not sep or not rest or "=" not in rest:
            raise UserError(f"--knobs {spec!r}: write METHOD:KEY=VALUE[,KEY=VALUE], e.g. --knobs yarn:beta_fast=16")
        if method not in methods:
            raise UserError(f"--knobs {spec!r}: {method} is not one of --methods ({','.join(methods)})")
        out[method] = f"{out[method]},{rest}" if method in out else rest
    return out


def _options(args_text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in args_text.split(",") if kv)


def plan_from(args: argparse.Namespace) -> Plan:
    methods = [rope.method_name(m) for m in _list(args.methods, "methods")]
    methods = [SAVED if m == rope.AS_SAVED else m for m in methods]
    bad = [m for m in methods if m != SAVED and m not in rope.METHODS]
    if bad or not methods:
        raise UserError(
            f"--methods {args.methods!r}: unknown {', '.join(bad) or 'empty list'}; use {SAVED} and any of "
            f"{', '.join(rope.METHODS)}"
        )
    if len(set(methods)) != len(methods):
        raise UserError(f"--methods {args.methods!r} names a method twice: each is one run and one row")
    config = loading.read_config(loading.Source.of(args.model))
    L = rope.base_window(config)
    if args.context_length is not None:
        context_length = args.context_length
    else:
        context_length = round(args.scaling_factor * L)
    if context_length <= L:
        raise UserError(
            f"the target window must exceed the checkpoint's trained window L={L} (got L'={context_length}): "
            f"pass e.g. --context-length {4 * L}"
        )
    tasks = tuple(_list(args.tasks, "tasks"))
    metadata = _metadata(args, L, context_length, tasks)
    knobs = _knobs(args.knobs, methods)
    extra = args.model_args.strip(",")
    for key in ("pretrained", "scaling_factor", "context_length", "rope_method", "max_length"):
        if key in _options(extra):
            raise UserError(f"--model-args sets {key}, which compare sets for each method; drop it from --model-args")
    output = Path(args.output or Path("runs") / "compare" / _slug(args.model))
    steps = []
    for method in methods:
        if method == SAVED:
            model_args = f"pretrained={args.model},max_length={context_length}"
        else:
            # each method's knobs are checked here, before any run starts
            rope.resolve(config, context_length=context_length, rope_method=method, options=_options(knobs.get(method, "")))
            model_args = f"pretrained={args.model},rope_method={method},context_length={context_length}"
            if method in knobs:
                model_args += f",{knobs[method]}"
        if extra:
            model_args += f",{extra}"
        steps.append(Step(method, model_args, output / method, output / "logs" / f"{method}.log"))
    out = Path(args.out or Path("leaderboards") / "compare" / _slug(args.model))
    return Plan(args.model, L, context_length, tasks, metadata, output, out, args.plots, args.batch_size, args.device, tuple(steps))


def _metadata(args: argparse.Namespace, L: int, context_length: int, tasks: tuple[str, ...]) -> dict:
    try:
        extra = json.loads(args.metadata)
    except json.JSONDecodeError as e:
        raise UserError(f"--metadata is not JSON ({e}): pass e.g. --metadata '{{\"max_docs\": 2}}'") from None
    if not isinstance(extra, dict):
        raise UserError(f"--metadata must be a JSON object (got {args.metadata!r})")
    windows = _list(args.windows, "windows", int)
    if not windows:
        windows, w = [], L
        while w < context_length:
            windows.append(w)
            w *= 2
        windows.append(context_length)
    stride = args.stride or (protocol.STRIDE if min(windows) > protocol.STRIDE else min(windows) // 2)
    meta: dict = {"windows": windows, "stride": stride}
    if args.data:
        meta["data_path"] = str(args.data)
    elif "local_ppl" in tasks and "data_path" not in extra:
        raise UserError("local_ppl needs its documents: pass --data PATH (a .txt, a folder of .txt, a .jsonl or .parquet)")
    for key, value in (("max_docs", args.max_docs), ("max_doc_tokens", args.max_doc_tokens),
                       ("trials", args.passkey_trials), ("num_distances", args.passkey_distances)):  # fmt: skip
        if value is not None:
            meta[key] = value
    meta["lengths"] = _list(args.passkey_lengths, "passkey-lengths", int) or [context_length]
    return {**meta, **extra}


def _latest_results(folder: Path) -> Path | None:
    found = sorted(folder.rglob("results_*.json"), key=lambda p: p.name)
    return found[-1] if found else None


def reusable(step: Step, plan: Plan) -> bool:
    """Whether ``step``'s results already exist and were made by this same sweep.

    A run made with other settings is an error, not a silent mix of two sweeps in one table.
    """
    results = _latest_results(step.output)
    if results is None:
        return False
    from lm_eval.utils import simple_parse_args_string  # how lm_eval itself records --model_args

    data = json.loads(results.read_text())
    why = []
    recorded_args = data.get("config", {}).get("model_args")
    asked = simple_parse_args_string(step.model_args) if isinstance(recorded_args, dict) else step.model_args
    if recorded_args != asked:
        why.append(f"model_args {recorded_args!r}, this sweep {asked!r}")
    missing = sorted(set(plan.tasks) - set(data.get("results", {})))
    if missing:
        why.append(f"no results for {', '.join(missing)}")
    for task in sorted(set(plan.tasks) & set(data.get("configs", {}))):
        recorded = data["configs"][task].get("metadata") or {}
        for key, value in plan.metadata.items():
            if key in recorded and recorded[key] != value:
                why.append(f"{task} {key}={recorded[key]!r}, this sweep {value!r}")
    if why:
        raise UserError(
            f"{step.output} holds a {step.method} run with other settings ({'; '.join(why)}): pass another --output, "
            f"or delete {step.output} to re-run it"
        )
    return True


def run(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    print(f"{PROG}: {plan.model} (L={plan.base_window}) at L'={plan.context_length}: "
          f"{', '.join(s.method for s in plan.steps)} on {', '.join(plan.tasks)}", flush=True)  # fmt: skip
    if not args.dry_run:
        (plan.output / "logs").mkdir(parents=True, exist_ok=True)
    for i, step in enumerate(plan.steps, 1):
        cmd = step.command(plan)
        print(f"[{i}/{len(plan.steps)}] {step.method}\n$ {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        if reusable(step, plan):
            print(f"  reused: {_latest_results(step.output)}", flush=True)
            continue
        run_together([(cmd, step.log)], tail_lines=20)
    board_cmd = ["leaderboard", *(str(s.output) for s in plan.steps), "--out", str(plan.out)]
    board_cmd += ["--plots"] if plan.plots else []
    print(f"$ pieval {shlex.join(board_cmd)}", flush=True)
    if args.dry_run:
        return 0
    from pieval import cli

    code = cli.main(board_cmd)
    if code:
        return code
    _print_table(plan.out / "methods.csv")
    return 0


def _print_table(path: Path) -> None:
    if not path.exists():
        print(f"{PROG}: no methods table was written (no perplexity or passkey result)", file=sys.stderr)
        return
    import pandas as pd

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame = frame[frame["source"] == "measured"]
    shown = ["method", "L'", "benchmark", *[c for c in frame.columns if c.isdigit()]]
    shown += [c for c in ("ppl_growth", "length", "k_max", "k_tested", "acc") if c in frame.columns]
    print(frame[shown].to_string(index=False))
    print(path)
