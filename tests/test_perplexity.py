"""Sliding-window perplexity against a brute-force reference written independently here.

The reference never uses ``plan_windows``: for each document token it derives the window
that scores it from the definition (window k starts at k*S and holds W-1 document
tokens; token j belongs to the first window that reaches it), runs the model on exactly
that window with full logits, and takes a float64 log-softmax.
"""

from __future__ import annotations

import math

import pytest
import torch

from pieval.errors import UserError
from pieval.perplexity import (
    SlidingWindowConfig,
    SlidingWindowError,
    check_head_split,
    count_windows,
    default_windows,
    plan_windows,
    score_documents,
)
from pieval.perplexity_metrics import bits_per_byte, doc_metrics, exp_ratio
from pieval.sliding_window_lm import REQUEST_TYPE, SlidingWindowMixin

REL = 1e-5


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return model.eval()


def random_docs(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def scoring_window(j: int, window: int, stride: int) -> int:
    """Index k of the window that scores document token j: the first with k*S + W-1 > j."""
    return 0 if j < window - 1 else -(-(j - (window - 1) + 1) // stride)


def brute_force(model, docs, window, stride, bos):
    """Per document: {k: [nll of each token window k scores]} in float64."""
    out = []
    for doc in docs:
        per_window: dict[int, list[float]] = {}
        cache: dict[int, torch.Tensor] = {}
        for j, token in enumerate(doc):
            k = scoring_window(j, window, stride)
            start = k * stride
            if k not in cache:
                ids = torch.tensor([[bos, *doc[start : start + window - 1]]])
                with torch.no_grad():
                    cache[k] = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            # token j sits at position j - start + 1 (after BOS), predicted from j - start
            per_window.setdefault(k, []).append(-cache[k][j - start, token].item())
        out.append(per_window)
    return out


def token_ppl(reference) -> float:
    nll = [x for doc in reference for win in doc.values() for x in win]
    return math.exp(math.fsum(nll) / len(nll))


def window_ppl(reference) -> float:
    """The window-mean formula: exp(mean over all windows of the window's mean NLL)."""
    means = [sum(win) / len(win) for doc in reference for win in doc.values()]
    return math.exp(sum(means) / len(means))


def ours(stats):
    tok = exp_ratio([(s.nll, s.tokens) for s in stats])
    win = exp_ratio([(s.window_mean_nll, s.windows) for s in stats])
    return tok, win


# Window 16 = BOS + 15 document tokens. Lengths: shorter than W, exactly W-1 (one full
# window), exactly W (a second window scoring one token), and several longer ones.
LENGTHS = [5, 15, 16, 40, 83]


@pytest.mark.parametrize("stride", [15, 1, 4], ids=["stride=W-1", "stride=1", "stride=4"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_brute_force(tiny_model, stride, batch_size):
    window, bos = 16, 1
    docs = random_docs(LENGTHS, tiny_model.config.vocab_size)
    stats = score_documents(tiny_model, docs, window, stride, bos, batch_size=batch_size, head_chunk_tokens=4)
    reference = brute_force(tiny_model, docs, window, stride, bos)

    tok, win = ours(stats)
    assert tok == pytest.approx(token_ppl(reference), rel=REL)
    assert win == pytest.approx(window_ppl(reference), rel=REL)
    for s, ref, doc in zip(stats, reference, docs, strict=True):
        assert s.tokens == len(doc)  # every token scored exactly once
        assert s.windows == len(ref)
        assert s.nll == pytest.approx(math.fsum(x for w in ref.values() for x in w), rel=REL)


def test_single_document_shorter_than_window_is_one_window(tiny_model):
    docs = random_docs([7], tiny_model.config.vocab_size, seed=3)
    (s,) = score_documents(tiny_model, docs, window=64, stride=16, bos_id=1)
    ref = brute_force(tiny_model, docs, 64, 16, 1)
    assert (s.windows, s.tokens) == (1, 7)
    assert math.exp(s.nll / s.tokens) == pytest.approx(token_ppl(ref), rel=REL)


def test_plan_windows_definition():
    # W=5 holds 4 document tokens; S=2: windows start at 0, 2, 4, ...
    assert [(s.start, s.end, s.scored) for s in plan_windows(9, 5, 2)] == [
        (0, 4, 4),
        (2, 6, 2),
        (4, 8, 2),
        (6, 9, 1),
    ]
    assert plan_windows(0, 5, 2) == []
    assert [(s.start, s.end, s.scored) for s in plan_windows(3, 5, 2)] == [(0, 3, 3)]
    for n in range(0, 60):
        for w, s in [(5, 4), (5, 1), (16, 7), (2, 1)]:
            spans = plan_windows(n, w, s)
            assert count_windows(n, w, s) == len(spans)
            assert sum(x.scored for x in spans) == n
            assert all(x.length <= w for x in spans)


def test_default_windows():
    assert default_windows(256, 1024) == (256, 512, 768, 1024)
    assert default_windows(256, 640) == (256, 512, 640)
    assert default_windows(256, 256) == (256,)


def test_aggregations_are_token_and_window_weighted():
    items = [(10.0, 5), (1.0, 1)]
    assert exp_ratio(items) == pytest.approx(math.exp(11 / 6))
    assert bits_per_byte([(math.log(2) * 8, 4), (0.0, 4)]) == pytest.approx(1.0)
    result = {
        "scored_bytes": 12,
        "windows": {"16": {"nll": 3.0, "tokens": 6, "windows": 2, "window_mean_nll": 1.2}},
    }
    assert doc_metrics(result) == {
        "token_ppl_16": (3.0, 6),
        "window_ppl_16": (1.2, 2),
        "bpb_16": (3.0, 12),
        "scored_tokens_16": 6,
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stride": 0}, "stride must be a positive integer (got 0)"),
        ({"stride": -3}, "stride must be a positive integer (got -3)"),
        ({"windows": [1]}, "window 1 must be an integer >= 2"),
        ({"windows": [64, 128], "stride": 100}, "stride 100 > W-1 = 63 for window 64"),
        ({"windows": []}, "windows is empty"),
        ({"windows": "256,512"}, "window '256,512' must be an integer >= 2"),
        ({"windows": [256, "512"]}, "window '512' must be an integer >= 2"),
        ({"max_doc_tokens": 0}, "max_doc_tokens must be a positive integer (got 0)"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(SlidingWindowError) as e:
        SlidingWindowConfig(**kwargs)
    assert message in str(e.value)
    assert isinstance(e.value, UserError)


def test_window_larger_than_max_length():
    config = SlidingWindowConfig(windows=(256, 512), stride=128)
    assert config.resolve_windows(max_length=512) == (256, 512)
    with pytest.raises(SlidingWindowError, match=r"window\(s\) \[512\] exceed the model's max_length=256.*max_length=512"):
        config.resolve_windows(max_length=256)
    with pytest.raises(SlidingWindowError, match="default windows"):
        SlidingWindowConfig(stride=300).resolve_windows(max_length=512, base_window=256)


def test_models_that_change_logits_after_the_head_are_refused(tiny_model):
    """The chunked head must reproduce model(...).logits; a logit scale (Cohere) would not."""

    class Scaled(type(tiny_model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    scaled = Scaled(tiny_model.config).eval()
    scaled.load_state_dict(tiny_model.state_dict())
    probe = torch.tensor([[1, 5, 6, 7, 8]])
    check_head_split(tiny_model, probe)
    with pytest.raises(UserError, match="Scaled changes its logits after the output head"):
        check_head_split(scaled, probe)


def test_empty_document_scores_nothing(tiny_model):
    (s,) = score_documents(tiny_model, [[]], window=16, stride=4, bos_id=1)
    assert (s.tokens, s.windows, s.nll) == (0, 0, 0.0)


def test_head_sees_at_most_chunk_rows_whatever_the_window(tiny_model):
    """Memory: the only vocabulary-sized tensors are head outputs; their rows stay <= chunk.

    This checks the shapes requested from the output head (the W x vocab term);
    test_peak_memory_does_not_grow_with_window_times_vocab measures the peak.
    """
    rows = []
    hook = tiny_model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: rows.append(out.shape[0] * out.shape[1])
    )
    try:
        for window in (32, 256):
            rows.clear()
            docs = random_docs([300, 300], tiny_model.config.vocab_size)
            score_documents(tiny_model, docs, window, 16, 1, batch_size=2, head_chunk_tokens=8)
            assert rows and max(rows) <= 8
    finally:
        hook.remove()


PEAK_SCRIPT = """
import resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from pieval.perplexity import score_documents
torch.set_num_threads(1)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
model = LlamaForCausalLM(config).eval()
window = int(sys.argv[2])
doc = torch.randint(3, 32000, (window - 1,)).tolist()
ids = torch.tensor([[1, *doc]])
with torch.inference_mode():
    if sys.argv[1] == "bare":  # the forward pass without any logits
        model.model(input_ids=ids, use_cache=False)
    elif sys.argv[1] == "naive":  # full logits + log-softmax, what the paper's pitfall does
        torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    else:  # one window scoring all of its W - 1 tokens: the worst case
        score_documents(model, [doc], window, 256, 1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_window_times_vocab():
    """Measured: peak RSS of scoring one window with a 32000-token vocabulary.

    Each run is a fresh process (ru_maxrss is a high-water mark). Full logits at W = 4096
    add 4096 x 32000 x 4 B = 500 MB (twice with the log-softmax); the chunked head adds a
    constant few tens of MB over the bare forward pass, the same at W = 1024 and 4096.
    """
    import os
    import subprocess
    import sys

    def peak_mb(mode, window):
        # Large blocks straight from mmap and returned at once: the high-water mark then counts
        # live tensors, not blocks glibc kept from an earlier, freed allocation.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        cmd = [sys.executable, "-c", PEAK_SCRIPT, mode, str(window)]
        return int(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])

    bare, naive = peak_mb("bare", 4096), peak_mb("naive", 4096)
    ours_1k, ours_4k = peak_mb("ours", 1024), peak_mb("ours", 4096)
    full_logits_mb = 4096 * 32000 * 4 / 2**20
    peaks = {"bare": bare, "naive": naive, "ours_1024": ours_1k, "ours_4096": ours_4k}
    # The measurement does see the W x V term. Not the whole 2 x 500 MB: the bare forward's own
    # transient peak (attention at W = 4096) is freed before the logits exist, and that much of the
    # naive peak overlaps it (measured in a fresh clone under `make test`: naive - bare = 458-468 MB).
    assert naive - bare > 0.75 * full_logits_mb, peaks
    assert ours_4k - bare < full_logits_mb / 4, peaks
    assert abs(ours_4k - ours_1k) < full_logits_mb / 16, peaks  # 3072 more scored tokens cost ~nothing


# ------------------------------------------------------------------ the lm-eval model side


@pytest.fixture(scope="module")
def sliding_lm(tiny_llama_dir):
    from lm_eval.models.huggingface import HFLM

    class SlidingHFLM(SlidingWindowMixin, HFLM):
        """The mixin on lm-eval's HFLM, as pieval.backend.PILlama uses it."""

    return SlidingHFLM(pretrained=str(tiny_llama_dir), device="cpu", batch_size=2, dtype="float32")


def request(text, **config):
    from lm_eval.api.instance import Instance

    spec = SlidingWindowConfig(**config).to_request()
    return Instance(request_type=REQUEST_TYPE, doc={}, arguments=(text, spec), idx=0)


def test_mixin_matches_brute_force_on_text(sliding_lm, heldout_dir):
    texts = [p.read_text()[:3000] for p in sorted(heldout_dir.glob("*.txt"))[:2]] + ["In the beginning"]
    windows, stride = (32, 64), 16
    results = sliding_lm.loglikelihood_sliding([request(t, windows=windows, stride=stride) for t in texts])
    tok = sliding_lm.tokenizer
    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    for w in windows:
        reference = brute_force(sliding_lm.model, docs, w, stride, tok.bos_token_id)
        items = [doc_metrics(r) for r in results]
        assert exp_ratio([m[f"token_ppl_{w}"] for m in items]) == pytest.approx(token_ppl(reference), rel=REL)
        assert exp_ratio([m[f"window_ppl_{w}"] for m in items]) == pytest.approx(window_ppl(reference), rel=REL)
        nll = math.fsum(x for doc in reference for win in doc.values() for x in win)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        assert bits_per_byte([m[f"bpb_{w}"] for m in items]) == pytest.approx(nll / n_bytes / math.log(2), rel=REL)
        assert sum(m[f"scored_tokens_{w}"] for m in items) == sum(map(len, docs))
    assert results[2]["scored_tokens"] == len(docs[2]) < 32  # shorter than a window: one window
    assert results[2]["windows"]["32"]["windows"] == 1


def test_mixin_truncation_and_bytes(sliding_lm, heldout_dir):
    text = sorted(heldout_dir.glob("*.txt"))[0].read_text()[:2000]
    (r,) = sliding_lm.loglikelihood_sliding([request(text, windows=(32,), stride=8, max_doc_tokens=50)])
    ids = sliding_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (r["doc_tokens"], r["scored_tokens"], r["truncated"]) == (len(ids), 50, True)
    assert r["scored_bytes"] == len(sliding_lm.tokenizer.decode(ids[:50]).encode("utf-8"))
    reference = brute_force(sliding_lm.model, [ids[:50]], 32, 8, sliding_lm.tokenizer.bos_token_id)
    assert math.exp(r["windows"]["32"]["nll"] / 50) == pytest.approx(token_ppl(reference), rel=REL)


def test_mixin_rejects_window_beyond_max_length(sliding_lm):
    with pytest.raises(SlidingWindowError, match="exceed the model's max_length=256"):
        sliding_lm.loglikelihood_sliding([request("some text", windows=(512,), stride=256)])


def test_the_bar_moves_layer_by_layer_and_ends_on_whole_windows(tiny_model):
    """A long window on a CPU takes minutes: the bar advances a fraction per decoder layer."""
    import io

    from tqdm import tqdm

    docs = random_docs([40, 83], tiny_model.config.vocab_size)
    n = sum(count_windows(len(d), 16, 4) for d in docs)
    seen = []
    with tqdm(total=n, file=io.StringIO()) as bar:
        original = bar.update
        bar.update = lambda k=1: (original(k), seen.append(bar.n))[0]
        score_documents(tiny_model, docs, 16, 4, bos_id=1, batch_size=3, progress=bar)
        assert bar.n == pytest.approx(n)
    layers = tiny_model.config.num_hidden_layers
    fractions = [x for x in seen if abs(x - round(x)) > 1e-9]
    assert len(fractions) >= n // 3 * (layers - 1)  # ticks inside every batch of windows
    assert seen == sorted(seen)  # never backwards
    assert not any(h for layer in tiny_model.model.layers for h in layer._forward_hooks.values())  # hooks removed


def test_the_run_is_announced_before_it_starts(sliding_lm, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="lm_eval.pieval"):
        sliding_lm.loglikelihood_sliding([request("In the beginning God created " * 30, windows=(32, 64), stride=16)])
    (line,) = [r.getMessage() for r in caplog.records if "sliding-window perplexity" in r.getMessage()]
    assert "1 document(s) of" in line and "window(s) of W=32 (stride 16)" in line and "window(s) of W=64" in line
