"""The fused-rotary LlamaAttention: stock logits on CPU with a torch kernel, fused vs torch on GPU."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama
from transformers.monkey_patching import get_patch_mapping

from pieval import flash_rotary, rope
from pieval.errors import UserError


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb_torch(x, cos, sin):
    """flash_attn.layers.rotary.apply_rotary_emb_torch, interleaved=False, without einops.

    x: (batch, seq, heads, head_dim); cos/sin: (batch, seq, rotary_dim/2).
    """
    ro_dim = cos.shape[-1] * 2
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(-2)  # "... d -> ... 1 (2 d)"
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(-2)
    return torch.cat([x[..., :ro_dim] * cos + rotate_half(x[..., :ro_dim]) * sin, x[..., ro_dim:]], dim=-1)


def torch_apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0):
    """flash-attn's apply_rotary_emb contract in torch: row b, token t uses table row offsets[b] + t."""
    assert not interleaved and not inplace, "the subclass must ask for the half-split layout, out of place"
    batch, seq = x.shape[:2]
    rows = torch.as_tensor(seqlen_offsets, device=x.device).expand(batch)[:, None] + torch.arange(seq, device=x.device)
    return apply_rotary_emb_torch(x, cos[rows], sin[rows])


class TorchRotaryAttention(flash_rotary.PIRotaryLlamaAttention):
    rotary_kernel = staticmethod(torch_apply_rotary_emb)


def build(path, s: float, attn: str = "sdpa", **kwargs) -> LlamaForCausalLM:
    """The checkpoint extended by PI factor s, built the supported way (config set before build)."""
    config = AutoConfig.from_pretrained(path)
    rope.apply(config, rope.resolve(config, scaling_factor=s))
    return LlamaForCausalLM.from_pretrained(path, config=config, attn_implementation=attn, **kwargs)


def padded_batch(vocab: int, seq: int = 300):
    """Two rows whose positions differ by more than a shift (RoPE cannot see a uniform shift):
    row 1 is left-padded by 37 tokens and jumps 500 positions half-way, as packed rows do."""
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (2, seq))
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, :37] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    positions[1, seq // 2 :] += 500
    return ids, mask, positions


@pytest.mark.parametrize("s", [1.0, 2.5, 4.0])
def test_subclass_gives_stock_logits_with_torch_kernel(tiny_llama_dir, s):
    stock = build(tiny_llama_dir, s, "sdpa")
    with flash_rotary.interpolated_rotary(TorchRotaryAttention):
        patched = build(tiny_llama_dir, s, "sdpa")
    assert all(isinstance(layer.self_attn, TorchRotaryAttention) for layer in patched.model.layers)
    assert patched.state_dict().keys() == stock.state_dict().keys()
    ids, mask, positions = padded_batch(stock.config.vocab_size)
    with torch.no_grad():
        want = stock(ids, attention_mask=mask, position_ids=positions).logits
        got = patched(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)  # measured: <= 2.4e-7
    assert "flash_attn" not in sys.modules


def test_gradients_match_stock(tiny_llama_dir):
    stock = build(tiny_llama_dir, 4.0, "sdpa")
    with flash_rotary.interpolated_rotary(TorchRotaryAttention):
        patched = build(tiny_llama_dir, 4.0, "sdpa")
    ids = torch.randint(3, stock.config.vocab_size, (1, 200))
    for model in (stock, patched):
        model(ids, labels=ids).loss.backward()
    for name in ("q_proj", "k_proj"):
        torch.testing.assert_close(
            getattr(patched.model.layers[0].self_attn, name).weight.grad,
            getattr(stock.model.layers[0].self_attn, name).weight.grad,
            rtol=1e-4,
            atol=1e-6,
        )


def test_patch_is_undone_after_build(tiny_llama_dir):
    recorders = modeling_llama.LlamaPreTrainedModel._can_record_outputs
    before = dict(recorders)
    with flash_rotary.interpolated_rotary(TorchRotaryAttention):
        patched = build(tiny_llama_dir, 2.0, "eager")
    assert recorders == before and recorders["attentions"] is modeling_llama.LlamaAttention
    assert flash_rotary.PATTERN not in get_patch_mapping()
    assert modeling_llama.LlamaAttention.__name__ == "LlamaAttention"
    later = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    assert type(later.model.layers[0].self_attn) is modeling_llama.LlamaAttention
    # the patched model still reports its attention maps (recorders match by isinstance)
    with torch.no_grad():
        out = patched(torch.arange(3, 40)[None], output_attentions=True)
    assert len(out.attentions) == patched.config.num_hidden_layers
    assert all(a.shape == (1, 4, 37, 37) for a in out.attentions)
    assert "flash_attn" not in sys.modules


def test_unsupported_rope_type_is_refused(tiny_llama_dir):
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    rope.apply(config, rope.resolve(config, scaling_factor=2, rope_method="yarn"))
    with pytest.raises(UserError, match="'yarn'"), flash_rotary.interpolated_rotary(TorchRotaryAttention):
        LlamaForCausalLM.from_pretrained(tiny_llama_dir, config=config)
    # the failed build left nothing patched behind
    assert modeling_llama.LlamaAttention is flash_rotary.STOCK_ATTENTION
    assert get_patch_mapping() == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_flash_without_cuda_names_the_fallback():
    with pytest.raises(UserError, match=r"needs a CUDA GPU and none is visible: use attn_implementation=sdpa"):
        flash_rotary.require_available()
    assert "flash_attn" not in sys.modules


FLASH = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(not FLASH, reason="needs CUDA and flash-attn")
def test_fused_kernel_matches_torch_rotary_on_gpu(tiny_llama_dir):
    from pieval.backend import PILlama

    fused = PILlama(
        pretrained=str(tiny_llama_dir),
        scaling_factor=4,
        device="cuda",
        dtype="bfloat16",
        attn_implementation="flash_attention_2",
    ).model
    assert all(isinstance(layer.self_attn, flash_rotary.PIRotaryLlamaAttention) for layer in fused.model.layers)
    reference = build(tiny_llama_dir, 4.0, "flash_attention_2", dtype=torch.bfloat16).cuda()
    assert type(reference.model.layers[0].self_attn) is modeling_llama.LlamaAttention
    ids = torch.randint(3, reference.config.vocab_size, (2, 900), device="cuda")
    with torch.no_grad():
        got, want = fused(ids).logits.float(), reference(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.fixture
def flash_on_cpu(monkeypatch):
    """PILlama's flash_attention_2 wiring on CPU: availability is faked and the model is built
    with eager attention (transformers itself refuses flash_attention_2 without flash-attn;
    eager, not sdpa, because every family has it: Gemma 2 has no sdpa)."""
    from lm_eval.models.huggingface import HFLM

    original = HFLM._create_model
    mappings = []

    def build_on_cpu(self, pretrained, **kwargs):
        mappings.append(get_patch_mapping())
        original(self, pretrained, **{**kwargs, "attn_implementation": "eager"})

    monkeypatch.setattr(flash_rotary, "require_available", lambda: None)
    monkeypatch.setattr(HFLM, "_create_model", build_on_cpu)
    return mappings


def test_backend_builds_pi_llama_with_the_fused_attention(tiny_llama_dir, flash_on_cpu):
    from pieval.backend import PILlama

    lm = PILlama(pretrained=str(tiny_llama_dir), scaling_factor=4, device="cpu", attn_implementation="flash_attention_2")
    assert flash_on_cpu == [{flash_rotary.PATTERN: flash_rotary.PIRotaryLlamaAttention}]
    assert all(type(layer.self_attn) is flash_rotary.PIRotaryLlamaAttention for layer in lm.model.model.layers)
    assert lm.model.model.layers[0].self_attn.rope_factor == 4.0
    assert get_patch_mapping() == {} and "flash_attn" not in sys.modules


def test_backend_keeps_stock_attention_for_other_rope_methods(tiny_llama_dir, flash_on_cpu, caplog):
    from pieval.backend import PILlama

    lm = PILlama(
        pretrained=str(tiny_llama_dir),
        scaling_factor=4,
        rope_method="yarn",
        device="cpu",
        attn_implementation="flash_attention_2",
    )
    assert flash_on_cpu == [{}]
    assert type(lm.model.model.layers[0].self_attn) is modeling_llama.LlamaAttention
    assert "rotary in transformers' torch code" in caplog.text
