"""`pieval plot-bound`: Theorem 2.1's ratio and Figure 2, against computations written here.

The references below are deliberately plain: Python loops over complex exponentials, a grid
search for the worst interpolation point, and the attention score a(s) evaluated term by term.
"""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest

from pieval import bound
from pieval.cli import main


def _B_brute(s: float, d: int, c: float) -> float:
    """B(s) = sum_{k=0}^{d/2-1} |sum_{j=0}^{k} e^{i s theta_j}|, one term at a time."""
    total, partial = 0.0, 0j
    for j in range(d // 2):
        partial += cmath.exp(1j * s * c ** (-2 * j / d))
        total += abs(partial)
    return total


def test_ratio_for_llama_is_the_papers_600x():
    d, c = 128, 10000.0
    # interpolation bound per unit max|h|: d * max over the unit gap of (s-s1)(s2-s) / (8 ln c)
    grid = np.linspace(0.0, 1.0, 100001)
    interp = d * float(np.max(grid * (1.0 - grid))) / (8 * math.log(c))
    r = bound.bound_ratio(d, c)
    assert r.interpolation == pytest.approx(interp, rel=1e-9)
    assert r.interpolation == pytest.approx(d / 294.73, rel=1e-4)  # the paper's Eq. 7 constant
    # extrapolation bound 2 B(s) max|h| with B(s) >= d (paper, Sec. 2.3 and Appendix B)
    assert r.ratio == pytest.approx(2 * d / interp, rel=1e-9)
    assert 550 < r.ratio < 650  # "~600x"
    assert r.ratio == pytest.approx(2 * 294.73, rel=1e-4)


def test_extrapolation_sum_matches_brute_force_and_exceeds_d():
    d, c = 128, 10000.0
    s = np.array([1, 7, 300, 2047, 2049, 3000, 4096])
    fast = bound.extrapolation_sum(s, d, c)
    assert fast == pytest.approx([_B_brute(float(x), d, c) for x in s], rel=1e-10)
    r = bound.bound_ratio(d, c, (1, 4096))
    # Appendix B: B(s)/d is >= 1 over the range (so the ratio is at least 2 * 32 ln c)
    assert r.b_over_d_min >= 1.0
    assert r.b_over_d_min == pytest.approx(min(_B_brute(float(x), d, c) for x in range(1, 4097, 1)) / d, rel=1e-9)


def test_theorem_2_1_holds_for_random_scores():
    """|a(s) - linear interpolation| <= d max|h| (s-s1)(s2-s)/(8 ln c) between integer positions."""
    d, c = 128, 10000.0
    rng = np.random.default_rng(7)
    theta = bound.frequencies(d, c)
    for _ in range(5):
        h = rng.standard_normal(d // 2) + 1j * rng.standard_normal(d // 2)

        def a(s: float) -> float:
            return sum((h[j] * cmath.exp(1j * s * theta[j])).real for j in range(d // 2))

        h_max = max(abs(x) for x in h)
        for s1 in (0, 3, 100, 2000):
            for frac in (0.1, 0.25, 0.5, 0.9):
                linear = (1 - frac) * a(s1) + frac * a(s1 + 1)
                err = abs(a(s1 + frac) - linear)
                assert err <= d * h_max * frac * (1 - frac) / (8 * math.log(c))
                assert err <= bound.interpolation_bound(d, c, h_max)


def test_fit_is_the_basis_sum():
    f = bound.fit(512, 64, 10000.0, seed=3)
    theta, half = bound.frequencies(64, 10000.0), 32
    h = f.coeffs[half:] - 1j * f.coeffs[:half]  # a(s) = Re sum h_j e^{i s theta_j}
    # the fitted coefficients are large and cancel, so compare at a relative 1e-4
    assert f(np.array([10.5]))[0] == pytest.approx(sum((h[j] * cmath.exp(10.5j * theta[j])).real for j in range(half)), rel=1e-4)
    assert f.h_max == pytest.approx(max(abs(x) for x in h), rel=1e-12)
    assert np.abs(f(np.arange(512)) - f.y).mean() < np.abs(f.y).mean()  # it fits the points


def test_figure2_interpolates_smoothly_and_extrapolation_blows_up():
    L = 2048
    f = bound.fit(L, bound.LLAMA_HEAD_DIM, bound.ROPE_BASE, seed=0)
    inside = np.abs(f(np.arange(L))).max()
    outside = np.abs(f(np.arange(L, 2 * L))).max()
    assert inside < 3 and outside > 1000 * inside  # the paper: within [-1, 1] inside, > 8000 past L
    # between integers the curve stays within the Theorem 2.1 band around the linear interpolation
    fine = np.arange(25, 75, 0.125)
    lo, frac = np.floor(fine), fine - np.floor(fine)
    linear = (1 - frac) * f(lo) + frac * f(lo + 1)
    band = bound.LLAMA_HEAD_DIM * f.h_max * frac * (1 - frac) / (8 * math.log(bound.ROPE_BASE))
    assert np.all(np.abs(f(fine) - linear) <= band + 1e-12)


def test_cli_prints_the_ratio_and_writes_the_figures(tmp_path, capsys):
    assert main(["plot-bound", "--out", str(tmp_path), "--window", "512"]) == 0
    out = capsys.readouterr().out
    assert f">= {bound.bound_ratio().ratio:.1f}x" in out and "589.5x" in out
    for stem in ("figure2", "figure5"):
        for ext in ("png", "svg"):
            assert (tmp_path / f"{stem}.{ext}").stat().st_size > 1000
    assert "positional difference s" in (tmp_path / "figure2.svg").read_text()


@pytest.mark.parametrize("argv, message", [(["--d", "127"], "--d must be an even"), (["--base", "1"], "--base must be > 1"), (["--window", "64"], "--window must be >= --d")])
def test_cli_bad_arguments(argv, message, tmp_path, capsys):
    assert main(["plot-bound", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
