"""The training loss: summed next-token NLL over labelled positions, by one of `LOSSES`.

At L' = 32768 and V = 32000 the full logits are ~4 GB in bf16 and twice that for the fp32
log-softmax, more than a 7B model's checkpointed activations. ``chunked`` (the default) never
holds them: the root module runs to the final hidden states (with an empty ``logits_to_keep``,
so it computes no logits but still runs as the wrapped module, which DDP's gradient sync and
FSDP's unsharding need), then the output head and cross-entropy run chunk by chunk over the
sequence, each chunk under activation checkpointing so its logits are recomputed in backward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from pieval.errors import UserError
from pieval.finetune.config import DEFAULT_CHUNK
from pieval.perplexity import head_logits


def full_nll(model, batch: dict[str, torch.Tensor], chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The full-logit loss: all L' x V logits and an fp32 copy (kept for comparison)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def _chunk_nll(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # the head as the model's own forward applies it (Gemma's soft-capping), the same function
    # sliding-window perplexity scores with
    return torch.nn.functional.cross_entropy(head_logits(model, hidden).float(), labels, ignore_index=-100, reduction="sum")


def chunked_nll(model, batch: dict[str, torch.Tensor], chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The same sum as `full_nll`, with at most ``chunk`` x V logits alive at any time."""
    hidden, labels = _final_hidden(model, batch, softcapping=True)
    _head(model)  # a model without an output head: one line naming --loss full
    inner = _unwrap(model)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], labels[start : start + chunk]
        total = total + checkpoint(_chunk_nll, inner, h, y, use_reentrant=False)
    return total


def liger_nll(model, batch: dict[str, torch.Tensor], chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Liger-Kernel's fused linear cross-entropy (Triton, CUDA only) on the same hidden states."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise UserError("--loss liger needs Liger-Kernel: pip install liger-kernel (or pip install 'pieval[liger]'), or use --loss chunked") from None
    hidden, labels = _final_hidden(model, batch, softcapping=False)
    if hidden.device.type != "cuda":
        raise UserError(f"--loss liger runs only on CUDA GPUs (this run is on {hidden.device.type}): use --loss chunked")
    head = _head(model)
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
    return fused(head.weight, hidden.to(head.weight.dtype), labels, getattr(head, "bias", None)).float()


# The registry --loss chooses from; each is (model, batch, chunk) -> summed NLL (fp32 scalar).
LOSSES: dict[str, Callable[..., torch.Tensor]] = {"chunked": chunked_nll, "full": full_nll, "liger": liger_nll}


def summed_nll(model, batch: dict[str, torch.Tensor], loss: str = "chunked", chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    return LOSSES[loss](model, batch, chunk)


def _final_hidden(model, batch: dict[str, torch.Tensor], softcapping: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states of positions 0..L'-2 as rows, their next-token labels), via the root module."""
    _refuse_head_extras(model, softcapping)
    ids = batch["input_ids"]
    out = model(
        input_ids=ids, attention_mask=batch.get("attention_mask"), use_cache=False,
        output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long, device=ids.device),
    )  # fmt: skip
    hidden = out.hidden_states[-1]  # transformers stores the final-norm output here
    if hidden.shape[:2] != ids.shape:
        raise UserError(f"{type(_unwrap(model)).__name__}'s last hidden state has shape {tuple(hidden.shape)}, not {tuple(ids.shape)} x hidden: use --loss full")
    return hidden[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()


def _unwrap(model):
    """The transformers model inside accelerate's DDP/FSDP wrapper and peft's PeftModel."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _head(model) -> torch.nn.Module:
    head = _unwrap(model).get_output_embeddings()
    if head is None:
        raise UserError(f"{type(_unwrap(model)).__name__} has no output head (get_output_embeddings() is None): use --loss full")
    return head


def _refuse_head_extras(model, softcapping: bool) -> None:
    """Heads that do more than a linear layer the loss can apply: Cohere's logit_scale always, and
    Gemma's soft-capping for Liger's fused kernel (the chunked loss applies it)."""
    inner = _unwrap(model)
    cfg = inner.config
    names = ("logit_scale", "logit_scaling") + (() if softcapping else ("final_logit_softcapping",))
    extras = [a for a in names if getattr(cfg, a, None) not in (None, 1, 1.0)]
    if extras:
        kind = "--loss chunked" if softcapping else "--loss liger"
        raise UserError(f"{type(inner).__name__} applies {', '.join(extras)} to its logits, which {kind} does not: use --loss full")
