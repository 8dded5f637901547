"""What pieval adds to lm-eval: the ``pi_llama`` model and pieval's task folder.

Normally run by :mod:`pieval.hook` right after ``lm_eval.models`` / ``lm_eval.tasks`` load;
call :func:`activate` yourself when the hook is switched off.

Tasks. ``TaskManager`` builds its index through ``TaskIndex.build(paths)`` with lm-eval's
own folder first and the user's ``include_path`` after it; later folders win on duplicate
names. pieval's folder goes in between, so its tasks count as built-ins and a user's
``--include_path`` still overrides them. A built-in task that a pieval task shadows (today:
the Russian ``passkey`` of lm-eval's libra suite) is not replaced but renamed to
``<suite>_<name>`` (``libra_passkey``): its tags and the groups that list it follow the new
name, so ``--tasks libra`` runs exactly what it ran before, and a log line says so.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pieval.paths import tasks_dir

MODEL_NAME = "pi_llama"
# A "module:Class" string: lm-eval imports pieval.backend (and torch) only when asked for it.
MODEL_TARGET = "pieval.backend:PILlama"

# Under lm-eval's logger so the lines show in lm-eval's output and obey its verbosity.
log = logging.getLogger("lm_eval.pieval")


def register_model() -> None:
    """Register ``pi_llama`` lazily; lm-eval's built-in models must already be registered."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)
    if _is_lm_eval_cli(sys.argv):
        _user_errors_as_one_line()


def cli_errors() -> None:
    """One-line errors from the start of an ``lm_eval`` command, before any model or task loads
    (a malformed ``--metadata``/``--model_args`` JSON)."""
    if _is_lm_eval_cli(sys.argv):
        _user_errors_as_one_line()


def _is_lm_eval_cli(argv: list[str]) -> bool:
    """The ``lm_eval``/``lm-eval`` console scripts or ``python -m lm_eval``."""
    first = Path(argv[0]) if argv else Path()
    return first.name in ("lm_eval", "lm-eval") or (first.name == "__main__.py" and first.parent.name == "lm_eval")


def _user_errors_as_one_line() -> None:
    """lm-eval's CLI lets every exception end in a traceback; a pieval UserError (a bad
    model_arg or task metadata) already names the bad value and the fix, so the CLI prints
    just that, like an argparse error. Other exceptions keep their traceback, except the one
    a model without pieval's sliding-window request type raises (``unsupported_request``)."""
    from pieval.errors import UserError

    previous = sys.excepthook
    if getattr(previous, "pieval", False):
        return

    def hook(kind, value, tb):
        value = unsupported_request(value) or malformed_argument(value, tb) or value
        if isinstance(value, UserError):
            print(f"lm_eval: error: {value}", file=sys.stderr)
        else:
            previous(kind, value, tb)

    hook.pieval = True
    sys.excepthook = hook


def malformed_argument(error: BaseException, tb):
    """A UserError for the ValueError lm-eval's argument parser raises on malformed JSON, else None.

    lm-eval's message already names the value and the fix ("Invalid JSON: ... Hint: Use double
    quotes ..."); only the traceback around it goes.
    """
    if not isinstance(error, ValueError) or tb is None:
        return None
    import traceback

    frames = traceback.extract_tb(tb)
    inner = frames[-1] if frames else None
    if inner is None or inner.name != "try_parse_json" or Path(inner.filename).parent.name != "_cli":
        return None
    from pieval.errors import UserError

    return UserError(f"{error} (in --metadata or --model_args)")


def unsupported_request(error: BaseException):
    """The one-line error for a model that lacks ``loglikelihood_sliding``, else None.

    lm-eval's evaluator dispatches requests with ``getattr(lm, request_type)`` and hands tasks
    no model before that, so the AttributeError it raises is where the perplexity tasks learn
    that the model cannot serve them.
    """
    if not isinstance(error, AttributeError):
        return None
    from pieval.perplexity_task import REQUEST_TYPE, unsupported_model

    return unsupported_model(error.obj) if error.name == REQUEST_TYPE else None


def include_tasks() -> None:
    """Make every ``TaskManager`` that includes lm-eval's tasks include pieval's too (idempotent)."""
    from lm_eval.tasks._factory import TaskFactory
    from lm_eval.tasks._index import TaskIndex

    if getattr(TaskIndex.build, "pieval", False):
        return
    build_index = TaskIndex.build
    load_config = TaskFactory._load_full_config

    def build(paths, *, resolve_includes=True):
        return _build_index(build_index, list(paths), resolve_includes)

    def _load_full_config(self, entry, overrides=None):
        cfg = load_config(self, entry, overrides)
        renames = getattr(entry, "renames", None)
        if renames and "task" in cfg:
            cfg["task"] = _renamed(cfg["task"], renames)
        return cfg

    build.pieval = True
    TaskIndex.build = staticmethod(build)
    TaskFactory._load_full_config = _load_full_config


def activate() -> None:
    """Do the hook's work in this process (for ``PIEVAL_LM_EVAL_HOOK=0`` or an uninstalled checkout)."""
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models first)
    import lm_eval.tasks  # noqa: F401

    register_model()
    include_tasks()


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks.manager

    return Path(lm_eval.tasks.manager.__file__).resolve().parent


def _build_index(build, paths: list, resolve_includes: bool) -> dict:
    if not paths or Path(paths[0]).resolve() != _lm_eval_tasks_dir():
        return build(paths, resolve_includes=resolve_includes)  # include_defaults=False
    index = build(paths[:1], resolve_includes=resolve_includes)
    try:
        ours_dir = tasks_dir()
    except FileNotFoundError as exc:
        log.warning("pieval's tasks are unavailable: %s", exc)
        ours, user_paths = {}, paths[1:]
    else:
        ours = build([ours_dir], resolve_includes=resolve_includes)
        # `--include_path <pieval's tasks>` (older instructions) would only re-add them with
        # one override warning per task
        user_paths = [p for p in paths[1:] if Path(p).resolve() != ours_dir.resolve()]
    rename_shadowed(index, ours)
    for later in (ours, build(user_paths, resolve_includes=resolve_includes) if user_paths else {}):
        for name, entry in later.items():
            if name in index:  # same rule and message as lm-eval's own merge
                log.warning(
                    "Task '%s' from %s overrides existing task from %s",
                    name,
                    entry.yaml_path,
                    index[name].yaml_path,
                )
            index[name] = entry
    return index


@functools.cache
def _entry_types():
    # lm_eval.tasks is heavy: import it only once a task index is being built
    from lm_eval.tasks._index import Entry, Kind

    @dataclass
    class RenamedEntry(Entry):
        """An index entry whose loaded config gets task names replaced (``{old: new}``)."""

        renames: dict[str, str] = field(default_factory=dict)

    return Kind, RenamedEntry


def rename_shadowed(index: dict, ours: dict) -> dict[str, str]:
    """Rename the built-in tasks in ``index`` that a task in ``ours`` shadows; returns ``{old: new}``.

    ``index`` maps names to lm-eval ``Entry`` objects (lm-eval's own folder only) and is
    edited in place: the task moves to ``<suite>_<name>``, where suite is its folder under
    ``lm_eval/tasks``, and tags and groups that name it are pointed at the new name.
    """
    Kind, RenamedEntry = _entry_types()
    task_kinds = (Kind.TASK, Kind.PY_TASK)
    root = _lm_eval_tasks_dir()
    done: dict[str, str] = {}
    for name in sorted(ours):
        builtin = index.get(name)
        if builtin is None or builtin.kind not in task_kinds or builtin.yaml_path is None:
            continue  # nothing to rename: lm-eval's usual override warning applies
        parts = Path(builtin.yaml_path).resolve().relative_to(root).parts
        new = f"{parts[0]}_{name}" if len(parts) > 1 else None
        if new is None or new in index or new in ours:
            continue
        del index[name]
        index[new] = RenamedEntry(
            name=new,
            kind=builtin.kind,
            yaml_path=builtin.yaml_path,
            cfg={**builtin.cfg, "task": new} if builtin.cfg else builtin.cfg,
            tags=set(builtin.tags),
            renames={name: new},
        )
        for key, entry in list(index.items()):
            if entry.kind is Kind.TAG and name in entry.tags:
                entry.tags = (entry.tags - {name}) | {new}
            elif entry.kind is Kind.GROUP and entry.cfg:
                if _renamed(entry.cfg.get("task"), {name: new}) != entry.cfg.get("task"):
                    renames = {**getattr(entry, "renames", {}), name: new}
                    index[key] = RenamedEntry(
                        name=entry.name,
                        kind=entry.kind,
                        yaml_path=entry.yaml_path,
                        cfg=entry.cfg,
                        tags=entry.tags,
                        renames=renames,
                    )
        done[name] = new
        log.info(
            "lm-eval's built-in task '%s' (%s) is renamed '%s'; '%s' now runs pieval's task "
            "from %s. Groups and tags that list it use the new name.",
            name,
            builtin.yaml_path,
            new,
            name,
            ours[name].yaml_path,
        )
    return done


def _renamed(value: Any, renames: dict[str, str]) -> Any:
    """A group's (or task's) ``task:`` field with member names replaced, inline sub-groups included."""
    if isinstance(value, str):
        return renames.get(value, value)
    if isinstance(value, list):
        return [_renamed(item, renames) for item in value]
    if isinstance(value, dict) and "task" in value:
        return {**value, "task": _renamed(value["task"], renames)}
    return value
