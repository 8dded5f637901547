"""RoPE context extension: resolve a request against a checkpoint, set it before build, check it after.

Position Interpolation (Chen et al. 2023, section 2.2) runs position m as m·L/L' = m/s.
transformers spells that ``rope_type="linear"`` (``inv_freq / s``), so a PI checkpoint
written here loads anywhere. The other methods (``ntk``, ``dynamic``, ``yarn``) exist for
side-by-side comparison and go through transformers' own rope functions.

The factor s is always relative to the checkpoint's *base* window L (the window it was
pre-trained on), never to whatever ``max_position_embeddings`` an extended checkpoint
records, so asking an s=4 checkpoint for s=4 again changes nothing. A checkpoint
`pieval finetune` made records L itself (`pieval.facts`), which wins over what the rope
settings imply.

A directly fine-tuned checkpoint (`pieval finetune --method direct`: plain RoPE, trained at
L' with positions as pre-trained) records L = 256, say, and is saved with
``max_position_embeddings = L' = 1024``. As saved it runs at L' = 1024 with unscaled
positions: its spec is factor 1 (no interpolation), base window 256, context length 1024,
the one case where context_length is not round(s·L). ``scaling_factor=s`` on it still means
s relative to L = 256 (s = 4 interpolates positions m/4 in a window of 1024).

Families: any config whose ``rope_parameters`` is one dict (Llama, Mistral, Qwen2/3, Gemma 2,
Phi-3 and GPT-NeoX with ``partial_rotary_factor``, OLMo 2) or one dict per layer type (Gemma 3);
for the latter an extension rescales the ``full_attention`` layers only (`rope_parameters`).

Composition: a checkpoint saved with a scaling (``llama3``, ``yarn``, ``longrope``: L is
``original_max_position_embeddings``; ``linear``: L = max_position_embeddings / factor) has
base window L and factor L'/L. A new request s *replaces* the saved scaling, with s relative
to L (not multiplied by the saved factor): asking a Llama 3.1 (L = 8192, llama3 8x) for
``scaling_factor=16`` gives PI with L' = 131072 and positions m/16.

Each method is one entry of `METHODS` (builder, the transformers rope_type it runs, its
leaderboard label, a help line), as transformers keeps ``ROPE_INIT_FUNCTIONS``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from pieval import facts
from pieval.errors import UserError

if TYPE_CHECKING:
    import torch

AS_SAVED = "as_saved"  # method of a spec that leaves the checkpoint as saved
_ALIASES = {"none": AS_SAVED}  # rope_method=none: the earlier name, still accepted


class RopeMismatchError(RuntimeError):
    """A built model's live rotary frequencies differ from the requested extension."""


@dataclass(frozen=True)
class RopeSpec:
    """One context extension of one checkpoint.

    ``method`` is a `METHODS` key, or `AS_SAVED` (the checkpoint as saved, whose recorded
    factor and window are then reported here).
    """

    method: str
    factor: float  # s = L'/L, relative to base_window (1.0 = unscaled positions)
    base_window: int  # L, the window the checkpoint was pre-trained on
    context_length: int  # L' = round(s·L); as saved, a direct fine-tune's trained window
    theta: float  # the checkpoint's rope_theta (kept; "ntk" derives its own from it)
    options: tuple[tuple[str, Any], ...] = ()  # the method's knobs (`KNOBS`), sorted (key, value) pairs


# ---------------------------------------------------------------------------
# reading a checkpoint config


GLOBAL_LAYERS = "full_attention"  # the layer type a per-layer-type rope extends (Gemma 3's global layers)


def layer_rope_parameters(config) -> dict[str | None, dict[str, Any]]:
    """Every RoPE of a config by layer type: ``{None: params}`` for one RoPE shared by all layers.

    Gemma 3 keeps one ``rope_parameters`` entry per ``layer_types`` value (``full_attention``,
    ``sliding_attention``), each with its own base and scaling.
    """
    params = getattr(config, "rope_parameters", None)
    name = getattr(config, "_name_or_path", "") or type(config).__name__
    family = getattr(config, "model_type", "?")
    if params and "rope_type" not in params and all(isinstance(v, dict) for v in params.values()):
        if GLOBAL_LAYERS not in params or not all("rope_type" in v for v in params.values()):
            raise UserError(
                f"checkpoint {name!r} (model_type={family!r}) has per-layer rope_parameters {sorted(params)} "
                f"without a {GLOBAL_LAYERS!r} entry: pieval extends the global layers' RoPE and cannot tell "
                "which those are; evaluate this model with lm-eval's `hf` model"
            )
        return dict(params)
    if not params or "rope_type" not in params:
        raise UserError(
            f"checkpoint {name!r} (model_type={family!r}) has no rotary "
            "position embedding (no rope_parameters in its config): Position Interpolation needs a "
            "RoPE model such as LLaMA; use lm-eval's `hf` model for other architectures"
        )
    return {None: params}


def rope_parameters(config) -> dict[str, Any]:
    """The ``rope_parameters`` the extension acts on: the only one, or the global layers' one.

    For a per-layer-type config (Gemma 3) an extension rescales the ``full_attention`` layers'
    RoPE and leaves the local (sliding-window) layers at their own base, as Gemma 3 itself
    does with its linear factor 8 on the global layers: a sliding layer never sees a distance
    beyond its window, so it needs no interpolation.
    """
    layers = layer_rope_parameters(config)
    return layers.get(GLOBAL_LAYERS, layers.get(None))


def base_window(config) -> int:
    """L: the window the checkpoint was pre-trained on, also for an already-extended checkpoint.

    A checkpoint `pieval finetune` wrote records it (`pieval.facts`). yarn/llama3/longrope
    record it as ``original_max_position_embeddings``; a linear (PI) checkpoint records
    L' = s·L in ``max_position_embeddings`` (the convention of PI and LongChat checkpoints,
    and of ``apply``); dynamic NTK keeps L there.
    """
    params = rope_parameters(config)
    recorded = facts.recorded(config).get("base_window")
    if recorded:
        return int(recorded)
    if params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    if params["rope_type"] == "linear":
        return round(config.max_position_embeddings / float(params["factor"]))
    return int(config.max_position_embeddings)


def saved_factor(config) -> float:
    """The extension factor a checkpoint was saved with, relative to its base window (1.0 if none)."""
    params = rope_parameters(config)
    if params["rope_type"] == "default":
        return 1.0
    return float(params.get("factor") or config.max_position_embeddings / base_window(config))


def saved_window(config) -> int:
    """L' the checkpoint runs at as saved: round(s·L), or the window a direct fine-tune trained at."""
    if facts.recorded(config).get("method") == "direct":
        return int(config.max_position_embeddings)
    return round(saved_factor(config) * base_window(config))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dim(config) -> int:
    """Number of rotated channels per head (LLaMA rotates all; partial_rotary_factor shrinks it)."""
    return int(head_dim(config) * rope_parameters(config).get("partial_rotary_factor", 1.0))


# ---------------------------------------------------------------------------
# resolving a request


def _number(name: str, value) -> float:
    """A finite float from a model_arg (lm-eval hands them over as int, float or str)."""
    if isinstance(value, bool):
        raise UserError(f"{name} must be a number (got {value!r}): pass e.g. {name}=4")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number (got {value!r}): pass e.g. {name}=4") from None
    if not math.isfinite(number):
        raise UserError(f"{name} must be a finite number (got {value!r}): pass e.g. {name}=4")
    return number


def _check_extends(s: float, arg: str, L: int) -> None:
    """Reject factors that do not extend the window; ``arg`` is the model_arg as the user wrote it."""
    if s <= 0:
        raise UserError(f"{arg} gives a factor s = L'/L = {s:g} <= 0 (L={L}): pass s >= 1, e.g. scaling_factor=4")
    if s < 1:
        raise UserError(
            f"{arg} gives s = L'/L = {s:g} < 1 (L={L}): PI compresses positions m -> m/s to fit a "
            "longer window into the trained one, and s < 1 would shrink the window instead; pass "
            f"s >= 1 (context_length >= {L}), or neither to run the checkpoint as saved"
        )


def method_name(rope_method) -> str:
    """The canonical name of a ``rope_method`` value (case and the ``none`` alias folded)."""
    method = str(rope_method).strip().lower()
    return _ALIASES.get(method, method)


def resolve(config, scaling_factor=None, context_length=None, rope_method="pi", options=None) -> RopeSpec:
    """The extension asked for by the ``pi_llama`` model_args, checked against ``config``.

    No factor and no context_length = the checkpoint as saved (method `AS_SAVED`): a base
    checkpoint then runs un-extended, the paper's "direct extrapolation" baseline.
    """
    method = method_name(rope_method)
    if method not in (*METHODS, AS_SAVED):
        raise UserError(
            f"unknown rope_method {rope_method!r}: use one of {', '.join(METHODS)} "
            f"(or {AS_SAVED} for the checkpoint as saved)"
        )
    L = base_window(config)
    theta = float(rope_parameters(config)["rope_theta"])
    given_s = None if scaling_factor is None else _number("scaling_factor", scaling_factor)
    given_len = None if context_length is None else _number("context_length", context_length)

    if options and method == AS_SAVED:
        raise UserError(f"rope knobs {sorted(options)} need a rope_method (one of {', '.join(METHODS)})")
    if given_s is None and given_len is None:
        if options:
            raise UserError(f"rope knobs {sorted(options)} need scaling_factor=S or context_length=N")
        if method not in ("pi", AS_SAVED):
            raise UserError(
                f"rope_method={method} needs scaling_factor=S or context_length=N: without them "
                "the checkpoint runs as saved"
            )
        return RopeSpec(AS_SAVED, saved_factor(config), L, saved_window(config), theta)
    if method == AS_SAVED:
        raise UserError(
            f"rope_method={AS_SAVED} keeps the checkpoint as saved, but a factor was given: drop "
            f"scaling_factor/context_length or pick one of {', '.join(METHODS)}"
        )
    if given_len is not None:
        if given_len != int(given_len):
            raise UserError(
                f"context_length must be a whole number of tokens (got {context_length!r}): pass e.g. "
                f"context_length={4 * L}"
            )
        _check_extends(given_len / L, f"context_length={context_length}", L)
    if given_s is not None:
        _check_extends(given_s, f"scaling_factor={scaling_factor}", L)
    if given_s is not None and given_len is not None and round(given_s * L) != int(given_len):
        raise UserError(
            f"scaling_factor={given_s:g} and context_length={int(given_len)} disagree: the checkpoint's "
            f"base window is L={L}, so s={given_s:g} means L'={round(given_s * L)}; pass only one of them"
        )
    s = given_s if given_s is not None else given_len / L
    return RopeSpec(method, s, L, round(s * L), theta, check_options(method, options or {}, config))


# ---------------------------------------------------------------------------
# writing a spec into a config (before the model is built)


def _linear(spec: RopeSpec, config) -> tuple[dict, int]:
    return {"rope_type": "linear", "factor": spec.factor, "rope_theta": spec.theta}, spec.context_length


def _ntk(spec: RopeSpec, config) -> tuple[dict, int]:
    # NTK-aware scaling keeps the highest frequency and stretches the lowest by s:
    # theta' = theta · s^(d/(d-2)). It is plain RoPE with another base, so it is saved as
    # "default" (portable) and keeps max_position_embeddings = L so base_window still reads L.
    d = rotary_dim(config)
    return {"rope_type": "default", "rope_theta": spec.theta * spec.factor ** (d / (d - 2))}, spec.base_window


def _dynamic(spec: RopeSpec, config) -> tuple[dict, int]:
    # transformers' dynamic NTK reads the *original* window from max_position_embeddings
    return {"rope_type": "dynamic", "factor": spec.factor, "rope_theta": spec.theta}, spec.base_window


def _with_original(rope_type: str):
    """A builder for the methods that record L as original_max_position_embeddings (yarn, llama3, longrope)."""

    def build(spec: RopeSpec, config) -> tuple[dict, int]:
        params = {
            "rope_type": rope_type,
            "factor": spec.factor,
            "rope_theta": spec.theta,
            "original_max_position_embeddings": spec.base_window,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.options},  # JSON-shaped
        }
        return params, spec.context_length

    return build


def _llama3(spec: RopeSpec, config) -> tuple[dict, int]:
    params, length = _with_original("llama3")(spec, config)
    # Llama 3.1's published values, when not given
    return {"low_freq_factor": 1.0, "high_freq_factor": 4.0, **params}, length


# ---------------------------------------------------------------------------
# the methods' knobs: name -> (methods that take it, check); each check returns the value to store


def _positive(key: str, value, config) -> float:
    number = _number(key, value)
    if number <= 0:
        raise UserError(f"{key} must be > 0 (got {value!r})")
    return number


def _factor_list(key: str, value, config) -> tuple[float, ...]:
    """longrope's per-frequency factors: rotary_dim/2 positive numbers (a JSON list, or a list)."""
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{key} must be a JSON list of numbers (got {value!r})") from None
    want = rotary_dim(config) // 2
    if not isinstance(value, (list, tuple)) or len(value) != want:
        got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
        raise UserError(f"{key} must list rotary_dim/2 = {want} factors, one per frequency (got {got})")
    return tuple(_positive(f"{key}[{i}]", v, config) for i, v in enumerate(value))


KNOBS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "beta_fast": (("yarn",), _positive),  # rotations above which frequencies are kept (default 32)
    "beta_slow": (("yarn",), _positive),  # rotations below which frequencies are interpolated (default 1)
    "attention_factor": (("yarn", "longrope"), _positive),  # cos/sin scaling (yarn: 0.1 ln s + 1)
    "mscale": (("yarn",), _positive),
    "mscale_all_dim": (("yarn",), _positive),
    "low_freq_factor": (("llama3",), _positive),
    "high_freq_factor": (("llama3",), _positive),
    "short_factor": (("longrope",), _factor_list),
    "long_factor": (("longrope",), _factor_list),
}
_REQUIRED = {"longrope": ("short_factor", "long_factor")}


def check_options(method: str, options: dict, config) -> tuple[tuple[str, Any], ...]:
    """The knobs of ``method``, each checked (UserError naming the key and its range)."""
    taken = [k for k, (methods, _) in KNOBS.items() if method in methods]
    for key in options:
        if key not in KNOBS:
            raise UserError(f"unknown rope knob {key!r}: the knobs are {', '.join(KNOBS)}")
        if key not in taken:
            raise UserError(
                f"{key} is a knob of rope_method={'/'.join(KNOBS[key][0])}, not of {method}"
                + (f" (its knobs: {', '.join(taken)})" if taken else " (it has none)")
            )
    missing = [k for k in _REQUIRED.get(method, ()) if k not in options]
    if missing:
        raise UserError(f"rope_method={method} needs {' and '.join(missing)} (lists of rotary_dim/2 factors)")
    checked = {k: KNOBS[k][1](k, v, config) for k, v in options.items()}
    if "beta_fast" in checked or "beta_slow" in checked:
        fast, slow = checked.get("beta_fast", 32.0), checked.get("beta_slow", 1.0)
        if fast <= slow:
            raise UserError(f"beta_fast must be > beta_slow (got beta_fast={fast:g}, beta_slow={slow:g})")
    if "low_freq_factor" in checked or "high_freq_factor" in checked:
        low, high = checked.get("low_freq_factor", 1.0), checked.get("high_freq_factor", 4.0)
        if low >= high:
            raise UserError(f"low_freq_factor must be < high_freq_factor (got {low:g} >= {high:g})")
    return tuple(sorted(checked.items()))


@dataclass(frozen=True)
class Method:
    """One context-extension method: how it writes a config, and how it is named."""

    build: Callable[[RopeSpec, Any], tuple[dict, int]]  # -> (rope_parameters, max_position_embeddings)
    rope_type: str  # the transformers rope_type a model built with it runs
    label: str  # its name in the leaderboard and the paper
    help: str


METHODS: dict[str, Method] = {
    "pi": Method(_linear, "linear", "PI", "Position Interpolation (Chen et al. 2023): positions m/s"),
    "ntk": Method(_ntk, "default", "ntk", "NTK-aware static base change (bloc97): theta * s^(d/(d-2))"),
    "dynamic": Method(_dynamic, "dynamic", "dynamic-ntk", "dynamic NTK: the base grows with the sequence length past L"),
    "yarn": Method(_with_original("yarn"), "yarn", "yarn", "YaRN (Peng et al. 2023); knobs beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim"),
    "llama3": Method(_llama3, "llama3", "llama3", "Llama 3.1's frequency-band scaling; knobs low_freq_factor, high_freq_factor"),
    "longrope": Method(_with_original("longrope"), "longrope", "longrope", "LongRoPE (Phi-3): per-frequency factors; knobs short_factor, long_factor (lists), attention_factor"),
}


def label_of_rope_type(rope_type: str) -> str:
    """The method label of a checkpoint saved with ``rope_type`` (a foreign type names itself).

    "default" is plain RoPE, which an ntk-extended checkpoint also saves as, so it names no method.
    """
    labels = {m.rope_type: m.label for m in METHODS.values() if m.rope_type != "default"}
    return labels.get(rope_type, rope_type)


def apply(config, spec: RopeSpec) -> None:
    """Write ``spec`` into ``config`` (rope_parameters, max_position_embeddings) BEFORE the build.

    transformers computes ``inv_freq`` once when the rotary module is built; editing the
    config of a built model changes nothing (``verify`` catches that).
    """
    if spec.method == AS_SAVED:
        return
    if base_window(config) != spec.base_window:
        raise UserError(
            f"this RopeSpec was resolved for a base window of {spec.base_window} tokens, but the config "
            f"has L={base_window(config)}: resolve the spec from the same checkpoint's config"
        )
    _write(config, spec)


def _write(config, spec: RopeSpec) -> None:
    params, max_positions = METHODS[spec.method].build(spec, config)
    partial = rope_parameters(config).get("partial_rotary_factor")
    if partial is not None:
        params["partial_rotary_factor"] = partial
    layers = layer_rope_parameters(config)
    if None in layers:
        config.rope_parameters = params
    else:  # per layer type: only the global layers are extended (see rope_parameters)
        config.rope_parameters = {**layers, GLOBAL_LAYERS: params}
    config.max_position_embeddings = max_positions


# ---------------------------------------------------------------------------
# the math, and the check of a built model


# torch is imported inside the functions that compute: reading a config (`pieval info`) needs none.


def inv_freq(theta: float, dim: int, device=None) -> torch.Tensor:
    """Un-scaled RoPE inverse frequencies theta^(-2j/dim), fp32, computed as transformers does."""
    import torch

    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponent)


def pi_tables(
    positions: torch.Tensor, base_inv_freq: torch.Tensor, factor: float, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the interpolated angles (m/s)·theta_j, shape ``positions.shape + (dim/2,)``.

    The half-split layout of flash-attn's ``apply_rotary_emb`` and transformers'
    ``rotate_half``. Angles are formed in fp32 (bf16 positions would collide past 256) and
    only the final tables are cast to ``dtype`` (default: kept in fp32).
    """
    angles = (positions.float() / factor)[..., None] * base_inv_freq.float().to(positions.device)
    dtype = dtype or angles.dtype
    return angles.cos().to(dtype), angles.sin().to(dtype)


def expected_rotary(config, spec: RopeSpec, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) that a model built from ``config`` with ``spec`` must hold.

    PI and plain RoPE are computed here (base / s); the other methods by transformers'
    own rope functions on a copy of the config with ``spec`` applied. ``layer_type`` picks
    one RoPE of a per-layer-type config (default: the one the extension acts on).
    """
    import torch

    built = copy.deepcopy(config)
    if spec.method != AS_SAVED:
        _write(built, spec)
    layers = layer_rope_parameters(built)
    if layer_type is None and None not in layers:
        layer_type = GLOBAL_LAYERS
    params = layers[layer_type]
    if params["rope_type"] in ("default", "linear"):
        dim = int(head_dim(built) * params.get("partial_rotary_factor", 1.0))
        return inv_freq(float(params["rope_theta"]), dim) / float(params.get("factor", 1.0)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](built, device=torch.device("cpu"), **kwargs)


def rotary_buffers(model) -> list[tuple[str, str | None, Any]]:
    """(module name, layer type, module) of every live inv_freq buffer (``{layer_type}_inv_freq`` per type)."""
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            found.append((name, None, module))
        for layer_type in getattr(module, "layer_types", None) or ():
            if isinstance(getattr(module, f"{layer_type}_inv_freq", None), torch.Tensor):
                found.append((name, layer_type, module))
    return found


def verify(model, spec: RopeSpec) -> None:
    """Raise RopeMismatchError unless every rotary module's live inv_freq matches ``spec``.

    Expected values come from ``spec`` plus the model's head size; ``model.config``'s rope
    fields are deliberately not trusted (they may have been edited after the build).
    """
    import torch

    rotary = rotary_buffers(model)
    if not rotary:
        raise RopeMismatchError(
            f"{type(model).__name__} (model_type={getattr(model.config, 'model_type', '?')}) has no rotary "
            "module with an inv_freq buffer: pieval cannot check, so will not extend, its RoPE"
        )
    # for AS_SAVED apply() is a no-op, so this checks the model against the config it reports
    for name, layer_type, module in rotary:
        expected, scaling = expected_rotary(model.config, spec, layer_type)
        prefix = f"{layer_type}_" if layer_type else ""
        name = f"{name or 'model'}.{prefix}inv_freq"
        live = getattr(module, f"{prefix}inv_freq").detach().cpu()
        want = expected.to(live.dtype)
        rtol = 1e-6 if live.dtype == torch.float32 else torch.finfo(live.dtype).eps
        if live.shape != want.shape or not torch.allclose(live.float(), want.float(), rtol=rtol, atol=0.0):
            ratio = (want.float() / live.float()).median().item() if live.shape == want.shape else float("nan")
            raise RopeMismatchError(
                f"{name} does not match rope_method={spec.method} factor={spec.factor:g} "
                f"(expected/live frequency ratio {ratio:.4g}): the rope scaling was not in the config when "
                "the model was built (transformers reads it once, at build; editing model.config afterwards "
                "does nothing). Load through pieval.backend.PILlama, or call pieval.rope.apply(config, spec) "
                "and pass that config to from_pretrained"
            )
        live_scaling = float(getattr(module, f"{prefix}attention_scaling", 1.0))
        if not math.isclose(live_scaling, float(scaling), rel_tol=1e-6):
            raise RopeMismatchError(
                f"{name}: attention_scaling is {live_scaling:g}, expected {float(scaling):g} for "
                f"rope_method={spec.method} factor={spec.factor:g}: the model was built from another rope config"
            )
