"""`pieval plot-bound`: the paper's Figure 2 and the Theorem 2.1 bound ratio (Sec. 2.2-2.3).

An attention score under RoPE is a sum of basis functions of the relative position s,
a(s) = Re sum_j h_j e^{i s theta_j}, theta_j = c^(-2j/d). Figure 2 fits such a sum (d = 128,
LLaMA-7B's head size) by least squares to random values at the integer positions [0, L): it
stays small inside [0, L], between integers it is smooth (interpolation), past L it blows up
(extrapolation).

Theorem 2.1 bounds the interpolation error between neighbouring integers s1 < s < s2 by
d max|h_j| (s - s1)(s2 - s) / (8 ln c) <= d max|h_j| / (32 ln c); the extrapolation bound of
RoPE (Su et al. 2021, Sec. 3.4.3) is 2 max|h_j| B(s) with B(s) = sum_k |A_{k+1}(s)| and
A_k(s) = sum_{j<k} e^{i s theta_j}. With the paper's observation B(s) >= d the ratio is at least
64 ln c (~600 for c = 10000, whatever d); `bound_ratio` computes both bounds and B(s)
numerically.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LLAMA_HEAD_DIM = 128  # d = d_model / n_head = 4096 / 32 for LLaMA-7B (Fig. 2)
ROPE_BASE = 10000.0  # c, LLaMA's rope_theta
PAPER_WINDOW = 2048  # L of Fig. 2


def frequencies(d: int, base: float) -> np.ndarray:
    """theta_j = base^(-2j/d), j = 0 .. d/2 - 1 (float64)."""
    return base ** (-np.arange(0, d, 2, dtype=np.float64) / d)


def basis(s: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """[sin(s theta_j) | cos(s theta_j)]: real form of the basis e^{i s theta_j}."""
    phase = np.outer(np.asarray(s, dtype=np.float64), theta)
    return np.concatenate([np.sin(phase), np.cos(phase)], axis=1)


@dataclass(frozen=True)
class Fit:
    theta: np.ndarray
    coeffs: np.ndarray  # real coefficients of `basis`
    y: np.ndarray  # the random targets at s = 0 .. L-1

    def __call__(self, s) -> np.ndarray:
        return basis(s, self.theta) @ self.coeffs

    @property
    def h_max(self) -> float:
        """max_j |h_j|: a_j sin + b_j cos = Re[(b_j - i a_j) e^{i s theta_j}]."""
        half = len(self.theta)
        return float(np.max(np.hypot(self.coeffs[:half], self.coeffs[half:])))


def fit(L: int = PAPER_WINDOW, d: int = LLAMA_HEAD_DIM, base: float = ROPE_BASE, seed: int = 0) -> Fit:
    """Least-squares fit of the basis sum to standard-normal values at s = 0 .. L-1 (Fig. 2)."""
    theta = frequencies(d, base)
    y = np.random.default_rng(seed).standard_normal(L)
    coeffs, *_ = np.linalg.lstsq(basis(np.arange(L), theta), y, rcond=None)
    return Fit(theta, coeffs, y)


def interpolation_bound(d: int, base: float, h_max: float = 1.0, gap: float = 1.0) -> float:
    """Theorem 2.1 at its worst point between grid points ``gap`` apart: (s-s1)(s2-s) <= gap^2/4."""
    return d * h_max * (gap * gap / 4.0) / (8.0 * math.log(base))


def extrapolation_sum(s: np.ndarray, d: int, base: float) -> np.ndarray:
    """B(s) = sum_{k=0}^{d/2-1} |A_{k+1}(s)|, A_k(s) = sum_{j<k} e^{i s theta_j} (Eq. 8)."""
    partial = np.cumsum(np.exp(1j * np.outer(np.asarray(s, dtype=np.float64), frequencies(d, base))), axis=1)
    return np.abs(partial).sum(axis=1)


@dataclass(frozen=True)
class BoundRatio:
    d: int
    base: float
    interpolation: float  # Theorem 2.1 bound per unit max|h_j|
    extrapolation_at_d: float  # 2 * d: the extrapolation bound per unit max|h_j| where B(s) = d
    ratio: float  # extrapolation_at_d / interpolation: the paper's "~600x"
    b_over_d_min: float  # numeric min / median of B(s)/d over the positions checked
    b_over_d_median: float
    positions: tuple[int, int]

    def lines(self) -> list[str]:
        lo, hi = self.positions
        return [
            f"Theorem 2.1 (d={self.d}, c={self.base:g}): interpolation bound d/(32 ln c) = {self.interpolation:.4f} x max|h_j|",
            f"extrapolation bound 2 B(s) max|h_j| >= 2d = {self.extrapolation_at_d:g} x max|h_j| where B(s) >= d",
            f"ratio extrapolation / interpolation >= {self.ratio:.1f}x (the paper: ~600x)",
            f"numerically, B(s)/d over s in [{lo}, {hi}]: min {self.b_over_d_min:.3f}, median {self.b_over_d_median:.3f}"
            f" -> typical ratio {self.ratio * self.b_over_d_median:.0f}x",
        ]


def bound_ratio(d: int = LLAMA_HEAD_DIM, base: float = ROPE_BASE, positions: tuple[int, int] = (1, 2 * PAPER_WINDOW)) -> BoundRatio:
    interp = interpolation_bound(d, base)
    extrap = 2.0 * d
    b = extrapolation_sum(np.arange(positions[0], positions[1] + 1), d, base) / d
    return BoundRatio(d, base, interp, extrap, extrap / interp, float(b.min()), float(np.median(b)), positions)


def figure2(f: Fit, L: int):
    """The paper's three panels: the fit on [0, L], extrapolation to 2L, interpolation on [25, 75]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inside, beyond, fine = np.arange(L), np.arange(2 * L), np.arange(25, 75, 0.125)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    axes[0].plot(inside, f(inside), "r", linewidth=0.8)
    axes[0].scatter(inside, f.y, s=2)
    axes[0].set_title("Fitted attention score within [0, L]")
    axes[1].plot(beyond, f(beyond), "r", linewidth=0.8)
    axes[1].scatter(inside, f.y, s=2)
    axes[1].axvline(L, color="k", linestyle="--", linewidth=0.8)
    axes[1].set_title("Effect of extrapolation (past L)")
    axes[2].plot(fine, f(fine), "r", linewidth=0.8)
    axes[2].scatter(np.arange(25, 75), f(np.arange(25, 75)), s=8)
    for s in range(25, 76):
        axes[2].axvline(s, color="grey", linestyle=":", linewidth=0.4)
    axes[2].set_title("Effect of interpolation (between integers)")
    for ax in axes:
        ax.set_xlabel("positional difference s")
        ax.set_ylabel("attention score a(s)")
    fig.tight_layout()
    return fig


def figure5(r: BoundRatio):
    """B(s)/d against s (the paper's Fig. 5): the extrapolation bound's size, >= 1 almost everywhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.arange(r.positions[0], r.positions[1] + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(s, extrapolation_sum(s, r.d, r.base) / r.d, linewidth=0.6)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    ax.set_xlabel("positional difference s")
    ax.set_ylabel("B(s)/d")
    ax.set_title(f"extrapolation bound B(s)/d (d={r.d}, c={r.base:g})")
    return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="leaderboards/plots", help="directory for figure2.{png,svg} and figure5.{png,svg}")
    parser.add_argument("--d", type=int, default=LLAMA_HEAD_DIM, help="head dimension d (LLaMA-7B: 128)")
    parser.add_argument("--base", type=float, default=ROPE_BASE, help="RoPE base c (rope_theta)")
    parser.add_argument("--window", type=int, default=PAPER_WINDOW, help="trained window L of the fit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random points to fit")


def run(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from pieval.errors import UserError
    from pieval.leaderboard.plots import RC, save

    if args.d < 2 or args.d % 2:
        raise UserError(f"--d must be an even head dimension >= 2 (got {args.d}); LLaMA-7B uses 128")
    if not args.base > 1:
        raise UserError(f"--base must be > 1 (got {args.base}); LLaMA's rope_theta is 10000")
    if args.window < args.d:
        raise UserError(f"--window must be >= --d (got {args.window} < {args.d}): the fit needs at least d points")
    r = bound_ratio(args.d, args.base, (1, 2 * args.window))
    for line in r.lines():
        print(line)
    out = Path(args.out)
    f = fit(args.window, args.d, args.base, args.seed)
    inside = np.abs(f(np.arange(args.window))).max()
    outside = np.abs(f(np.arange(args.window, 2 * args.window))).max()
    print(f"Figure 2 fit (L={args.window}): max |a(s)| {inside:.3g} on [0, L) vs {outside:.3g} on [L, 2L)")
    with plt.rc_context(RC):
        for path in save(figure2(f, args.window), out, "figure2") + save(figure5(r), out, "figure5"):
            print(path)
    return 0
