"""lm-eval's model side of sliding-window perplexity: the ``loglikelihood_sliding`` request type.

lm-eval dispatches each request type to the model method of that name, and its own
``loglikelihood_rolling`` has no stride; ``SlidingWindowMixin`` adds the method to an ``HFLM``
(``pi_llama``). The tasks (``pieval.perplexity_task``) send ``(text, SlidingWindowConfig.to_request())``
and get back a ``DocResult`` as a dict; the math is ``pieval.perplexity``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from pieval.perplexity import (
    SlidingWindowConfig,
    WindowStats,
    check_head_split,
    count_windows,
    score_documents,
)

REQUEST_TYPE = "loglikelihood_sliding"

log = logging.getLogger("lm_eval.pieval")


@dataclass
class DocResult:
    """What ``loglikelihood_sliding`` returns for one document (JSON-serialisable via asdict)."""

    doc_tokens: int  # tokens in the whole document
    scored_tokens: int  # after max_doc_tokens truncation; every one is scored once per window size
    scored_bytes: int  # UTF-8 bytes of the scored text
    truncated: bool
    windows: dict[str, WindowStats] = field(default_factory=dict)  # str(W) -> stats


def plan_summary(jobs) -> str:
    """What a run will score, said before it starts (so that a three-hour run can be stopped at once)."""
    parts, through, docs, doc_tokens = [], 0, 0, 0
    for scoring, windows, _, encoded in jobs:
        lengths = [len(ids) for ids, _ in encoded]
        docs, doc_tokens = docs + len(lengths), doc_tokens + sum(lengths)
        for w in windows:
            n = sum(count_windows(t, w, scoring.stride) for t in lengths)
            through += n * w
            parts.append(f"{n} window(s) of W={w} (stride {scoring.stride})")
    return f"{docs} document(s) of {doc_tokens} tokens: {', '.join(parts)}; {through} tokens through the model"


class SlidingWindowMixin:
    """Serves ``loglikelihood_sliding`` requests on an lm-eval ``HFLM``.

    Use as the first base: ``class PILlama(SlidingWindowMixin, HFLM)``. A request's
    arguments are ``(text, SlidingWindowConfig.to_request())``; the answer is a
    ``DocResult`` as a dict. All windows of all documents sharing a config are scored in
    one pass over window sizes, batched by ``batch_size`` (``auto``: lm-eval's detection
    at max_length, which bounds the equal-or-shorter windows used here).
    """

    def loglikelihood_sliding(self, requests, disable_tqdm: bool = False) -> list[dict]:
        by_config: dict[str, list[int]] = defaultdict(list)
        configs: dict[str, SlidingWindowConfig] = {}
        # In a multi-process run lm-eval evens out the ranks' shares by repeating one Instance
        # (``numpad``); a repeat is answered with its first occurrence's result, not scored again.
        first: dict[int, int] = {}
        for i, req in enumerate(requests):
            if first.setdefault(id(req), i) != i:
                continue
            _, spec = req.args
            key = repr(sorted(spec.items()))
            configs.setdefault(key, SlidingWindowConfig.from_request(spec))
            by_config[key].append(i)

        jobs = []  # (config, windows, request indices, [(token ids, DocResult)])
        for key, indices in by_config.items():
            config = configs[key]
            base = self._sliding_base_window() if config.windows is None else None
            windows = config.resolve_windows(self.max_length, base)
            encoded = [self._sliding_encode(requests[i].args[0], config.max_doc_tokens) for i in indices]
            jobs.append((config, windows, indices, encoded))

        n_windows = sum(
            count_windows(len(ids), w, config.stride)
            for config, windows, _, encoded in jobs
            for w in windows
            for ids, _ in encoded
        )
        batch_size = self._detect_batch_size() if self.batch_size == "auto" else int(self.batch_size)
        bos = self.prefix_token_id
        self._sliding_check_model(bos)
        # every process says what it scores: its share of the documents in a multi-process run
        where = f" (process {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        log.info("sliding-window perplexity%s: %s", where, plan_summary(jobs))
        results: list[dict | None] = [None] * len(requests)
        bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} windows [{elapsed}<{remaining}]"
        with tqdm(total=n_windows, desc="Sliding windows", bar_format=bar_format, disable=disable_tqdm or self.rank != 0) as bar:
            for config, windows, indices, encoded in jobs:
                token_ids = [ids for ids, _ in encoded]
                per_window = {
                    w: score_documents(
                        self.model, token_ids, w, config.stride, bos,
                        batch_size=batch_size, head_chunk_tokens=config.head_chunk_tokens, progress=bar,
                    )
                    for w in windows
                }
                for j, (i, (_, doc)) in enumerate(zip(indices, encoded, strict=True)):
                    doc.windows = {str(w): per_window[w][j] for w in windows}
                    results[i] = asdict(doc)
        return [results[first[id(req)]] for req in requests]

    def _sliding_base_window(self) -> int:
        from pieval.rope import base_window

        return base_window(self.model.config)

    def _sliding_check_model(self, bos: int) -> None:
        if getattr(self, "_sliding_head_checked", False):
            return
        probe = torch.tensor([[bos] + list(range(1, 8))], device=next(self.model.parameters()).device)
        check_head_split(self.model, probe)
        self._sliding_head_checked = True

    def _sliding_encode(self, text: str, max_doc_tokens: int | None) -> tuple[list[int], DocResult]:
        """Token ids (no special tokens, truncated) and the document's counts."""
        tok = self.tokenizer
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=tok.is_fast, verbose=False)
        ids = enc["input_ids"]
        keep = len(ids) if max_doc_tokens is None else min(len(ids), max_doc_tokens)
        if keep == len(ids):
            n_bytes = len(text.encode("utf-8"))
        elif tok.is_fast:
            n_bytes = len(text[: enc["offset_mapping"][keep - 1][1]].encode("utf-8"))
        else:
            n_bytes = len(tok.decode(ids[:keep]).encode("utf-8"))
        doc = DocResult(len(ids), keep, n_bytes, keep < len(ids))
        return ids[:keep], doc
