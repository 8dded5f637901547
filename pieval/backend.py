"""``pi_llama``: lm-eval's HFLM with a Position-Interpolation-extended RoPE.

Only what PI changes is overridden: the config is extended before the model is built
(``_get_config``), the built model is checked (``_create_model``), ``max_length``
defaults to L', over-long requests fail loudly instead of being left-truncated, and
the results JSON records the extension and, for a checkpoint `pieval finetune` made, the
facts its config.json records (``get_model_info``, under ``config.pieval.finetune``). Every HFLM model_arg
(dtype, device, batch_size, attn_implementation, peft, ...) passes through unchanged.
"""

from __future__ import annotations

import logging

import pieval
from accelerate import PartialState
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string

from pieval import distributed, facts, gguf, loading, rope
from pieval.errors import UserError
from pieval.sliding_window_lm import SlidingWindowMixin

log = logging.getLogger(__name__)


class PILlama(SlidingWindowMixin, HFLM):
    """HFLM + ``scaling_factor=s`` | ``context_length=L'`` and ``rope_method`` (a `pieval.rope.METHODS` key).

    No factor = the checkpoint as saved. ``max_length`` defaults to L' = round(s·L).
    Requests longer than ``max_length`` raise unless ``truncation=True``, which
    left-truncates them with one warning that counts them.
    """

    def __init__(
        self,
        pretrained,
        scaling_factor=None,
        context_length=None,
        rope_method: str = "pi",
        rope_parameters_file: str | None = None,
        max_length: int | None = None,
        gguf_file: str | None = None,
        **kwargs,
    ) -> None:
        # read by _get_config/_create_model, which HFLM.__init__ calls before it returns
        self._rope_request = {
            "scaling_factor": scaling_factor,
            "context_length": context_length,
            "rope_method": rope_method,
            "options": rope_knobs(kwargs, rope_parameters_file),
        }
        self.rope: rope.RopeSpec | None = None
        check_batch_sizes(kwargs)
        if kwargs.get("attn_implementation") == "flash_attention_2":
            from pieval import flash_rotary

            flash_rotary.require_available()
        if not isinstance(pretrained, str):
            self._check_built(pretrained)
        else:  # pretrained=path/to/model.gguf stands for pretrained=path/to,gguf_file=model.gguf
            pretrained, gguf_file = gguf.split(pretrained, gguf_file)
        self._gguf_file = gguf_file
        if isinstance(pretrained, str) and kwargs.get("tp_plan") is None and distributed.several_cpu_processes():
            # HFLM's Accelerator then joins this gloo group, as with ACCELERATE_USE_CPU=1
            PartialState(cpu=True)
        super().__init__(pretrained, max_length=max_length, gguf_file=gguf_file, **kwargs)
        self._adopt_process_group()
        start = self.window_start_token()
        if not start["is_bos"]:
            log.warning(
                "windows and contexts start with %r (id %d, %s), not a BOS token: scores are not comparable "
                "with tools that add nothing there (yarn's perplexity script differs by a few percent); pass "
                "prefix_token_id=ID in model_args to choose the token",
                start["token"], start["id"], start["source"],
            )  # fmt: skip
        if max_length is None:
            self._max_length = self.rope.context_length
        elif int(max_length) > self.rope.context_length:
            log.warning(
                "max_length=%s exceeds the extended window L'=%d: positions past L' are extrapolated",
                max_length,
                self.rope.context_length,
            )

    def _adopt_process_group(self) -> None:
        """Split the documents over the processes of ``torchrun``/``accelerate launch`` on CPU too.

        HFLM creates an Accelerator on any device (on CPU it joins the gloo group once accelerate's
        state is a CPU one: ACCELERATE_USE_CPU=1, or the PartialState made in __init__), but takes
        its rank and world size only when it counts more than one GPU: on CPU every process then
        evaluated every document as rank 0. Here they come from the same Accelerator, so lm-eval's
        own sharding, padding and gathering (``all_gather``, ``gather_object``, ``barrier``) run as
        on GPUs. The global ``process_index`` (HFLM takes the local one) keeps nodes apart.
        """
        accelerator = getattr(self, "accelerator", None)
        if accelerator is None or accelerator.num_processes <= 1 or self.world_size > 1:
            return
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if self._rank == 0:  # under lm-eval's logger, so that its CLI shows the line
            logging.getLogger("lm_eval.pieval").info(
                "%d processes (%s, %s): lm-eval splits the documents over them",
                self._world_size, accelerator.distributed_type.value, accelerator.state.backend,
            )  # fmt: skip

    # lm-eval's CLI passes --device (default "cuda:0") and --batch_size (default 1) beside
    # --model_args, and the stock LM.create_from_* fail with a duplicate-keyword TypeError
    # when model_args names one too (`--model hf --model_args device=cpu` does). Here the
    # model_args value wins: it is the more specific of the two.
    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        return cls(**merge_cli_config(dict(arg_dict), additional_config))

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def _check_built(self, model) -> None:
        """An already-built model cannot be re-scaled (its inv_freq is fixed): only check it."""
        request = self._rope_request
        if request["options"] or any(v is not None for v in (request["scaling_factor"], request["context_length"])):
            raise UserError(
                "scaling_factor/context_length need a checkpoint path: a model passed as an object is "
                "already built and its RoPE can no longer change; pass pretrained=PATH"
            )
        self.rope = rope.resolve(model.config)
        rope.verify(model, self.rope)

    # ------------------------------------------------------------------ building

    def _get_config(self, pretrained: str, **kwargs) -> None:
        try:
            super()._get_config(pretrained, **kwargs)
        except (OSError, ValueError) as e:
            raise loading.not_found(loading.Source.of(pretrained, kwargs.get("gguf_file")), e) from e
        if kwargs.get("gguf_file"):
            gguf.check_loaded(pretrained, kwargs["gguf_file"], self._config)
        self.rope = rope.resolve(self._config, **self._rope_request)
        rope.apply(self._config, self.rope)

    def _create_model(self, pretrained: str, **kwargs) -> None:
        # HFLM lets from_pretrained re-read config.json; hand it the extended config instead
        kwargs.setdefault("config", self._config)
        if kwargs.get("gguf_file") and kwargs.get("quantization_config") is None:
            kwargs.update(gguf.load_kwargs(kwargs["gguf_file"]))  # a dense model, as a checkpoint would be
        try:
            if self._fused_rotary(kwargs):
                from pieval import flash_rotary

                with flash_rotary.interpolated_rotary():
                    super()._create_model(pretrained, **kwargs)
            else:
                super()._create_model(pretrained, **kwargs)
        except TypeError as e:
            # HFLM hands every model_arg it does not know to from_pretrained, and the model's
            # __init__ rejects it (before any weights load): name it and the nearest real one
            raise unknown_model_arg(e) or e
        rope.verify(self._model, self.rope)

    def _fused_rotary(self, kwargs) -> bool:
        if kwargs.get("attn_implementation") != "flash_attention_2":
            return False
        from pieval import flash_rotary

        rope_type = rope.rope_parameters(self._config)["rope_type"]
        if self._config.model_type != "llama" or rope_type not in flash_rotary.SUPPORTED_ROPE_TYPES:
            log.warning(
                "flash_attention_2 with model_type=%s, rope_type=%s: attention runs in flash-attn, rotary "
                "in transformers' torch code (the fused PI rotary covers LLaMA with PI or plain RoPE)",
                self._config.model_type,
                rope_type,
            )
            return False
        return True

    # ------------------------------------------------------------------ requests

    def _refuse_overlong(self, lengths: list[int], kind: str, fix: str) -> None:
        """UserError (or, with truncation=True, one counting warning) for lengths over max_length."""
        limit = self.max_length
        over = [n for n in lengths if n > limit]
        if not over:
            return
        counts = f"{len(over)} of {len(lengths)} {kind} requests exceed max_length={limit} (longest {max(over)} tokens)"
        if not self.truncation:
            raise UserError(
                f"{counts}: lm-eval would cut their oldest tokens, changing what is measured. {fix}, or pass "
                "truncation=True to left-truncate them"
            )
        log.warning("%s: left-truncating them (truncation=True), dropping up to %d tokens", counts, max(over) - limit)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        # context + continuation minus the last token is what HFLM feeds the model
        self._refuse_overlong(
            [len(ctx) + len(cont) - 1 for _, ctx, cont in requests],
            "loglikelihood",
            "Raise max_length (or scaling_factor/context_length)",
        )
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def generate_until(self, requests, disable_tqdm: bool = False):
        # HFLM fits each prompt into max_length - max_gen_toks by cutting its start
        lengths = [
            len(self.tok_encode(context)) + normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)["max_gen_toks"]
            for context, gen_kwargs in (req.args for req in requests)
        ]
        self._refuse_overlong(lengths, "generate_until (prompt + max_gen_toks)", "Raise max_length or lower max_gen_toks")
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    # ------------------------------------------------------------------ provenance

    def window_start_token(self) -> dict:
        """The token lm-eval puts before every context, and pieval before every perplexity window."""
        tok = self.tokenizer
        token_id = self.prefix_token_id
        if self.custom_prefix_token_id is not None:
            source = "prefix_token_id from model_args"
        elif tok.bos_token_id is not None:
            source = "the tokenizer's BOS"
        else:
            source = "the tokenizer's EOS: it has no BOS, and lm-eval falls back to EOS"
        return {
            "id": token_id,
            "token": tok.convert_ids_to_tokens(token_id),
            "source": source,
            "is_bos": tok.bos_token_id is not None and token_id == tok.bos_token_id,
        }

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        model = self._model
        info["pieval"] = {
            "rope_method": self.rope.method,
            "rope_type": rope.rope_parameters(model.config)["rope_type"],
            "factor": self.rope.factor,
            "base_window": self.rope.base_window,
            "context_length": self.rope.context_length,
            "max_length": self.max_length,
            "theta": self.rope.theta,
            "rope_parameters": _recorded_rope(model.config),
            "dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "pretrained": self.pretrained if isinstance(self.pretrained, str) else type(self.pretrained).__name__,
            "gguf_file": self._gguf_file,
            "window_start_token": self.window_start_token(),
            "pieval_version": pieval.__version__,
        }
        recorded = facts.recorded(model.config)
        if recorded:
            info["pieval"]["finetune"] = recorded
        return info


def rope_knobs(kwargs: dict, path: str | None) -> dict:
    """The rope method's knobs (`pieval.rope.KNOBS`): popped from model_args, or a JSON object in ``path``.

    Lists (longrope's factors) cannot pass through lm-eval's comma-separated model_args: give
    them in ``rope_parameters_file=knobs.json``, or as a mapping in ``lm-eval run --config``.
    """
    import json
    from pathlib import Path

    knobs = {key: kwargs.pop(key) for key in list(kwargs) if key in rope.KNOBS}
    if path is None:
        return knobs
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"rope_parameters_file={path}: cannot read a JSON object of rope knobs ({e})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"rope_parameters_file={path} must hold a JSON object such as {{\"beta_fast\": 32}}")
    both = sorted(knobs.keys() & loaded.keys())
    if both:
        raise UserError(f"rope knobs {both} are in both model_args and rope_parameters_file={path}: give each once")
    return {**loaded, **knobs}


def _recorded_rope(config) -> dict:
    """The model's rope_parameters as built: one dict, or one per layer type (Gemma 3)."""
    layers = rope.layer_rope_parameters(config)
    return dict(layers[None]) if None in layers else {k: dict(v) for k, v in layers.items()}


def check_batch_sizes(kwargs: dict) -> None:
    """batch_size is a positive integer, "auto" or "auto:N"; max_batch_size a positive integer.

    HFLM takes 0 and negative values without a word and then batches oddly or not at all.
    """
    for key in ("batch_size", "max_batch_size"):
        value = kwargs.get(key)
        if value is None:
            continue
        text = str(value).strip().lower()
        if key == "batch_size" and (text == "auto" or text.startswith("auto:")):
            count = text.removeprefix("auto").removeprefix(":") or "1"
        else:
            count = text
        if not count.isdigit() or int(count) < 1:
            allowed = 'a positive integer, "auto" or "auto:N"' if key == "batch_size" else "a positive integer"
            raise UserError(f"{key}={value} is not {allowed}: pass e.g. --batch_size 1 (or {key}=8 in --model_args)")


def unknown_model_arg(error: TypeError) -> UserError | None:
    """A UserError naming a model_arg that no one takes (from_pretrained's TypeError), else None."""
    import difflib
    import re

    from pieval.task_settings import arguments_of

    match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if not match:
        return None
    name = match.group(1)
    near = difflib.get_close_matches(name, sorted((arguments_of(PILlama) | set(rope.KNOBS)) - {"args", "kwargs"}), n=1)
    hint = f"did you mean {near[0]}?" if near else "remove it"
    return UserError(
        f"model_arg {name}= is an argument of neither pi_llama, lm-eval's hf model nor the model's "
        f"from_pretrained: {hint}"
    )


def merge_cli_config(model_args: dict, cli: dict | None) -> dict:
    """model_args plus the CLI's device/batch_size/max_batch_size, model_args winning."""
    merged = {k: v for k, v in (cli or {}).items() if v is not None}
    for key in sorted(merged.keys() & model_args.keys()):
        if str(merged[key]) != str(model_args[key]):
            log.info("%s=%s from --model_args is used, not the CLI's %s", key, model_args[key], merged[key])
    return {**merged, **model_args}
