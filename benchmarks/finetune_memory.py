"""Fine-tuning at long L': peak memory and tokens/s of one optimizer step, pieval's losses vs Trainer vs the floor.

Four ways to take the same AdamW step (micro-batch 1, one sequence of L' random tokens, the same
random LLaMA-shaped model, activation checkpointing as pieval's ``--gradient-checkpointing auto``
resolves it, for every variant alike):

- pieval: ``pieval.finetune.loss`` ``chunked`` (the default): head + cross-entropy per chunk,
  each chunk's logits recomputed in backward;
- full: the same with ``--loss full`` (all L' x V logits, the path before the chunked loss);
- trainer: a plain ``transformers.Trainer`` (its own loss, ``model(ids, labels=ids)``);
- floor: the decoder over all L' positions, the head and loss over one chunk's positions only:
  what any loss that keeps one chunk in flight must cost at least.

Each (variant, L') runs in a fresh worker that builds the model and optimizer and takes a warm-up
step at 64 tokens (AdamW's states then exist, and library code is paged in), then measures the
peak memory above that state (CPU: the RSS high-water mark with glibc returning freed blocks, see
``_common.LIVE_MEMORY_ENV``) and, on the CPU in a second worker, the step's wall time. Usage:

    python benchmarks/finetune_memory.py              # L' = 2048..16384
    python benchmarks/finetune_memory.py --quick      # L' = 256, 512, tiny model (seconds)
    python benchmarks/finetune_memory.py --device cuda
"""

from __future__ import annotations

import sys

import _common as c

VARIANTS = ("pieval", "full", "trainer", "floor")
TARGET_FLOOR = 1.15  # pieval / floor memory, at every L'
TARGET_TRAINER = 8.0  # trainer / pieval memory, at the largest L'
TARGET_SPEED = 0.95  # pieval / trainer tokens/s


def main() -> int:
    p = c.parser(__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", help="L' values (default 2048 4096 8192 16384; quick: 256 512)")
    p.add_argument("--chunk", type=int, help="pieval's loss chunk (default: pieval's own)")
    c.add_shape_args(p)
    args = p.parse_args()
    if c.serve_worker(args, worker):
        return 0
    from pieval.finetune.config import DEFAULT_CHUNK

    lengths = args.lengths or ([256, 512] if args.quick else [2048, 4096, 8192, 16384])
    chunk = args.chunk or (64 if args.quick else DEFAULT_CHUNK)
    shape = c.shape_from(args, max_positions=max(lengths))
    dtype = c.resolve_dtype(args.dtype, args.device)
    c.check_device(args.device)
    print(c.machine(args.device))
    print(f"model: random LLaMA, vocab {shape.vocab}, {shape.layers} layers, hidden {shape.hidden}, "
          f"intermediate {shape.intermediate}, {shape.heads} heads, {dtype}; micro-batch 1, loss chunk {chunk}")  # fmt: skip
    specs = {
        (v, n): {"variant": v, "length": n, "chunk": chunk, "seed": args.seed, "device": args.device, "dtype": dtype, "shape": vars(shape)}
        for n in lengths for v in VARIANTS
    }  # fmt: skip
    if args.quick:
        results = dict(zip(specs, c.run_worker(__file__, list(specs.values()), live_memory=True)["results"]))
    else:
        results = {}
        for key, spec in specs.items():
            r = results[key] = c.run_worker(__file__, spec, live_memory=True)
            if args.device == "cpu":
                r["seconds"] = c.run_worker(__file__, spec)["seconds"]
            print(f"  L'={key[1]:6d} {key[0]:8s} peak {r['peak_mb']:8.1f} MiB  {r['seconds']:7.2f} s  loss {r['loss']:.6g}", flush=True)
    return summarize(results, lengths, args.quick)


def summarize(results: dict, lengths: list[int], quick: bool) -> int:
    rows = []
    for n in lengths:
        m = {v: results[v, n]["peak_mb"] for v in VARIANTS}
        tps = {v: n / results[v, n]["seconds"] for v in VARIANTS}
        rows.append([n, results["pieval", n]["checkpointing"], m["pieval"], m["full"], m["trainer"], m["floor"],
                     c.ratio(m["pieval"], m["floor"]), c.ratio(m["trainer"], m["pieval"]), tps["pieval"], tps["full"],
                     tps["trainer"], c.ratio(tps["pieval"], tps["trainer"])])  # fmt: skip
    print()
    print(c.table(["L'", "ckpt", "pieval MiB", "full MiB", "trainer MiB", "floor MiB", "pieval/floor", "trainer/pieval",
                   "pieval tok/s", "full tok/s", "trainer tok/s", "speed pieval/trainer"], rows))  # fmt: skip
    print()
    worst_floor = max(r[6] for r in rows)
    top = rows[-1]
    slowest = min(r[11] for r in rows)
    print(f"RATIO memory pieval/floor worst {worst_floor:.3f} (target <= {TARGET_FLOOR}: {c.verdict(worst_floor <= TARGET_FLOOR)})")
    print(f"RATIO memory trainer/pieval at L'={top[0]}: {top[7]:.2f}x (target >= {TARGET_TRAINER:g}x at 16384: {c.verdict(top[7] >= TARGET_TRAINER)})")
    print(f"RATIO tokens/s pieval/trainer worst {slowest:.3f} (target >= {TARGET_SPEED}: {c.verdict(slowest >= TARGET_SPEED)})")
    if len(lengths) >= 2:
        for v in VARIANTS:
            ys = [results[v, n]["peak_mb"] for n in lengths]
            print(f"LINEAR memory {v}: {1024 * (ys[-1] - ys[0]) / (lengths[-1] - lengths[0]):.1f} KiB per token of L'")
    ref = {n: results["full", n]["loss"] for n in lengths}
    worst = max(abs(results[v, n]["loss"] - ref[n]) / ref[n] for n in lengths for v in ("pieval", "trainer"))
    ok = worst <= 1e-5
    print(f"SAME-LOSS pieval vs full vs trainer: max relative difference {worst:.2e}: {'ok' if ok else 'FAILED'}")
    if quick:
        print("quick: one worker for all runs; ratios are indicative only (run without --quick to measure)")
    return 0 if ok else 1


# --------------------------------------------------------------------------- worker


def worker(spec: dict) -> dict:
    import torch

    from pieval.finetune import loss as L
    from pieval.finetune.config import resolve_checkpointing
    from pieval.finetune.recipe import enable_activation_checkpointing

    device, n, chunk = spec["device"], spec["length"], spec["chunk"]
    model = c.random_model(c.Shape(**spec["shape"]), spec["seed"], device, spec["dtype"]).train()
    checkpointing = resolve_checkpointing("auto", n)
    if checkpointing:
        enable_activation_checkpointing(model)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=gen).to(device)
    warm = ids[:, :64]
    batch = lambda x: {"input_ids": x, "labels": x}  # noqa: E731
    probe = c.MemoryProbe(device)
    if spec["variant"] == "trainer":
        value, seconds = _trainer_step(model, [warm, ids], probe, device)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(x) -> float:
            if spec["variant"] == "floor":  # decoder over all positions, head + loss on one chunk only
                hidden = model(input_ids=x, use_cache=False, output_hidden_states=True,
                               logits_to_keep=torch.zeros(0, dtype=torch.long, device=device)).hidden_states[-1]  # fmt: skip
                k = min(chunk, x.shape[1] - 1)
                loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[0, :k]).float(), x[0, 1 : k + 1], reduction="sum")
            else:
                loss = L.summed_nll(model, batch(x), "chunked" if spec["variant"] == "pieval" else "full", chunk)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        step(warm)
        probe.start()
        with c.Stopwatch(device) as clock:
            value = step(ids)
        seconds = clock.seconds
        value = value / (n - 1)  # mean, as Trainer reports
    return {"peak_mb": probe.peak_mb(), "seconds": seconds, "loss": value, "checkpointing": checkpointing, "memory_method": probe.method}


def _trainer_step(model, sequences, probe, device) -> tuple[float, float]:
    """One plain Trainer step on ``sequences[1]`` after a warm-up step on ``sequences[0]``."""
    import tempfile

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                probe.start()
                self.clock = c.Stopwatch(device).__enter__()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                self.clock.__exit__(None, None, None)
                self.peak = probe.peak_mb()

    class Ordered(Trainer):  # warm-up first, then the measured sequence
        def _get_train_sampler(self, *a, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    data = [{"input_ids": s[0].cpu(), "labels": s[0].cpu()} for s in sequences]
    measure = Measure()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=1, max_steps=2, learning_rate=1e-5, logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=device == "cpu", dataloader_num_workers=0,
                                 max_grad_norm=0.0, disable_tqdm=True)  # fmt: skip
        trainer = Ordered(model=model, args=args, train_dataset=data, callbacks=[measure])
        trainer.train()
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    probe_peak = measure.peak
    probe.peak_mb = lambda: probe_peak  # the peak was read at the step's end, before Trainer's clean-up
    return loss, measure.clock.seconds


if __name__ == "__main__":
    sys.exit(main())
