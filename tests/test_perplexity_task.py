"""pg19_ppl / proofpile_ppl / local_ppl as lm-eval tasks: settings, document selection,
bad input, and whole runs through ``lm_eval.simple_evaluate`` and the stock CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pieval.documents import Document, DocumentError
from pieval.errors import UserError
from pieval.perplexity import SlidingWindowError
from pieval.perplexity_task import CorpusConfig, select_documents, settings_from_metadata
from pieval.protocol import PROOFPILE_DOCS, PROOFPILE_MIN_TOKENS, STRIDE
from test_perplexity import brute_force, token_ppl, window_ppl

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tasks" / "perplexity"
WINDOWS = (256, 512)  # L and L' of the reference model at scaling_factor=2


@pytest.fixture(scope="module")
def model_dir(ref_model_dir, tiny_llama_dir):
    """The reference model once trained; until then the random model with its tokenizer."""
    return ref_model_dir if (ref_model_dir / "model.safetensors").exists() else tiny_llama_dir


@pytest.fixture(scope="module")
def lm_eval_ready():
    """Register pi_llama as the installed hook does (idempotent)."""
    from pieval import lmeval

    lmeval.activate()


def task_manager(**metadata):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False, metadata=metadata)


def load_task(name, **metadata):
    return task_manager(**metadata).load([name])["tasks"][name]


# ------------------------------------------------------------------ settings and selection


def test_yaml_defaults_follow_the_protocol():
    from lm_eval.tasks._yaml_loader import load_yaml

    pg19 = load_yaml(TASKS / "pg19_ppl.yaml", resolve_func=False)["metadata"]
    proof = load_yaml(TASKS / "proofpile_ppl.yaml", resolve_func=False)["metadata"]
    assert pg19["dataset"] == "emozilla/pg19-test" and "max_docs" not in pg19  # the whole split
    assert proof["max_docs"] == PROOFPILE_DOCS
    assert proof["min_doc_tokens"] == proof["max_doc_tokens"] == PROOFPILE_MIN_TOKENS
    scoring, _ = settings_from_metadata(proof)
    assert scoring.stride == STRIDE and scoring.windows is None  # the model's L..L'


def test_settings_ignore_model_args_and_validate():
    scoring, corpus = settings_from_metadata(
        {"pretrained": "x", "dtype": "float32", "revision": "main", "windows": [512, 256], "stride": 64, "data_path": "d"}
    )
    assert scoring.windows == (256, 512) and scoring.stride == 64
    assert corpus.data_path == "d" and corpus.dataset_revision is None
    with pytest.raises(SlidingWindowError, match="stride must be a positive integer"):
        settings_from_metadata({"stride": 0, "data_path": "d"})
    with pytest.raises(UserError, match="max_docs must be a positive integer"):
        settings_from_metadata({"max_docs": 0, "data_path": "d"})


def test_misspelt_keys_name_the_nearest_and_bad_values_are_one_line():
    with pytest.raises(UserError, match="'max_doc_token': did you mean 'max_doc_tokens'"):
        settings_from_metadata({"max_doc_token": 5, "data_path": "d"}, "local_ppl")
    with pytest.raises(UserError, match="'windoes': did you mean 'windows'"):
        settings_from_metadata({"windoes": [256], "data_path": "d"}, "local_ppl")
    # keys of the other pieval tasks and lm-eval's own are known: one --metadata serves a whole run
    settings_from_metadata({"lengths": [256], "greedy": True, "version": 1.0, "config_source": "x", "data_path": "d"})
    with pytest.raises(UserError) as raised:
        settings_from_metadata({"sample_seed": "a", "text_field": "", "data_path": "d"}, "local_ppl")
    message = str(raised.value)
    assert "\n" not in message
    assert "sample_seed must be an integer or null (got 'a')" in message
    assert "text_field must be a non-empty string (got '')" in message


def docs(*texts):
    return [Document(f"d{i}", t) for i, t in enumerate(texts)]


def test_select_documents_counts_what_it_skips():
    corpus = CorpusConfig(data_path="x", min_doc_tokens=3)
    sel = select_documents(docs("a b c d", "", "a b", "a b c"), corpus, count_tokens=lambda t: len(t.split()))
    assert [d.doc_id for d in sel.documents] == ["d0", "d3"]
    assert (sel.empty_skipped, sel.below_min_tokens_skipped, sel.eligible) == (1, 1, 2)


def test_select_documents_first_n_or_seeded_sample():
    many = docs(*[f"doc {i}" for i in range(50)])
    first = select_documents(many, CorpusConfig(data_path="x", max_docs=5))
    assert [d.doc_id for d in first.documents] == ["d0", "d1", "d2", "d3", "d4"]
    a = select_documents(many, CorpusConfig(data_path="x", max_docs=5, sample_seed=0))
    b = select_documents(many, CorpusConfig(data_path="x", max_docs=5, sample_seed=0))
    ids = [d.doc_id for d in a.documents]
    assert ids == [d.doc_id for d in b.documents] and len(ids) == 5 and a.eligible == 50
    assert ids != [d.doc_id for d in first.documents]
    assert ids == sorted(ids, key=lambda s: int(s[1:]))  # kept in corpus order


def test_hub_settings_reach_load_dataset_and_proofpile_selection(monkeypatch, tiny_llama_dir):
    import datasets

    calls = []

    def load_dataset(name, config, split, revision, streaming):
        calls.append((name, config, split, revision, streaming))
        return [{"text": "In the beginning " * n, "meta": "{}"} for n in (1, 40, 2, 60, 80)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    task = load_task(
        "proofpile_ppl", pretrained=str(tiny_llama_dir), dataset_revision="abc123", min_doc_tokens=100, max_docs=2
    )
    assert calls == [("emozilla/proofpile-test-tokenized", None, "train", "abc123", True)]
    docs_ = task.config.metadata["documents"]
    assert (docs_["selected"], docs_["eligible"], docs_["below_min_tokens_skipped"]) == (2, 3, 2)
    assert task.config.metadata["corpus"]["dataset_revision"] == "abc123"
    assert task.config.metadata["scoring"]["max_doc_tokens"] == PROOFPILE_MIN_TOKENS


# ------------------------------------------------------------------ bad input at task build


def test_local_ppl_without_data_path_says_how_to_pass_it():
    with pytest.raises(UserError, match=r"""--metadata '\{"data_path": "/path/to/docs"\}'"""):
        load_task("local_ppl")


def test_hub_task_offline_says_how_to_pass_local_data(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DocumentError, match="emozilla/pg19-test.*data_path"):
        load_task("pg19_ppl")


def test_non_utf8_file_is_refused(tmp_path):
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DocumentError, match="not valid UTF-8"):
        load_task("local_ppl", data_path=str(tmp_path))


def test_corpus_of_empty_documents_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(UserError, match="no documents to score \\(1 empty"):
        load_task("local_ppl", data_path=str(tmp_path))


def test_min_doc_tokens_needs_a_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 40000)
    with pytest.raises(UserError, match="min_doc_tokens=32768 counts tokens with the model's tokenizer"):
        load_task("proofpile_ppl", data_path=str(tmp_path))


def test_bad_windows_fail_at_task_build(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(SlidingWindowError, match="stride 256 > W-1 = 127"):
        load_task("local_ppl", data_path=str(tmp_path), windows=[128])


def test_models_without_sliding_windows_get_a_clear_error():
    """lm-eval asks the model for the request type with getattr; that AttributeError becomes one line."""
    from pieval import lmeval

    class OtherLM:
        pass

    with pytest.raises(AttributeError) as raised:
        getattr(OtherLM(), "loglikelihood_sliding")
    error = lmeval.unsupported_request(raised.value)
    assert isinstance(error, UserError) and "model class OtherLM" in str(error) and "--model pi_llama" in str(error)
    with pytest.raises(AttributeError) as other:
        getattr(OtherLM(), "loglikelihood")
    assert lmeval.unsupported_request(other.value) is None
    assert lmeval.unsupported_request(ValueError("x")) is None


@pytest.mark.slow
def test_stock_cli_with_hf_model_gives_one_line(tiny_llama_dir, tmp_path):
    (tmp_path / "a.txt").write_text("In the beginning God created the heaven and the earth.")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_llama_dir}",
        "--tasks", "local_ppl", "--metadata", json.dumps({"data_path": str(tmp_path), "stride": 64}),
        "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "lm_eval: error: model class HFLM cannot score strided sliding-window perplexity"
    ), proc.stderr[-3000:]
    assert "--model pi_llama" in proc.stderr


# ------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def corpus_dir(heldout_dir, tmp_path_factory):
    """Three held-out books, an empty document and one shorter than any window."""
    out = tmp_path_factory.mktemp("corpus")
    rows = [{"text": p.read_text()} for p in sorted(heldout_dir.glob("*.txt"))[:3]]
    rows += [{"text": ""}, {"text": "Jesus wept."}]
    path = out / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate_local(model_dir, corpus_dir, **metadata):
    import lm_eval

    model_args = {"pretrained": str(model_dir), "scaling_factor": 2, "dtype": "float32"}
    metadata = {"data_path": str(corpus_dir), "stride": 128, "max_doc_tokens": 1024} | metadata
    # simple_evaluate merges model_args into the metadata only for a TaskManager it builds
    # itself (over all of lm-eval's tasks); this one indexes ours alone, merged the same way.
    return lm_eval.simple_evaluate(
        model="pi_llama", model_args=model_args, tasks=["local_ppl"], batch_size=4, device="cpu",
        bootstrap_iters=0, task_manager=task_manager(**model_args, **metadata), log_samples=True,
    )


@pytest.fixture(scope="module")
def local_run(model_dir, corpus_dir, lm_eval_ready):
    return evaluate_local(model_dir, corpus_dir)


def test_simple_evaluate_matches_brute_force(local_run, model_dir, corpus_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = local_run["results"]["local_ppl"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [t for t in (json.loads(line)["text"] for line in corpus_dir.open()) if t]
    ids = [tok(t, add_special_tokens=False)["input_ids"][:1024] for t in texts]
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=pi_config(model_dir), dtype="float32").eval()
    for w in WINDOWS:
        reference = brute_force(model, ids, w, 128, tok.bos_token_id)
        assert res[f"token_ppl_{w},none"] == pytest.approx(token_ppl(reference), rel=1e-5)
        assert res[f"window_ppl_{w},none"] == pytest.approx(window_ppl(reference), rel=1e-5)
        assert res[f"scored_tokens_{w},none"] == sum(map(len, ids))
        # bpb and token_ppl describe the same NLL
        n_bytes = sum(len(tok.decode(i).encode("utf-8")) for i in ids)
        assert res[f"bpb_{w},none"] * math.log(2) * n_bytes == pytest.approx(
            math.log(res[f"token_ppl_{w},none"]) * sum(map(len, ids)), rel=1e-6
        )


def pi_config(model_dir):
    """The checkpoint config extended by 2x, built independently of pi_llama's loader."""
    from transformers import AutoConfig

    from pieval import rope

    config = AutoConfig.from_pretrained(model_dir)
    rope.apply(config, rope.resolve(config, scaling_factor=2))
    return config


def test_run_facts_are_recorded_in_the_config_section(local_run):
    meta = local_run["configs"]["local_ppl"]["metadata"]
    assert meta["scoring"]["windows"] == list(WINDOWS)  # the model's default L, 2L
    assert meta["scoring"]["stride"] == 128 and meta["scoring"]["max_doc_tokens"] == 1024
    docs_ = meta["documents"]
    assert (docs_["selected"], docs_["scored"], docs_["empty_skipped"]) == (4, 4, 1)
    assert docs_["truncated"] == 3
    assert docs_["shorter_than_window"] == {"256": 1, "512": 1}
    assert local_run["config"]["pieval"]["context_length"] == 512
    assert set(local_run["higher_is_better"]["local_ppl"]) == {
        f"{m}_{w}" for m in ("token_ppl", "window_ppl", "bpb", "scored_tokens") for w in WINDOWS
    }
    short = [s for s in local_run["samples"]["local_ppl"] if s["doc"]["text"] == "Jesus wept."]
    assert short[0]["filtered_resps"][0]["windows"]["256"]["windows"] == 1


@pytest.mark.slow
def test_stock_cli_runs_all_three_tasks(model_dir, corpus_dir, lm_eval_ready, tmp_path):
    """`lm_eval` as a user types it; data local; numbers equal the in-process run's."""
    metadata = {
        "data_path": str(corpus_dir), "stride": 128, "max_doc_tokens": 1024,
        "min_doc_tokens": 1024,  # proofpile_ppl's filter, scaled to the held-out books
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "pi_llama",
        "--model_args", f"pretrained={model_dir},scaling_factor=2,dtype=float32",
        "--tasks", "pg19_ppl,proofpile_ppl,local_ppl", "--metadata", json.dumps(metadata),
        "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    for task in ("pg19_ppl", "proofpile_ppl", "local_ppl"):
        res = out["results"][task]
        for w in WINDOWS:
            assert 1 < res[f"token_ppl_{w},none"] < 1e5
        assert out["configs"][task]["metadata"]["scoring"]["windows"] == list(WINDOWS)
    # --metadata reaches all three tasks, so they score the same documents (min_doc_tokens
    # included); the in-process run with that metadata must agree with each of them.
    expected = evaluate_local(model_dir, corpus_dir, min_doc_tokens=1024)["results"]["local_ppl"]
    for task in ("pg19_ppl", "proofpile_ppl", "local_ppl"):
        for w in WINDOWS:
            key = f"token_ppl_{w},none"
            assert out["results"][task][key] == pytest.approx(expected[key], rel=1e-6), (task, w)
    # proofpile_ppl kept only the documents with >= min_doc_tokens tokens
    docs_ = out["configs"]["proofpile_ppl"]["metadata"]["documents"]
    assert docs_["below_min_tokens_skipped"] >= 1 and docs_["selected"] >= 1
    assert docs_["shorter_than_window"] == {"256": 0, "512": 0}
