"""Passkey: prompt geometry in the model's tokens, k_max by its definition, the task end to end."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pieval import passkey
from pieval.errors import UserError
from pieval.leaderboard.heatmap import heat_map
from pieval.task_model import TaskModel, from_metadata

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tasks"


@pytest.fixture(scope="module")
def model(ref_tokenizer) -> TaskModel:
    return TaskModel(ref_tokenizer, window=None, add_special_tokens=True)


def key_distance(tokenizer, prompt: str, key: str) -> tuple[int, int]:
    """(length, key distance) found independently of the builder: token-by-token decoding, no offsets."""
    ids = tokenizer(prompt).input_ids
    key_char = prompt.index(f"The pass key is {key}") + len("The pass key is ")
    chars = 0
    for i, tok in enumerate(ids):
        chars += len(tokenizer.decode([tok], skip_special_tokens=True))
        if chars > key_char:
            return len(ids), len(ids) - i
    raise AssertionError("key not found")


# ---------------------------------------------------------------- prompts


def test_prompt_text_is_the_papers(model):
    row = passkey.generate(model, [512], trials=1, num_distances=4)[1]
    key = row["key"]
    lines = row["prompt"].split("\n")
    assert lines[0] == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there."
    )
    assert lines[1].startswith("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.")
    assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert lines[3].startswith("The grass is green.")
    assert lines[4] == "What is the pass key? The pass key is"
    assert len(lines) == 5 and re.fullmatch(r"[1-9]\d{4}", key)


@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_prompts_hit_length_and_distance_in_model_tokens(model, ref_tokenizer, length):
    rows = passkey.generate(model, [length], trials=2)
    target = length - passkey.DEFAULT_GEN_TOKS
    # The fixed text bounds the distance: no filler after the key / none before it.
    _, k_lo = key_distance(ref_tokenizer, passkey.render(12345, 0, 0)[0], "12345")
    head = len(ref_tokenizer(passkey.render(12345, 0, 0)[0]).input_ids) - k_lo
    k_hi = target - head
    assert [r["k"] for r in rows[::2]] == [length * i // 32 for i in range(1, 33)]
    for row in rows:
        n, k = key_distance(ref_tokenizer, row["prompt"], row["key"])
        assert (n, k) == (row["prompt_tokens"], row["k_tokens"])
        assert target - 3 <= n <= target, row
        want = min(max(row["k"], k_lo), k_hi)
        assert abs(k - want) <= 3, (row["k"], k, want)


def test_same_seed_same_prompts_and_lengths_are_independent(model):
    both = passkey.generate(model, [256, 512], trials=2, num_distances=4, seed=7)
    assert both == passkey.generate(model, [256, 512], trials=2, num_distances=4, seed=7)
    assert [r for r in both if r["length"] == 512] == passkey.generate(model, [512], trials=2, num_distances=4, seed=7)
    other = passkey.generate(model, [256], trials=2, num_distances=4, seed=8)
    assert [r["key"] for r in other] != [r["key"] for r in both if r["length"] == 256]


def test_keys_come_from_a_private_rng(model):
    import random

    random.seed(0)
    a = passkey.generate(model, [256], trials=1, num_distances=2)
    random.seed(1)
    assert a == passkey.generate(model, [256], trials=1, num_distances=2)


def test_bad_lengths_are_refused(model, ref_tokenizer):
    with pytest.raises(UserError, match="exceeds the model's window 256"):
        passkey.generate(TaskModel(ref_tokenizer, 256, True), [512])
    with pytest.raises(UserError, match=r"passkey length 64 cannot hold the prompt: its fixed text is \d+ tokens") as raised:
        passkey.generate(model, [64], num_distances=4)
    minimum = int(re.search(r"pass lengths >= (\d+)", str(raised.value)).group(1))
    assert len(passkey.generate(model, [minimum], trials=1, num_distances=1)) == 1  # the minimum it names works
    with pytest.raises(UserError, match="too short for 32 distinct distances"):
        passkey.distances(16)


# ---------------------------------------------------------------- k_max


@pytest.mark.parametrize(
    "table, expected",
    [
        ({8: 1.0, 16: 1.0, 24: 1.0}, 24),
        ({8: 0.1, 16: 1.0, 24: 1.0}, 0),  # the smallest fails
        ({8: 1.0, 16: 0.2, 24: 0.1, 32: 0.9}, 16),  # non-monotone: the recovery at 32 does not count
        ({8: 0.3, 16: 0.0, 24: 1.0, 32: 1.0}, 8),
        ({32: 0.5, 8: 0.5, 24: 0.19, 16: 0.5}, 16),  # order of the mapping does not matter
        ({8: 0.0}, 0),
    ],
)
def test_k_max_matches_the_definition(table, expected):
    assert passkey.k_max(table) == expected
    # The definition, transcribed: the largest k with every k' <= k at >= 20%, else 0.
    ok = [k for k in table if all(table[j] >= 0.2 for j in table if j <= k)]
    assert expected == max(ok, default=0)


def test_k_max_from_trials_uses_success_rates_and_reports_the_real_distance():
    outcomes = [(8, True)] * 2 + [(8, False)] * 8 + [(16, True)] + [(16, False)] * 9 + [(24, True)] * 10
    assert passkey.success_rates(outcomes) == {8: 0.2, 16: 0.1, 24: 1.0}
    # the grid point 8 was reached as 7 or 9 tokens, 24 as 21-23: the report is the smallest reached
    items = [{"k": k, "k_tokens": k - 1 + (i % 3) - (k == 24) * 2, "correct": c} for i, (k, c) in enumerate(outcomes)]
    assert passkey.aggregate_k_max(items) == 7
    assert passkey.aggregate_k_tested(items) == 21
    assert passkey.aggregate_k_max([{**item, "correct": True} for item in items]) == 21
    assert passkey.aggregate_k_max([{**item, "correct": False} for item in items]) == 0


def test_k_max_pools_grid_points_that_reach_the_same_distance():
    # grid points 24, 32 and 40 cannot be met (the question follows the key): all three put the
    # key 21 tokens from the end, so they are one distance tested with 30 keys, 5 found (17%)
    hits = {8: 10, 16: 10, 24: 3, 32: 1, 40: 1}
    items = [
        {"k": k, "k_tokens": min(k, 21), "correct": i < n} for k, n in hits.items() for i in range(10)
    ]
    assert passkey.aggregate_k_tested(items) == 21
    assert passkey.aggregate_k_max(items) == 16  # the first of them alone (3 of 10) would say 21
    # brute force over real distances: pool every key by the distance it really had
    pooled: dict[int, list[bool]] = {}
    for item in items:
        pooled.setdefault(item["k_tokens"], []).append(item["correct"])
    ok = [d for d in pooled if all(sum(v) / len(v) >= 0.2 for e, v in pooled.items() if e <= d)]
    assert max(ok) == 16
    assert passkey.aggregate_k_max([{**item, "correct": item["correct"] or item["k"] == 40} for item in items]) == 21


def test_first_integer():
    assert passkey.first_integer(" 12345. Remember") == 12345
    assert passkey.first_integer(" is the 4th, 12345") == 4
    assert passkey.first_integer(" none") is None


# ---------------------------------------------------------------- the task through lm-eval


def _lm_class():
    from lm_eval.api.model import LM

    class KeyReader(LM):
        """Answers the key when ``knows(k_tokens)``; reads it from the prompt like a perfect model."""

        def __init__(self, knows):
            super().__init__()
            self.knows = knows
            self.requests = []

        def generate_until(self, requests, disable_tqdm=False):
            out = []
            for r in requests:
                self.requests.append(r)
                key = re.search(r"The pass key is (\d+)", r.args[0]).group(1)
                out.append(f" {key}. Remember" if self.knows(r.doc["k"]) else " 4 is the pass key")
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    return KeyReader


def _run(lm, ref_model_dir, **metadata):
    import lm_eval
    from lm_eval.tasks import TaskManager

    metadata = {"tokenizer": str(ref_model_dir), **metadata}
    tm = TaskManager(include_path=str(TASKS), include_defaults=False, metadata=metadata)
    return lm_eval.simple_evaluate(model=lm, tasks=["passkey"], task_manager=tm, log_samples=True)


def test_oracle_gets_k_max_equal_to_the_farthest_distance_tested_and_never_gets_zero(ref_model_dir):
    KeyReader = _lm_class()
    out = _run(KeyReader(lambda k: True), ref_model_dir, lengths=[256, 512], trials=2)
    names = [f"{m}_{n}" for n in (256, 512) for m in ("acc", "k_max", "k_tested")]
    assert out["higher_is_better"]["passkey"] == dict.fromkeys(names, True)
    res = out["results"]["passkey"]
    samples = out["samples"]["passkey"]
    for length in (256, 512):
        # the farthest key sits where the question and the answer's room leave space, short of L'
        farthest = min(s["doc"]["k_tokens"] for s in samples if s["doc"]["length"] == length and s["doc"]["k"] == length)
        assert res[f"k_max_{length},none"] == res[f"k_tested_{length},none"] == farthest < length
        assert res[f"acc_{length},none"] == 1.0
        grid = out["configs"]["passkey"]["metadata"]["prompts"][str(length)]
        assert grid["grid"] == passkey.distances(length) and grid["achieved"][-1] == farthest
    res = _run(KeyReader(lambda k: False), ref_model_dir, lengths=[256], trials=2)["results"]["passkey"]
    assert (res["k_max_256,none"], res["acc_256,none"]) == (0, 0.0)


def test_partial_model_and_logged_samples(ref_model_dir):
    KeyReader = _lm_class()
    lm = KeyReader(lambda k: k <= 96 or k == 200)  # fails from 104 on, "recovers" at 200
    out = _run(lm, ref_model_dir, lengths=[256], trials=3, seed=5)
    res = out["results"]["passkey"]
    samples = out["samples"]["passkey"]
    # k_max is the real distance of the grid point 96: a distance one of its prompts had exactly
    assert res["k_max_256,none"] == min(s["doc"]["k_tokens"] for s in samples if s["doc"]["k"] == 96)
    assert res["acc_256,none"] == pytest.approx(13 / 32)
    assert len(samples) == 96
    for s in samples:
        doc, item = s["doc"], s["k_max_256"]
        assert set(doc) >= {"length", "k", "k_tokens", "prompt_tokens", "key"}
        assert item["correct"] == (item["answer"] == int(doc["key"])) == lm.knows(doc["k"])
        assert s["acc_256"] == float(item["correct"])
    heat = heat_map(samples)
    assert heat[256][96] == 1.0 and heat[256][104] == 0.0 and heat[256][200] == 1.0
    # Every prompt asks for exactly the answer tokens it left room for, greedily.
    assert {r.args[1]["max_gen_toks"] for r in lm.requests} == {passkey.DEFAULT_GEN_TOKS}
    assert {r.args[1]["do_sample"] for r in lm.requests} == {False}


def test_gen_kwargs_larger_than_the_reserved_room_are_refused(ref_model_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(
        include_path=str(TASKS), include_defaults=False,
        metadata={"tokenizer": str(ref_model_dir), "lengths": [256], "trials": 1, "num_distances": 2},
    )
    with pytest.raises(UserError, match="max_gen_toks=32 exceeds the 10 tokens"):
        lm_eval.simple_evaluate(model=_lm_class()(lambda k: True), tasks=["passkey"], task_manager=tm, gen_kwargs="max_gen_toks=32")


def test_default_length_is_the_models_context_length(tiny_llama_dir):
    def lengths(**md):
        return set(passkey.build_dataset(**{"trials": 1, "num_distances": 2, **md})["test"]["length"])

    md = {"pretrained": str(tiny_llama_dir), "scaling_factor": 2}
    assert from_metadata(md, "passkey").window == 512
    assert lengths(**md) == {512}
    # max_length widens the window HFLM allows, not the default length; longer lengths then fit
    assert lengths(pretrained=str(tiny_llama_dir), max_length=300) == {256}
    assert lengths(pretrained=str(tiny_llama_dir), max_length=300, lengths=[300]) == {300}
    assert lengths(tokenizer=str(tiny_llama_dir), max_length=300) == {300}
    with pytest.raises(UserError, match="cannot tell the model's window"):
        lengths(tokenizer=str(tiny_llama_dir))
    assert lengths(tokenizer=str(tiny_llama_dir), lengths=[300, 256, 300]) == {256, 300}
    # lm-eval's ruler key, which lm-eval suggests for length-bound tasks, means the same
    assert lengths(**md, max_seq_lengths=[256]) == {256}
    assert lengths(**md, max_seq_lengths=[256], lengths=[384]) == {384}  # passkey's own key wins
    with pytest.raises(UserError, match="trials must be a positive integer"):
        lengths(tokenizer=str(tiny_llama_dir), lengths=256, trials=[2, 3])


def test_settings_misspelt_and_bad_values(tiny_llama_dir):
    with pytest.raises(UserError, match="'lenghts': did you mean 'lengths'"):
        passkey.build_dataset(tokenizer=str(tiny_llama_dir), lenghts=[256])
    with pytest.raises(UserError) as raised:
        passkey.PasskeySettings(lengths=[256, -1], trials=0, seed="x")
    message = str(raised.value)
    assert "\n" not in message and message.startswith("passkey metadata: ")
    assert "trials must be a positive integer (got 0)" in message and "lengths must be a positive integer (got -1)" in message
    assert "seed must be an integer (got 'x')" in message
    assert passkey.PasskeySettings(lengths=256).lengths == (256,)
    with pytest.raises(UserError, match="lengths is empty"):
        passkey.PasskeySettings(lengths=[])


def test_no_prompt_is_truncated_by_hflm(tiny_llama_dir, caplog):
    """A real HFLM with max_length = L' receives every prompt whole (it warns when it truncates)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(tiny_llama_dir), max_length=256, batch_size=8, device="cpu")
    tm = TaskManager(
        include_path=str(TASKS), include_defaults=False,
        metadata={"pretrained": str(tiny_llama_dir), "lengths": [256], "trials": 1, "num_distances": 8},
    )
    with caplog.at_level(logging.WARNING):
        out = lm_eval.simple_evaluate(model=lm, tasks=["passkey"], task_manager=tm, log_samples=True)
    assert "Left truncation" not in caplog.text
    assert len(out["samples"]["passkey"]) == 8
    for s in out["samples"]["passkey"]:
        assert len(lm.tok_encode(s["arguments"][0][0])) == s["doc"]["prompt_tokens"] <= 256 - 10


CHAT_TEMPLATE = (  # SmolLM2's, with its default system turn
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny model with a chat template on its tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_chat")
    shutil.copytree(tiny_llama_dir, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def sent_key_distance(tokenizer, text: str, key: str, add_special_tokens: bool) -> int:
    """Tokens from the key's first token to the end of the text lm-eval sent, found in that text."""
    first_char = text.index(key)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return len(enc["input_ids"]) - next(i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > first_char)


@pytest.mark.parametrize(
    "how",
    [{"apply_chat_template": True}, {"apply_chat_template": True, "system_instruction": "Answer with the key."},
     {"system_instruction": "Answer with the key."}],
    ids=["chat", "chat+system", "system"],
)  # fmt: skip
def test_prompts_are_sized_on_the_text_lm_eval_sends(chat_llama_dir, how, caplog):
    """Lengths and distances of the wrapped text (chat template, system instruction), not of the bare prompt."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(chat_llama_dir), max_length=256, batch_size=8, device="cpu")
    tm = TaskManager(
        include_path=str(TASKS), include_defaults=False,
        metadata={"pretrained": str(chat_llama_dir), "lengths": [256], "trials": 1, "num_distances": 4},
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        out = lm_eval.simple_evaluate(model=lm, tasks=["passkey"], task_manager=tm, log_samples=True, **how)
    assert "Left truncation" not in caplog.text
    chat = how.get("apply_chat_template", False)
    for s in out["samples"]["passkey"]:
        sent, doc = s["arguments"][0][0], s["doc"]
        assert sent.startswith("<|im_start|>system\n") == chat
        assert ("Answer with the key." in sent) == ("system_instruction" in how)
        # under a chat template the answer phrase opens the assistant's turn (lm-eval's gen_prefix)
        assert sent.endswith("<|im_start|>assistant\nThe pass key is" if chat else "What is the pass key? The pass key is")
        ids = lm.tok_batch_encode([sent])[0][0]
        assert len(ids) == doc["prompt_tokens"] == len(lm.tok_encode(sent)) <= 256 - passkey.DEFAULT_GEN_TOKS
        assert sent_key_distance(lm.tokenizer, sent, doc["key"], not chat) == doc["k_tokens"]


@pytest.mark.slow
def test_stock_cli_runs_passkey_with_logged_samples(ref_model_dir, tiny_llama_dir, tmp_path):
    model = ref_model_dir if (ref_model_dir / "model.safetensors").exists() else tiny_llama_dir
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "pi_llama",
        "--model_args", f"pretrained={model}", "--tasks", "passkey",
        "--metadata", json.dumps({"trials": 2, "num_distances": 4}),
        "--output_path", str(tmp_path), "--log_samples", "--batch_size", "8",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    res = results["results"]["passkey"]
    assert {"k_max_256,none", "acc_256,none"} <= set(res)
    samples = [json.loads(line) for line in next(tmp_path.rglob("samples_passkey_*.jsonl")).open()]
    assert len(samples) == 8
    assert {"length", "k", "k_tokens", "prompt_tokens", "key"} <= set(samples[0]["doc"])
    assert {"answer", "correct"} <= set(samples[0]["k_max_256"])
    assert "Left truncation" not in proc.stderr
    assert "max_seq_lengths" not in proc.stderr  # lm-eval's ruler hint, for a key passkey does not read


@pytest.mark.slow
def test_simple_evaluate_with_pi_llama_defaults_to_its_context_length(tiny_llama_dir, caplog):
    import lm_eval

    with caplog.at_level(logging.WARNING):
        out = lm_eval.simple_evaluate(
            model="pi_llama", model_args={"pretrained": str(tiny_llama_dir), "scaling_factor": 2}, tasks=["passkey"],
            metadata={"trials": 1, "num_distances": 4}, log_samples=True, device="cpu", batch_size=4,
        )
    assert {"k_max_512,none", "acc_512,none"} <= set(out["results"]["passkey"])
    assert [s["doc"]["k"] for s in out["samples"]["passkey"]] == [128, 256, 384, 512]
    assert all(512 - 13 <= s["doc"]["prompt_tokens"] <= 512 - 10 for s in out["samples"]["passkey"])
    assert "Left truncation" not in caplog.text


@pytest.mark.slow
def test_reference_model_retrieves_through_the_task(ref_model_dir):
    """The trained reference model (L = 256) finds the key at every distance inside L' = L.

    Measured on the committed weights (step 10000), full protocol (32 distances x 10 keys),
    pi_llama, CPU: acc_256 = 0.994, k_max_256 = k_tested_256 (every distance passes; the grid's
    256 is reached as the farthest place the text allows); success 1.0 at 30 distances, 0.9 at
    k = 56 and 248. A broken prompt, key placement or answer parser gives 0 everywhere (as a
    random model does).
    """
    if not (ref_model_dir / "model.safetensors").exists():
        pytest.skip("reference model weights not trained yet")
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="pi_llama", model_args={"pretrained": str(ref_model_dir)}, tasks=["passkey"],
        batch_size=32, device="cpu", log_samples=True,
    )
    res = out["results"]["passkey"]
    assert res["acc_256,none"] >= 0.95 and res["k_max_256,none"] == res["k_tested_256,none"], res
    by_distance = heat_map(out["samples"]["passkey"])[256]
    assert len(by_distance) == 32 and min(by_distance.values()) >= 0.8, by_distance


def test_other_lm_eval_models_arguments_are_known_keys():
    """With --model vllm its model_args reach the task metadata: they must not be refused."""
    from pieval import task_settings

    task_settings.check_keys({"tensor_parallel_size": 2, "pretrained": "x"}, "passkey")  # vllm's named argument
    # one it forwards through **kwargs is close to no known key: reported, not refused
    task_settings.check_keys({"gpu_memory_utilization": 0.9}, "passkey")
    with pytest.raises(UserError, match="'tensor_paralel_size': did you mean 'tensor_parallel_size'"):
        task_settings.check_keys({"tensor_paralel_size": 2}, "passkey")
