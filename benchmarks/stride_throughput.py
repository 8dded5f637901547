"""Sliding-window perplexity throughput: tokens scored per second over strides and batch sizes.

Scores one token stream of N tokens at one window W with ``pieval.perplexity.score_documents``
(what ``pi_llama`` runs) for strides S in {256, 512, W/2} and several batch sizes, and prints
beside each measurement the cost model: about N/S windows, each one forward pass of W tokens,
so time ~ windows x t(W), where t(W) is the bare forward pass of one window measured in the same
run. Tokens scored per second therefore grow ~linearly with S; batching equal-length windows
changes the work per window only by how well the device uses a larger batch.

The model leaves out the output head, which every scored token goes through once whatever S is
(N x hidden x vocabulary multiply-adds). With a narrow benchmark model and vocabulary 32000 that
term is not small, so a second column adds it: + N x t(head), t(head) being the measured time per
token of pieval's chunked head and cross-entropy.

    python benchmarks/stride_throughput.py            # W = 2048, N = 16384
    python benchmarks/stride_throughput.py --quick    # W = 1024, N = 4096
"""

from __future__ import annotations

import math
import statistics
import sys

import _common as c

PPL_RTOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def main() -> int:
    import torch

    from pieval.perplexity import count_windows, score_documents

    p = c.parser(__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, help="W (default 2048; quick 1024)")
    p.add_argument("--strides", type=int, nargs="+", help="default 256 512 W/2")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 2 4; quick 1 2")
    p.add_argument("--tokens", type=int, help="N, the stream length (default 8 W; quick 4 W)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    window = args.window or (1024 if args.quick else 2048)
    strides = sorted(set(args.strides or [256, 512, window // 2]))
    strides = [s for s in strides if s <= window - 1] or sys.exit(f"no stride <= W-1 = {window - 1} in {args.strides}")
    batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 2, 4])
    n = args.tokens or (4 if args.quick else 8) * window
    dtype = c.resolve_dtype(args.dtype, args.device)
    c.check_device(args.device)
    shape = c.Shape(max_positions=window)
    model = c.random_model(shape, args.seed, args.device, dtype)
    doc = torch.randint(3, shape.vocab, (n,), generator=torch.Generator().manual_seed(args.seed + 1)).tolist()
    bos = 1
    print(c.machine(args.device))
    print(f"model: random LLaMA, vocab {shape.vocab}, {shape.layers} layers, hidden {shape.hidden}, {dtype}; "
          f"W={window}, stream N={n} tokens")  # fmt: skip

    # The cost model's unit: one bare forward pass of a full window (median of 3, after a warm-up).
    ids = torch.tensor([[bos, *doc[: window - 1]]], device=args.device)
    times = []
    with torch.inference_mode():
        for i in range(4):
            with c.Stopwatch(args.device) as clock:
                model.model(input_ids=ids, use_cache=False)
            if i:
                times.append(clock.seconds)
    t_window = statistics.median(times)
    t_head = head_seconds_per_token(model, ids, args.device)
    print(f"t(W): bare forward of one {window}-token window = {t_window * 1e3:.1f} ms; "
          f"t(head): output head + NLL = {t_head * 1e6:.1f} us per scored token")

    rows, ppl_by_stride, worst = [], {}, 0.0
    for stride in strides:
        windows = count_windows(n, window, stride)
        model_s = windows * t_window
        head_s = model_s + n * t_head
        for b in batch_sizes:
            with torch.inference_mode(), c.Stopwatch(args.device) as clock:
                (stats,) = score_documents(model, [doc], window, stride, bos, batch_size=b)
            ppl = math.exp(stats.nll / stats.tokens)
            reference = ppl_by_stride.setdefault(stride, ppl)  # batching must not change the number
            worst = max(worst, abs(ppl - reference) / reference)
            rows.append([stride, b, f"{n / stride:.1f}", windows, model_s, head_s, clock.seconds,
                         clock.seconds / model_s, clock.seconds / head_s, stats.tokens / clock.seconds,
                         n / model_s, n / head_s, f"{ppl:.6g}"])  # fmt: skip
            print(f"  S={stride:5d} batch {b}: {clock.seconds:.2f} s", flush=True)
    print()
    print(c.table(["S", "batch", "N/S", "windows", "model s", "model+head s", "measured s", "measured/model",
                   "measured/(model+head)", "tokens/s", "model tokens/s", "model+head tokens/s", "ppl"], rows))  # fmt: skip
    print()

    def ratio_with_head(s0: int, s1: int) -> float:
        cost = lambda s: count_windows(n, window, s) * t_window + n * t_head  # noqa: E731
        return cost(s0) / cost(s1)

    speed = {(r[0], r[1]): r[9] for r in rows}
    b1 = batch_sizes[0]
    for stride in strides[1:]:
        print(f"RATIO tokens/s S={stride} / S={strides[0]} (batch {b1}): {speed[stride, b1] / speed[strides[0], b1]:.2f}x "
              f"(cost model {stride / strides[0]:.2f}x from N/S, "
              f"{count_windows(n, window, strides[0]) / count_windows(n, window, stride):.2f}x from exact window counts, "
              f"{ratio_with_head(strides[0], stride):.2f}x with the head term)")
    for b in batch_sizes[1:]:
        print(f"RATIO tokens/s batch {b} / batch {b1} (S={strides[0]}): {speed[strides[0], b] / speed[strides[0], b1]:.2f}x "
              f"(cost model 1.00x: same windows)")
    rtol = PPL_RTOL[dtype]
    ok = worst <= rtol
    print(f"SAME-PPL across batch sizes: max relative difference {worst:.2e} (tolerance {rtol:g}): {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def head_seconds_per_token(model, ids, device: str) -> float:
    """Time per scored token of pieval's output head + NLL (``tail_nll`` minus the forward pass)."""
    import torch

    from pieval.perplexity import HEAD_CHUNK_TOKENS, tail_nll

    scored = ids.shape[1] - 1
    with torch.inference_mode():
        tail_nll(model, ids, scored, HEAD_CHUNK_TOKENS)  # warm-up
        full, bare = [], []
        for _ in range(3):
            with c.Stopwatch(device) as clock:
                tail_nll(model, ids, scored, HEAD_CHUNK_TOKENS)
            full.append(clock.seconds)
            with c.Stopwatch(device) as clock:
                model.model(input_ids=ids, use_cache=False)
            bare.append(clock.seconds)
    return max(0.0, statistics.median(full) - statistics.median(bare)) / scored


if __name__ == "__main__":
    sys.exit(main())
