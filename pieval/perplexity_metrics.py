"""The metrics of the perplexity tasks: per-document items and lm-eval aggregations over them.

Per window W: ``token_ppl_W`` (token-weighted, the paper's), ``window_ppl_W`` (exp of the mean over
windows of each window's mean NLL), ``bpb_W`` (bits per UTF-8 byte) and ``scored_tokens_W``. Sums
are carried per document and aggregated over the corpus, so the corpus number is the ratio of
sums, not a mean of per-document perplexities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def doc_metrics(result: dict) -> dict[str, tuple | int]:
    """Per-document metric items from a ``DocResult`` dict; ``AGGREGATIONS`` turns lists of them into numbers."""
    out: dict[str, tuple | int] = {}
    for w, s in result["windows"].items():
        out[f"token_ppl_{w}"] = (s["nll"], s["tokens"])
        out[f"window_ppl_{w}"] = (s["window_mean_nll"], s["windows"])
        out[f"bpb_{w}"] = (s["nll"], result["scored_bytes"])
        out[f"scored_tokens_{w}"] = s["tokens"]
    return out


def exp_ratio(items: Sequence[tuple[float, int]]) -> float:
    """exp(sum of NLL terms / sum of counts): token- or window-weighted perplexity."""
    nll = math.fsum(n for n, _ in items)
    count = sum(c for _, c in items)
    return math.exp(nll / count) if count else math.nan


def bits_per_byte(items: Sequence[tuple[float, int]]) -> float:
    nll = math.fsum(n for n, _ in items)
    n_bytes = sum(b for _, b in items)
    return nll / n_bytes / math.log(2) if n_bytes else math.nan


def total(items: Sequence[int]) -> int:
    return sum(items)


# metric-name prefix -> (aggregation, higher is better)
AGGREGATIONS = {
    "token_ppl": (exp_ratio, False),
    "window_ppl": (exp_ratio, False),
    "bpb": (bits_per_byte, False),
    "scored_tokens": (total, True),
}


def metric_names(windows: Sequence[int]) -> list[str]:
    return [f"{prefix}_{w}" for w in windows for prefix in AGGREGATIONS]


def metric_prefix(name: str) -> str:
    return name.rsplit("_", 1)[0]
