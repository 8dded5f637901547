"""Strided sliding-window perplexity, exactly as the PI paper measures it.

Definition (Chen et al. 2023, Sec. 3.2, after Press et al. 2022): a document is tokenized
once, without special tokens. Windows of W tokens start every S tokens (S = stride); each
window is BOS followed by up to W-1 document tokens. A window scores only the tokens the
previous window did not score (the first window scores all of its tokens), and the
document ends with the first window that reaches its last token. So every document token
is scored exactly once, with at least W-1-S tokens of context after the first window; a
document shorter than W-1 tokens is one window.

Memory: only the scored tail of a window goes through the output head, a few rows at a
time (``head_chunk_tokens``), and the NLL is taken in fp32, so the W x vocabulary logits
are never materialised. Windows are batched only with windows of the same length: one
padded token would make transformers build a W x W attention mask (an fp32 copy of 1 GB at
W = 16384, and SDPA could no longer skip the masked half: about 2x slower, measured on CPU).

Elsewhere: ``pieval.sliding_window_lm`` serves this to lm-eval as the request type
``loglikelihood_sliding``; ``pieval.perplexity_metrics`` turns its results into lm-eval metrics.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pieval.errors import UserError
from pieval.protocol import STRIDE

# Output-head rows per chunk: 128 x 32000 fp32 logits are 16 MB (plus as much for the
# log-softmax), small next to the activations even at W = 2048.
HEAD_CHUNK_TOKENS = 128


class SlidingWindowError(UserError):
    """Invalid sliding-window settings; the message names each bad value and the fix."""


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Span:
    """One window: document tokens [start, end) after a BOS; its last ``scored`` are scored."""

    start: int
    end: int
    scored: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1  # + BOS


def plan_windows(n_tokens: int, window: int, stride: int) -> list[Span]:
    """The windows that score a document of ``n_tokens`` tokens (none for an empty one)."""
    capacity = window - 1  # one position holds BOS
    spans: list[Span] = []
    start, scored_to = 0, 0
    while scored_to < n_tokens:
        end = min(start + capacity, n_tokens)
        spans.append(Span(start, end, end - scored_to))
        scored_to = end
        start += stride
    return spans


def count_windows(n_tokens: int, window: int, stride: int) -> int:
    """``len(plan_windows(...))`` without building the plan (for progress bars)."""
    capacity = window - 1
    if n_tokens == 0:
        return 0
    return 1 + max(0, -(-(n_tokens - capacity) // stride))


def default_windows(base_window: int, context_length: int) -> tuple[int, ...]:
    """L, 2L, ... up to L' (and L' itself when it is not a multiple of L): a Table 1 row."""
    if base_window >= context_length:
        return (context_length,)
    windows = tuple(range(base_window, context_length + 1, base_window))
    return windows if windows[-1] == context_length else (*windows, context_length)


@dataclass(frozen=True)
class SlidingWindowConfig:
    """What to score: evaluation windows W, stride S and per-document truncation.

    ``windows=None`` means the loaded model's L, 2L, ..., L' (``default_windows``).
    """

    windows: tuple[int, ...] | None = None
    stride: int = STRIDE  # paper Sec. 3.2
    max_doc_tokens: int | None = None  # keep only each document's first N tokens
    head_chunk_tokens: int = HEAD_CHUNK_TOKENS

    def __post_init__(self) -> None:
        if self.windows is not None:
            # metadata may give one int, a list, or (by mistake) a string such as "256,512"
            windows = (self.windows,) if isinstance(self.windows, (int, str)) else self.windows
            object.__setattr__(self, "windows", tuple(dict.fromkeys(windows)))
        problems = []
        for name in ("stride", "max_doc_tokens", "head_chunk_tokens"):
            value = getattr(self, name)
            if value is None and name == "max_doc_tokens":
                continue
            if not _is_int(value) or value <= 0:
                problems.append(f"{name} must be a positive integer (got {value!r})")
        if self.windows is not None:
            if not self.windows:
                problems.append("windows is empty: give at least one window, e.g. [2048]")
            problems += [_window_problem(w, self.stride) for w in self.windows]
        problems = [p for p in problems if p]
        if problems:
            raise SlidingWindowError("; ".join(problems))
        if self.windows is not None:
            object.__setattr__(self, "windows", tuple(sorted(self.windows)))

    def resolve_windows(self, max_length: int, base_window: int | None = None) -> tuple[int, ...]:
        """The windows to run on a model with this ``max_length`` (and trained window L)."""
        windows = self.windows
        if windows is None:
            windows = default_windows(base_window or max_length, max_length)
            problems = [_window_problem(w, self.stride) for w in windows]
            if any(problems):
                raise SlidingWindowError(
                    f"the model's default windows {list(windows)}: " + "; ".join(p for p in problems if p)
                )
        too_long = [w for w in windows if w > max_length]
        if too_long:
            raise SlidingWindowError(
                f"window(s) {too_long} exceed the model's max_length={max_length}: pass smaller "
                f"windows, or raise max_length in model_args (max_length={max(too_long)}) to measure "
                "beyond the model's context (extrapolation), or extend it with scaling_factor"
            )
        return windows

    def to_request(self) -> dict:
        return asdict(self) | {"windows": None if self.windows is None else list(self.windows)}

    @classmethod
    def from_request(cls, spec: dict) -> SlidingWindowConfig:
        return cls(**spec)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _largest_power_of_two(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _window_problem(window, stride) -> str | None:
    if not _is_int(window) or window < 2:
        return (
            f"window {window!r} must be an integer >= 2 (BOS plus at least one document token); "
            "give windows as a list, e.g. --metadata '{\"windows\": [2048, 4096]}'"
        )
    if _is_int(stride) and stride > window - 1:
        return (
            f"stride {stride} > W-1 = {window - 1} for window {window}: tokens between windows "
            f"would never be scored; pass a stride <= {window - 1} (--metadata '{{\"stride\": "
            f"{_largest_power_of_two(window - 1)}}}') or larger windows"
        )
    return None


# --------------------------------------------------------------------------- scoring


@dataclass
class WindowStats:
    """One document at one window size: sums over its windows (fp64)."""

    tokens: int = 0  # scored tokens
    nll: float = 0.0  # total NLL of the scored tokens, nats
    windows: int = 0
    window_mean_nll: float = 0.0  # sum over windows of each window's mean NLL

    def add(self, nll: float, tokens: int) -> None:
        self.tokens += tokens
        self.nll += nll
        self.windows += 1
        self.window_mean_nll += nll / tokens


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The output head on ``hidden``, soft-capped as the model's own forward does (Gemma 2: c·tanh(x/c))."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def check_head_split(model: torch.nn.Module, probe: torch.Tensor) -> None:
    """Raise unless decoder + output head reproduce ``model(probe).logits``.

    The chunked scoring runs the head itself; a model that transforms logits after the
    head (soft-capping, scaling) would otherwise be scored silently wrong.
    """
    with torch.inference_mode():
        full = model(input_ids=probe, use_cache=False).logits.float()
        hidden = model.get_decoder()(input_ids=probe, use_cache=False).last_hidden_state
        split = head_logits(model, hidden).float()
    if not torch.allclose(full, split, rtol=1e-2, atol=1e-2):
        raise UserError(
            f"{type(model).__name__} changes its logits after the output head (max difference "
            f"{(full - split).abs().max().item():.3g}); sliding-window perplexity supports "
            "LLaMA-style causal LMs whose logits are lm_head(last hidden state)"
        )


def tail_nll(model: torch.nn.Module, input_ids: torch.Tensor, scored: int, head_chunk_tokens: int) -> torch.Tensor:
    """Summed NLL (fp64, one per row) of the last ``scored`` tokens of each row.

    The token at position j is predicted by the hidden state at j-1, so the scored tail
    ``input_ids[:, -scored:]`` needs hidden states ``[-scored-1, -1)``: exactly those go
    through the head, ``head_chunk_tokens`` rows at a time.
    """
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, -scored - 1 : -1]
    targets = input_ids[:, -scored:]
    batch = input_ids.shape[0]
    step = max(1, head_chunk_tokens // batch)
    total = torch.zeros(batch, dtype=torch.float64, device=input_ids.device)
    for i in range(0, scored, step):
        logits = head_logits(model, hidden[:, i : i + step]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets[:, i : i + step].flatten(), reduction="none")
        total += nll.view(batch, -1).sum(dim=1, dtype=torch.float64)
    return total


@contextlib.contextmanager
def layer_progress(model: torch.nn.Module, progress: tqdm | None) -> Iterator[list[int]]:
    """Advance ``progress`` (counted in windows) a fraction per decoder layer, not once per window.

    A 16384-token window takes minutes on a CPU; a bar that moves only when it ends looks hung.
    Yields a one-item list: the number of windows in the forward pass under way.
    """
    rows = [0]
    layers = getattr(model.get_decoder(), "layers", None) if progress is not None and not progress.disable else None
    if not layers:
        yield rows
        return

    def tick(module, args, output) -> None:
        progress.update(rows[0] / len(layers))

    handles = [layer.register_forward_hook(tick) for layer in layers]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def score_documents(
    model: torch.nn.Module,
    docs: Sequence[Sequence[int]],
    window: int,
    stride: int,
    bos_id: int,
    *,
    batch_size: int = 1,
    head_chunk_tokens: int = HEAD_CHUNK_TOKENS,
    progress: tqdm | None = None,
) -> list[WindowStats]:
    """Sliding-window NLL of each document (token ids without BOS) at one window size."""
    device = next(model.parameters()).device
    stats = [WindowStats() for _ in docs]
    # Equal (length, scored) windows stack without padding; longest first, so an
    # out-of-memory error shows up at once rather than at the end.
    groups: dict[tuple[int, int], list[tuple[int, Span]]] = defaultdict(list)
    for i, doc in enumerate(docs):
        for span in plan_windows(len(doc), window, stride):
            groups[span.length, span.scored].append((i, span))
    with torch.inference_mode(), layer_progress(model, progress) as rows:
        for length, scored in sorted(groups, reverse=True):
            items = groups[length, scored]
            for b in range(0, len(items), batch_size):
                batch = items[b : b + batch_size]
                ids = torch.tensor(
                    [[bos_id, *docs[i][s.start : s.end]] for i, s in batch], dtype=torch.long, device=device
                )
                start = progress.n if progress is not None else 0
                rows[0] = len(batch)
                nll = tail_nll(model, ids, scored, head_chunk_tokens).tolist()
                for (i, _), value in zip(batch, nll, strict=True):
                    stats[i].add(value, scored)
                if progress is not None:  # whole windows again, whatever the layer ticks summed to
                    progress.update(start + len(batch) - progress.n)
    return stats
