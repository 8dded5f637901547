"""`pieval info PATH`: a checkpoint's RoPE window as pi_llama will see it.

It reads config.json (or a GGUF file's header) directly, so it answers without importing torch
or transformers (`pieval.loading.read_config`).
"""

from __future__ import annotations

import argparse
import json

from pieval import facts, loading, rope


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint folder (with config.json), hub model id, or a .gguf file")
    parser.add_argument("--gguf-file", help="a GGUF file inside PATH (as lm-eval's gguf_file=)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def describe(config) -> dict:
    """The checkpoint as saved: base window L, rope type, factor s, window L', theta, and how
    `pieval finetune` made it when it did (the facts its config.json records)."""
    spec = rope.resolve(config)
    made = facts.recorded(config)
    return {
        "model_type": config.model_type,
        "base_window": spec.base_window,
        "rope_type": rope.rope_parameters(config)["rope_type"],
        "factor": spec.factor,
        "context_length": spec.context_length,
        "theta": spec.theta,
        "max_position_embeddings": config.max_position_embeddings,
        **({"finetune": made} if made else {}),
    }


def _finetune_line(made: dict) -> str:
    """e.g. "directly to L'=1024, 200 steps from models/kjv-llama-tiny"."""
    how = "directly" if made.get("method") == "direct" else f"with PI s={float(made.get('factor') or 1):g}"
    return f"{how} to L'={made.get('context_length')}, {made.get('steps')} steps from {made.get('base_model')}"


LABELS = {
    "model_type": "model type",
    "base_window": "base window L",
    "rope_type": "rope type",
    "factor": "factor s",
    "context_length": "window L'",
    "theta": "rope_theta",
    "max_position_embeddings": "max_position_embeddings",
    "finetune": "fine-tuned",
}


def run(args: argparse.Namespace) -> int:
    source = loading.Source.of(args.path, args.gguf_file, args.revision)
    info = {"checkpoint": source.label, **describe(loading.read_config(source))}
    if args.json:
        print(json.dumps(info))
        return 0
    labels = {"checkpoint": "checkpoint", **LABELS}
    width = max(map(len, labels.values()))
    for key, value in info.items():
        shown = f"{value:g}" if isinstance(value, float) else _finetune_line(value) if key == "finetune" else value
        print(f"{labels[key]:<{width}}  {shown}")
    return 0
