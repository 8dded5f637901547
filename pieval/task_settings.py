"""Each task's settings as a frozen dataclass, read from lm-eval task metadata by one function.

A task's metadata is its YAML ``metadata`` merged with ``--model_args`` and ``--metadata``
(lm-eval's ``EvaluatorConfig`` and ``simple_evaluate`` merge them; ``TaskFactory`` adds them to
every task of the run). So it holds this task's settings, the other pieval tasks' settings (one
``--metadata`` serves every task of a run), the model's arguments and lm-eval's own keys. A task
reads only its dataclass's fields, so a model argument never becomes a task setting; a key that
is none of these is refused with the nearest known name, since a misspelt setting would
otherwise be silently ignored.

Register a settings class with :func:`register` (one registry: every task's keys are known to
every other task's check).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pieval.errors import UserError

log = logging.getLogger("lm_eval.pieval")

# task name -> its settings classes (a perplexity task has two: what to score, which documents)
SETTINGS: dict[str, list[type]] = {}

# Keys lm-eval itself puts into task metadata (the YAML's version, TaskFactory's config_source),
# and its ruler tasks' documented --metadata key (a run may mix them with pieval's tasks).
LM_EVAL_KEYS = frozenset({"version", "config_source", "max_seq_lengths"})
# Model arguments HFLM passes on to ``from_pretrained`` through its ``**kwargs``.
FROM_PRETRAINED_KWARGS = frozenset({"attn_implementation", "device_map", "low_cpu_mem_usage", "torch_dtype"})
MODELS = ("pi_llama", "hf")  # the lm-eval models whose arguments a task's metadata may carry
# The modules that register pieval's tasks: all are imported before a key is called unknown,
# since one --metadata serves every task of a run, whichever task is built first.
TASK_MODULES = ("pieval.passkey", "pieval.govreport", "pieval.perplexity_task")

T = TypeVar("T")


class TaskSettingError(UserError):
    """A bad task setting; the message names the key, the bad value and the fix."""


def register(*tasks: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: ``cls`` holds the settings of ``tasks``.

    ``cls`` is a frozen dataclass whose fields are the metadata keys it reads. Optional class
    attributes: ``DEPRECATED = {old: new}`` (old names still read, with a warning; never a
    model argument) and ``WRITES`` (keys the task writes back into its metadata for the results).
    """

    def add(cls: type[T]) -> type[T]:
        for task in tasks:
            if cls not in SETTINGS.setdefault(task, []):
                SETTINGS[task].append(cls)
        return cls

    return add


def from_metadata(cls: type[T], metadata: Mapping[str, Any], task: str) -> T:
    """``cls`` built from the keys of ``metadata`` that are its fields (``None`` means the default)."""
    check_keys(metadata, task)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in metadata.items() if k in names and v is not None}
    for old, new in getattr(cls, "DEPRECATED", {}).items():
        if metadata.get(old) is not None and new not in values:
            log.warning("%s: metadata key %r is deprecated, use %r", task, old, new)
            values[new] = metadata[old]
    return cls(**values)


def check_keys(metadata: Iterable[str], task: str) -> None:
    """Refuse a key that looks like a misspelt known key, naming it; warn about the other unknowns.

    A key no task or model reads but close to one that is (``max_doc_token``, ``strid``) is a
    typo that would otherwise be silently ignored. One close to nothing is most likely an argument
    a model backend forwards through ``**kwargs`` (vLLM's engine arguments): it is reported, not
    refused, since refusing it would make that backend unusable with pieval's tasks.
    """
    known = known_keys()
    unknown = sorted(k for k in metadata if k not in known)
    if unknown:  # the slow path, taken only for a key pi_llama and hf do not know
        known = known | other_model_arguments()
        unknown = [k for k in unknown if k not in known]
    near = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
    misspelt = sorted(k for k, match in near.items() if match)
    if misspelt:
        raise TaskSettingError(
            f"{task}: unknown metadata key(s) "
            + "; ".join(f"{k!r}: did you mean {near[k][0]!r}?" for k in misspelt)
        )
    for key in sorted(set(unknown) - set(misspelt)):
        _warn_once(task, key)


@functools.cache
def _warn_once(task: str, key: str) -> None:
    log.warning(
        "%s: metadata key %r is read by no pieval task and is no lm-eval model's named argument: "
        "ignored (remove it, unless your model takes it through **kwargs)", task, key,
    )


def known_keys() -> frozenset[str]:
    for module in TASK_MODULES:
        importlib.import_module(module)
    keys = set(LM_EVAL_KEYS) | model_arguments()
    for cls in {cls for classes in SETTINGS.values() for cls in classes}:
        keys |= {f.name for f in dataclasses.fields(cls)}
        keys |= set(getattr(cls, "DEPRECATED", {})) | set(getattr(cls, "WRITES", ()))
    return frozenset(keys)


@functools.cache
def other_model_arguments() -> frozenset[str]:
    """The keyword arguments of every model lm-eval ships, read from its source without importing it.

    With ``--model vllm`` (or any other), its model_args reach the task metadata too. Importing
    every backend to ask would take a minute (and fail for those whose packages are missing), so
    the parameter names of the model classes' constructors are read from lm-eval's source files.
    """
    import ast
    import importlib.util

    spec = importlib.util.find_spec("lm_eval.models")
    names: set[str] = set()
    for folder in spec.submodule_search_locations or ():
        for path in sorted(Path(folder).glob("*.py")):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (OSError, SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef) and node.name in ("__init__", "_create_model", "_create_tokenizer"):
                    names |= {a.arg for a in (*node.args.args, *node.args.kwonlyargs) if a.arg != "self"}
    return frozenset(names)


def arguments_of(model_class: type) -> set[str]:
    """The keyword arguments an lm-eval model class takes: its constructors' and model/tokenizer builders'."""
    names = set()
    for klass in model_class.__mro__:
        for method in ("__init__", "_create_model", "_create_tokenizer"):
            fn = klass.__dict__.get(method)
            if fn is not None:
                try:
                    params = inspect.signature(fn).parameters.values()
                except (TypeError, ValueError):
                    continue
                names |= {
                    p.name for p in params
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
                }  # fmt: skip
    return names


@functools.cache
def model_arguments() -> frozenset[str]:
    """The keyword arguments of the ``pi_llama`` and ``hf`` models (their classes' constructors)."""
    from lm_eval.api.registry import get_model

    import pieval.lmeval

    pieval.lmeval.register_model()
    names = set(FROM_PRETRAINED_KWARGS)
    for model in MODELS:
        names |= arguments_of(get_model(model))
    return frozenset(names)


# ---------------------------------------------------------------- validators: a problem or None


def positive_int(key: str, value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return None
    return f"{key} must be a positive integer (got {value!r}), e.g. --metadata '{{\"{key}\": 8}}'"


def optional_positive_int(key: str, value: Any) -> str | None:
    return None if value is None else positive_int(key, value)


def boolean(key: str, value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    return f"{key} must be true or false (got {value!r}), e.g. --metadata '{{\"{key}\": true}}'"


def string(key: str, value: Any) -> str | None:
    if isinstance(value, str) and value:
        return None
    return f"{key} must be a non-empty string (got {value!r})"


def optional_string(key: str, value: Any) -> str | None:
    return None if value is None else string(key, value)


def raise_problems(task: str, problems: Iterable[str | None], error: type[UserError] = TaskSettingError) -> None:
    """One error naming every bad setting (so a user fixes them all in one go)."""
    problems = [p for p in problems if p]
    if problems:
        raise error(f"{task} metadata: " + "; ".join(problems))
