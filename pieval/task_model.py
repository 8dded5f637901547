"""What a generated-prompt task knows about the model it will run on, read from lm-eval metadata.

lm-eval merges ``--model_args`` into every task's metadata (``evaluator.simple_evaluate``), so a
task that sizes its prompts in the model's own tokens finds the tokenizer and the window there,
as lm-eval's ``ruler`` tasks find their tokenizer. Shared by the passkey and GovReport tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lm_eval.api.task import ConfigurableTask

from pieval.errors import UserError

log = logging.getLogger("lm_eval.pieval")


@dataclass(frozen=True)
class TaskModel:
    tokenizer: Any  # a fast transformers tokenizer: prompts are measured through its offsets
    window: int | None  # tokens prompt + generation may occupy (HFLM's max_length); None if unknown
    # HFLM's add_bos_token: None leaves the tokenizer's default (add_special_tokens=True)
    add_special_tokens: bool | None = None
    context_length: int | None = None  # the model's L' (pieval.rope.resolve), when a checkpoint is named
    # the text lm-eval sends for a prompt (chat template, system instruction); None: the prompt itself
    render: Callable[[str], str] | None = None

    def encode(self, text: str, offsets: bool = False):
        """Token ids (and offsets) of what HFLM will feed the model for the prompt ``text``.

        That is ``render(text)``, encoded as ``HFLM.tok_batch_encode`` encodes a context: no
        special tokens when it already starts with BOS (a chat template's output often does).
        Offsets stay relative to ``text``: the template's tokens before it have negative ones.
        """
        sent, shift = text, 0
        if self.render is not None:
            sent = self.render(text)
            shift = sent.find(text)
        bos = getattr(self.tokenizer, "bos_token", None)
        kwargs = {}
        if bos and sent.startswith(bos):
            kwargs["add_special_tokens"] = False
        elif self.add_special_tokens is not None:
            kwargs["add_special_tokens"] = self.add_special_tokens
        enc = self.tokenizer(sent, return_offsets_mapping=offsets, **kwargs)
        if not offsets:
            return enc["input_ids"]
        return enc["input_ids"], [(a - shift, b - shift) for a, b in enc["offset_mapping"]]


def from_metadata(metadata: Mapping[str, Any], task: str, render: Callable[[str], str] | None = None) -> TaskModel:
    """Tokenizer from ``tokenizer``/``pretrained``; window from ``max_length``, else the model's L'.

    L' comes from ``pieval.rope.resolve`` on the ``pretrained`` config with the same
    ``scaling_factor``/``context_length``/``rope_method`` the ``pi_llama`` model receives, which is
    also the ``max_length`` that model defaults to.
    """
    from pieval import loading

    source = loading.Source.from_metadata(metadata)
    if source is None:
        raise UserError(
            f"{task} builds its prompts in the model's own tokens but got no tokenizer: pass "
            "--model_args pretrained=PATH (lm-eval hands model_args to tasks), or "
            "--metadata '{\"tokenizer\": \"PATH\"}' when the model is passed as an object"
        )
    add_bos = metadata.get("add_bos_token")
    tokenizer = loading.load_tokenizer(source, add_bos_token=add_bos)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"{task} needs a fast (Rust) tokenizer to place text at exact token positions; "
            f"{source.label!r} loaded {type(tokenizer).__name__}: convert it or pass a fast tokenizer=..."
        )
    max_length = metadata.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise UserError(f"{task}: max_length must be an integer >= 2 (got {max_length!r})")
    context_length = _context_length(metadata)
    return TaskModel(
        tokenizer,
        window=max_length if max_length is not None else context_length,
        add_special_tokens=None if add_bos is None else bool(add_bos),
        context_length=context_length,
        render=render,
    )


def _context_length(metadata: Mapping[str, Any]) -> int | None:
    from pieval import loading, rope

    pretrained = metadata.get("pretrained")
    if not isinstance(pretrained, str):
        return None
    source = loading.Source.of(pretrained, metadata.get("gguf_file"), metadata.get("revision"))
    spec = rope.resolve(
        loading.read_config(source),
        scaling_factor=metadata.get("scaling_factor"),
        context_length=metadata.get("context_length"),
        rope_method=metadata.get("rope_method") or "pi",
    )
    return spec.context_length


class GeneratedPromptTask(ConfigurableTask):
    """A ``generate_until`` task whose prompts are sized in the evaluated model's tokens (passkey, GovReport).

    ``build_dataset(render=..., **metadata)`` makes the prompts. With ``--apply_chat_template`` or
    ``--system_instruction`` lm-eval wraps each prompt before sending it, which only
    ``build_all_requests`` learns about: the prompts are then rebuilt with that wrapping counted,
    so lengths and positions are those of the text the model really gets.
    """

    TEXT_FIELD = ""  # the doc field that doc_to_text turns into the prompt
    build_dataset: Callable[..., Any]

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        # Not ConfigurableTask.download: for a custom_dataset it logs lm-eval's ruler hint
        # (`--metadata='{"max_seq_lengths": ...}'`), a key these tasks do not read.
        self.dataset = self._build()

    def _build(self, render: Callable[[str], str] | None = None, chat: bool = False):
        """The prompts; ``chat``: they will go through a chat template (an answer prefix may move to its turn)."""
        return type(self).build_dataset(render=render, chat=chat, **dict(self.config.metadata or {}))

    def _marker_doc(self, marker: str, chat: bool) -> dict:
        return {**self.dataset["test"][0], self.TEXT_FIELD: marker}

    def build_all_requests(self, *, system_instruction=None, apply_chat_template=False,
                           fewshot_as_multiturn=False, chat_template=None, **kwargs) -> None:  # fmt: skip
        chat = bool(apply_chat_template and chat_template)
        if system_instruction or chat:
            render = self._renderer(system_instruction, chat, fewshot_as_multiturn, chat_template)
            self.dataset = self._build(render, chat)
        super().build_all_requests(
            system_instruction=system_instruction, apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=fewshot_as_multiturn, chat_template=chat_template, **kwargs,
        )  # fmt: skip

    def _renderer(self, system_instruction, chat, fewshot_as_multiturn, chat_template):
        """doc_to_text's prompt -> the text lm-eval sends, found by wrapping a marker doc with lm-eval's
        own fewshot_context (chat templates place the message text verbatim between fixed parts)."""
        marker = "\x00pieval-prompt\x00"
        doc = self._marker_doc(marker, chat)
        inner = self.doc_to_text(doc)
        sent = self.fewshot_context(
            doc, num_fewshot=0, system_instruction=system_instruction, apply_chat_template=chat,
            fewshot_as_multiturn=fewshot_as_multiturn, chat_template=chat_template, gen_prefix=self.doc_to_prefix(doc),
        )  # fmt: skip
        if not isinstance(sent, str) or sent.count(inner) != 1:
            raise UserError(
                f"{self.config.task}: the chat template does not keep the prompt text as it is, so its tokens "
                "cannot be placed exactly; run without --apply_chat_template"
            )
        head, tail = sent.split(inner)
        log.info("%s: prompts are sized with the chat template/system instruction (%r ... %r)", self.config.task, head, tail)
        return lambda text: head + text + tail


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
