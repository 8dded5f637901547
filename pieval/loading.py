"""Where a model comes from (a checkpoint folder, a hub id, a GGUF file) and how its config and tokenizer load.

Everything that names a model goes through here: ``pi_llama``'s ``pretrained=``, the tasks that
size prompts in the model's tokens, ``pieval finetune --model`` and ``pieval info``. So a GGUF
file, a revision and an offline hub behave the same in all of them, and a model that cannot be
found ends in one line that says why and what to pass instead.
"""

from __future__ import annotations

import json
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pieval import gguf
from pieval.errors import UserError

EXAMPLE = "models/smollm2-135m/hf"  # a local checkpoint every checkout can make (make real-model)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """A model as ``from_pretrained`` takes it: a folder or hub id, and optionally a GGUF file in it."""

    pretrained: str
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def of(cls, pretrained, gguf_file=None, revision=None, trust_remote_code=False) -> Source:
        """``pretrained`` may also be the path of a .gguf file itself."""
        folder, file = gguf.split(str(pretrained), gguf_file)
        return cls(folder, file, revision, bool(trust_remote_code))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Source | None:
        """The model a task runs on, from lm-eval task metadata (model_args are merged into it).

        ``tokenizer`` wins over ``pretrained`` (a model passed as an object has no path); the GGUF
        file, revision and trust_remote_code of model_args belong to ``pretrained``.
        """
        tokenizer, pretrained = metadata.get("tokenizer"), metadata.get("pretrained")
        if isinstance(tokenizer, str) and tokenizer and tokenizer != pretrained:
            return cls.of(tokenizer, trust_remote_code=bool(metadata.get("trust_remote_code")))
        if not isinstance(pretrained, str) or not pretrained:
            return None
        return cls.of(pretrained, metadata.get("gguf_file"), metadata.get("revision"), bool(metadata.get("trust_remote_code")))

    @property
    def label(self) -> str:
        return f"{self.pretrained}/{self.gguf_file}" if self.gguf_file else self.pretrained

    def kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` kwargs for the config and tokenizer (the model adds ``gguf.load_kwargs``)."""
        out: dict[str, Any] = {}
        if self.revision is not None:
            out["revision"] = self.revision
        if self.trust_remote_code:
            out["trust_remote_code"] = True
        if self.gguf_file is not None:
            gguf.require_package()
            out["gguf_file"] = self.gguf_file
        return out


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def not_found(source: Source, error: Exception) -> UserError:
    """The one-line error for a model transformers could not load, with what to pass instead."""
    name, local = source.pretrained, Path(source.pretrained).expanduser()
    if local.is_dir() and source.gguf_file is None and not (local / "config.json").is_file():
        found = sorted(p.name for p in local.glob(f"*{gguf.SUFFIX}"))
        if found:
            return UserError(
                f"{name!r} has no config.json but holds GGUF file(s) {', '.join(found)}: pass gguf_file={found[0]} "
                f"(lm_eval: --model_args pretrained={name},gguf_file={found[0]}) or the .gguf path itself"
            )
        return UserError(f"{name!r} has no config.json: pass the folder of a saved model, e.g. {EXAMPLE}")
    if not local.exists() and _HUB_ID.match(name):
        if hub_offline():
            return UserError(
                f"{name!r} is no local folder, and the Hugging Face hub is offline (HF_HUB_OFFLINE=1), so it "
                f"cannot be downloaded: pass the path of a local checkpoint folder (with config.json), e.g. "
                f"{EXAMPLE} (make real-model), or unset HF_HUB_OFFLINE where the hub is reachable"
            )
        return UserError(
            f"{name!r} is no local folder and could not be loaded from the Hugging Face hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): check the name, "
            "the network, or pass a local checkpoint folder"
        )
    return UserError(
        f"no checkpoint at {source.label!r} ({type(error).__name__}): pass the folder of a saved model "
        f"(with config.json), e.g. {EXAMPLE}"
    )


def load_config(source: Source):
    """``AutoConfig.from_pretrained`` with a model that is not there turned into a one-line UserError.

    A GGUF file's config is checked for a rope scaling transformers' GGUF loader dropped.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.pretrained, **source.kwargs())
    except (OSError, ValueError) as e:
        if isinstance(e, ValueError) and "trust_remote_code" in str(e):
            raise UserError(
                f"{source.label!r} runs its own Python code to load: allow it (model_args trust_remote_code, "
                "pieval finetune --trust-remote-code) only if you trust that code"
            ) from None
        raise not_found(source, e) from e
    if source.gguf_file is not None:
        gguf.check_loaded(source.pretrained, source.gguf_file, config)
    return config


def load_tokenizer(source: Source, add_bos_token: bool | None = None):
    """The tokenizer as lm-eval's HFLM builds it (``add_bos_token`` is passed to it the same way)."""
    from transformers import AutoTokenizer

    extra = {} if add_bos_token is None else {"add_bos_token": bool(add_bos_token)}
    try:
        return AutoTokenizer.from_pretrained(source.pretrained, **source.kwargs(), **extra)
    except OSError as e:
        raise not_found(source, e) from e


def read_config(source: Source):
    """The checkpoint's RoPE-relevant config without importing torch or transformers (for ``pieval info``).

    Read from config.json or the GGUF header where their rope fields are unambiguous; anything
    else (a hub id, a revision, a legacy config of another family) goes through transformers.
    The fields are the ones transformers reports (``tests/test_loading.py`` compares them).
    """
    if source.gguf_file is not None:
        metadata = gguf.read_metadata(gguf.path_of(source.pretrained, source.gguf_file))
        view = types.SimpleNamespace(**gguf.config_fields(metadata), _name_or_path=source.label)
        gguf.check_rope_kept(metadata, view, source.label)
        return view
    config_json = Path(source.pretrained).expanduser() / "config.json"
    if source.revision is None and config_json.is_file():
        fields = json.loads(config_json.read_text(encoding="utf-8"))
        params = _rope_parameters(fields)
        if params is not None and "max_position_embeddings" in fields:
            return types.SimpleNamespace(**{**fields, "rope_parameters": params, "_name_or_path": source.pretrained})
    return load_config(source)


def _rope_parameters(fields: dict) -> dict | None:
    """transformers 5's flat ``rope_parameters``, or a LLaMA config.json of transformers 4 translated as 5 does."""
    params = fields.get("rope_parameters")
    if isinstance(params, dict):
        return params if isinstance(params.get("rope_type"), str) and "rope_theta" in params else None
    if fields.get("model_type") != "llama" or "rope_theta" not in fields:
        return None  # other families' legacy fields are read by their own config classes
    scaling = {k: v for k, v in (fields.get("rope_scaling") or {}).items() if k != "type"}
    rope_type = scaling.pop("rope_type", None) or (fields.get("rope_scaling") or {}).get("type") or "default"
    return {**scaling, "rope_type": rope_type, "rope_theta": float(fields["rope_theta"])}
