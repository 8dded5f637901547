"""Interpreter start-up hook that plugs pieval into lm-eval when, and only when, lm-eval loads.

lm-eval 0.4.13 has no plugin entry points, so the installed ``pieval_lm_eval.pth`` calls
:func:`install` at start-up. That only puts a finder on ``sys.meta_path``; nothing of
lm-eval, torch or pieval's own modules is imported. When a program later imports
``lm_eval.models`` or ``lm_eval.tasks``, the finder lets the normal loader run the module
and then calls :mod:`pieval.lmeval` to register ``pi_llama`` and pieval's task folder.
It must run *after* those modules: registering a model before ``lm_eval.models`` has
filled the registry leaves it non-empty, and lm-eval then never loads its own models.

Set ``PIEVAL_LM_EVAL_HOOK=0`` to switch it off (the ``.pth`` line checks it before
importing anything); ``pieval.lmeval.activate()`` then does the same work explicitly.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "PIEVAL_LM_EVAL_HOOK"
_OFF = frozenset({"0", "false", "no", "off"})

# module -> name of the pieval.lmeval function to run once that module has executed
_AFTER_IMPORT = {
    "lm_eval._cli.utils": "cli_errors",  # the CLI's argument parsers, which run before any model loads
    "lm_eval.models": "register_model",
    "lm_eval.tasks": "include_tasks",
}


def enabled(environ=os.environ) -> bool:
    """False when ``PIEVAL_LM_EVAL_HOOK`` is 0/false/no/off (any case)."""
    return environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def _run(action: str) -> None:
    try:
        from pieval import lmeval

        getattr(lmeval, action)()
    except Exception as exc:  # a broken plug-in must not take lm-eval down with it
        import warnings

        warnings.warn(
            f"pieval could not hook into lm-eval ({action}: {exc!r}); pi_llama or pieval's "
            f"tasks are unavailable in this run. Set {ENV_VAR}=0 to skip the hook.",
            RuntimeWarning,
            stacklevel=2,
        )


class _LoaderAfter:
    """Wraps a module's loader to call pieval right after the module body has executed."""

    def __init__(self, loader, action: str) -> None:
        self._loader = loader
        self._action = action

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        # leave no trace of the wrapper on the module lm-eval sees
        module.__loader__ = module.__spec__.loader = self._loader
        _run(self._action)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class PostImportFinder:
    """A ``sys.meta_path`` entry that finds nothing itself; it only wraps the watched modules' loaders."""

    def __init__(self, watched: dict[str, str]) -> None:
        self._pending = dict(watched)

    def find_spec(self, fullname, path=None, target=None):
        action = self._pending.get(fullname)
        if action is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        del self._pending[fullname]
        if not self._pending:
            sys.meta_path.remove(self)
        spec.loader = _LoaderAfter(spec.loader, action)
        return spec


def install() -> None:
    """Arrange for pieval to register itself in lm-eval once lm-eval loads (idempotent)."""
    if not enabled() or any(isinstance(f, PostImportFinder) for f in sys.meta_path):
        return
    already = {m: a for m, a in _AFTER_IMPORT.items() if m in sys.modules}
    for action in already.values():
        _run(action)
    pending = {m: a for m, a in _AFTER_IMPORT.items() if m not in already}
    if pending:
        sys.meta_path.insert(0, PostImportFinder(pending))
