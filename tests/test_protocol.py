"""pieval.protocol is the one place the paper's parameters live: what YAML and shipped data
cannot import is checked against it here."""

from __future__ import annotations

from pathlib import Path

import yaml

from pieval import protocol
from pieval.leaderboard import tables
from pieval.paths import tasks_dir



def task_metadata(name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader; !function left unresolved

    return load_yaml(tasks_dir() / "perplexity" / f"{name}.yaml", resolve_func=False)["metadata"]


def test_perplexity_task_configs_follow_the_protocol():
    proofpile = task_metadata("proofpile_ppl")
    assert proofpile["max_docs"] == protocol.PROOFPILE_DOCS
    assert proofpile["min_doc_tokens"] == proofpile["max_doc_tokens"] == protocol.PROOFPILE_MIN_TOKENS
    pg19 = task_metadata("pg19_ppl")
    assert "max_docs" not in pg19 and "max_doc_tokens" not in pg19  # the whole test split, each book whole


def test_reference_data_and_leaderboard_columns_follow_the_protocol():
    ref = yaml.safe_load((Path(tables.__file__).parent / "paper_reference.yaml").read_text())
    assert ref["steps"] == {"base": 0, "PI": protocol.FINETUNE_STEPS, "FT": protocol.DIRECT_FT_STEPS}
    assert set(tables.ORIGINAL_WINDOW_TASK_COLUMN) == set(protocol.ORIGINAL_WINDOW_TASKS)
    assert set(tables.ORIGINAL_WINDOW_TASK_COLUMN.values()) <= set(tables.ORIGINAL_WINDOW_COLUMNS)
