"""Shared fixtures: the committed reference model, its held-out books, and a tiny random LLaMA.

The random model shares the reference tokenizer, so tests that need exact numbers
(brute-force references) run in milliseconds while using real text.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REF_MODEL = REPO / "models" / "kjv-llama-tiny"
HELDOUT = REPO / "models" / "corpus" / "kjv" / "heldout"
# The real reference model, re-created by `make real-model` (which `make test` runs first).
REAL_MODEL = REPO / "models" / "smollm2-135m" / "hf"
REAL_GGUF = REPO / "models" / "smollm2-135m" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ref_model_dir() -> Path:
    return REF_MODEL


@pytest.fixture(scope="session")
def ref_tokenizer(ref_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref_model_dir)


@pytest.fixture(scope="session")
def heldout_dir() -> Path:
    return HELDOUT


def _made_by_recipe(path: Path) -> Path:
    # a failure, not a skip: CI makes the model, so its absence is a broken set-up
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make real-model` (models/smollm2-135m/make.py) first")
    return path


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain checkpoint (L = 8192)."""
    return _made_by_recipe(REAL_MODEL / "model.safetensors").parent


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The GGUF file the checkpoint was made from."""
    return _made_by_recipe(REAL_GGUF)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random LLaMA (trained window 256, default rope) with the reference tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(REF_MODEL)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
