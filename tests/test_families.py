"""pi_llama on every RoPE family it claims: tiny random checkpoints built here, checked against plain transformers.

For each family: the live inv_freq check passes (every rotary module, per layer type), max_length
is L', and sliding-window perplexity at W = 2L with PI 2x equals a full-logit brute force on a
plain transformers model given the same rope_parameters, written here independently of pieval.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REF_MODEL
from test_flash_rotary import flash_on_cpu  # noqa: F401  (fixture: flash wiring faked on CPU)
from test_perplexity import brute_force, token_ppl

from pieval import info, loading, rope
from pieval.errors import UserError
from pieval.perplexity_metrics import doc_metrics, exp_ratio

L = 32  # the tiny checkpoints' base window
S = 2  # PI factor: W = 2L
REL = 1e-5

_COMMON = dict(
    vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=L, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_GEMMA = dict(head_dim=16, sliding_window=16, query_pre_attn_scalar=16)

# family -> (config class, its own fields); sliding windows (16) are shorter than W = 64
FAMILIES = {
    "llama": ("LlamaConfig", {"rope_parameters": _ROPE}),
    "mistral": ("MistralConfig", {"rope_parameters": _ROPE, "sliding_window": 16}),
    "qwen2": ("Qwen2Config", {"rope_parameters": _ROPE}),
    "qwen3": ("Qwen3Config", {"rope_parameters": _ROPE, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {"rope_parameters": _ROPE, **_GEMMA}),  # final_logit_softcapping 30
    "gemma3": (
        "Gemma3TextConfig",
        {
            **_GEMMA,
            "layer_types": ["sliding_attention", "full_attention"],
            "final_logit_softcapping": 30.0,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        },
    ),
    "phi3": ("Phi3Config", {"rope_parameters": {**_ROPE, "partial_rotary_factor": 0.5}}),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.25, "rope_parameters": dict(_ROPE)}),
    "olmo2": ("Olmo2Config", {"rope_parameters": _ROPE}),
}


def make_config(family: str, **override):
    import transformers

    cls, fields = FAMILIES[family]
    return getattr(transformers, cls)(**{**_COMMON, **copy.deepcopy(fields), **override})


def save_tiny(config, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(REF_MODEL).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = save_tiny(make_config(family), tmp_path_factory.mktemp(family))
        return made[family]

    return get


def pi_reference(path):
    """A plain transformers model with PI 2x written into rope_parameters here (global layers only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    params = config.rope_parameters
    linear = lambda p: {**p, "rope_type": "linear", "factor": float(S)}  # noqa: E731
    if "full_attention" in params:  # Gemma 3: the global layers interpolate, the local ones keep their base
        config.rope_parameters = {**params, "full_attention": linear(params["full_attention"])}
    else:
        config.rope_parameters = linear(params)
    config.max_position_embeddings = S * L
    return AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()


def pi_lm(path, **args):
    from pieval.backend import PILlama

    return PILlama(pretrained=str(path), device="cpu", batch_size=2, dtype="float32", **args)


def sliding_request(text, window, stride):
    from lm_eval.api.instance import Instance

    from pieval.perplexity import SlidingWindowConfig
    from pieval.sliding_window_lm import REQUEST_TYPE

    spec = SlidingWindowConfig(windows=(window,), stride=stride).to_request()
    return Instance(request_type=REQUEST_TYPE, doc={}, arguments=(text, spec), idx=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pi_2x_sliding_window_matches_brute_force(family, checkpoints, heldout_dir):
    path = checkpoints(family)
    lm = pi_lm(path, scaling_factor=S)  # builds, then checks every rotary module's inv_freq
    assert (lm.rope.factor, lm.rope.base_window, lm.max_length) == (S, L, S * L)
    rope.verify(lm.model, lm.rope)
    layer_types = {t for _, t, _ in rope.rotary_buffers(lm.model)}
    if family == "gemma3":
        assert layer_types == {"full_attention", "sliding_attention"}
        live = lm.model.model.rotary_emb
        assert torch.equal(live.full_attention_inv_freq, rope.inv_freq(1e6, 16) / S)  # global layers: PI
        assert torch.equal(live.sliding_attention_inv_freq, rope.inv_freq(1e4, 16))  # local layers: as saved

    text = sorted(heldout_dir.glob("*.txt"))[0].read_text()[:700]
    window, stride = S * L, L // 2
    [result] = lm.loglikelihood_sliding([sliding_request(text, window, stride)])
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * window  # positions past L are scored
    reference = brute_force(pi_reference(path), [ids], window, stride, lm.prefix_token_id)
    assert exp_ratio([doc_metrics(result)[f"token_ppl_{window}"]]) == pytest.approx(token_ppl(reference), rel=REL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_info_reports_base_window_and_factor(family, checkpoints, capsys):
    """`pieval info --json` itself, as a user runs it, on each family's saved folder."""
    from pieval.cli import main

    assert main(["info", str(checkpoints(family)), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["model_type"] == make_config(family).model_type  # gemma3: gemma3_text
    assert (described["base_window"], described["factor"], described["context_length"]) == (L, 1.0, L)
    assert (described["rope_type"], described["theta"]) == ("default", rope.rope_parameters(make_config(family))["rope_theta"])


def test_unscaled_run_is_refused_when_rotary_cannot_be_checked(checkpoints):
    """A model whose inv_freq pieval cannot find is an error, never a silent unscaled run."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"))
    del model.model.rotary_emb.inv_freq
    with pytest.raises(rope.RopeMismatchError, match="model_type=llama.*cannot check"):
        rope.verify(model, rope.resolve(model.config))


def test_per_layer_rope_without_global_layers_is_one_line_error():
    config = make_config("gemma3")
    config.rope_parameters = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(UserError, match="model_type='gemma3_text'.*full_attention"):
        rope.resolve(config, scaling_factor=2)


# ------------------------------------------------------------------ checkpoints saved with a scaling


SAVED = {
    # Llama 3.1's rope: factor 8 over an original window of 8192 (here 32 -> 256)
    "llama3": ("llama", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": L}, 8 * L),
    # Qwen2.5's yarn: factor 4 over 32768 (here 32 -> 128)
    "yarn": ("qwen2", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": L},
             4 * L),
    # Phi-3-128k's longrope: factor = max_position_embeddings / original (here 128 / 32), lists of rotary_dim/2
    "longrope": ("phi3", {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                          "short_factor": [1.0 + i / 10 for i in range(4)], "long_factor": [2.0 + i for i in range(4)],
                          "original_max_position_embeddings": L}, 4 * L),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(SAVED))
def test_saved_scaling_is_read_and_checked(kind, tmp_path):
    family, params, max_positions = SAVED[kind]
    extra = {"original_max_position_embeddings": L} if family == "phi3" else {}  # Phi-3 keeps it top-level
    config = make_config(family, rope_parameters=params, max_position_embeddings=max_positions, **extra)
    path = save_tiny(config, tmp_path)
    described = info.describe(loading.read_config(loading.Source.of(str(path))))
    factor = max_positions / L
    assert (described["rope_type"], described["base_window"], described["factor"]) == (kind, L, factor)
    lm = pi_lm(path)  # as saved: the live rotary is checked against transformers' own function
    assert (lm.rope.method, lm.max_length) == (rope.AS_SAVED, max_positions)
    # a new factor is relative to the base window L, never to the saved L' (rope.py's rule)
    # and replaces the saved scaling (rope.py's composition rule): PI at 2x the saved factor
    again = pi_lm(path, scaling_factor=2 * factor)  # built, and its live inv_freq checked
    assert (again.rope.factor, again.max_length) == (2 * factor, round(2 * factor * L))
    assert again.get_model_info()["pieval"]["rope_parameters"]["rope_type"] == "linear"
    want = rope.inv_freq(params["rope_theta"], rope.rotary_dim(lm.model.config)) / (2 * factor)
    torch.testing.assert_close(again.model.model.rotary_emb.inv_freq, want, rtol=1e-6, atol=0)


def test_lm_eval_cli_on_gemma3_matches_brute_force(checkpoints, heldout_dir, tmp_path):
    """The real lm_eval CLI on Gemma 3 (per-layer-type rope, soft-capped logits) with PI 2x."""
    path = checkpoints("gemma3")
    text = sorted(heldout_dir.glob("*.txt"))[0].read_text()[:700]
    (tmp_path / "doc.txt").write_text(text)
    window, stride = S * L, L // 2
    metadata = {"data_path": str(tmp_path / "doc.txt"), "windows": [window], "stride": stride}
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "pi_llama",
        "--model_args", f"pretrained={path},scaling_factor={S},dtype=float32",
        "--tasks", "local_ppl", "--device", "cpu", "--output_path", str(tmp_path / "out"),
        "--metadata", json.dumps(metadata),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert data["config"]["pieval"]["rope_parameters"]["full_attention"]["rope_type"] == "linear"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    reference = brute_force(pi_reference(path), [ids], window, stride, tok.bos_token_id)
    assert data["results"]["local_ppl"][f"token_ppl_{window},none"] == pytest.approx(token_ppl(reference), rel=REL)


# ------------------------------------------------------------------ flash_attention_2 on other families



@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])  # llama: the fused path, test_flash_rotary
def test_flash_attention_falls_back_to_stock_rotary(family, checkpoints, flash_on_cpu, caplog):
    path = checkpoints(family)
    lm = pi_lm(path, scaling_factor=S, attn_implementation="flash_attention_2")
    assert flash_on_cpu == [{}]  # nothing patched: transformers' own attention and rotary
    assert f"model_type={lm.model.config.model_type}" in caplog.text and "rotary in transformers' torch code" in caplog.text
    ids = torch.randint(3, 2048, (2, S * L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = lm.model(ids).logits, pi_reference(path)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ methods and their knobs

KNOBBED = {  # method -> knobs given (each method built with them, checked against transformers)
    "pi": {},
    "ntk": {},
    "dynamic": {},
    "yarn": {"beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
    "llama3": {"low_freq_factor": 2.0, "high_freq_factor": 8.0},
    "longrope": {"short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7], "long_factor": [2.0] * 4 + [3.0] * 4},
}


def test_every_method_is_tested():
    assert set(KNOBBED) == set(rope.METHODS)


@pytest.mark.parametrize("method", list(KNOBBED))
def test_method_with_knobs_matches_transformers(method, checkpoints):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = checkpoints("llama")
    lm = pi_lm(path, scaling_factor=4, rope_method=method, **KNOBBED[method])  # the built model is verified
    params = lm.get_model_info()["pieval"]["rope_parameters"]
    assert params["rope_type"] == rope.METHODS[method].rope_type
    assert {k: params[k] for k in KNOBBED[method]} == {k: v for k, v in KNOBBED[method].items()}
    # transformers' own function on a config written here
    config = AutoConfig.from_pretrained(path)
    ntk_theta = 10000.0 * 4 ** (16 / 14)
    config.rope_parameters = {
        "pi": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        "ntk": {"rope_type": "default", "rope_theta": ntk_theta},
        "dynamic": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    }.get(method, {"rope_type": method, "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": L,
                   **KNOBBED[method]})  # fmt: skip
    config.max_position_embeddings = L if method in ("ntk", "dynamic") else 4 * L
    if method == "ntk":  # plain RoPE at another base: transformers registers no function for "default"
        want, scaling = rope.inv_freq(ntk_theta, 16), 1.0
    else:
        want, scaling = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, device=torch.device("cpu"))
    live = lm.model.model.rotary_emb
    torch.testing.assert_close(live.inv_freq, want, rtol=1e-6, atol=0)
    assert live.attention_scaling == pytest.approx(scaling)


def llama3_brute(f, s, L, low, high):
    """Llama 3.1's band rule (Meta's reference code), float64: keep short wavelengths, divide long ones by s."""
    out = []
    for x in f:
        wavelen = 2 * math.pi / x
        if wavelen < L / high:
            out.append(x)
        elif wavelen > L / low:
            out.append(x / s)
        else:
            smooth = (L / wavelen - low) / (high - low)
            out.append((1 - smooth) * x / s + smooth * x)
    return out


def yarn_brute(f, s, L, d, base, beta_fast, beta_slow):
    """YaRN's ramp (Peng et al. 2023, eq. 17-18), float64: interpolate below beta_slow rotations, keep above beta_fast."""
    cd = lambda r: d * math.log(L / (r * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    low, high = max(math.floor(cd(beta_fast)), 0), min(math.ceil(cd(beta_slow)), d - 1)
    high = high + 0.001 if high == low else high
    ramp = [min(max((j - low) / (high - low), 0.0), 1.0) for j in range(d // 2)]
    return [x / s * r + x * (1 - r) for x, r in zip(f, ramp, strict=True)]


@pytest.mark.parametrize("method", ["pi", "ntk", "yarn", "llama3"])
def test_closed_forms_match_a_float64_brute_force(method):
    config = make_config("llama", max_position_embeddings=64)
    d, base, s = 16, 10000.0, 4.0
    f = [base ** (-2 * j / d) for j in range(d // 2)]
    options = {"yarn": {"beta_fast": 16, "beta_slow": 2}, "llama3": {"low_freq_factor": 2.0, "high_freq_factor": 8.0}}
    spec = rope.resolve(config, scaling_factor=s, rope_method=method, options=options.get(method))
    got, scaling = rope.expected_rotary(config, spec)
    want = {
        "pi": [x / s for x in f],
        "ntk": [(base * s ** (d / (d - 2))) ** (-2 * j / d) for j in range(d // 2)],
        "yarn": yarn_brute(f, s, 64, d, base, 16, 2),
        "llama3": llama3_brute(f, s, 64, 2.0, 8.0),
    }[method]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    assert scaling == pytest.approx(0.1 * math.log(s) + 1 if method == "yarn" else 1.0)


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("yarn", {"beta_fast": 1, "beta_slow": 4}, r"beta_fast must be > beta_slow \(got beta_fast=1, beta_slow=4\)"),
        ("yarn", {"attention_factor": -1}, r"attention_factor must be > 0 \(got -1\)"),
        ("llama3", {"low_freq_factor": 4, "high_freq_factor": 4}, r"low_freq_factor must be < high_freq_factor"),
        ("longrope", {"short_factor": [1.0] * 3, "long_factor": [1.0] * 8}, r"short_factor must list rotary_dim/2 = 8"),
        ("longrope", {"short_factor": [1.0] * 8}, r"rope_method=longrope needs long_factor"),
        ("pi", {"beta_fast": 32}, r"beta_fast is a knob of rope_method=yarn, not of pi \(it has none\)"),
    ],
)
def test_bad_knobs_are_one_line_errors(method, options, message):
    with pytest.raises(UserError, match=message):
        rope.resolve(make_config("llama"), scaling_factor=2, rope_method=method, options=options)


def test_knobs_from_a_json_file_and_near_misses(checkpoints, tmp_path):
    path = checkpoints("llama")
    knobs = tmp_path / "longrope.json"
    knobs.write_text(json.dumps({k: v for k, v in KNOBBED["longrope"].items()}))
    lm = pi_lm(path, scaling_factor=4, rope_method="longrope", rope_parameters_file=str(knobs))
    assert lm.get_model_info()["pieval"]["rope_parameters"]["long_factor"] == KNOBBED["longrope"]["long_factor"]
    with pytest.raises(UserError, match="model_arg beta_fats= .*did you mean beta_fast"):
        pi_lm(path, scaling_factor=4, rope_method="yarn", beta_fats=32)


# ------------------------------------------------------------------ the other tasks and pieval finetune


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3"])
def test_finetune_reloads_in_plain_transformers(family, checkpoints, tmp_path):
    """`pieval finetune` on partial-rotary (GPT-NeoX) and per-layer-type (Gemma 3) rope: 2 steps of
    PI 2x give a checkpoint plain transformers loads with standard linear-rope settings."""
    from test_finetune_run import tiny_args
    from transformers import AutoModelForCausalLM

    from pieval.cli import main

    out = tmp_path / "run"
    argv = tiny_args(checkpoints(family), out, "--max-steps", "2")
    argv[argv.index("--scaling-factor") + 1] = str(S)
    assert main(argv) == 0
    saved = out / "checkpoint-000002"
    model = AutoModelForCausalLM.from_pretrained(saved)  # plain transformers, no pieval
    params = rope.rope_parameters(model.config)  # Gemma 3: the full-attention layers' rope
    assert params["rope_type"] == "linear" and params["factor"] == S
    base = rope.rope_parameters(make_config(family))
    assert params.get("partial_rotary_factor") == base.get("partial_rotary_factor")
    if family == "gemma3":  # the sliding layers keep their local rope, unscaled
        assert rope.layer_rope_parameters(model.config)["sliding_attention"] == rope.layer_rope_parameters(make_config(family))["sliding_attention"]
    assert model.config.max_position_embeddings == S * L
    rope.verify(model, rope.resolve(model.config))
    described = info.describe(loading.read_config(loading.Source.of(str(saved))))
    assert (described["base_window"], described["factor"], described["context_length"]) == (L, S, S * L)


def test_finetune_refuses_a_rope_the_family_cannot_save_before_training(checkpoints, tmp_path, capsys):
    """Phi-3's config accepts only longrope: a PI checkpoint could not be saved or loaded, so the run
    stops in its checks (before, it trained and then failed at the first save)."""
    from test_finetune_run import tiny_args

    from pieval.cli import main

    out = tmp_path / "run"
    argv = tiny_args(checkpoints("phi3"), out, "--max-steps", "2")
    argv[argv.index("--scaling-factor") + 1] = str(S)
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "Phi3Config (model_type phi3) rejects the rope settings a --method pi checkpoint is saved with" in line
    assert "must be one of ['longrope'], got linear" in line and "nothing was trained" in line
    assert not any(out.glob("checkpoint-*"))


def test_passkey_and_govreport_run_on_qwen3(tmp_path, heldout_dir):
    """The generation tasks use only the LM interface: Qwen3 (L = 256, PI 2x) through both, in process."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pieval.paths import tasks_dir

    path = save_tiny(make_config("qwen3", max_position_embeddings=256), tmp_path / "qwen3")
    lm = pi_lm(path, scaling_factor=S)
    book = sorted(heldout_dir.glob("*.txt"))[0].read_text()
    gov = tmp_path / "gov.jsonl"
    gov.write_text(json.dumps({"document": book[:3000], "summary": " ".join(book.split()[40:80])}) + "\n")
    metadata = {"pretrained": str(path), "scaling_factor": S, "lengths": [512], "trials": 1, "num_distances": 2, "data_path": str(gov), "max_gen_toks": 8}
    tm = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=metadata)
    out = lm_eval.simple_evaluate(model=lm, tasks=["passkey", "govreport_pi"], task_manager=tm, log_samples=True)
    assert len(out["samples"]["passkey"]) == 2 and len(out["samples"]["govreport_pi"]) == 1
    assert 0.0 <= out["results"]["govreport_pi"]["rouge1,none"] <= 1.0
    assert out["config"]["pieval"]["context_length"] == 2 * 256
