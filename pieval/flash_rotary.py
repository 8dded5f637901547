"""flash-attn's fused rotary kernel on Position-Interpolated cos/sin tables, for LLaMA.

With ``attn_implementation=flash_attention_2`` the backend builds LLaMA with
``PIRotaryLlamaAttention`` in place of ``LlamaAttention`` through transformers'
``register_patch_mapping`` (consulted by ``from_pretrained``/``from_config`` while they
build). Neither the kernels-hub decorator on ``apply_rotary_pos_emb`` (process-wide, falls
back silently) nor an ``AttentionInterface`` function (it receives q/k already rotated)
can own the rotary, hence a subclass. Its weights and state dict are LlamaAttention's.

Coverage: ``model_type=llama`` with ``rope_type`` default or linear (plain RoPE, PI). Every
other family (Mistral, Qwen, Gemma, Phi-3, GPT-NeoX, OLMo 2, ...) and method (ntk is plain
RoPE and so covered; dynamic, yarn, llama3, longrope are not) keeps transformers' attention
class: flash-attn attention, torch rotary, one warning from the backend.

``flash_attn`` is imported only when a patched model first runs: importing it loads the
CUDA extension, which fails on CPU machines.
"""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from typing import Callable

import torch
from transformers.models.llama import modeling_llama
from transformers.monkey_patching import register_patch_mapping, unregister_patch_mapping

from pieval import rope
from pieval.errors import UserError

FLASH_ATTENTION = "flash_attention_2"
PATTERN = "^LlamaAttention$"
STOCK_ATTENTION = modeling_llama.LlamaAttention
# rope types whose tables are "positions / factor times plain RoPE frequencies"
SUPPORTED_ROPE_TYPES = ("default", "linear")


def require_available() -> None:
    """UserError unless the fused path can run here (CUDA and the flash-attn package)."""
    if not torch.cuda.is_available():
        raise UserError(
            f"attn_implementation={FLASH_ATTENTION} needs a CUDA GPU and none is visible: "
            "use attn_implementation=sdpa (same results, torch rotary)"
        )
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            f"attn_implementation={FLASH_ATTENTION} needs the flash-attn package, which is not installed: "
            "pip install 'pieval[flash]' on the CUDA machine, or use attn_implementation=sdpa"
        )


def fused_kernel() -> Callable:
    from flash_attn.layers.rotary import apply_rotary_emb

    return apply_rotary_emb


class PIRotaryLlamaAttention(STOCK_ATTENTION):
    """LlamaAttention whose rotary is flash-attn's fused kernel on tables at positions m/s.

    ``rotary_kernel`` has flash-attn's ``apply_rotary_emb`` signature; None means that
    kernel. Tests on CPU subclass with ``rotary_kernel = staticmethod(torch_reference)``.
    """

    rotary_kernel: Callable | None = None

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        params = rope.rope_parameters(config)
        if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise UserError(
                f"the fused PI rotary supports rope types {SUPPORTED_ROPE_TYPES}, got {params['rope_type']!r}: "
                "build this model without pieval.flash_rotary.interpolated_rotary()"
            )
        self.rope_theta = float(params["rope_theta"])
        self.rope_factor = float(params.get("factor", 1.0))
        self.rotary_dim = rope.rotary_dim(config)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, heads, head_dim) -> rotated copy (never in place: x may be a view)."""
        batch, seq = x.shape[:2]
        # made per call on x's device: a tensor made in __init__ would be left on the meta
        # device by from_pretrained's empty-weights build (only weights get loaded)
        base = rope.inv_freq(self.rope_theta, self.rotary_dim, device=x.device)
        cos, sin = rope.pi_tables(positions.expand(batch, seq), base, self.rope_factor, dtype=x.dtype)
        # each row has its own positions (left padding): give the kernel one table row per
        # token and start row b's lookups at b·seq
        offsets = torch.arange(batch, device=x.device, dtype=torch.int32) * seq
        kernel = self.rotary_kernel or fused_kernel()
        return kernel(
            x,
            cos.reshape(batch * seq, -1),
            sin.reshape(batch * seq, -1),
            interleaved=False,
            inplace=False,
            seqlen_offsets=offsets,
        )

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        # position_embeddings (the stock cos/sin) are ignored: the tables come from position_ids
        positions = kwargs.get("position_ids")
        if positions is None:
            raise ValueError("PIRotaryLlamaAttention needs position_ids (LlamaDecoderLayer passes them)")
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        # (batch, seq, heads, head_dim) is the kernel's layout: rotate before transposing
        query_states = self._rotate(self.q_proj(hidden_states).view(hidden_shape), positions).transpose(1, 2)
        key_states = self._rotate(self.k_proj(hidden_states).view(hidden_shape), positions).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface = modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_llama.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


@contextmanager
def interpolated_rotary(attention_cls: type[PIRotaryLlamaAttention] = PIRotaryLlamaAttention):
    """LLaMA models built by from_pretrained/from_config inside this block use ``attention_cls``.

    Restores what transformers' patching leaves behind: the class-level
    ``_can_record_outputs`` of LlamaPreTrainedModel, rewritten to name the replacement
    (recorders match with isinstance, so the subclass is still recorded), and the
    ``LlamaAttention`` module attributes, which ``apply_patches`` does not put back when a
    build raises.
    """
    recorders = modeling_llama.LlamaPreTrainedModel._can_record_outputs
    saved = dict(recorders)
    register_patch_mapping({PATTERN: attention_cls})
    try:
        yield
    finally:
        unregister_patch_mapping([PATTERN])
        recorders.clear()
        recorders.update(saved)
        for name, module in list(sys.modules.items()):
            if name.startswith("transformers") and vars(module).get("LlamaAttention") is attention_cls:
                module.LlamaAttention = STOCK_ATTENTION
