"""`pieval finetune`: options generated from `FinetuneConfig`, so the CLI and config files agree
(grouped in --help as the settings are grouped there).

Precedence: the dataclass defaults (the paper's recipe) < ``--config FILE`` (YAML or JSON) <
options on the command line. Example (the CPU demo, models/recipes/kjv_tiny_cpu.yaml)::

    pieval finetune --config models/recipes/kjv_tiny_cpu.yaml --output runs/kjv-pi4
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from pieval.finetune.config import FinetuneConfig

_FLAG_NAMES = {"scaling_factor": ["--scaling-factor", "-s"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON file of settings (command-line options override it)")
    hints = typing.get_type_hints(FinetuneConfig)
    groups = {}  # one --help heading per settings group
    for f in dataclasses.fields(FinetuneConfig):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        flags = _FLAG_NAMES.get(f.name, [f"--{f.name.replace('_', '-')}"])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_ = f"{f.metadata['help']} (default: {_show(default)})"
        if set(f.metadata.get("choices", ())) == {"auto", "on", "off"}:
            # a switch with a third state: --flag (on), --no-flag (off), --flag auto|on|off
            groups[group].add_argument(*flags, dest=f.name, nargs="?", const="on", choices=f.metadata["choices"], default=argparse.SUPPRESS, help=help_)
            groups[group].add_argument(flags[0].replace("--", "--no-", 1), dest=f.name, action="store_const", const="off", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif hints[f.name] is bool:
            groups[group].add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            # Values stay strings here; FinetuneConfig.build coerces them with the file's values.
            metavar = "{" + ",".join(f.metadata["choices"]) + "}" if "choices" in f.metadata else _metavar(hints[f.name])
            groups[group].add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=help_)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    settings = FinetuneConfig.from_file(args.config) if getattr(args, "config", None) else {}
    settings.update({k: v for k, v in vars(args).items() if k not in ("config", "command")})
    return FinetuneConfig.build(settings)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from pieval.finetune.recipe import finetune  # torch/transformers only once the settings are valid

    finetune(config)
    return 0


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value).replace("%", "%%")


def _metavar(hint) -> str:
    text = str(hint)
    for name, meta in (("list", "A,B"), ("dict", "JSON"), ("float", "X"), ("int", "N")):
        if name in text:
            return meta
    return "STR"
