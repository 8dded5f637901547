"""The recipe's settings: the paper's numbers as defaults, config files, CLI overrides, validation."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from pieval.finetune.cli import add_arguments, config_from_args
from pieval.finetune.config import RUNTIME_FIELDS, ConfigError, FinetuneConfig, renamed, run_identity
from pieval.finetune.recipe import build_optimizer, build_scheduler, lr_factor

BASE = {"model": "m", "output": "o", "scaling_factor": 4}


def parse(argv: list[str]) -> FinetuneConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def _lrs(config: FinetuneConfig, steps: int) -> list[float]:
    """The lr of each of the first `steps` optimizer steps, as the training loop drives them."""
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], config)
    sched = build_scheduler(opt, config)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_lr_schedule_matches_the_paper():
    # Sec. 3.1: peak 2e-5, linear warm-up over 20 steps starting from 10% of the peak, then constant.
    lrs = _lrs(FinetuneConfig.build(BASE), 501)
    expected = {0: 2e-6, 1: 2e-6 + 1.8e-5 / 20, 19: 2e-6 + 1.8e-5 * 19 / 20, 20: 2e-5, 500: 2e-5}
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-12), step
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:21]))  # strictly rising during the warm-up
    assert lrs[20:] == pytest.approx([2e-5] * 481, rel=1e-12)
    assert lr_factor(0, 20, 0.1) == 0.1 and lr_factor(20, 20, 0.1) == 1.0


def test_cosine_decay_after_the_warm_up():
    # --decay-steps: after the warm-up, a cosine from the peak to min_lr_ratio x peak, then flat there.
    lrs = _lrs(FinetuneConfig.build({**BASE, "lr": 1e-3, "warmup_steps": 5, "decay_steps": 100, "min_lr_ratio": 0.1}), 131)
    assert lrs[0] == pytest.approx(1e-4) and lrs[5] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-4 + 9e-4 * 0.5)  # half way: the cosine's midpoint
    assert lrs[105:] == pytest.approx([1e-4] * 26)
    assert all(a > b for a, b in zip(lrs[5:105], lrs[6:106]))  # strictly falling during the decay
    with pytest.raises(ConfigError, match=r"decay_steps must be >= 1 \(got 0\)"):
        FinetuneConfig.build({**BASE, "decay_steps": 0})
    with pytest.raises(ConfigError, match=r"min_lr_ratio must be in \[0, 1\] \(got 1.5\)"):
        FinetuneConfig.build({**BASE, "min_lr_ratio": 1.5})


def test_settings_added_later_keep_old_runs_resumable():
    # a run.json written before decay_steps existed names the same run while it is unset
    config = FinetuneConfig.build(BASE)
    assert "decay_steps" not in run_identity(config) and "min_lr_ratio" not in run_identity(config)
    decayed = FinetuneConfig.build({**BASE, "decay_steps": 100})
    assert run_identity(decayed)["decay_steps"] == 100 and run_identity(decayed) != run_identity(config)


def test_optimizer_hyper_parameters_are_the_papers():
    config = FinetuneConfig.build(BASE)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], config)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.95)
    assert group["weight_decay"] == 0.0
    assert config.lr == 2e-5 and config.max_steps == 1000 and config.global_batch == 64
    assert config.method == "pi" and config.precision == "auto" and config.trust_remote_code is False


def test_config_file_then_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text("model: base\noutput: out\ncontext-length: 1024\nlr: 1.0e-4\neval_tasks: [passkey, pg19_ppl]\nlora: true\n")
    config = parse(["--config", str(tmp_path / "c.yaml"), "--lr", "3e-4", "--global-batch", "8", "--no-lora"])
    assert config.model == "base" and config.context_length == 1024
    assert config.lr == 3e-4 and config.global_batch == 8  # the command line wins
    assert config.eval_tasks == ["passkey", "pg19_ppl"] and config.lora is False
    (tmp_path / "c.json").write_text(json.dumps({"model": "m", "output": "o", "scaling_factor": 2, "betas": [0.8, 0.9]}))
    config = parse(["--config", str(tmp_path / "c.json"), "--eval-tasks", "a,b", "--eval-metadata", '{"data_path": "x"}'])
    assert config.betas == [0.8, 0.9] and config.eval_tasks == ["a", "b"] and config.eval_metadata == {"data_path": "x"}


def test_every_documented_option_exists_on_the_command_line():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    for flag in (
        "--model", "--data", "--scaling-factor", "--context-length", "--output", "--max-steps", "--global-batch",
        "--micro-batch", "--lr", "--save-every", "--seed", "--method", "--resume", "--overwrite", "--eval-tasks",
        "--eval-every", "--config", "--task", "--lora", "--gradient-checkpointing", "--trust-remote-code",
    ):  # fmt: skip
        # the whole flag: --data must not pass on the strength of --data-config
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag


def test_unknown_key_in_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("model: m\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        FinetuneConfig.from_file(tmp_path / "c.yaml")


def test_all_invalid_settings_reported_at_once():
    with pytest.raises(ConfigError) as e:
        FinetuneConfig.build({"model": "m", "output": "o", "scaling_factor": 0.5, "global_batch": 64, "micro_batch": 5, "method": "ntk", "lr": -1})
    msg = str(e.value)
    assert "scaling_factor must be >= 1 (got 0.5)" in msg
    assert "multiple of micro_batch" in msg and "--micro-batch 1" in msg
    assert "method must be one of pi, direct (got 'ntk')" in msg and "lr must be a positive number" in msg


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"scaling_factor": "four"}, "scaling_factor='four'"),
        ({"context_length": 1024}, "either --scaling-factor or --context-length"),
        ({"model": None}, "model is required"),
        ({"eval_every": 200}, "eval_every needs --eval-tasks"),
        ({"resume": True, "overwrite": True}, "not both"),
        ({"betas": [0.9]}, "betas must be two numbers"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig.build({**BASE, **settings})


def test_run_identity_ignores_runtime_settings():
    a = FinetuneConfig.build(BASE)
    b = FinetuneConfig.build({**BASE, "max_steps": 5, "eval_tasks": ["x"], "micro_batch": 2, "resume": True})
    c = FinetuneConfig.build({**BASE, "lr": 1e-4})
    assert run_identity(a) == run_identity(b) != run_identity(c)


def test_runtime_fields_are_the_ones_a_resumed_run_may_change():
    """Pinned: a different set would change the identity of every run already on disk."""
    assert RUNTIME_FIELDS == {
        "max_steps", "save_every", "keep_training_state", "resume", "overwrite", "micro_batch",
        "gradient_checkpointing", "attn_implementation", "eval_tasks", "eval_every", "eval_limit",
        "eval_batch_size", "eval_metadata", "eval_include_path", "eval_log_samples", "barrier_timeout_min", "log_with",
        "progress", "output", "loss", "loss_chunk",  # the loss's implementation, not its value
    }  # fmt: skip


def test_method_none_is_the_old_name_of_direct(caplog):
    with caplog.at_level("WARNING"):
        config = parse(["--model", "m", "--output", "o", "--scaling-factor", "4", "--method", "none"])
    assert config.method == "direct"
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == "--method none is deprecated: use --method direct"
    # a run made before the rename is the same run as the one asked for now
    old = {**run_identity(config), "method": "none"}
    assert renamed(old) == run_identity(config)
