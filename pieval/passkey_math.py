"""The passkey score math (PI, Sec. 3.3): success rates by distance and the effective window k_max.

Pure functions without lm-eval or datasets, so the leaderboard's heat map and the passkey
task share one definition while `pieval leaderboard` stays light.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from pieval.protocol import PASSKEY_MIN_SUCCESS


def k_max(success: Mapping[int, float], threshold: float = PASSKEY_MIN_SUCCESS) -> int:
    """The largest k such that every k' <= k has success rate >= threshold; 0 if the smallest fails."""
    best = 0
    for k in sorted(success):
        if success[k] < threshold:
            break
        best = k
    return best


def success_rates(outcomes: Iterable[tuple[int, bool]]) -> dict[int, float]:
    """Per-distance success rate from (k, correct) pairs."""
    hits: dict[int, list[bool]] = defaultdict(list)
    for k, correct in outcomes:
        hits[k].append(bool(correct))
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def achieved_distances(pairs: Iterable[tuple[int, int]]) -> dict[int, int]:
    """{grid distance: the smallest real distance of its prompts} from (k, k_tokens) pairs."""
    reached: dict[int, int] = {}
    for k, k_tokens in pairs:
        reached[k] = min(reached.get(k, k_tokens), k_tokens)
    return dict(sorted(reached.items()))
