"""Passkey success rate by distance, from lm-eval's ``--log_samples`` records (the heat map's data).

Leaderboard code, kept apart from `pieval.passkey` (the task, which needs lm-eval's task
machinery and datasets): it reads logged samples with the shared math of `pieval.passkey_math`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from pieval.passkey_math import success_rates


def heat_map(samples: Iterable[Mapping[str, Any]]) -> dict[int, dict[int, float]]:
    """{length: {k: success rate}} from lm-eval ``--log_samples`` records of the passkey task."""
    by_length: dict[int, list[tuple[int, bool]]] = defaultdict(list)
    for sample in samples:
        doc = sample["doc"]
        item = sample[f"k_max_{doc['length']}"]
        by_length[doc["length"]].append((doc["k"], item["correct"]))
    return {length: success_rates(outcomes) for length, outcomes in sorted(by_length.items())}
