"""The fine-tuner's evaluation files are lm-eval's own: its writer, its layout and keys."""

from __future__ import annotations

import json

import pytest

from pieval.finetune.evaluate import save_results


def _results(samples: bool) -> dict:
    out = {"results": {"toy": {"acc,none": 0.5}}, "configs": {"toy": {"task": "toy"}}, "versions": {"toy": 1.0}}
    if samples:
        sample = {"doc_id": 0, "doc": {"x": 1}, "target": "a", "arguments": [("q", {})], "resps": [["a"]],
                  "filtered_resps": ["a"], "doc_hash": "d", "prompt_hash": "p", "target_hash": "t"}  # fmt: skip
        out["samples"] = {"toy": [sample]}
    return out


@pytest.mark.parametrize("samples", [False, True])
def test_results_are_written_by_lm_evals_tracker(tmp_path, samples):
    from lm_eval.loggers import EvaluationTracker

    directory = tmp_path / "eval" / "checkpoint-000002"
    full = save_results(EvaluationTracker(), _results(samples), directory)
    assert full.parent == directory and full.name.startswith("results_") and full.suffix == ".json"
    written = json.loads(full.read_text())
    assert float(written["total_evaluation_time_seconds"]) >= 0  # lm-eval's own keys, as the CLI writes
    assert {"task_hashes", "model_name", "chat_template", "fewshot_as_multiturn"} <= set(written)
    assert written["results"] == {"toy": {"acc,none": 0.5}} and "samples" not in written
    date = full.name[len("results_") : -len(".json")]
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted([full.name, *([f"samples_toy_{date}.jsonl"] if samples else [])])
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["checkpoint-000002"]  # no staging left
    if samples:
        (line,) = (directory / f"samples_toy_{date}.jsonl").read_text().splitlines()
        assert json.loads(line)["arguments"] == {"gen_args_0": {"arg_0": "q", "arg_1": {}}}
        assert written["task_hashes"]["toy"]


def test_a_results_file_lm_eval_could_not_write_is_an_error(tmp_path, monkeypatch):
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker()
    monkeypatch.setattr(tracker, "save_results_aggregated", lambda **kwargs: None)
    with pytest.raises(RuntimeError, match="lm-eval did not write the results of checkpoint-000002"):
        save_results(tracker, _results(False), tmp_path / "checkpoint-000002")
