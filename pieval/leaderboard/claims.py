"""The paper's qualitative claims, checked against the measured rows of written leaderboards.

The paper's qualitative findings, as they should show at any scale: (1) the base model's
perplexity explodes just past L; (2) PI without fine-tuning stays finite and moderate up to
L'; (3) PI plus a short fine-tune gives perplexity that falls as the window grows to L', and
passkey k_max = L'; (4) direct fine-tuning extends k_max less; (5) quality at windows <= L
degrades only slightly. Each verdict is computed from the CSV files alone and shows the
numbers it rests on; the thresholds that turn "explodes", "moderate" and "slightly" into
numbers are explicit (`Thresholds`) and printed with the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pieval.errors import UserError

PASS, FAIL, MISSING = "PASS", "FAIL", "MISSING"


@dataclass(frozen=True)
class Thresholds:
    explode_ratio: float = 10.0  # (1) base ppl at the first window past L >= this x its ppl at L
    moderate_ratio: float = 10.0  # (2) PI step-0 ppl at every W <= L' <= this x base ppl at L
    max_degradation: float = 0.10  # (5) PI+FT ppl at W = L <= (1 + this) x base ppl at L


@dataclass(frozen=True)
class Claim:
    number: str
    statement: str
    status: str  # PASS, FAIL, or MISSING (the rows it needs were not measured)
    measured: str  # the numbers behind the verdict

    @property
    def passed(self) -> bool:
        return self.status == PASS

    def __str__(self) -> str:
        return f"[{self.status}] ({self.number}) {self.statement}: {self.measured}"


def summary(claims: list[Claim]) -> str:
    """One line per claim, then the tally: what the demo prints."""
    tally = {s: sum(c.status == s for c in claims) for s in (PASS, FAIL, MISSING)}
    return "\n".join([*map(str, claims), ", ".join(f"{n} {s}" for s, n in tally.items())])


def _read(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame = frame[frame["source"] == "measured"].copy()
    for col in ("L", "L'", "steps"):
        frame[col] = frame[col].astype(int)
    return frame.sort_values("date", kind="mergesort")


def _ppl_table(leaderboard_dir: Path, dataset: str | None) -> tuple[str, pd.DataFrame]:
    if dataset is not None:
        path = leaderboard_dir / f"ppl_{dataset}.csv"
        if not path.is_file():
            raise UserError(f"{path} does not exist: run `pieval leaderboard` on results of the {dataset}_ppl task first")
        return dataset, _read(path)
    for path in sorted(leaderboard_dir.glob("ppl_*.csv")):
        if path.name != "ppl_vs_steps.csv":
            frame = _read(path)
            if len(frame):
                return path.stem.removeprefix("ppl_"), frame
    raise UserError(f"{leaderboard_dir} holds no ppl_<dataset>.csv with measured rows: run `pieval leaderboard` first")


def _ppl(row: pd.Series | None, window: int) -> float | None:
    if row is None or str(window) not in row.index or row[str(window)] == "":
        return None
    return float(row[str(window)])


def _windows(frame: pd.DataFrame) -> list[int]:
    return sorted(int(c) for c in frame.columns if c.isdigit())


def _last(frame: pd.DataFrame) -> pd.Series | None:
    return frame.iloc[-1] if len(frame) else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _curve(row: pd.Series, windows: list[int]) -> str:
    return ", ".join(f"{w}: {_fmt(_ppl(row, w))}" for w in windows if _ppl(row, w) is not None)


def check(leaderboard_dir: str | Path, L: int, L_prime: int, dataset: str | None = None, thresholds: Thresholds = Thresholds()) -> list[Claim]:
    """Verdicts for the paper's claims, from ``ppl_<dataset>.csv`` and ``passkey.csv`` in ``leaderboard_dir``.

    Rows used: the base model (method base, trained window L, not fine-tuned), PI to L' without
    fine-tuning (steps 0), PI to L' after the most fine-tuning steps, and direct fine-tuning (FT)
    to L' after the most steps; the newest run when a row was measured more than once.
    """
    leaderboard_dir = Path(leaderboard_dir)
    dataset, ppl = _ppl_table(leaderboard_dir, dataset)
    t = thresholds
    windows = _windows(ppl)
    at_L = ppl[ppl["L"] == L]
    base_rows = at_L[(at_L["method"] == "base") & (at_L["steps"] == 0)]
    # the base checkpoint itself over a fine-tuning run's untrained step-0 copy of it
    base = _last(base_rows.assign(_own=base_rows["model"] == base_rows["base_model"]).sort_values("_own", kind="mergesort"))
    pi = at_L[(at_L["method"] == "PI") & (at_L["L'"] == L_prime)]
    pi0 = _last(pi[pi["steps"] == 0])
    pift = _last(pi[pi["steps"] > 0].sort_values("steps", kind="mergesort"))
    claims = []

    # (1) explosion past L
    past = [w for w in windows if w > L and _ppl(base, w) is not None]
    if _ppl(base, L) is None or not past:
        claims.append(Claim("1", "base perplexity explodes just past L", MISSING, f"need the base model (method base, L={L}) at W={L} and a window > {L} in ppl_{dataset}.csv"))
    else:
        p_L, p_next = _ppl(base, L), _ppl(base, past[0])
        ratio = p_next / p_L
        claims.append(
            Claim("1", "base perplexity explodes just past L", PASS if ratio >= t.explode_ratio else FAIL,
                  f"{dataset} ppl {_fmt(p_L)} at W={L} -> {_fmt(p_next)} at W={past[0]} (x{ratio:.1f}; explodes if >= x{t.explode_ratio:g})")
        )

    # (2) PI without fine-tuning stays finite and moderate up to L'
    upto = [w for w in windows if w <= L_prime and _ppl(pi0, w) is not None]
    if pi0 is None or not upto or _ppl(base, L) is None:
        claims.append(Claim("2", "PI without fine-tuning stays finite and moderate up to L'", MISSING, f"need PI to L'={L_prime} at 0 steps and the base model at W={L} in ppl_{dataset}.csv"))
    else:
        worst = max(_ppl(pi0, w) for w in upto)
        ok = math.isfinite(worst) and worst <= t.moderate_ratio * _ppl(base, L)
        claims.append(
            Claim("2", "PI without fine-tuning stays finite and moderate up to L'", PASS if ok else FAIL,
                  f"{dataset} ppl {_curve(pi0, upto)}; worst {_fmt(worst)} = x{worst / _ppl(base, L):.2f} the base's {_fmt(_ppl(base, L))} at W={L} (moderate if <= x{t.moderate_ratio:g})")
        )

    # (3a) PI + fine-tune: perplexity falls as the window grows to L'
    if pift is None or _ppl(pift, L) is None or _ppl(pift, L_prime) is None:
        claims.append(Claim("3a", "PI + fine-tune: perplexity falls as the window grows to L'", MISSING, f"need a fine-tuned PI model to L'={L_prime} at W={L} and W={L_prime}"))
    else:
        upto = [w for w in windows if L <= w <= L_prime and _ppl(pift, w) is not None]
        ok = _ppl(pift, L_prime) < _ppl(pift, L)
        claims.append(
            Claim("3a", "PI + fine-tune: perplexity falls as the window grows to L'", PASS if ok else FAIL,
                  f"{dataset} ppl after {pift['steps']} steps: {_curve(pift, upto)}")
        )

    # (3b) PI + fine-tune: passkey k_max = L'; (4) direct fine-tuning extends k_max less
    passkey_path = leaderboard_dir / "passkey.csv"
    pk = _read(passkey_path) if passkey_path.is_file() else None
    if pk is not None:
        pk = pk[pk["length"].astype(int) == L_prime]
    pk_pi = _last(pk[(pk["method"] == "PI") & (pk["L"] == L) & (pk["steps"] > 0)].sort_values("steps", kind="mergesort")) if pk is not None else None
    pk_ft = _last(pk[pk["method"] == "FT"].sort_values("steps", kind="mergesort")) if pk is not None else None
    if pk_pi is None:
        claims.append(Claim("3b", "PI + fine-tune: passkey k_max = L'", MISSING, f"need passkey.csv with a fine-tuned PI model at length {L_prime}"))
    else:
        k = int(pk_pi["k_max"])
        # k_max is in real token distances: "= L'" means it reached the farthest distance tested
        # (k_tested, a little short of L'); results that predate k_tested report the grid's L'
        farthest = int(pk_pi["k_tested"]) if pk_pi.get("k_tested", "") != "" else L_prime
        claims.append(
            Claim("3b", "PI + fine-tune: passkey k_max = L'", PASS if k >= farthest else FAIL,
                  f"k_max {k} at length {L_prime} after {pk_pi['steps']} steps (farthest distance tested {farthest})")
        )
    if pk_pi is None or pk_ft is None:
        claims.append(Claim("4", "direct fine-tuning extends k_max less than PI", MISSING, f"need passkey.csv rows at length {L_prime} for both a fine-tuned PI and an FT model"))
    else:
        k_pi, k_ft = int(pk_pi["k_max"]), int(pk_ft["k_max"])
        claims.append(
            Claim("4", "direct fine-tuning extends k_max less than PI", PASS if k_ft < k_pi else FAIL,
                  f"k_max at length {L_prime}: FT {k_ft} ({pk_ft['steps']} steps) vs PI {k_pi} ({pk_pi['steps']} steps)")
        )

    # (5) quality within L degrades only slightly
    if pift is None or _ppl(pift, L) is None or _ppl(base, L) is None:
        claims.append(Claim("5", "quality at windows <= L degrades only slightly", MISSING, f"need the base model and a fine-tuned PI model at W={L}"))
    else:
        change = _ppl(pift, L) / _ppl(base, L) - 1.0
        claims.append(
            Claim("5", "quality at windows <= L degrades only slightly", PASS if change <= t.max_degradation else FAIL,
                  f"{dataset} ppl at W={L}: base {_fmt(_ppl(base, L))}, PI + {pift['steps']} steps {_fmt(_ppl(pift, L))} ({change:+.1%}; slight if <= {t.max_degradation:+.0%})")
        )
    return claims
