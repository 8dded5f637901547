"""pieval inside lm-eval, in-process: ``pi_llama`` beside lm-eval's own models, pieval's tasks
between lm-eval's folder and the user's ``--include_path``, and lm-eval's libra ``passkey``
renamed ``libra_passkey`` (its tag and group follow) instead of being replaced.

Fast tests use the miniature folders in fixtures/lmeval; one slow test pays for lm-eval's
full task index (~25 s) to check the real libra suite against pieval's real ``passkey``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pieval import lmeval
from pieval.paths import tasks_dir

FIXTURES = Path(__file__).parent / "fixtures" / "lmeval"
BUILTIN = FIXTURES / "builtin"
# Columns for the fixture tasks (text, target) and libra's template (context, input, ...).
FAKE_DOCS = [
    {"text": "alpha", "target": "1", "context": "Трава зелёная.", "input": "Какой ключ?",
     "positive_outputs": ["12345"], "length": "8p"},
]


@pytest.fixture(scope="module", autouse=True)
def _activated():
    lmeval.activate()  # what the .pth hook does; idempotent, so harmless when installed


@pytest.fixture
def fake_hub(monkeypatch):
    """Every ``datasets.load_dataset`` call gets FAKE_DOCS, so lm-eval's own task code runs offline."""
    import datasets

    def load_dataset(*args, **kwargs):
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(FAKE_DOCS)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def pieval_log():
    """Messages logged to ``lm_eval.pieval`` (lm-eval may stop propagation, so no caplog)."""
    logger = logging.getLogger("lm_eval.pieval")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def miniature(monkeypatch):
    """TaskManager factory where fixtures/lmeval/builtin plays lm-eval's own task folder."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(lmeval, "_lm_eval_tasks_dir", lambda: BUILTIN)
    monkeypatch.setattr(lmeval, "tasks_dir", lambda: FIXTURES / "pieval_tasks")

    def make(*include_paths: Path) -> TaskManager:
        # include_defaults=False + BUILTIN first is exactly how TaskManager passes its defaults
        return TaskManager(include_path=[BUILTIN, *include_paths], include_defaults=False)

    return make


def test_pi_llama_registered_beside_builtin_models():
    from lm_eval.api.registry import get_model, model_registry
    from lm_eval.models import MODEL_MAPPING
    from lm_eval.models.huggingface import HFLM

    from pieval.backend import PILlama

    assert set(MODEL_MAPPING) <= set(model_registry.keys())
    assert get_model("hf") is HFLM
    assert get_model(lmeval.MODEL_NAME) is PILlama


def test_pieval_tasks_sit_between_builtins_and_include_path(miniature, pieval_log):
    index = miniature().task_index
    assert index["passkey"].yaml_path == FIXTURES / "pieval_tasks" / "passkey.yaml"
    assert index["libra_passkey"].yaml_path == BUILTIN / "libra" / "passkey.yaml"
    assert index["libra"].tags == {"libra_passkey", "passkey_with_librusec"}
    assert any("'passkey'" in m and "renamed 'libra_passkey'" in m for m in pieval_log)

    assert miniature(FIXTURES / "pieval_tasks").task_index["passkey"].yaml_path == index["passkey"].yaml_path
    assert not any("overrides existing task" in m for m in pieval_log)  # pieval's dir given twice: once

    user = FIXTURES / "user_tasks"
    index = miniature(user).task_index
    assert index["passkey"].yaml_path == user / "passkey.yaml"  # --include_path still wins
    assert index["libra_passkey"].yaml_path == BUILTIN / "libra" / "passkey.yaml"


def test_builtin_suite_keeps_running_its_own_passkey(miniature, fake_hub):
    tm = miniature()
    by_tag = tm.load("libra")["tasks"]
    assert set(by_tag) == {"libra_passkey", "passkey_with_librusec"}
    assert by_tag["libra_passkey"].config.doc_to_text == "builtin libra passkey: {{text}}"

    group = tm.load("libra_simple_information_retrieval")
    assert group["group_map"] == {"libra_simple_information_retrieval": ["libra_passkey", "passkey_with_librusec"]}
    assert group["tasks"]["libra_passkey"].config.doc_to_text == "builtin libra passkey: {{text}}"

    ours = tm.load("passkey")["tasks"]
    assert ours["passkey"].config.doc_to_text == "pieval passkey: {{text}}"

    both = tm.load(["passkey", "libra"])["tasks"]  # no "duplicate task" clash any more
    assert {"passkey", "libra_passkey"} <= set(both)
    assert both["passkey"].config.doc_to_text != both["libra_passkey"].config.doc_to_text


def test_include_defaults_false_gets_no_pieval_tasks(monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(lmeval, "tasks_dir", lambda: FIXTURES / "pieval_tasks")
    index = TaskManager(include_path=BUILTIN, include_defaults=False).task_index
    assert index["passkey"].yaml_path == BUILTIN / "libra" / "passkey.yaml"
    assert "libra_passkey" not in index


def test_no_rename_when_the_new_name_is_taken(monkeypatch):
    from lm_eval.tasks._index import Entry, Kind

    monkeypatch.setattr(lmeval, "_lm_eval_tasks_dir", lambda: BUILTIN)
    index = {
        "passkey": Entry("passkey", Kind.TASK, BUILTIN / "libra" / "passkey.yaml"),
        "libra_passkey": Entry("libra_passkey", Kind.TASK, BUILTIN / "libra" / "other.yaml"),
    }
    ours = {"passkey": Entry("passkey", Kind.TASK, FIXTURES / "pieval_tasks" / "passkey.yaml")}
    before = dict(index)
    # lm-eval's own "overrides existing task" warning then applies, as for any other clash
    assert lmeval.rename_shadowed(index, ours) == {}
    assert index == before


@pytest.mark.slow
def test_real_libra_suite_and_pieval_passkey(fake_hub, pieval_log):
    """The full lm-eval index (~25 s): ``--tasks passkey`` is pieval's, ``--tasks libra`` is libra's."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    libra_yaml = lmeval._lm_eval_tasks_dir() / "libra" / "passkey.yaml"
    tm = TaskManager()
    index = tm.task_index
    assert index["passkey"].yaml_path == tasks_dir() / "passkey" / "passkey.yaml"
    assert Path(index["libra_passkey"].yaml_path).resolve() == libra_yaml
    assert "libra_passkey" in index["libra"].tags and "passkey" not in index["libra"].tags
    assert any("renamed 'libra_passkey'" in m for m in pieval_log)
    assert tm._factory._load_full_config(index["passkey"])["metadata"]["config_source"] == str(
        index["passkey"].yaml_path
    )

    libra = tm.load("libra")
    assert "passkey" not in libra["tasks"]
    task = libra["tasks"]["libra_passkey"]
    original = load_yaml(libra_yaml, resolve_func=False)
    assert task.config.doc_to_text == original["doc_to_text"]  # the Russian prompt, unchanged
    assert task.config.generation_kwargs["max_gen_toks"] == original["generation_kwargs"]["max_gen_toks"]
    assert task.config.task_alias == original["task_alias"]
    group = tm.load("libra_simple_information_retrieval")["group_map"]
    assert group["libra_simple_information_retrieval"] == ["libra_passkey", "passkey_with_librusec"]
