"""pieval.rope against transformers' own rope functions and a float64 brute force.

Tolerances are one fp32 rounding of the largest angle (eps32 · max angle): the tables
are fp32 by design, and transformers rounds m·(θ_j/s) where pieval rounds (m/s)·θ_j.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from pieval import rope
from pieval.errors import UserError

L = 256  # base window of the test configs
HEAD_DIM = 16
THETA = 10000.0
FACTORS = [1.0, 2.0, 2.5, 8 / 3, 4.0]
EPS32 = torch.finfo(torch.float32).eps


def llama_config(max_positions: int = L, **rope_parameters) -> LlamaConfig:
    params = {"rope_type": "default", "rope_theta": THETA, **rope_parameters}
    return LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rope_parameters=params,
    )


def brute_angles(positions: torch.Tensor, s: float) -> torch.Tensor:
    """float64 (m/s)·θ^(-2j/d) straight from the paper's definition."""
    j = torch.arange(HEAD_DIM // 2, dtype=torch.float64)
    return (positions.double() / s)[:, None] * THETA ** (-2 * j / HEAD_DIM)[None]


def brute_rotate(x: torch.Tensor, positions: torch.Tensor, s: float) -> torch.Tensor:
    """Rotate each channel pair (j, j + d/2) of x (seq, d) by its angle, in float64."""
    a = brute_angles(positions, s)
    x1, x2 = x[:, : HEAD_DIM // 2].double(), x[:, HEAD_DIM // 2 :].double()
    return torch.cat([x1 * a.cos() - x2 * a.sin(), x1 * a.sin() + x2 * a.cos()], dim=-1)


def full_width(table: torch.Tensor) -> torch.Tensor:
    """(…, d/2) half-split table -> transformers' (…, d) layout."""
    return torch.cat([table, table], dim=-1)


@pytest.mark.parametrize("s", FACTORS)
def test_pi_inv_freq_is_transformers_linear_and_brute_force(s):
    config = llama_config(round(s * L), rope_type="linear", factor=s)
    linear, scaling = ROPE_INIT_FUNCTIONS["linear"](config)
    ours = rope.inv_freq(THETA, HEAD_DIM) / s
    assert torch.equal(ours, linear) and scaling == 1.0
    j = torch.arange(HEAD_DIM // 2, dtype=torch.float64)
    torch.testing.assert_close(ours.double(), THETA ** (-2 * j / HEAD_DIM) / s, rtol=1e-6, atol=0)
    assert torch.equal(rope.expected_rotary(llama_config(), rope.resolve(llama_config(), scaling_factor=s))[0], ours)


@pytest.mark.parametrize("s", FACTORS)
def test_pi_tables_match_transformers_linear_rope_and_float64_up_to_8L(s):
    positions = torch.arange(8 * L)
    cos, sin = rope.pi_tables(positions, rope.inv_freq(THETA, HEAD_DIM), s)
    max_angle = (8 * L - 1) / s
    config = llama_config(round(s * L), rope_type="linear", factor=s)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])
    tol = 2 * EPS32 * max_angle
    torch.testing.assert_close(full_width(cos), hf_cos[0], rtol=0, atol=tol)
    torch.testing.assert_close(full_width(sin), hf_sin[0], rtol=0, atol=tol)
    angles = brute_angles(positions, s)
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=EPS32 * max_angle)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=EPS32 * max_angle)


def test_pi_tables_cast_only_at_the_end():
    # bf16 positions would collide past 256 (m and m+1 round to the same value); the
    # tables must come from fp32 angles and only then be cast
    positions = torch.arange(4 * L, 4 * L + 8)
    cos, _ = rope.pi_tables(positions, rope.inv_freq(THETA, HEAD_DIM), 4.0, dtype=torch.bfloat16)
    reference, _ = rope.pi_tables(positions, rope.inv_freq(THETA, HEAD_DIM), 4.0)
    assert cos.dtype == torch.bfloat16
    torch.testing.assert_close(cos, reference.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("s", [1.0, 2.5, 4.0])
def test_rotation_with_pi_tables_equals_float64_rotation(s):
    torch.manual_seed(0)
    positions = torch.arange(0, 8 * L, 7)
    q = torch.randn(len(positions), HEAD_DIM)
    cos, sin = rope.pi_tables(positions, rope.inv_freq(THETA, HEAD_DIM), s)
    rotated, _ = apply_rotary_pos_emb(q[None, None], q[None, None], full_width(cos)[None], full_width(sin)[None])
    expected = brute_rotate(q, positions, s)
    scale = q.abs().max().item() * 2
    torch.testing.assert_close(rotated[0, 0].double(), expected, rtol=0, atol=scale * 2 * EPS32 * (8 * L / s))


@pytest.mark.parametrize("s", [1.0, 2.5, 4.0])
def test_scores_after_rotation_depend_only_on_m_minus_n(s):
    torch.manual_seed(1)
    q, k = torch.randn(HEAD_DIM), torch.randn(HEAD_DIM)
    base = rope.inv_freq(THETA, HEAD_DIM)

    def score(m: int, n: int) -> float:
        cos, sin = rope.pi_tables(torch.tensor([m, n]), base, s)
        rq, rk = apply_rotary_pos_emb(
            q.expand(1, 1, 2, -1), k.expand(1, 1, 2, -1), full_width(cos)[None], full_width(sin)[None]
        )
        return float(rq[0, 0, 0] @ rk[0, 0, 1])

    by_delta = {}
    for delta in (0, 1, 37, 300, 1000):
        scores = [score(n + delta, n) for n in (0, 5, 250, 1023, 8 * L - 1 - delta)]
        assert max(scores) - min(scores) < 1e-3 * (q.norm() * k.norm()).item(), (delta, scores)
        by_delta[delta] = scores[0]
    assert len({round(v, 3) for v in by_delta.values()}) == len(by_delta)  # the delta itself matters


@pytest.mark.parametrize("s", [2.0, 2.5, 4.0])
def test_yarn_and_dynamic_match_transformers_init_functions(s):
    for method, independent in (
        ("yarn", {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L}),
        ("dynamic", {"rope_type": "dynamic", "factor": s}),
    ):
        config = llama_config()
        rope.apply(config, rope.resolve(config, scaling_factor=s, rope_method=method))
        built = LlamaRotaryEmbedding(config)
        max_positions = L if method == "dynamic" else round(s * L)
        spelled_out = llama_config(max_positions, **independent)
        inv, scaling = ROPE_INIT_FUNCTIONS[independent["rope_type"]](spelled_out)
        assert torch.equal(built.inv_freq, inv), method
        assert built.attention_scaling == pytest.approx(scaling), method
        assert rope.base_window(config) == L


def test_dynamic_grows_past_base_window_as_transformers_does():
    config = llama_config()
    rope.apply(config, rope.resolve(config, scaling_factor=4, rope_method="dynamic"))
    built = LlamaRotaryEmbedding(config)
    built(torch.zeros(1), torch.arange(3 * L)[None])
    grown, _ = ROPE_INIT_FUNCTIONS["dynamic"](llama_config(L, rope_type="dynamic", factor=4.0), seq_len=3 * L)
    assert torch.equal(built.inv_freq, grown)


@pytest.mark.parametrize("s", [2.0, 4.0])
def test_ntk_is_plain_rope_with_the_ntk_aware_base(s):
    config = llama_config()
    rope.apply(config, rope.resolve(config, scaling_factor=s, rope_method="ntk"))
    theta = THETA * s ** (HEAD_DIM / (HEAD_DIM - 2))
    inv, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(llama_config(rope_theta=theta))
    assert torch.equal(LlamaRotaryEmbedding(config).inv_freq, inv)
    # highest frequency kept, lowest divided by exactly s (the point of NTK-aware scaling)
    live = LlamaRotaryEmbedding(config).inv_freq.double()
    j = torch.arange(HEAD_DIM // 2, dtype=torch.float64)
    plain = THETA ** (-2 * j / HEAD_DIM)
    assert live[0] == 1.0
    assert (plain[-1] / live[-1]).item() == pytest.approx(s, rel=1e-5)


# ---------------------------------------------------------------- resolve / apply


def test_base_checkpoint_without_arguments_runs_as_saved():
    spec = rope.resolve(llama_config())
    assert spec == rope.RopeSpec(rope.AS_SAVED, 1.0, L, L, THETA)
    config = llama_config()
    rope.apply(config, spec)
    assert config.to_dict() == llama_config().to_dict()


def test_factor_and_context_length_are_relative_to_base_window():
    assert rope.resolve(llama_config(), scaling_factor=4) == rope.RopeSpec("pi", 4.0, L, 4 * L, THETA)
    assert rope.resolve(llama_config(), context_length=640).factor == 2.5
    assert rope.resolve(llama_config(), scaling_factor="2.5", context_length="640").context_length == 640
    config = llama_config(rope_theta=5e5)
    spec = rope.resolve(config, scaling_factor=2)
    rope.apply(config, spec)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    assert config.max_position_embeddings == 2 * L and spec.theta == 5e5


def test_already_extended_checkpoint():
    extended = llama_config(4 * L, rope_type="linear", factor=4.0)
    assert rope.base_window(extended) == L
    assert rope.resolve(extended) == rope.RopeSpec(rope.AS_SAVED, 4.0, L, 4 * L, THETA)
    same = llama_config(4 * L, rope_type="linear", factor=4.0)
    rope.apply(same, rope.resolve(same, scaling_factor=4))
    assert same.to_dict() == extended.to_dict()  # asking for the saved factor changes nothing
    further = llama_config(4 * L, rope_type="linear", factor=4.0)
    rope.apply(further, rope.resolve(further, scaling_factor=8))
    assert further.rope_parameters["factor"] == 8.0 and further.max_position_embeddings == 8 * L
    assert rope.resolve(extended, context_length=8 * L).factor == 8.0


def test_base_window_of_yarn_and_dynamic_checkpoints():
    yarn = llama_config(4 * L, rope_type="yarn", factor=4.0, original_max_position_embeddings=L)
    assert (rope.base_window(yarn), rope.saved_factor(yarn)) == (L, 4.0)
    dynamic = llama_config(L, rope_type="dynamic", factor=2.0)
    assert rope.resolve(dynamic) == rope.RopeSpec(rope.AS_SAVED, 2.0, L, 2 * L, THETA)


def test_rope_method_none_is_the_old_name_of_as_saved():
    assert rope.resolve(llama_config(), rope_method="none") == rope.resolve(llama_config(), rope_method="as_saved")
    assert rope.resolve(llama_config(), rope_method="None").method == rope.AS_SAVED


@pytest.mark.parametrize("method", sorted(rope.METHODS))
def test_each_method_builds_the_rope_type_its_entry_names(method):
    config = llama_config()
    half = rope.rotary_dim(config) // 2  # longrope's required factor lists
    options = {"short_factor": [1.0] * half, "long_factor": [2.0] * half} if method == "longrope" else None
    spec = rope.resolve(config, scaling_factor=2, rope_method=method, options=options)
    rope.apply(config, spec)
    entry = rope.METHODS[method]
    assert config.rope_parameters["rope_type"] == entry.rope_type
    assert entry.label and entry.help
    assert rope.base_window(config) == L  # every method keeps L readable from what it saves


def direct_checkpoint(tmp_path, steps: int = 200):
    """What `pieval finetune --method direct --context-length 1024` saves from an L = 256 model."""
    config = llama_config(4 * L)
    config.pieval = {"method": "direct", "base_window": L, "factor": 4.0, "context_length": 4 * L, "steps": steps}
    config.save_pretrained(tmp_path)
    return tmp_path


def test_direct_finetuned_checkpoint_keeps_its_base_window(tmp_path):
    """As saved it runs at L' = 1024 with unscaled positions; a factor stays relative to L = 256."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(direct_checkpoint(tmp_path))
    assert rope.base_window(config) == L
    assert rope.resolve(config) == rope.RopeSpec(rope.AS_SAVED, 1.0, L, 4 * L, THETA)
    assert rope.resolve(config, scaling_factor=4) == rope.RopeSpec("pi", 4.0, L, 4 * L, THETA)
    assert rope.resolve(config, context_length=8 * L).factor == 8.0
    spec = rope.resolve(config, scaling_factor=2)
    rope.apply(config, spec)
    assert config.rope_parameters["factor"] == 2.0 and config.max_position_embeddings == 2 * L


def test_linear_rope_would_warn_about_original_max_position_embeddings(caplog):
    """Why L lives in the checkpoint's own "pieval" key (pieval.facts), not in rope_parameters."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            llama_config(4 * L, rope_type="linear", factor=4.0, original_max_position_embeddings=L)
    finally:
        hf_logging.disable_propagation()
    assert "Unrecognized keys in `rope_parameters` for 'rope_type'='linear'" in caplog.text


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"scaling_factor": 4, "rope_method": "rotary9"}, "unknown rope_method 'rotary9': use one of pi, ntk"),
        ({"scaling_factor": 0}, "scaling_factor=0 gives a factor s = L'/L = 0 <= 0"),
        ({"scaling_factor": -2}, "scaling_factor=-2"),
        ({"scaling_factor": 0.5}, "would shrink the window"),
        ({"context_length": 128}, "context_length=128 gives s = L'/L = 0.5 < 1"),
        ({"scaling_factor": "four"}, "scaling_factor must be a number (got 'four')"),
        ({"scaling_factor": float("nan")}, "scaling_factor must be a finite number"),
        ({"scaling_factor": True}, "scaling_factor must be a number (got True)"),
        ({"context_length": 1000.5}, "context_length must be a whole number of tokens (got 1000.5)"),
        ({"scaling_factor": 4, "context_length": 2048}, "scaling_factor=4 and context_length=2048 disagree"),
        ({"rope_method": "yarn"}, "rope_method=yarn needs scaling_factor=S or context_length=N"),
        ({"rope_method": "as_saved", "scaling_factor": 2}, "rope_method=as_saved keeps the checkpoint as saved"),
        ({"rope_method": "none", "scaling_factor": 2}, "rope_method=as_saved keeps the checkpoint as saved"),
    ],
)
def test_bad_requests_are_one_line_user_errors(kwargs, needle):
    with pytest.raises(UserError) as err:
        rope.resolve(llama_config(), **kwargs)
    message = str(err.value)
    assert needle in message and "\n" not in message
    assert ":" in message  # "<bad value>: <fix>"


def test_non_rope_checkpoint_is_a_user_error():
    with pytest.raises(UserError, match=r"model_type='gpt2'.* no rotary position embedding.*RoPE model"):
        rope.resolve(GPT2Config(), scaling_factor=4)


# ---------------------------------------------------------------- verify


@pytest.mark.parametrize("method", ["pi", "ntk", "dynamic", "yarn"])
def test_verify_accepts_models_built_after_apply(method):
    config = llama_config()
    spec = rope.resolve(config, scaling_factor=2.5, rope_method=method)
    rope.apply(config, spec)
    rope.verify(LlamaForCausalLM(config), spec)


def test_verify_catches_config_mutated_after_build():
    model = LlamaForCausalLM(llama_config())
    spec = rope.resolve(model.config, scaling_factor=4)
    rope.apply(model.config, spec)  # too late: inv_freq was computed at build
    assert model.config.rope_parameters["factor"] == 4.0
    with pytest.raises(
        rope.RopeMismatchError,
        match=r"rotary_emb.inv_freq does not match rope_method=pi factor=4 \(expected/live frequency ratio 0.25\)"
        r": the rope scaling was not in the config when the model was built",
    ):
        rope.verify(model, spec)


def test_verify_as_saved_checks_model_against_its_config():
    model = LlamaForCausalLM(llama_config(4 * L, rope_type="linear", factor=4.0))
    rope.verify(model, rope.resolve(model.config))
    model.config.rope_parameters["factor"] = 2.0
    with pytest.raises(rope.RopeMismatchError):
        rope.verify(model, rope.resolve(model.config))


def test_verify_tolerates_half_precision_buffers():
    config = llama_config()
    spec = rope.resolve(config, scaling_factor=3)
    rope.apply(config, spec)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.to(torch.bfloat16)
    rope.verify(model, spec)  # a bf16 copy of base/3 is still base/3
    model.model.rotary_emb.inv_freq = (rope.inv_freq(THETA, HEAD_DIM) / 2).to(torch.bfloat16)
    with pytest.raises(rope.RopeMismatchError):
        rope.verify(model, spec)
