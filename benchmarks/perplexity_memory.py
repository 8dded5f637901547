"""Sliding-window perplexity: peak memory and time of pieval vs the naive full-logit loss vs the floor.

Three ways to score the same token stream with the same strided window plan
(``pieval.perplexity.plan_windows``: BOS + up to W-1 tokens, a window every S tokens, each
window scoring only the tokens the previous one did not):

- pieval: ``pieval.perplexity.score_documents``, the function ``pi_llama`` serves
  ``loglikelihood_sliding`` with (only the scored tail goes through the output head, in chunks);
- naive: ``model(ids, labels=...)`` with the unscored prefix labelled -100, as yarn's
  ``eval/perplexity.py`` and the Hugging Face perplexity guide do: full W x vocabulary logits;
- floor: the bare decoder ``model.model(ids)`` without the output head, over the same windows. It
  computes no loss in the measured region (keeping even the scored hidden states would add to its
  peak); a second, unmeasured pass of the same loop puts its hidden states through the head, which
  checks that it ran the very same windows.

Each (variant, W) runs in a fresh worker process that builds the same random LLaMA-shaped model
(vocabulary 32000, few narrow layers) or, with ``--model PATH``, loads that checkpoint; runs the
variant once on a few 64-token windows (so that library code paged in by the first call of each
kernel does not count), then measures the peak memory above that state (in one worker, with
glibc returning freed blocks: live tensors only) and the wall time of scoring the whole stream
(on the CPU in another worker, with the default allocator). Usage:

    python benchmarks/perplexity_memory.py            # W = 1024..8192, stride 256
    python benchmarks/perplexity_memory.py --quick    # W = 256, 512, stride 128, one worker (seconds)
    python benchmarks/perplexity_memory.py --device cuda
    python benchmarks/perplexity_memory.py --model models/smollm2-135m/hf --windows 4096 8192 --windows-each 2
"""

from __future__ import annotations

import dataclasses
import math
import sys

import _common as c

VARIANTS = ("pieval", "naive", "floor")
# The project's targets, evaluated at the largest window run.
TARGET_MEMORY_RATIO = 8.0  # naive / pieval
TARGET_TIME_RATIO = 1.05  # pieval / floor
# Same-perplexity tolerance (relative): fp32 differs only by summation order.
PPL_RTOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
# With --model, the stream is real text rather than random ids: memory and time do not depend on
# the tokens, but a trained model's perplexity on random ids is huge and far from what users
# score, so the printed perplexity would check nothing a reader can recognise. These six books
# are public domain, held out of the training corpus, and 37k SmolLM2 tokens long.
HELDOUT = c.REPO / "models" / "corpus" / "kjv" / "heldout"


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="PATH",
                   help="a Hugging Face checkpoint to measure instead of the random model (fp32 on CPU); "
                        "the stream is then the held-out KJV books in its tokenizer")  # fmt: skip
    p.add_argument("--windows", type=int, nargs="+", help="W values (default 1024 2048 4096 8192; quick: 256 512)")
    p.add_argument("--stride", type=int, help="S (default 256; quick 128)")
    p.add_argument("--tokens", type=int, help="length of the token stream (default: max W + 16 strides; quick: + 4)")
    p.add_argument("--windows-each", type=int, metavar="N",
                   help="instead of one stream for all W: each W its own stream of (W-1) + (N-1) x S tokens, "
                        "which it scores in exactly N windows (a few windows of a large model at every W)")  # fmt: skip
    p.add_argument("--head-chunk", type=int, help="pieval's output-head rows per chunk (default: pieval's own)")
    c.add_shape_args(p)
    args = p.parse_args()
    # --quick hands one worker the whole list: one interpreter start instead of twelve
    if c.serve_worker(args, worker):
        return 0

    windows = args.windows or ([256, 512] if args.quick else [1024, 2048, 4096, 8192])
    args.stride = args.stride or (128 if args.quick else 256)
    if args.windows_each is not None and args.windows_each < 1:
        p.error(f"--windows-each {args.windows_each}: pass a number of windows >= 1")
    if args.windows_each is not None and args.tokens is not None:
        p.error(f"--windows-each {args.windows_each} sets each stream's length: drop --tokens {args.tokens}")
    tokens = {w: stream_length(args, w, windows) for w in windows}
    dtype = c.resolve_dtype(args.dtype, args.device)
    given = {f: getattr(args, f) for f in vars(c.Shape()) if hasattr(args, f)}
    if args.model and given:
        p.error(f"--{next(iter(given)).replace('_', '-')} sets the random model's shape; --model {args.model} has its own")
    shape = c.Shape(**given)
    shape = dataclasses.replace(shape, max_positions=max(max(windows), shape.max_positions))
    if args.model:
        c.checkpoint_dir(args.model)
        text_stream(args.model, max(tokens.values()))  # too little text: say so before any worker starts
    c.check_device(args.device)
    print(c.machine(args.device))
    if args.windows_each is None:
        stream = f"stream {tokens[windows[0]]} tokens"
    else:
        stream = f"each W its own stream of (W-1) + {args.windows_each - 1} strides ({', '.join(map(str, tokens.values()))} tokens)"
    print(f"model: {describe(args.model, shape)}, {dtype}; {stream}, stride {args.stride}")

    specs = {
        (variant, w): {"variant": variant, "window": w, "stride": args.stride, "tokens": tokens[w], "seed": args.seed,
                       "device": args.device, "dtype": dtype, "shape": vars(shape), "model": args.model,
                       "head_chunk": args.head_chunk}
        for w in windows for variant in VARIANTS
    }  # fmt: skip
    if args.quick:
        # A check that the script runs and its variants agree, in seconds: every measurement in one
        # worker (the high-water mark is reset before each) and its times taken under the same
        # allocator setting, so the ratios are indicative only.
        measured = c.run_worker(__file__, list(specs.values()), live_memory=True)["results"]
        results = dict(zip(specs, measured))
        for (variant, w), r in results.items():
            print(f"  W={w:5d} {variant:6s} {r['windows']} windows  peak {r['peak_mb']:8.1f} MiB  {r['seconds']:7.2f} s  ppl {r['ppl']:.6g}", flush=True)
        print("quick: one worker for all runs; ratios are indicative only (run without --quick to measure)")
    else:
        results = measure(specs, args.device)
    print(f"memory: {results['pieval', windows[0]]['memory_method']}, above the loaded model "
          f"({results['pieval', windows[0]]['model_mb']:.0f} MiB of weights)")
    return summarize(results, windows, dtype)


def measure(specs: dict, device: str) -> dict:
    """Each (variant, W) in fresh workers: one for its peak memory, on the CPU another for its time."""
    results: dict[tuple[str, int], dict] = {}
    for (variant, w), spec in specs.items():
        r = results[variant, w] = c.run_worker(__file__, spec, live_memory=True)
        if device == "cpu":
            # time in a second fresh worker: the allocator setting that makes the CPU peak
            # exact slows allocation-heavy code (see _common.LIVE_MEMORY_ENV); it does not
            # touch GPU memory, so on CUDA the memory worker's time is the time
            timed = c.run_worker(__file__, spec)
            if timed["ppl"] != r["ppl"]:
                raise RuntimeError(f"{variant} at W={w}: ppl {timed['ppl']} in the timed run, {r['ppl']} in the memory run")
            r["seconds"] = timed["seconds"]
        print(f"  W={w:5d} {variant:6s} {r['windows']} windows  peak {r['peak_mb']:8.1f} MiB  {r['seconds']:7.2f} s  ppl {r['ppl']:.6g}", flush=True)
    return results


def stream_length(args, window: int, windows: list[int]) -> int:
    if args.windows_each is not None:
        return window - 1 + (args.windows_each - 1) * args.stride
    return args.tokens or max(windows) + (4 if args.quick else 16) * args.stride


def describe(model: str | None, shape: c.Shape) -> str:
    if model is None:
        return (f"random LLaMA, vocab {shape.vocab}, {shape.layers} layers, hidden {shape.hidden}, "
                f"intermediate {shape.intermediate}, {shape.heads} heads")  # fmt: skip
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    return (f"checkpoint {model} ({cfg.model_type}, vocab {cfg.vocab_size}, {cfg.num_hidden_layers} layers, "
            f"hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, trained window "
            f"{cfg.max_position_embeddings}); text: the held-out KJV books in its tokenizer")  # fmt: skip


def summarize(results: dict, windows: list[int], dtype: str) -> int:
    rows = []
    worst_ppl = 0.0
    for w in windows:
        m = {v: results[v, w]["peak_mb"] for v in VARIANTS}
        t = {v: results[v, w]["seconds"] for v in VARIANTS}
        ppl = {v: results[v, w]["ppl"] for v in VARIANTS}
        diff = max(abs(ppl["naive"] - ppl["pieval"]), abs(ppl["floor"] - ppl["pieval"])) / ppl["pieval"]
        worst_ppl = max(worst_ppl, diff)
        rows.append([w, results["pieval", w]["windows"], m["naive"], m["pieval"], m["floor"], c.ratio(m["naive"], m["pieval"]),
                     c.ratio(m["pieval"], m["floor"]), t["naive"], t["pieval"], t["floor"], c.ratio(t["naive"], t["pieval"]),
                     c.ratio(t["pieval"], t["floor"]), ppl["pieval"], f"{diff:.1e}"])  # fmt: skip
    print()
    print(c.table(
        ["W", "windows", "naive MiB", "pieval MiB", "floor MiB", "mem naive/pieval", "mem pieval/floor",
         "naive s", "pieval s", "floor s", "time naive/pieval", "time pieval/floor", "ppl", "ppl rel diff"],
        rows,
    ))  # fmt: skip
    print()

    top = windows[-1]
    mem_ratio = c.ratio(results["naive", top]["peak_mb"], results["pieval", top]["peak_mb"])
    time_ratio = c.ratio(results["pieval", top]["seconds"], results["floor", top]["seconds"])
    print(f"RATIO memory naive/pieval at W={top}: {mem_ratio:.2f}x "
          f"(target >= {TARGET_MEMORY_RATIO:g}x at W=8192: {c.verdict(mem_ratio >= TARGET_MEMORY_RATIO)})")
    print(f"RATIO time pieval/floor at W={top}: {time_ratio:.3f} "
          f"(target <= {TARGET_TIME_RATIO}: {c.verdict(time_ratio <= TARGET_TIME_RATIO)})")
    print(f"RATIO time naive/pieval at W={top}: "
          f"{results['naive', top]['seconds'] / results['pieval', top]['seconds']:.2f}x")
    vocab = results["pieval", top]["vocab"]
    if len(windows) >= 2:
        for v in VARIANTS:
            slope, worst = linear_fit(windows, [results[v, w]["peak_mb"] for w in windows])
            kib = slope * 1024
            print(f"LINEAR memory {v}: {kib:.1f} KiB per window token (W x vocab fp32 would be "
                  f"{4 * vocab / 1024:.0f} KiB), worst deviation from a line {worst:.1%}")
    rtol = PPL_RTOL[dtype]
    ok = worst_ppl <= rtol
    print(f"SAME-PPL pieval vs naive vs floor: max relative difference {worst_ppl:.2e} (tolerance {rtol:g}): "
          f"{'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def linear_fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope, and the largest |residual| relative to the value."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    worst = max(abs(y - (my + slope * (x - mx))) / abs(y) for x, y in zip(xs, ys))
    return slope, worst


# --------------------------------------------------------------------------- worker


def worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from pieval.perplexity import HEAD_CHUNK_TOKENS, plan_windows, score_documents

    device, window, stride = spec["device"], spec["window"], spec["stride"]
    if spec["model"]:
        model = c.load_checkpoint(spec["model"], device, spec["dtype"])
        bos, doc = text_stream(spec["model"], spec["tokens"])
    else:
        model = c.random_model(c.Shape(**spec["shape"]), spec["seed"], device, spec["dtype"])
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        bos = 1
        doc = torch.randint(3, model.config.vocab_size, (spec["tokens"],), generator=gen).tolist()
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    spans = plan_windows(len(doc), window, stride)
    chunk = spec["head_chunk"] or HEAD_CHUNK_TOKENS

    def windows_of(tokens, w, s):
        for span in plan_windows(len(tokens), w, s):
            yield span, torch.tensor([[bos, *tokens[span.start : span.end]]], device=device)

    def floor_nll(span, ids) -> float:
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        logits = model.lm_head(hidden[:, -span.scored - 1 : -1]).float()
        return F.cross_entropy(logits.flatten(0, 1), ids[0, -span.scored :], reduction="sum").double().item()

    def run(tokens, w, s) -> tuple[float, int]:
        """(summed NLL, scored tokens) of the variant; the floor reports (0, 0)."""
        if spec["variant"] == "pieval":
            (stats,) = score_documents(model, [tokens], w, s, bos, head_chunk_tokens=chunk)
            return stats.nll, stats.tokens
        if spec["variant"] == "naive":
            nll, scored = 0.0, 0
            for span, ids in windows_of(tokens, w, s):
                labels = ids.clone()
                labels[:, : -span.scored] = -100  # yarn / HF guide: score only the new tokens
                loss = model(input_ids=ids, labels=labels, use_cache=False).loss  # mean over scored tokens
                nll += loss.double().item() * span.scored
                scored += span.scored
            return nll, scored
        for _, ids in windows_of(tokens, w, s):
            model.model(input_ids=ids, use_cache=False)
        return 0.0, 0

    probe = c.MemoryProbe(device)
    with torch.inference_mode():
        # Warm-up on a few short windows: the first call of each kernel pages in library code,
        # which counts in RSS but is not memory the scoring needs.
        run(doc[:256], 64, 32)
        probe.start()
        with c.Stopwatch(device) as clock:
            nll, scored_total = run(doc, window, stride)
        peak = probe.peak_mb()
        if spec["variant"] == "floor":  # the unmeasured second pass
            nll = math.fsum(floor_nll(span, ids) for span, ids in windows_of(doc, window, stride))
            scored_total = sum(span.scored for span in spans)
    if scored_total != len(doc):
        raise RuntimeError(f"{spec['variant']} scored {scored_total} tokens of a {len(doc)}-token stream")
    return {
        "peak_mb": peak,
        "seconds": clock.seconds,
        "ppl": math.exp(nll / scored_total),
        "windows": len(spans),
        "memory_method": probe.method,
        "model_mb": model_mb,
        "vocab": model.config.vocab_size,
    }


def text_stream(model: str, tokens: int) -> tuple[int, list[int]]:
    """(BOS id, the first ``tokens`` tokens of the held-out books, sorted by name, joined by EOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if tok.bos_token_id is None or tok.eos_token_id is None:
        sys.exit(f"--model {model}: its tokenizer has no BOS or EOS token, which the windows and the stream need")
    stream: list[int] = []
    for book in sorted(HELDOUT.glob("*.txt")):
        if len(stream) >= tokens:
            break
        stream += tok(book.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(stream) < tokens:
        sys.exit(f"a stream of {tokens} tokens: the held-out books in {HELDOUT} are {len(stream)} tokens of this "
                 f"tokenizer; pass --tokens (or W, --windows-each, --stride) for at most {len(stream)}")  # fmt: skip
    return tok.bos_token_id, stream[:tokens]


if __name__ == "__main__":
    sys.exit(main())
