"""The fine-tuning recipe's settings: one typed dataclass, loadable from YAML/JSON, overridable from the CLI.

Defaults are the paper's recipe (`pieval.protocol`, Sec. 3.1). The command line is generated
from the fields (each field's ``help`` metadata), so a setting exists once: in this file.
Each field also says its group (a --help heading; flags and YAML keys stay flat) and whether
it is ``runtime``: free to change when a run is resumed, and so not part of the run's identity.
`validate` collects every invalid setting into one `ConfigError`, as litgpt's
``validate_args`` does, so a user fixes a config in one round trip.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pieval import protocol
from pieval.errors import UserError

# The paper fine-tunes on the Pile; this is its public copy without the copyrighted subsets
# (plain jsonl.zst files, so `datasets` streams it without a loading script).
DEFAULT_HUB_DATA = "monology/pile-uncopyrighted"

log = logging.getLogger(__name__)


class ConfigError(UserError):
    """One or more invalid settings; the message lists each with its fix."""


def _opt(default, help: str, runtime: bool = False, **kw):
    """A setting: its default, its --help line, and whether it is ``runtime`` (see `RUNTIME_FIELDS`)."""
    metadata = {"help": help, "runtime": runtime, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# The settings' groups, in --help order (a group is a heading there; flags and YAML keys stay flat).
_model = functools.partial(_opt, group="model and extension")
_data = functools.partial(_opt, group="data")
_train = functools.partial(_opt, group="optimisation (the paper's recipe, Sec. 3.1)")
_lora = functools.partial(_opt, group="LoRA (peft; checkpoints hold the merged model)")
_output = functools.partial(_opt, group="output, checkpoints, resume")
_eval = functools.partial(_opt, group="evaluation as it trains")
_logging = functools.partial(_opt, group="logging")

# --gradient-checkpointing auto turns it on from this L' (models/recipes/README.md gives the
# measurements): below it the activations are small and recomputing them costs ~30% speed.
CHECKPOINTING_FROM = 4096
# Positions per chunk of --loss chunked: 1024 x 32000 fp32 logits = 131 MB, enough rows that
# the head's matmul runs at full speed.
DEFAULT_CHUNK = 1024


def resolve_checkpointing(setting: str, context_length: int) -> bool:
    """Whether the run checkpoints activations: ``on``/``off`` as given, ``auto`` by L'."""
    return setting == "on" or (setting == "auto" and context_length >= CHECKPOINTING_FROM)


# Values renamed since: still accepted, with a one-line warning, and read as the new one
# (also in the run.json of a run made before, so resuming it finds the same run).
_RENAMED = {"method": {"none": "direct"}}
# gradient_checkpointing was a true/false switch (YAML recipes and run.json files still say so).
_WAS_BOOL = {"gradient_checkpointing": {True: "on", False: "off", "true": "on", "false": "off"}}


@dataclass
class FinetuneConfig:
    model: str | None = _model(None, "base checkpoint: a local HF directory, a hub id, or a .gguf file (required)")
    gguf_file: str | None = _model(None, "a GGUF file inside --model's directory (loaded dequantized; checkpoints are plain safetensors)")
    scaling_factor: float | None = _model(None, "s = L'/L, relative to the checkpoint's trained window L")
    context_length: int | None = _model(None, "target window L' (alternative to --scaling-factor)")
    method: str = _model("pi", "pi: Position Interpolation; direct: the paper's direct fine-tuning baseline (train at L', rope unchanged; 'none' is its old name)", choices=("pi", "direct"))
    task: str = _model("lm", "lm: next-token loss on packed documents; govreport: PI prompt + summary, loss on the summary only", choices=("lm", "govreport"))
    trust_remote_code: bool = _model(False, "allow model code from the hub (off unless you pass it)")
    data: str | None = _data(None, f"local .txt/.jsonl/.parquet (.gz), directory of .txt, or a hub dataset id (default {DEFAULT_HUB_DATA}); for --task govreport a jsonl with document/summary fields (default: SCROLLS gov_report)")
    data_config: str | None = _data(None, "hub dataset configuration")
    data_split: str = _data("train", "hub dataset split")
    data_revision: str | None = _data(None, "hub dataset revision (commit or tag) for a reproducible stream")
    text_field: str = _data("text", "jsonl/parquet/hub field holding the text (--task lm)")
    shuffle_buffer: int = _data(10_000, "documents held for the seeded streaming shuffle (1 = file order)")
    max_steps: int = _train(protocol.FINETUNE_STEPS, "optimizer steps", runtime=True)
    global_batch: int = _train(protocol.FINETUNE_GLOBAL_BATCH, "sequences per optimizer step, over all processes")
    micro_batch: int = _train(1, "sequences per forward pass per process (the rest is gradient accumulation)", runtime=True)
    lr: float = _train(protocol.FINETUNE_LR, "peak learning rate")
    warmup_steps: int = _train(protocol.FINETUNE_WARMUP_STEPS, "linear warm-up steps")
    warmup_start: float = _train(protocol.FINETUNE_WARMUP_START, "warm-up starts at this fraction of the peak lr")
    # The paper keeps the lr constant after the warm-up; a small model fine-tuned at a high lr
    # ends noisier than it started, and annealing is the usual remedy (measured in models/recipes/kjv_tiny_cpu.yaml).
    decay_steps: int | None = _train(None, "cosine decay of the lr over this many steps after the warm-up, to --min-lr-ratio x the peak, then constant (default: constant after the warm-up, the paper)")
    min_lr_ratio: float = _train(0.1, "the lr at the end of --decay-steps, as a fraction of the peak")
    betas: list[float] = _train(list(protocol.FINETUNE_BETAS), "AdamW betas, e.g. 0.9,0.95")
    weight_decay: float = _train(protocol.FINETUNE_WEIGHT_DECAY, "AdamW weight decay")
    # The paper does not state clipping; 1.0 is LLaMA's pre-training value. 0 disables it.
    max_grad_norm: float = _train(1.0, "gradient-norm clipping (0 = off)")
    seed: int = _train(0, "seed for data order and initialisation of anything random (LoRA)")
    precision: str = _train("auto", "auto (bf16 where the GPU has it, fp32 on CPU), bf16, fp16 or fp32", choices=("auto", "bf16", "fp16", "fp32"))
    gradient_checkpointing: str = _train("auto", f"recompute each layer's activations in the backward pass (less memory, ~30%% slower); auto: on when L' >= {CHECKPOINTING_FROM}", choices=("auto", "on", "off"), runtime=True)
    loss: str = _train("chunked", "training loss: chunked (output head + cross-entropy chunk by chunk, never the L' x V logits), full (all logits at once, the old path), liger (Liger-Kernel's fused kernel, CUDA, pip install liger-kernel)", choices=("chunked", "full", "liger"), runtime=True)
    loss_chunk: int = _train(DEFAULT_CHUNK, "positions per chunk of --loss chunked (memory ~ chunk x vocab x 4 bytes, twice in backward)", runtime=True)
    attn_implementation: str | None = _train(None, "transformers attention kernel, e.g. sdpa or flash_attention_2", runtime=True)
    lora: bool = _lora(False, "train LoRA adapters instead of all weights (checkpoints hold the merged model)")
    lora_r: int = _lora(8, "LoRA rank")
    lora_alpha: float = _lora(16.0, "LoRA alpha")
    lora_dropout: float = _lora(0.0, "LoRA dropout")
    lora_target_modules: list[str] = _lora(["q_proj", "k_proj", "v_proj", "o_proj"], "modules that get adapters")
    output: str | None = _output(None, "run directory (required)", runtime=True)
    save_every: int = _output(200, "save a checkpoint every N steps (and always at the end)", runtime=True)
    keep_training_state: int = _output(2, "keep optimizer/RNG state in only the newest N checkpoints (0 = all)", runtime=True)
    resume: bool = _output(False, "continue from the newest complete checkpoint in --output", runtime=True)
    overwrite: bool = _output(False, "replace a different run found in --output", runtime=True)
    eval_tasks: list[str] = _eval([], "lm-eval tasks run on each evaluated checkpoint, e.g. passkey,pg19_ppl", runtime=True)
    eval_every: int | None = _eval(None, "evaluate every N steps (default: every saved checkpoint); step 0 and the end are always evaluated", runtime=True)
    eval_limit: float | None = _eval(None, "lm-eval --limit (documents per task) for quick runs", runtime=True)
    eval_batch_size: int = _eval(1, "lm-eval batch size", runtime=True)
    eval_metadata: dict = _eval({}, 'lm-eval --metadata for the tasks, JSON, e.g. {"data_path": "books/"}', runtime=True)
    eval_include_path: str | None = _eval(None, "extra directory of lm-eval task YAMLs", runtime=True)
    eval_log_samples: bool = _eval(False, "also write lm-eval's per-sample logs (as --log_samples); pieval leaderboard draws passkey heat maps from them", runtime=True)
    # Multi-process runs: the other processes wait at a barrier while the main one evaluates, and
    # torch's default process-group timeout (10 min for NCCL) is shorter than a long-context evaluation.
    barrier_timeout_min: int = _eval(180, "minutes processes may wait for each other (evaluations included)", runtime=True)
    log_with: str | None = _logging(None, "also log to tensorboard or wandb (must be installed)", choices=("tensorboard", "wandb"), runtime=True)
    progress: bool = _logging(True, "show a progress bar", runtime=True)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_file(cls, path: str | Path) -> dict:
        """The settings in a YAML or JSON file, as a dict (keys may use - or _)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML/JSON: {e}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)} - {"config"})
        if unknown:
            raise ConfigError(f"unknown settings {unknown} in {path}; known: {', '.join(f.name for f in dataclasses.fields(cls))}")
        data.pop("config", None)
        return data

    @classmethod
    def build(cls, settings: dict) -> FinetuneConfig:
        """Coerce values (strings from the CLI, numbers from YAML) to the field types, then validate."""
        errors, values = [], {}
        settings = renamed(settings, log.warning)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in settings:
                try:
                    values[f.name] = _coerce(settings[f.name], hints[f.name])
                except (TypeError, ValueError) as e:
                    errors.append(f"{f.name}={settings[f.name]!r}: {e}")
        if errors:
            raise ConfigError("invalid settings:\n  " + "\n  ".join(errors))
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        e = []
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                e.append(f"{f.name} must be one of {', '.join(choices)} (got {value!r})")
        if not self.model:
            e.append("model is required: --model PATH_OR_HUB_ID")
        if not self.output:
            e.append("output is required: --output DIR (the run directory)")
        if self.scaling_factor is not None and self.context_length is not None:
            e.append("pass either --scaling-factor or --context-length, not both")
        if self.scaling_factor is not None and not (math.isfinite(self.scaling_factor) and self.scaling_factor >= 1):
            e.append(f"scaling_factor must be >= 1 (got {self.scaling_factor}): PI compresses positions into the trained window; s = L'/L")
        if self.context_length is not None and self.context_length < 1:
            e.append(f"context_length must be a positive number of tokens (got {self.context_length})")
        for name in ("max_steps", "loss_chunk", "global_batch", "micro_batch", "save_every", "shuffle_buffer", "lora_r", "eval_batch_size", "barrier_timeout_min"):
            if getattr(self, name) < 1:
                e.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.micro_batch >= 1 and self.global_batch % self.micro_batch:
            e.append(
                f"global_batch ({self.global_batch}) must be a multiple of micro_batch ({self.micro_batch}); "
                f"e.g. --micro-batch {math.gcd(self.global_batch, self.micro_batch)}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            e.append(f"lr must be a positive number (got {self.lr})")
        if self.warmup_steps < 0:
            e.append(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if not 0 < self.warmup_start <= 1:
            e.append(f"warmup_start must be in (0, 1] (got {self.warmup_start})")
        if self.decay_steps is not None and self.decay_steps < 1:
            e.append(f"decay_steps must be >= 1 (got {self.decay_steps}); leave it unset for a constant lr after the warm-up")
        if not 0 <= self.min_lr_ratio <= 1:
            e.append(f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            e.append(f"betas must be two numbers in [0, 1), e.g. 0.9,0.95 (got {self.betas})")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.keep_training_state < 0 or self.lora_dropout < 0:
            e.append("weight_decay, max_grad_norm, keep_training_state and lora_dropout must be >= 0")
        if self.eval_every is not None and self.eval_every < 1:
            e.append(f"eval_every must be >= 1 (got {self.eval_every})")
        if self.eval_every is not None and not self.eval_tasks:
            e.append("eval_every needs --eval-tasks (e.g. --eval-tasks passkey,pg19_ppl)")
        if self.resume and self.overwrite:
            e.append("pass --resume (continue the run in --output) or --overwrite (start it again), not both")
        if e:
            raise ConfigError("invalid fine-tuning settings:\n  " + "\n  ".join(e))


# Settings that may change when a run is resumed (extend it, evaluate more, log differently):
# those marked runtime=True. Every other setting defines the run, and a different value means
# a different run.
RUNTIME_FIELDS = frozenset(f.name for f in dataclasses.fields(FinetuneConfig) if f.metadata["runtime"])


# Settings added after runs were recorded: left out of the identity while at their default, so a
# run.json written before they existed still names the same run.
_ADDED_LATER = {"decay_steps": None, "min_lr_ratio": 0.1}


def run_identity(config: FinetuneConfig) -> dict:
    return {
        k: v for k, v in config.to_dict().items()
        if k not in RUNTIME_FIELDS and not (k in _ADDED_LATER and v == _ADDED_LATER[k])
    }  # fmt: skip


def renamed(settings: dict, warn=None) -> dict:
    """``settings`` with renamed values replaced by their current names; ``warn(line)`` for each."""
    out = dict(settings)
    for name, values in _WAS_BOOL.items():
        old = out.get(name)
        if isinstance(old, (bool, str)) and not (isinstance(old, str) and old.lower() not in values):
            out[name] = values[old.lower() if isinstance(old, str) else old]
    for name, names in _RENAMED.items():
        old = out.get(name)
        if isinstance(old, str) and old in names:
            out[name] = names[old]
            if warn is not None:
                warn(f"--{name.replace('_', '-')} {old} is deprecated: use --{name.replace('_', '-')} {names[old]}")
    return out


def _coerce(value, hint):
    """A CLI string or YAML value as the field's type (``int | None``, ``list[str]``, ...)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0])
    origin = typing.get_origin(hint) or hint
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list or a comma-separated string, got {type(value).__name__}")
        return [_coerce(v, item) for v in value]
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a JSON object ({e.msg})") from None
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {type(value).__name__}")
        return value
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError("expected true or false")
    if origin is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or isinstance(value, float):
            raise TypeError("expected an integer")
        return int(value)
    if origin is float:
        if isinstance(value, bool):
            raise TypeError("expected a number")
        return float(value)
    if origin is str:
        return str(value)
    raise TypeError(f"unsupported setting type {hint}")
