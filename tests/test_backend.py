"""pi_llama (pieval.backend.PILlama) against plain transformers on the tiny random LLaMA."""

from __future__ import annotations

import json
import logging

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval.models.huggingface import HFLM
from transformers import AutoConfig, AutoTokenizer, GPT2Config, LlamaForCausalLM

from pieval import rope
from pieval.backend import PILlama
from pieval.errors import UserError

L = 256  # tiny_llama_dir's trained window


def load(path, **model_args) -> PILlama:
    return PILlama(pretrained=str(path), device="cpu", dtype="float32", **model_args)


def base_inv_freq(model) -> torch.Tensor:
    params = model.config.rope_parameters
    return rope.inv_freq(params["rope_theta"], rope.head_dim(model.config))


@pytest.fixture(scope="module")
def extended_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny model saved as a PI checkpoint (linear, s=4, max_position_embeddings=4L)."""
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    rope.apply(config, rope.resolve(config, scaling_factor=4))
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, config=config)
    out = tmp_path_factory.mktemp("tiny_llama_pi4")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sharp_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny model with q/k scaled 8x: random weights attend almost uniformly, so the
    rope factor barely moves their scores; sharp attention makes them position-sensitive."""
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    out = tmp_path_factory.mktemp("tiny_llama_sharp")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def long_text(heldout_dir) -> str:
    return (heldout_dir / "Ruth.txt").read_text(encoding="utf-8")


def test_s4_load_interpolates_every_layer(tiny_llama_dir):
    lm = load(tiny_llama_dir, scaling_factor=4)
    model = lm.model
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, base_inv_freq(model) / 4, rtol=1e-6, atol=0)
    # what each attention layer is actually handed: cos/sin at positions m/4
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(i, kwargs["position_embeddings"]), with_kwargs=True
        )
    positions = torch.arange(3 * L)
    with torch.no_grad():
        model(torch.ones(1, 3 * L, dtype=torch.long))
    cos, sin = rope.pi_tables(positions, base_inv_freq(model), 4.0)
    assert sorted(seen) == list(range(model.config.num_hidden_layers))
    for layer_cos, layer_sin in seen.values():
        tol = 2 * torch.finfo(torch.float32).eps * (3 * L / 4)
        torch.testing.assert_close(layer_cos[0], torch.cat([cos, cos], -1), rtol=0, atol=tol)
        torch.testing.assert_close(layer_sin[0], torch.cat([sin, sin], -1), rtol=0, atol=tol)


def test_broken_load_is_caught(tiny_llama_dir, monkeypatch):
    """HFLM's own path (re-read config.json, then edit model.config) is the silent no-op this guards."""
    original = HFLM._create_model

    def build_then_edit_config(self, pretrained, **kwargs):
        kwargs.pop("config")
        original(self, pretrained, **kwargs)
        rope.apply(self._model.config, self.rope)

    monkeypatch.setattr(HFLM, "_create_model", build_then_edit_config)
    with pytest.raises(rope.RopeMismatchError, match=r"inv_freq does not match rope_method=pi factor=4 .*ratio 0.25"):
        load(tiny_llama_dir, scaling_factor=4)


def test_max_length_defaults_to_extended_window(tiny_llama_dir):
    assert load(tiny_llama_dir).max_length == L
    assert load(tiny_llama_dir, scaling_factor=4).max_length == 4 * L
    lm = load(tiny_llama_dir, context_length=640)
    assert (lm.max_length, lm.rope.factor) == (640, 2.5)
    assert load(tiny_llama_dir, scaling_factor=4, max_length=300).max_length == 300


def test_already_extended_checkpoint(extended_dir, tiny_llama_dir):
    as_saved = load(extended_dir)
    assert as_saved.rope == rope.RopeSpec(rope.AS_SAVED, 4.0, L, 4 * L, 10000.0)
    assert as_saved.max_length == 4 * L
    same = load(extended_dir, scaling_factor=4)
    assert same.model.config.to_dict() == as_saved.model.config.to_dict()
    ids = torch.arange(3, 3 + 2 * L)[None]
    with torch.no_grad():
        torch.testing.assert_close(same.model(ids).logits, as_saved.model(ids).logits, rtol=0, atol=0)
        from_base = load(tiny_llama_dir, scaling_factor=4)
        torch.testing.assert_close(from_base.model(ids).logits, as_saved.model(ids).logits, rtol=0, atol=0)
    further = load(extended_dir, scaling_factor=8)
    assert further.max_length == 8 * L
    torch.testing.assert_close(further.model.model.rotary_emb.inv_freq, base_inv_freq(further.model) / 8)


def reference_loglikelihood(path, factor: float, context: str, continuation: str) -> float:
    """Plain transformers with rope_type=linear, tokenised as lm-eval does (whole, then split)."""
    tok = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    config.rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": 10000.0}
    model = LlamaForCausalLM.from_pretrained(path, config=config).eval()
    whole = tok(context + continuation).input_ids
    n_context = len(tok(context).input_ids)
    ids = torch.tensor(whole)[None]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    targets = ids[0, n_context:]
    return logprobs[n_context - 1 :].gather(-1, targets[:, None]).sum().item()


def test_loglikelihood_equals_plain_transformers_with_linear_rope(sharp_dir, long_text):
    lm = load(sharp_dir, scaling_factor=4, batch_size=2)
    words = long_text.split()
    pairs = [(" ".join(words[:300]), " " + " ".join(words[300:310])), (" ".join(words[:40]), " " + words[40])]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    n_tokens = len(lm.tok_encode(pairs[0][0]))
    assert L < n_tokens < 4 * L  # the long request really uses interpolated positions past L
    for (context, continuation), (logprob, _) in zip(pairs, got):
        assert logprob == pytest.approx(reference_loglikelihood(sharp_dir, 4.0, context, continuation), abs=1e-4)
    # the comparison can tell factors apart: s=3.9 is off by ~0.1 on the long request
    assert abs(got[0][0] - reference_loglikelihood(sharp_dir, 3.9, *pairs[0])) > 1e-2


def test_overlong_requests_fail_loudly_or_warn_with_counts(tiny_llama_dir, long_text, caplog):
    context = " ".join(long_text.split()[:400])  # > L tokens
    requests = [Instance("loglikelihood", {}, (context, " end"), 0), Instance("loglikelihood", {}, ("Ruth", " end"), 1)]
    lm = load(tiny_llama_dir)
    with pytest.raises(UserError, match=r"^1 of 2 loglikelihood requests exceed max_length=256 \(longest \d+ tokens\): "
                       r"lm-eval would cut their oldest tokens.*pass truncation=True"):
        lm.loglikelihood(requests)
    generate = [Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 4}), 0)]
    with pytest.raises(UserError, match=r"^1 of 1 generate_until \(prompt \+ max_gen_toks\) requests exceed"):
        lm.generate_until(generate)
    truncating = load(tiny_llama_dir, truncation=True)
    with caplog.at_level(logging.WARNING, logger="pieval.backend"):
        assert len(truncating.loglikelihood(requests)) == 2
        assert len(truncating.generate_until(generate)) == 1
    assert "1 of 2 loglikelihood requests exceed max_length=256" in caplog.text
    assert "1 of 1 generate_until (prompt + max_gen_toks) requests exceed max_length=256" in caplog.text
    assert "left-truncating" in caplog.text
    # the same request fits once the window is extended
    assert len(load(tiny_llama_dir, scaling_factor=4).loglikelihood(requests)) == 2


def test_hflm_model_args_pass_through(tiny_llama_dir):
    lm = PILlama(
        pretrained=str(tiny_llama_dir),
        scaling_factor=2,
        device="cpu",
        dtype="bfloat16",
        attn_implementation="eager",
        batch_size=3,
        add_bos_token=True,
    )
    assert lm.model.dtype == torch.bfloat16 and lm.batch_size == 3
    assert lm.model.config._attn_implementation == "eager"
    info = lm.get_model_info()["pieval"]
    assert info["dtype"] == "bfloat16" and info["attn_implementation"] == "eager"


def test_model_args_device_and_batch_size_win_over_the_cli_defaults(tiny_llama_dir):
    """lm-eval's CLI always passes device="cuda:0" and batch_size=1 beside --model_args;
    stock HFLM then fails on a duplicate keyword (found on a GPU machine with device=cuda)."""
    cli = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}
    lm = PILlama.create_from_arg_string(f"pretrained={tiny_llama_dir},device=cpu,batch_size=2", cli)
    assert str(lm.device) == "cpu" and lm.batch_size == 2
    lm = PILlama.create_from_arg_obj({"pretrained": str(tiny_llama_dir), "batch_size": 3}, cli)
    assert lm.batch_size == 3


def test_model_info_records_provenance(tiny_llama_dir):
    info = load(tiny_llama_dir, context_length=640, rope_method="yarn").get_model_info()
    assert info["model_num_parameters"] > 0  # HFLM's own entries stay
    pieval_info = info["pieval"]
    assert {
        "rope_method",
        "rope_type",
        "factor",
        "base_window",
        "context_length",
        "theta",
        "dtype",
        "attn_implementation",
        "pretrained",
        "pieval_version",
    } <= set(pieval_info)
    assert (pieval_info["rope_method"], pieval_info["rope_type"], pieval_info["factor"]) == ("yarn", "yarn", 2.5)
    assert (pieval_info["base_window"], pieval_info["context_length"]) == (L, 640)
    assert pieval_info["pretrained"] == str(tiny_llama_dir)
    assert "finetune" not in pieval_info  # pieval did not fine-tune it


def test_model_info_carries_the_checkpoints_finetune_facts(tiny_llama_dir, tmp_path):
    """A directly fine-tuned checkpoint: plain rope at L' = 4L, its base window L recorded in config.json."""
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.max_position_embeddings = 4 * L
    config.pieval = {"method": "direct", "base_window": L, "factor": 4.0, "context_length": 4 * L, "steps": 7, "base_model": "m"}
    LlamaForCausalLM.from_pretrained(tiny_llama_dir, config=config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path)
    lm = load(tmp_path)
    assert lm.rope == rope.RopeSpec(rope.AS_SAVED, 1.0, L, 4 * L, 10000.0) and lm.max_length == 4 * L
    info = lm.get_model_info()["pieval"]
    assert info["finetune"] == config.pieval and info["base_window"] == L


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    "model_args, needle",
    [
        ({"scaling_factor": 4, "rope_method": "alibi"}, "unknown rope_method 'alibi'"),
        ({"scaling_factor": 0}, "scaling_factor=0"),
        ({"scaling_factor": 0.5}, "PI compresses positions"),
        ({"scaling_factor": "x4"}, "scaling_factor must be a number (got 'x4')"),
        ({"scaling_factor": 4, "context_length": 512}, "scaling_factor=4 and context_length=512 disagree"),
        ({"attn_implementation": "flash_attention_2"}, "use attn_implementation=sdpa"),
    ],
)
def test_bad_model_args_fail_before_loading(tiny_llama_dir, model_args, needle, monkeypatch):
    if model_args.get("attn_implementation") and torch.cuda.is_available():
        pytest.skip("flash-attn may be usable on this machine")
    monkeypatch.setattr(HFLM, "_create_model", lambda *a, **k: pytest.fail("weights loaded despite bad input"))
    with pytest.raises(UserError) as err:
        load(tiny_llama_dir, **model_args)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_checkpoints_fail_before_loading(gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(HFLM, "_create_model", lambda *a, **k: pytest.fail("weights loaded despite bad input"))
    with pytest.raises(UserError, match=r"model_type='gpt2'.*no rotary position embedding") as err:
        load(gpt2_dir, scaling_factor=4)
    assert "\n" not in str(err.value)
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError, match=r"no checkpoint at '.*no-such-model' \(OSError\): pass the folder of a saved model") as err:
        load(missing, scaling_factor=4)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_prebuilt_model_is_checked_not_rescaled(tiny_llama_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    lm = PILlama(pretrained=model, tokenizer=str(tiny_llama_dir))
    assert lm.rope.method == rope.AS_SAVED and lm.max_length == L
    with pytest.raises(UserError, match="need a checkpoint path"):
        PILlama(pretrained=model, tokenizer=str(tiny_llama_dir), scaling_factor=4)


def test_simple_evaluate_records_pieval_config(tiny_llama_dir, long_text, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": long_text[i : i + 3000]}) + "\n" for i in (0, 3000)))
    (tmp_path / "smoke.yaml").write_text(
        "task: pieval_backend_smoke\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
    )
    results = lm_eval.simple_evaluate(
        model=load(tiny_llama_dir, scaling_factor=4),
        tasks=["pieval_backend_smoke"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    assert results["results"]["pieval_backend_smoke"]["word_perplexity,none"] > 1
    provenance = results["config"]["pieval"]
    assert (provenance["factor"], provenance["context_length"], provenance["rope_type"]) == (4.0, 4 * L, "linear")


def test_peft_adapter_loads_on_the_extended_model(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    adapter = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(tmp_path)
    lm = load(tiny_llama_dir, scaling_factor=4, peft=str(tmp_path))
    assert type(lm.model).__name__ == "PeftModel"  # verify() ran on the wrapped model
    assert lm.max_length == 4 * L


def test_the_window_start_token_is_recorded_and_a_missing_bos_warned_about(tiny_llama_dir, tmp_path, caplog):
    lm = load(tiny_llama_dir)
    start = lm.get_model_info()["pieval"]["window_start_token"]
    assert start == {"id": 1, "token": "<s>", "source": "the tokenizer's BOS", "is_bos": True}
    # a tokenizer without BOS: lm-eval falls back to EOS, and pieval says so
    import shutil

    no_bos = tmp_path / "no_bos"
    shutil.copytree(tiny_llama_dir, no_bos)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.bos_token = None
    tok.save_pretrained(no_bos)
    with caplog.at_level(logging.WARNING):
        start = load(no_bos).get_model_info()["pieval"]["window_start_token"]
    assert (start["id"], start["is_bos"]) == (tok.eos_token_id, False)
    assert "it has no BOS" in start["source"]
    assert "not a BOS token" in caplog.text and "prefix_token_id=ID" in caplog.text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("scaling_factr=4", "model_arg scaling_factr= is an argument of neither pi_llama, lm-eval's hf model nor the model's from_pretrained: did you mean scaling_factor?"),
        ("contxt_length=1024", "did you mean context_length?"),
        ("bogus=1", "model_arg bogus= is an argument of neither"),
        ("batch_size=0", 'batch_size=0 is not a positive integer, "auto" or "auto:N"'),
        ("batch_size=auto:0", "batch_size=auto:0 is not"),
        ("max_batch_size=-2", "max_batch_size=-2 is not a positive integer"),
    ],
)  # fmt: skip
def test_bad_model_args_are_named_with_the_fix(tiny_llama_dir, args, message):
    with pytest.raises(UserError) as raised:
        PILlama.create_from_arg_string(f"pretrained={tiny_llama_dir},{args}", {"device": "cpu"})
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_the_clis_batch_size_is_checked_too(tiny_llama_dir):
    """--batch_size 0 reaches pi_llama beside model_args (lm-eval's additional_config)."""
    with pytest.raises(UserError, match='batch_size=0 is not a positive integer, "auto" or "auto:N"'):
        PILlama.create_from_arg_string(f"pretrained={tiny_llama_dir}", {"device": "cpu", "batch_size": 0})
    lm = PILlama.create_from_arg_string(f"pretrained={tiny_llama_dir},batch_size=auto:4", {"device": "cpu"})
    assert lm.batch_size_per_gpu == "auto"
