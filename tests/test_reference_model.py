"""The committed reference model: a plain LLaMA checkpoint that reads prose and retrieves.

The retrieval check builds the paper's passkey prompt itself (the text of Chen et al. 2023, Sec. 3.3)
instead of calling pieval.passkey, so a bug there cannot hide a model that does not retrieve.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import REF_MODEL, REPO

HEAD = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILL = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
WINDOW = 256


def test_loads_with_plain_transformers():
    """No pieval import: the checkpoint is an ordinary Llama with default rope and window L."""
    code = textwrap.dedent(
        f"""
        import json, sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(REF_MODEL)!r})
        t = AutoTokenizer.from_pretrained({str(REF_MODEL)!r})
        c = m.config
        print(json.dumps(dict(cls=type(m).__name__, model_type=c.model_type, rope=c.rope_parameters,
            max_pos=c.max_position_embeddings, bos=t.bos_token_id, eos=t.eos_token_id,
            first=t("The key is 12345").input_ids[0], digits=t.tokenize("12345"),
            pieval=any(k.startswith("pieval") for k in sys.modules))))
        """
    )
    env = {**os.environ, "PIEVAL_LM_EVAL_HOOK": "0"}  # not even the installed lm-eval hook
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["cls"] == "LlamaForCausalLM" and info["model_type"] == "llama"
    assert info["rope"]["rope_type"] == "default" and info["rope"]["rope_theta"] == 10000.0
    assert info["max_pos"] == WINDOW
    assert info["first"] == info["bos"] == 1 and info["eos"] == 2
    assert info["digits"] == ["1", "2", "3", "4", "5"]
    assert not info["pieval"]


@pytest.fixture(scope="module")
def model_and_tokenizer(ref_tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(REF_MODEL).eval(), ref_tokenizer


def passkey_prompt(tok, key: int, before: int, budget: int) -> tuple[list[int], int]:
    """The paper's prompt with ``before`` filler blocks ahead of the key, filled up to ``budget``."""
    best = None
    for after in range(20):
        text = (
            HEAD + FILL * before + f" The pass key is {key}. Remember it. {key} is the pass key."
            + FILL * after + " What is the pass key? The pass key is"
        )
        ids = tok(text).input_ids
        if len(ids) > budget:
            break
        best = ids
    key_end = text.index(f"{key} is the pass key.") + len(f"{key} is the pass key.")
    assert best is not None
    distance = len(best) - len(tok(text[:key_end]).input_ids)
    return best, distance


def test_passkey_retrieval_within_window(model_and_tokenizer):
    """>= 90% of held-out keys retrieved at every distance that fits inside L.

    Measured on the committed model (step 10000): 10/10, 9/10, 10/10, 10/10 with the key 132,
    102, 72 and 42 tokens before the question's end. The passkey task covers all 32 distances
    (tests/test_passkey.py)."""
    model, tok = model_and_tokenizer
    rng = random.Random(2026)  # keys never seen by the training probe (seed 0)
    by_position: dict[int, list[bool]] = {}
    for before in range(4):
        for _ in range(10):
            key = rng.randint(10000, 99999)
            ids, distance = passkey_prompt(tok, key, before, WINDOW - 8)
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=2)
            answer = re.search(r"\d+", tok.decode(out[0, len(ids) :]))
            by_position.setdefault(before, []).append(bool(answer) and int(answer.group()) == key)
    rates = {b: sum(v) / len(v) for b, v in by_position.items()}
    assert all(r >= 0.9 for r in rates.values()), rates


def test_copy_loss_second_copy_far_below_first(model_and_tokenizer, heldout_dir):
    model, tok = model_and_tokenizer
    text = (heldout_dir / "Jonah.txt").read_text()
    first, second = [], []
    for start in range(0, 1200, 200):
        p = tok(text, add_special_tokens=False).input_ids[start : start + 100]
        ids = torch.tensor([[tok.bos_token_id] + p + p])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        first.append(nll[:100].mean().item())
        second.append(nll[100:].mean().item())
    # measured on the committed model: 1.94 vs 3.17 nats (ratio 0.61)
    assert sum(second) / len(second) < 0.7 * sum(first) / len(first)


# Golden number, produced by (from the repo root, pieval installed):
#   lm_eval --model pi_llama --model_args pretrained=models/kjv-llama-tiny --tasks local_ppl \
#       --metadata '{"data_path": "models/corpus/kjv/heldout", "windows": [256], "stride": 128}'
# -> token_ppl_256 23.693069685769224, scored_tokens_256 42897 (6 held-out books)
GOLDEN_PPL_256 = 23.693069685769224
GOLDEN_TOKENS = 42897


def test_heldout_perplexity_at_window_L_matches_golden(model_and_tokenizer, heldout_dir):
    from pieval.perplexity import score_documents
    from pieval.perplexity_metrics import exp_ratio

    model, tok = model_and_tokenizer
    docs = [tok(p.read_text(encoding="utf-8"), add_special_tokens=False).input_ids for p in sorted(heldout_dir.glob("*.txt"))]
    stats = score_documents(model, docs, window=WINDOW, stride=128, bos_id=tok.bos_token_id, batch_size=8)
    assert sum(s.tokens for s in stats) == GOLDEN_TOKENS
    assert exp_ratio([(s.nll, s.tokens) for s in stats]) == pytest.approx(GOLDEN_PPL_256, rel=1e-5)


def test_recipe_reproduces_logged_losses(tmp_path):
    """Re-running the recipe's first 10 steps on CPU repeats itself bit for bit and gives the
    committed log's losses to within one float32 ulp.

    Not always bit for bit across CPUs: on an AVX-512/AMX Xeon the step-1 loss (a forward pass
    of the initial weights) came out one float32 ulp away from the log (7.609817981719971 vs
    7.6098175048828125), with the same step-10 loss: the vectorised reduction of the mean loss
    rounds differently per instruction set; the training itself did not diverge.
    """
    runs = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        out.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(REF_MODEL / name, out / name)
        subprocess.run(
            [sys.executable, str(REF_MODEL / "train.py"), "--recipe", str(REF_MODEL / "recipe.yaml"),
             "--out", str(out), "--max-steps", "10"],
            check=True, capture_output=True, cwd=REPO,
        )
        runs.append([(r["step"], r["loss"]) for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())])
    assert runs[0] == runs[1]  # deterministic on this machine
    logged = {r["step"]: r["loss"] for r in map(json.loads, (REF_MODEL / "train_log.jsonl").read_text().splitlines())}
    assert [step for step, _ in runs[0]] == [1, 10]
    for step, loss in runs[0]:
        ulp = float(np.spacing(np.float32(logged[step])))
        assert abs(loss - logged[step]) <= ulp, (step, loss, logged[step])


def test_finetune_mix_is_remade_byte_for_byte(tmp_path):
    """The demo's fine-tuning corpus is a pure function of the script, the tokenizer and the seed."""
    out = tmp_path / "mix.jsonl.gz"
    subprocess.run(
        [sys.executable, str(REF_MODEL / "make_finetune_mix.py"), "--out", str(out), "--docs", "2000"],
        check=True, capture_output=True, cwd=REPO,
    )
    assert out.read_bytes() == (REPO / "models/corpus/kjv/finetune_mix_1024.jsonl.gz").read_bytes()


def test_position_scales_run_the_step_as_transformers_linear_rope():
    """A recipe step at scale s (train.py's ``position_scales``) is the model under transformers'
    own linear rope with factor s, i.e. what PI feeds it; without scales every step is at s = 1."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    train = _train_module("kjv_train_scales")
    recipe = train.Recipe.load(REPO / "models/kjv-llama-tiny-recall/recipe.yaml")
    stage = recipe.stages[0]
    scales = [train.position_scale(recipe, stage, step) for step in range(60)]
    assert set(scales) == {1.0, 2.0, 4.0}
    assert scales == [train.position_scale(recipe, stage, step) for step in range(60)]
    unscaled = train.Recipe.load(REF_MODEL / "recipe.yaml")
    assert {train.position_scale(unscaled, unscaled.stage(s), s) for s in range(0, 10000, 97)} == {1.0}

    model = AutoModelForCausalLM.from_pretrained(REF_MODEL).eval()
    config = model.config.to_dict() | {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}
    linear = LlamaForCausalLM(type(model.config).from_dict(config)).eval()
    linear.load_state_dict(model.state_dict())
    rotary = model.model.rotary_emb
    rotary.inv_freq.copy_(rotary.inv_freq / 4.0)  # what train.py does for a step at s = 4
    ids = torch.randint(3, 2048, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, linear(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_multi_recall_asks_every_fact_it_states():
    """make_finetune_mix's ``multi_recall``: several facts in background text, then a question
    about each, answered with the value stated for that key (so one document of L' tokens
    carries an answer per fact, at distances spread over the window)."""
    train, tok, mixture = _mixture("kjv_train_multi")
    asked_counts = []
    for seed in range(5):
        ids = mixture.multi_recall(random.Random(seed), 1023)
        assert len(ids) == 1023
        text = tok.decode(ids)
        stated = {}
        for template, _ in train.OPEN_TEMPLATES:
            pattern = re.escape(template)
            for slot, group in (("k", r"[a-z]+(?: [a-z]+){0,2}"), ("v", r"\d+")):
                pattern = pattern.replace(rf"\{{{slot}\}}", f"(?P<{slot}>{group})", 1).replace(rf"\{{{slot}\}}", f"(?P={slot})")
            stated.update({m["k"]: m["v"] for m in re.finditer(pattern, text)})
        answers = re.findall(r"(?:What is|Now tell me|Which is) the ([a-z ]+?)[?.] The \1 is (\d+)\.", text)
        assert len(answers) >= 4
        for key, value in answers:
            assert stated.get(key) == value, (seed, key, value)
        assert text.rstrip().endswith(f"The {answers[-1][0]} is {answers[-1][1]}.")
        asked_counts.append(len(answers))
    assert max(asked_counts) > min(asked_counts)  # 4-8 facts, not a fixed number


def test_far_repeat_copies_every_segment_at_the_end():
    """``far_repeat``: 2-4 short segments among background text, then each of them again."""
    train, tok, mixture = _mixture("kjv_train_far")
    for seed in range(5):
        rng = random.Random(seed)
        ids = mixture.far_repeat(rng, 1023)
        assert len(ids) == 1023
        # the same draw again, to know the segments: place_facts is the last thing far_repeat draws for
        again = random.Random(seed)
        digits = mixture.enc("0123456789")
        segments = []
        for _ in range(again.randint(2, 4)):
            alphabet = digits if again.random() < 0.5 else again.sample(range(len(train.SPECIALS), mixture.vocab), again.randint(8, 64))
            segments.append(mixture.enc(" ") + [again.choice(alphabet) for _ in range(again.randint(5, 16))])
        tail = ids[-sum(map(len, segments)):]
        assert sorted(map(tuple, segments)) == sorted(tuple(tail[i : i + len(s)]) for s, i in _offsets(segments, tail))
        for seg in segments:  # stated once earlier, copied once at the end
            head = ids[: -len(tail)]
            assert any(head[i : i + len(seg)] == seg for i in range(len(head) - len(seg) + 1))


def _offsets(segments, tail):
    """Where each segment starts in the tail, matching segments greedily from the start."""
    out, i, left = [], 0, list(segments)
    while left:
        seg = next(s for s in left if tail[i : i + len(s)] == s)
        out.append((seg, i))
        i += len(seg)
        left.remove(seg)
    return out


def _train_module(name: str):
    """The reference model's train.py (a script, not a package module) imported as ``name``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REF_MODEL / "train.py")
    train = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train
    spec.loader.exec_module(train)
    return train


def _mixture(name: str):
    """train.py as a module, the model's tokenizer, and a Mixture over the first 3 books."""
    from transformers import PreTrainedTokenizerFast

    train = _train_module(name)
    tok = PreTrainedTokenizerFast.from_pretrained(REF_MODEL)
    books = [tok.encode(b, add_special_tokens=False) for b in train.load_books(REPO / train.Recipe().corpus)[:3]]
    return train, tok, train.Mixture(books, tok)


def test_capacity_trial_recipe_is_the_reference_recipe_with_6_layers():
    """The capacity trial measures layers alone: same seed, data, curriculum and schedule."""
    import dataclasses

    train = _train_module("kjv_train_capacity")
    trial = train.Recipe.load(REPO / "models/kjv-llama-tiny-recall/capacity_6_layers.yaml")
    reference = train.Recipe.load(REF_MODEL / "recipe.yaml")
    assert (trial.num_layers, reference.num_layers) == (6, 4)
    assert dataclasses.replace(trial, num_layers=4) == reference


def test_position_spread_trial_recipe_is_the_reference_recipe_with_scales_in_every_stage():
    """Attempt E measures the spread of rotary scales alone: same seed, data, curriculum and schedule."""
    import dataclasses

    train = _train_module("kjv_train_spread")
    trial = train.Recipe.load(REPO / "models/kjv-llama-tiny-recall/recipe_e.yaml")
    reference = train.Recipe.load(REF_MODEL / "recipe.yaml")
    assert all(st.position_scales == {1: 0.6, 2: 0.2, 4: 0.2} for st in trial.stages)
    unscaled = [dataclasses.replace(st, position_scales=None) for st in trial.stages]
    assert dataclasses.replace(trial, stages=unscaled) == reference


def test_late_spread_trial_recipe_scales_only_the_stages_after_copying_formed():
    """Attempt F is attempt E with the reference run's first 1500 steps (where copying forms) unscaled."""
    import dataclasses

    train = _train_module("kjv_train_late_spread")
    trial = train.Recipe.load(REPO / "models/kjv-llama-tiny-recall/recipe_f.yaml")
    spread = train.Recipe.load(REPO / "models/kjv-llama-tiny-recall/recipe_e.yaml")
    assert [st.position_scales is None for st in trial.stages] == [st.until <= 1500 for st in trial.stages]
    scaled = [dataclasses.replace(st, position_scales={1: 0.6, 2: 0.2, 4: 0.2}) for st in trial.stages]
    assert dataclasses.replace(trial, stages=scaled) == spread


def test_scaled_recipe_probes_passkey_at_its_largest_scale_too(tmp_path):
    """A recipe with position scales logs the passkey probe at its largest scale beside the one
    at the model's own positions (attempt B's ``passkey_acc_s4``). On the committed weights,
    after one step at warm-up lr, the two differ as PI at step 0 does: 0.95 at s = 1 on the
    committed log's last probe, 0 under PI 4x in the demo's step-0 evaluation."""
    import dataclasses

    train = _train_module("kjv_train_probe_scaled")
    recipe = dataclasses.replace(
        train.Recipe.load(REPO / "models/kjv-llama-tiny-recall/recipe_b.yaml"), probe_every=1, log_every=1, threads=1
    )
    threads = torch.get_num_threads()
    try:
        (record,) = train.train(recipe, tmp_path, max_steps=1)
    finally:
        torch.set_num_threads(threads)  # train() sets the recipe's count for the whole process
    assert record["step"] == 1 and record["position_scale"] in (1.0, 4.0)
    assert record["passkey_acc"] >= 0.8, record
    assert record["passkey_acc_s4"] <= 0.1, record
