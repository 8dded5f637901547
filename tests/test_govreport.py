"""govreport_pi: exact prompt and truncation, decoding settings, ROUGE against rouge_score itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pieval import govreport, task_settings
from pieval.documents import DocumentError
from pieval.errors import UserError
from pieval.task_model import TaskModel

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tasks"


@pytest.fixture(scope="module")
def reports(heldout_dir, tmp_path_factory) -> Path:
    """Four held-out books as 'reports'; a passage of each (with a line break) as its 'summary'."""
    path = tmp_path_factory.mktemp("gov") / "gov.jsonl"
    with path.open("w") as f:
        for book in sorted(heldout_dir.glob("*.txt"))[:4]:
            text = book.read_text()
            words = text.split()
            summary = " ".join(words[40:90]) + "\n" + " ".join(words[200:230])
            f.write(json.dumps({"document": text, "summary": summary}) + "\n")
    return path


def test_prompt_is_the_papers():
    assert govreport.doc_to_text({"document": "A\nB"}) == (
        "Read the following article and then summarize it.\nA\nB\nNow summarize the above article.\nSummary:"
    )


def test_truncation_keeps_exactly_the_first_tokens(ref_tokenizer, heldout_dir):
    model = TaskModel(ref_tokenizer, window=None, add_special_tokens=True)
    text = next(heldout_dir.glob("*.txt")).read_text()
    ids = ref_tokenizer(text, add_special_tokens=False).input_ids
    for n in (1, 100, 1000):
        cut, count = govreport.truncate(model, text, n)
        assert count == n and text.startswith(cut)
        assert cut == ref_tokenizer.decode(ids[:n])
    assert govreport.truncate(model, text, len(ids)) == (text, len(ids))


def test_documents_shrink_to_fit_the_window(ref_tokenizer, heldout_dir):
    text = next(heldout_dir.glob("*.txt")).read_text()
    model = TaskModel(ref_tokenizer, window=512, add_special_tokens=True)
    cut, n = govreport.fit(model, text, max_doc_tokens=15000, max_gen_toks=100)
    assert 512 - 100 - 3 <= len(ref_tokenizer(govreport.prompt(cut)).input_ids) <= 512 - 100
    assert cut == ref_tokenizer.decode(ref_tokenizer(text, add_special_tokens=False).input_ids[:n])
    with pytest.raises(UserError, match="no room for a document"):
        govreport.fit(model, text, max_doc_tokens=15000, max_gen_toks=500)


def test_local_data_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"document": "text", "abstract": "x"}) + "\n")
    with pytest.raises(DocumentError, match="needs a 'summary' field"):
        list(govreport.iter_local(str(bad)))


def test_hub_offline_error_says_how_to_pass_local_data(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DocumentError, match=r"Offline\? Pass local data.*data_path"):
        list(govreport.iter_scrolls())


def test_scrolls_zip_is_read_and_repeated_documents_merged(tmp_path, monkeypatch, caplog):
    """The hub path, on a local copy of SCROLLS' gov_report.zip layout (the same fsspec zip chain)."""
    import zipfile

    rows = [
        {"id": "a", "pid": "a_0", "input": "Report A.", "output": "Summary A1."},
        {"id": "b", "pid": "b_0", "input": "Report B.", "output": "Summary B."},
        {"id": "a", "pid": "a_1", "input": "Report A.", "output": "Summary A2."},
    ]
    with zipfile.ZipFile(tmp_path / "gov_report.zip", "w") as z:
        z.writestr("gov_report/validation.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    import datasets

    monkeypatch.setattr(govreport, "SCROLLS_ZIP", str(tmp_path / "{config}.zip"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # a zip:// chain counts as remote
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    reports = list(govreport.iter_scrolls("validation"))
    assert reports == [
        govreport.Report("a", "Report A.", ("Summary A1.", "Summary A2.")),
        govreport.Report("b", "Report B.", ("Summary B.",)),
    ]
    assert "2 documents, not the paper's 972" in caplog.text
    # several references: the best one counts, per ROUGE type
    assert govreport.rouge("Summary A2.", ["Summary A1.", "Summary A2."])["rouge2"] == 1.0


def test_rouge_of_one_summary_is_rouge_score_itself():
    from rouge_score import rouge_scorer

    pred, ref = "The agencies reported rising costs.\nCongress acted.", "Agencies report costs rising; Congress acts."
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ref, pred)
    assert govreport.rouge(pred, [ref]) == {t: direct[t].fmeasure for t in ("rouge1", "rouge2", "rougeL")}


class _Echo:
    """Builds a fake lm-eval LM that 'summarizes' by returning a fixed span of the article."""

    @staticmethod
    def make():
        from lm_eval.api.model import LM

        class Echo(LM):
            def __init__(self):
                super().__init__()
                self.requests = []

            def generate_until(self, requests, disable_tqdm=False):
                self.requests.extend(requests)
                return [self.summary(r.args[0]) for r in requests]

            @staticmethod
            def summary(prompt):
                words = prompt.split(" ")
                return " ".join(words[30:80]) + "\n\n" + " ".join(words[190:240])

            def loglikelihood(self, requests):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

        return Echo()


def _evaluate(lm, **metadata):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS), include_defaults=False, metadata=metadata)
    return lm_eval.simple_evaluate(model=lm, tasks=["govreport_pi"], task_manager=tm, log_samples=True)


def test_task_rouge_equals_rouge_score_on_the_same_pairs(reports, ref_model_dir):
    from rouge_score import rouge_scorer

    lm = _Echo.make()
    out = _evaluate(lm, tokenizer=str(ref_model_dir), data_path=str(reports), max_doc_tokens=300)
    res = out["results"]["govreport_pi"]
    assert out["higher_is_better"]["govreport_pi"] == {"rouge1": True, "rouge2": True, "rougeL": True}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    refs = [json.loads(line)["summary"] for line in reports.open()]
    preds = {r.doc["summaries"][0]: lm.summary(r.args[0]) for r in lm.requests}
    assert all("\n\n" in p for p in preds.values())  # the whole generation is scored
    for t in ("rouge1", "rouge2", "rougeL"):
        direct = [scorer.score(ref, preds[ref])[t].fmeasure for ref in refs]
        assert res[f"{t},none"] == pytest.approx(sum(direct) / len(direct), abs=1e-12)
    for r in lm.requests:
        assert r.args[0] == govreport.prompt(r.doc["document"])
        assert r.doc["doc_tokens"] == 300 and r.doc["truncated"]
        assert r.args[1] == {"until": [], "do_sample": True, "temperature": 0.5, "top_p": 0.95, "max_gen_toks": 1000}


def test_greedy_and_generation_budget_from_metadata(reports, ref_model_dir):
    lm = _Echo.make()
    out = _evaluate(lm, tokenizer=str(ref_model_dir), data_path=str(reports), greedy=True, max_gen_toks=64, max_docs=2)
    assert len(out["samples"]["govreport_pi"]) == 2
    assert {json.dumps(r.args[1], sort_keys=True) for r in lm.requests} == {
        json.dumps({"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": 64}, sort_keys=True)
    }
    assert all(not r.doc["truncated"] for r in lm.requests)  # default 15000 tokens: whole books fit


def _load(**metadata):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS), include_defaults=False, metadata=metadata)
    return tm.load(["govreport_pi"])["tasks"]["govreport_pi"]


def test_model_revision_is_not_the_datasets(ref_model_dir, monkeypatch, caplog):
    """model_args reach task metadata: revision=X names the model's commit, never SCROLLS'."""
    asked = []

    def scrolls(split="validation", revision="main"):
        asked.append((split, revision))
        yield govreport.Report("a", "Report A.", ("Summary A.",))

    monkeypatch.setattr(govreport, "iter_scrolls", scrolls)
    _load(tokenizer=str(ref_model_dir), revision="0123abc")
    _load(tokenizer=str(ref_model_dir), revision="0123abc", dataset_revision="r1", dataset_split="test")
    assert asked == [("validation", "main"), ("test", "r1")]
    _load(tokenizer=str(ref_model_dir), split="test")  # the old name, with a warning
    assert asked[-1] == ("test", "main") and "'split' is deprecated, use 'dataset_split'" in caplog.text


def settings(metadata):
    return task_settings.from_metadata(govreport.GovReportSettings, metadata, "govreport_pi")


def test_settings_misspelt_and_bad_values(ref_model_dir):
    with pytest.raises(UserError, match="'max_doc_token': did you mean 'max_doc_tokens'"):
        settings({"max_doc_token": 300})
    with pytest.raises(UserError) as raised:
        settings({"greedy": "yes", "max_gen_toks": 0, "dataset_revision": ""})
    message = str(raised.value)
    assert "\n" not in message and message.startswith("govreport_pi metadata: ")
    assert "greedy must be true or false (got 'yes')" in message
    assert "max_gen_toks must be a positive integer (got 0)" in message
    assert "dataset_revision must be a non-empty string (got '')" in message
    assert settings({"pretrained": "m", "revision": "x", "dtype": "float32"}) == (
        govreport.GovReportSettings()
    )


def _model_dir(ref_model_dir, tiny_llama_dir) -> Path:
    return ref_model_dir if (ref_model_dir / "model.safetensors").exists() else tiny_llama_dir


@pytest.mark.slow
def test_simple_evaluate_with_pi_llama(reports, ref_model_dir, tiny_llama_dir):
    import lm_eval

    model = _model_dir(ref_model_dir, tiny_llama_dir)
    out = lm_eval.simple_evaluate(
        model="pi_llama", model_args={"pretrained": str(model), "scaling_factor": 2}, tasks=["govreport_pi"],
        metadata={"data_path": str(reports), "max_gen_toks": 24, "max_docs": 2}, log_samples=True, device="cpu",
    )
    res = out["results"]["govreport_pi"]
    assert all(0.0 <= res[f"{t},none"] <= 1.0 for t in ("rouge1", "rouge2", "rougeL"))
    for s in out["samples"]["govreport_pi"]:
        # window 512 (L' = 2 x 256): the document shrinks so that prompt + 24 tokens fit
        assert s["doc"]["truncated"] and s["doc"]["doc_tokens"] < 512 - 24


@pytest.mark.slow
def test_stock_cli_runs_govreport(reports, ref_model_dir, tiny_llama_dir, tmp_path):
    model = _model_dir(ref_model_dir, tiny_llama_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "pi_llama", "--model_args", f"pretrained={model}",
        "--tasks", "govreport_pi", "--output_path", str(tmp_path), "--log_samples",
        "--metadata", json.dumps({"data_path": str(reports), "greedy": True, "max_gen_toks": 16, "max_docs": 2}),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert {"rouge1,none", "rouge2,none", "rougeL,none"} <= set(results["results"]["govreport_pi"])
    assert "Left truncation" not in proc.stderr
