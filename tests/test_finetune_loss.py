"""The training loss (pieval.finetune.loss) against transformers' own loss and the full-logit gradients."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pieval.errors import UserError
from pieval.finetune import loss as L
from pieval.finetune.config import CHECKPOINTING_FROM, FinetuneConfig, resolve_checkpointing

from conftest import REF_MODEL

CHUNK = 16  # small, so a 48-token sequence spans three chunks and a remainder


def _random_llama(vocab=32000):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).float()


def _random_gemma2(vocab=2048):
    """Gemma 2: soft-capped logits (30 tanh(x/30)), which the chunked loss must apply as the forward does."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=16, query_pre_attn_scalar=8,
        final_logit_softcapping=3.0, attn_implementation="eager",
    )  # fmt: skip  # a small cap, so tanh is far from linear on these logits
    return Gemma2ForCausalLM(cfg).float()


def _toy():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(REF_MODEL, dtype=torch.float32)


def _batch(vocab, n=50, prompt=0):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, n), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100  # the GovReport mask: no loss on the prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # LoRA's B starts at 0: make its gradient path non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _loss_and_grads(model, batch, name):
    model.zero_grad(set_to_none=True)
    value = L.summed_nll(model, batch, name, CHUNK)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [_toy, _random_llama, _random_gemma2], ids=["toy", "llama-v32000", "gemma2-softcap"])
@pytest.mark.parametrize("prompt", [0, 30], ids=["lm", "govreport-mask"])
@pytest.mark.parametrize("lora", [False, True], ids=["full-ft", "lora"])
def test_chunked_loss_and_gradients_equal_the_full_logit_loss(build, prompt, lora):
    model = build()
    model = _lora(model) if lora else model
    model.train()
    batch = _batch(model.config.vocab_size, prompt=prompt)
    # The reference for the value is transformers' own loss (a mean over the labelled positions).
    with torch.no_grad():
        hf = model(**batch, use_cache=False).loss.double() * (batch["labels"][:, 1:] != -100).sum()
    full, full_grads = _loss_and_grads(model, batch, "full")
    chunked, chunked_grads = _loss_and_grads(model, batch, "chunked")
    assert chunked.item() == pytest.approx(hf.item(), rel=1e-6)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    assert chunked_grads.keys() == full_grads.keys() and full_grads
    for name, g in full_grads.items():  # 1e-5 of each gradient's scale (fp32 sums in another order)
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)


class _VocabRows(TorchDispatchMode):
    """The most rows of any tensor an op allocates (views aside: the head's W.T) whose last dimension is the vocabulary."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func in (torch.ops.aten.detach.default, torch.ops.aten.t.default):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("name", ["full", "chunked"])
def test_only_the_full_loss_allocates_a_sequence_by_vocab_tensor(name):
    model = _random_llama()
    batch = _batch(32000, n=96)
    with _VocabRows(32000) as seen:  # forward and backward: every allocation, saved or transient
        L.summed_nll(model, batch, name, CHUNK).backward()
    if name == "full":
        assert seen.rows >= 95  # the probe sees the L' x V logits when they exist
    else:
        assert seen.rows == CHUNK


def test_heads_with_extras_are_refused_naming_loss_full():
    model = _toy()
    model.config.logit_scale = 0.5  # Cohere's: not applied by the chunked loss
    with pytest.raises(UserError, match=r"applies logit_scale to its logits, which --loss chunked does not: use --loss full"):
        L.summed_nll(model, _batch(model.config.vocab_size), "chunked")
    model.config.logit_scale = None
    model.config.final_logit_softcapping = 30.0  # applied by chunked, not by Liger's kernel
    L._refuse_head_extras(model, softcapping=True)
    with pytest.raises(UserError, match=r"applies final_logit_softcapping to its logits, which --loss liger does not: use --loss full"):
        L._refuse_head_extras(model, softcapping=False)  # liger_nll's check, reached once Liger-Kernel imports


def test_liger_matches_the_full_logit_loss_or_says_how_to_get_it():
    model = _toy()
    batch = _batch(model.config.vocab_size, prompt=10)
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install liger-kernel"):
            L.summed_nll(model, batch, "liger")
        pytest.skip("liger-kernel is not installed (pip install liger-kernel); its error was checked")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            L.summed_nll(model, batch, "liger")
        pytest.skip("Liger-Kernel needs a CUDA GPU; its error was checked")
    model, batch = model.cuda(), {k: v.cuda() for k, v in batch.items()}
    full, full_grads = _loss_and_grads(model, batch, "full")
    fused, fused_grads = _loss_and_grads(model, batch, "liger")
    assert fused.item() == pytest.approx(full.item(), rel=1e-5)
    for name, g in full_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_checkpointing_rule_auto_by_context_length_and_forced_either_way():
    assert not resolve_checkpointing("auto", CHECKPOINTING_FROM - 1)
    assert resolve_checkpointing("auto", CHECKPOINTING_FROM)
    assert resolve_checkpointing("on", 256) and not resolve_checkpointing("off", 65536)
    # recipes and run.json files written when it was a true/false switch still load
    for old, new in ((True, "on"), (False, "off"), ("true", "on")):
        assert FinetuneConfig.build({"model": "m", "output": "o", "gradient_checkpointing": old}).gradient_checkpointing == new


@pytest.mark.parametrize(("length", "on"), [(CHECKPOINTING_FROM // 2, False), (CHECKPOINTING_FROM, True)])
def test_auto_checkpointing_is_on_in_the_built_model_from_the_rule_length(length, on, tmp_path):
    from pieval.finetune.recipe import load_model

    config = FinetuneConfig.build({"model": str(REF_MODEL), "output": str(tmp_path), "context_length": length})
    model = load_model(config)[0]
    assert model.is_activation_checkpointing == on


def test_checkpointing_flags_on_off_and_auto():
    import argparse

    from pieval.finetune.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for argv, want in ((["--gradient-checkpointing"], "on"), (["--no-gradient-checkpointing"], "off"), (["--gradient-checkpointing", "off"], "off"), ([], "auto")):
        assert config_from_args(parser.parse_args(["--model", "m", "--output", "o", *argv])).gradient_checkpointing == want
