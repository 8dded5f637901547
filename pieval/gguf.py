"""GGUF files as checkpoints: located, read, loaded dequantized, and saved as plain safetensors.

A GGUF file can stand wherever a checkpoint folder does: ``pretrained=DIR,gguf_file=NAME`` (as
lm-eval's HFLM and ``from_pretrained`` spell it) or ``pretrained=path/to/model.gguf``. transformers
loads it (the ``gguf`` package must be installed: ``pip install pieval[gguf]``); pieval asks for
the weights dequantized (``GgufConfig(dequantize=True)``), so the model is an ordinary dense
model in the requested dtype that trains and saves like any other. What pieval then writes is a
standard checkpoint: the dequantized values, not the original unquantized weights.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from pieval.errors import UserError

SUFFIX = ".gguf"


def split(pretrained: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder, file name) for ``from_pretrained``: ``path/x.gguf`` becomes ``(path, "x.gguf")``."""
    if gguf_file is None and str(pretrained).endswith(SUFFIX):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UserError(f"no GGUF file at {str(pretrained)!r}: pass the path of an existing .gguf file")
        return str(path.parent), path.name
    if gguf_file is not None:
        local = Path(pretrained).expanduser()
        if local.is_dir() and not (local / gguf_file).is_file() and not Path(gguf_file).is_file():
            found = sorted(p.name for p in local.glob(f"*{SUFFIX}"))
            raise UserError(
                f"gguf_file={gguf_file!r} is not in {str(pretrained)!r}"
                + (f" (GGUF files there: {', '.join(found)})" if found else " (it holds no .gguf file)")
            )
    return str(pretrained), gguf_file


def path_of(folder: str, gguf_file: str) -> Path:
    """The file ``from_pretrained(folder, gguf_file=...)`` reads when it is local."""
    path = Path(gguf_file).expanduser()
    return path if path.is_absolute() else Path(folder).expanduser() / path


def check_loaded(folder: str, gguf_file: str, config) -> None:
    """After transformers built ``config`` from a local GGUF file: refuse it if it lost the file's rope scaling."""
    path = path_of(folder, gguf_file)
    if path.is_file():  # a file on the hub was read by transformers itself; its header is not here
        check_rope_kept(read_metadata(path), config, str(path))


def load_kwargs(gguf_file: str | None) -> dict[str, Any]:
    """``from_pretrained`` kwargs that load ``gguf_file`` as a plain dense model ({} without one).

    Without ``dequantize=True`` transformers keeps the weights packed where a ``kernels`` matmul
    exists: such a model cannot train and ``save_pretrained`` refuses it ("not serializable").
    """
    if gguf_file is None:
        return {}
    require_package()
    from transformers import GgufConfig

    return {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}


def require_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(
            "loading a GGUF file needs the gguf package: pip install 'pieval[gguf]' (or pip install gguf)"
        ) from None


# --------------------------------------------------------------------------- metadata
#
# A reader of the key-value header only, written here because both libraries that read GGUF are
# slow for `pieval info`: transformers' reader imports torch (~2.5 s), and gguf's GGUFReader
# parses every element of the tokenizer's arrays (~2.8 s for SmolLM2's 49152 tokens). This one
# skips arrays and stops before the tensor table: a few milliseconds.

_SCALARS = {  # GGUF value type -> struct format
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class _Header:
    def __init__(self, f, order: str):
        self.f, self.order = f, order

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack(self.order + fmt, data)[0]

    def string(self) -> str:
        return self.f.read(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("I"), self.unpack("Q")
            if item in _SCALARS:
                self.f.seek(struct.calcsize(_SCALARS[item]) * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    self.value(item)
            return count  # arrays are reported by their length, as transformers' reader does
        raise ValueError(f"unknown GGUF value type {kind}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF file's key-value metadata (arrays as their lengths)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{path} is not a GGUF file (no GGUF magic number)")
            version = struct.unpack("<I", f.read(4))[0]
            order = "<" if version < 0x10000 else ">"  # a big-endian file reads as a huge version
            header = _Header(f, order)
            header.unpack("Q")  # tensor count
            return {header.string(): header.value(header.unpack("I")) for _ in range(header.unpack("Q"))}
    except OSError as e:
        raise UserError(f"cannot read GGUF file {str(path)!r}: {e.strerror}") from None
    except (EOFError, ValueError, struct.error) as e:
        raise UserError(f"{path} is truncated or not a GGUF file ({e or 'ends inside its header'})") from None


def config_fields(metadata: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields that decide RoPE, named as transformers' GGUF loader names them."""
    arch = metadata.get("general.architecture")
    if not arch or f"{arch}.context_length" not in metadata:
        raise UserError(f"the GGUF metadata names no architecture with a context length (architecture {arch!r})")
    fields = {
        "model_type": arch,
        "max_position_embeddings": int(metadata[f"{arch}.context_length"]),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(metadata.get(f"{arch}.rope.freq_base", 10000.0))},
    }
    for key, name in (("embedding_length", "hidden_size"), ("attention.head_count", "num_attention_heads")):
        if f"{arch}.{key}" in metadata:
            fields[name] = int(metadata[f"{arch}.{key}"])
    return fields


def stated_rope_scaling(metadata: dict[str, Any]) -> str | None:
    """The RoPE scaling a GGUF file states (llama.cpp's ``<arch>.rope.scaling.*``), described; None if none.

    transformers' GGUF loader builds a LLaMA config from the file without these keys, so a file
    converted from an extended model would load un-extended.
    """
    arch = metadata.get("general.architecture")
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if not kind or kind == "none":
        return None
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    return f"{kind}" + (f" factor {factor:g}" if isinstance(factor, (int, float)) else "")


def check_rope_kept(metadata: dict[str, Any], config, where: str) -> None:
    """Refuse a file whose stated RoPE scaling the loaded config lost (it would run silently un-extended)."""
    stated = stated_rope_scaling(metadata)
    params = getattr(config, "rope_parameters", None) or {}
    if stated and params.get("rope_type", "default") == "default":
        raise UserError(
            f"{where} states RoPE scaling {stated}, which transformers' GGUF loader drops (the model would "
            "run un-extended): load the original checkpoint folder instead, or pass scaling_factor "
            "explicitly to extend the unscaled model"
        )


# --------------------------------------------------------------------------- conversion


def save_plain(folder: str, gguf_file: str, out: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    """Dequantize ``folder/gguf_file`` and save it as a standard safetensors checkpoint in ``out`` (atomically).

    The checkpoint holds config.json (default rope as the file states it), model.safetensors, the
    tokenizer (with its chat template) and generation_config.json; it loads in plain transformers.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pieval import atomic

    torch_dtype = getattr(torch, dtype)
    if not progress:
        hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **load_kwargs(gguf_file))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    check_rope_kept(read_metadata(Path(folder) / gguf_file), model.config, gguf_file)
    with atomic.directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic.ordinary_modes(tmp)
    return Path(out)
