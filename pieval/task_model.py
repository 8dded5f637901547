"""What a generated-prompt task knows about the model it will run on, read from lm-eval metadata.

lm-eval merges ``--model_args`` into every task's metadata (``evaluator.simple_evaluate``), so a
task that sizes its prompts in the model's own tokens finds the tokenizer and the window there,
as lm-eval's ``ruler`` tasks find their tokenizer. Shared by the passkey and GovReport tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pieval.errors import UserError


@dataclass(frozen=True)
class TaskModel:
    tokenizer: Any  # a fast transformers tokenizer: prompts are measured through its offsets
    window: int | None  # tokens prompt + generation may occupy (HFLM's max_length); None if unknown
    add_special_tokens: bool  # what HFLM's tok_batch_encode will do: BOS counts toward the window
    context_length: int | None = None  # the model's L' (pieval.rope.resolve), when a checkpoint is named

    def encode(self, text: str, offsets: bool = False):
        """Token ids (and character offsets) exactly as HFLM will encode ``text`` as a context."""
        enc = self.tokenizer(text, add_special_tokens=self.add_special_tokens, return_offsets_mapping=offsets)
        return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]


def from_metadata(metadata: Mapping[str, Any], task: str) -> TaskModel:
    """Tokenizer from ``tokenizer``/``pretrained``; window from ``max_length``, else the model's L'.

    L' comes from ``pieval.rope.resolve`` on the ``pretrained`` config with the same
    ``scaling_factor``/``context_length``/``rope_method`` the ``pi_llama`` model receives, which is
    also the ``max_length`` that model defaults to.
    """
    name = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(name, str) or not name:
        raise UserError(
            f"{task} builds its prompts in the model's own tokens but got no tokenizer: pass "
            "--model_args pretrained=PATH (lm-eval hands model_args to tasks), or "
            "--metadata '{\"tokenizer\": \"PATH\"}' when the model is passed as an object"
        )
    from transformers import AutoTokenizer

    load_kwargs = {k: metadata[k] for k in ("revision", "trust_remote_code") if metadata.get(k) is not None}
    tokenizer = AutoTokenizer.from_pretrained(name, **load_kwargs)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"{task} needs a fast (Rust) tokenizer to place text at exact token positions; "
            f"{name!r} loaded {type(tokenizer).__name__}: convert it or pass a fast tokenizer=..."
        )
    add_bos = metadata.get("add_bos_token")
    max_length = metadata.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise UserError(f"{task}: max_length must be an integer >= 2 (got {max_length!r})")
    context_length = _context_length(metadata)
    return TaskModel(
        tokenizer,
        window=max_length if max_length is not None else context_length,
        add_special_tokens=True if add_bos is None else bool(add_bos),
        context_length=context_length,
    )


def _context_length(metadata: Mapping[str, Any]) -> int | None:
    pretrained = metadata.get("pretrained")
    if not isinstance(pretrained, str):
        return None
    from transformers import AutoConfig

    from pieval import rope

    config = AutoConfig.from_pretrained(pretrained)
    spec = rope.resolve(
        config,
        scaling_factor=metadata.get("scaling_factor"),
        context_length=metadata.get("context_length"),
        rope_method=metadata.get("rope_method") or "pi",
    )
    return spec.context_length


def check_generation_budget(task: str, generation_kwargs: Mapping[str, Any] | None, reserved: int) -> None:
    """Refuse a generation length the prompts were not sized for.

    The prompts leave exactly ``reserved`` tokens of the window free; a larger ``max_gen_toks``
    (e.g. from ``--gen_kwargs``) would make HFLM left-truncate them, cutting their beginning.
    """
    asked = (generation_kwargs or {}).get("max_gen_toks", reserved)
    if asked > reserved:
        raise UserError(
            f"{task}: max_gen_toks={asked} exceeds the {reserved} tokens its prompts leave free; "
            f"drop it from --gen_kwargs and pass --metadata '{{\"max_gen_toks\": {asked}}}' instead"
        )
