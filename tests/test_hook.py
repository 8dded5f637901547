"""The start-up hook: it runs pieval's action right after a watched module has executed,
leaves every other import alone, cleans up after itself, and obeys PIEVAL_LM_EVAL_HOOK.

End-to-end checks of the installed ``.pth`` (start-up cost, no torch, leftovers) are in
test_install.py; these use a throw-away package so they never touch lm-eval's state.
"""

from __future__ import annotations

import importlib
import sys

import pytest

from pieval import hook


@pytest.fixture
def watched_package(tmp_path, monkeypatch):
    """A package ``hookdemo`` with submodules ``watched`` and ``other``; records the hook's calls."""
    pkg = tmp_path / "hookdemo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "watched.py").write_text("READY = True\n")
    (pkg / "other.py").write_text("READY = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []

    def record(action):
        # every hookdemo submodule in sys.modules, the one just imported included, has run its body
        loaded = [m for name, m in sys.modules.items() if name.startswith("hookdemo.")]
        calls.append((action, all(getattr(m, "READY", False) for m in loaded)))

    monkeypatch.setattr(hook, "_run", record)
    yield calls
    for name in [m for m in sys.modules if m.startswith("hookdemo")]:
        del sys.modules[name]


def test_action_runs_once_after_module_body(watched_package, monkeypatch):
    finder = hook.PostImportFinder({"hookdemo.watched": "register_model"})
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])

    importlib.import_module("hookdemo.other")
    assert watched_package == []
    module = importlib.import_module("hookdemo.watched")

    assert watched_package == [("register_model", True)]  # module body had run
    assert finder not in sys.meta_path  # nothing left to watch
    # lm-eval (and importlib.reload) see the ordinary loader, not the wrapper
    assert type(module.__loader__).__name__ == "SourceFileLoader"
    assert module.__spec__.loader is module.__loader__
    importlib.reload(module)
    assert watched_package == [("register_model", True)]


def test_finder_stays_until_every_watched_module_loaded(watched_package, monkeypatch):
    finder = hook.PostImportFinder({"hookdemo.watched": "a", "hookdemo.other": "b"})
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    importlib.import_module("hookdemo.other")
    assert finder in sys.meta_path
    importlib.import_module("hookdemo.watched")
    assert finder not in sys.meta_path
    assert watched_package == [("b", True), ("a", True)]


def test_install_acts_at_once_on_modules_already_imported(monkeypatch):
    calls = []
    monkeypatch.setattr(hook, "_run", calls.append)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, hook.PostImportFinder)])
    monkeypatch.setitem(sys.modules, "lm_eval.models", object())
    monkeypatch.delitem(sys.modules, "lm_eval.tasks", raising=False)
    monkeypatch.delitem(sys.modules, "lm_eval._cli.utils", raising=False)
    monkeypatch.delenv(hook.ENV_VAR, raising=False)

    hook.install()
    hook.install()  # idempotent: one finder, actions not repeated

    assert calls == ["register_model"]
    finders = [f for f in sys.meta_path if isinstance(f, hook.PostImportFinder)]
    assert len(finders) == 1 and finders[0]._pending == {"lm_eval._cli.utils": "cli_errors", "lm_eval.tasks": "include_tasks"}


@pytest.mark.parametrize("value", ["0", "false", "No", " OFF "])
def test_env_var_switches_it_off(value, monkeypatch):
    calls = []
    monkeypatch.setattr(hook, "_run", calls.append)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, hook.PostImportFinder)])
    monkeypatch.setenv(hook.ENV_VAR, value)
    hook.install()
    assert calls == []
    assert not any(isinstance(f, hook.PostImportFinder) for f in sys.meta_path)


@pytest.mark.parametrize("value", ["1", "yes", "on", ""])
def test_other_values_leave_it_on(value):
    assert hook.enabled({hook.ENV_VAR: value})
    assert hook.enabled({})


def test_failing_action_warns_instead_of_breaking_lm_eval(monkeypatch):
    import pieval.lmeval

    def broken():
        raise FileNotFoundError("no tasks")

    monkeypatch.setattr(pieval.lmeval, "include_tasks", broken)
    with pytest.warns(RuntimeWarning, match=r"include_tasks.*no tasks.*PIEVAL_LM_EVAL_HOOK=0"):
        hook._run("include_tasks")
