"""`pieval` / `python -m pieval`: the project's own commands.

Each subcommand lives in the module that does its job and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches, importing
the chosen module alone so that `pieval info` never pays for torch-heavy imports it
does not need.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pieval.errors import UserError

# name -> (module, one-line help)
COMMANDS = {
    "info": ("pieval.info", "print a checkpoint's base window L, rope type, factor, L' and theta"),
    "finetune": ("pieval.finetune.cli", "fine-tune a RoPE model with Position Interpolation"),
    "leaderboard": ("pieval.leaderboard.cli", "lm-eval result files -> leaderboards/*.csv (+ plots)"),
    "compare": ("pieval.compare", "a checkpoint as saved and each rope method at one L', side by side, unfine-tuned"),
    "plot-bound": ("pieval.bound", "the paper's Figure 2 and the Theorem 2.1 bound ratio"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pieval", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd = argparse.ArgumentParser(prog=f"pieval {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    try:
        return module.run(args)
    except UserError as e:
        print(f"pieval {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pieval {argv[0]}: interrupted", file=sys.stderr)
        return 130
