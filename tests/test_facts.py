"""The facts a checkpoint records (config.json's "pieval" key) survive transformers' own load and save."""

from __future__ import annotations

import json

from transformers import AutoConfig, LlamaConfig
from transformers.utils import logging as hf_logging

from pieval import facts, loading

FACTS = facts.FinetuneFacts(
    method="pi", base_window=256, factor=4.0, context_length=1024, steps=200, base_model="models/kjv-llama-tiny",
    base_revision=None, base_sha="0" * 64, data="train.jsonl", data_revision=None, task="lm", seed=0, pieval_version="0.1.0",
)  # fmt: skip


def test_facts_round_trip_through_autoconfig_without_warnings(tmp_path, caplog):
    config = LlamaConfig(max_position_embeddings=1024, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4})
    setattr(config, facts.CONFIG_KEY, FACTS.to_dict())
    config.save_pretrained(tmp_path / "a")
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            loaded = AutoConfig.from_pretrained(tmp_path / "a")
            loaded.save_pretrained(tmp_path / "b")
    finally:
        hf_logging.disable_propagation()
    assert caplog.records == []
    assert facts.recorded(loaded) == FACTS.to_dict()
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == json.loads((tmp_path / "a" / "config.json").read_text())
    # pieval info's torch-free reader sees the same facts
    assert facts.recorded(loading.read_config(loading.Source.of(str(tmp_path / "a")))) == FACTS.to_dict()


def test_a_checkpoint_pieval_did_not_make_records_nothing():
    assert facts.recorded(LlamaConfig()) == {}
    assert FACTS.at_step(3).steps == 3 and FACTS.steps == 200
