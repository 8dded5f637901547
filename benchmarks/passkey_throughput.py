"""Passkey retrieval: prompts per second with batched generation vs one prompt at a time.

The path users get: prompts from ``pieval.passkey.generate`` (the passkey task's prompt builder),
answered through ``pieval.backend.PILlama.generate_until`` (lm-eval's HFLM generation: greedy,
left-padded batches sorted by length) with ``batch_size=1`` and ``batch_size=B``, with the
generation settings of ``tasks/passkey/passkey.yaml``. Prints prompts/s of both, their ratio,
and whether the two runs gave the same answers (a padded batch runs different kernels, so an
answer may in principle flip where two tokens are nearly tied; every differing answer is listed).

    python benchmarks/passkey_throughput.py            # L' = 1024 (reference model x4), 40 prompts
    python benchmarks/passkey_throughput.py --quick    # 8 prompts
    python benchmarks/passkey_throughput.py --model models/smollm2-135m/hf --scaling-factor 2 --length 1024
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import _common as c


def main() -> int:
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.api.instance import Instance
    from transformers import AutoConfig, AutoTokenizer

    from pieval import passkey, rope
    from pieval.backend import PILlama
    from pieval.task_model import TaskModel

    p = c.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="auto",
                   help="checkpoint dir, 'reference' (models/kjv-llama-tiny), 'random' (its shape, random "
                        "weights) or 'auto' (reference if its weights exist, else random)")  # fmt: skip
    p.add_argument("--scaling-factor", type=float, default=4.0, help="PI factor s: the model's window is L' = s x L")
    p.add_argument("--length", type=int,
                   help="prompt length in tokens (default L'; shorter prompts keep a large model's run short on a CPU)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="B, compared with 1")
    p.add_argument("--num-distances", type=int, help="default 10; quick 4")
    p.add_argument("--trials", type=int, help="prompts per distance (default 4; quick 2)")
    args = p.parse_args()
    c.check_device(args.device)
    dtype = c.resolve_dtype(args.dtype, args.device)
    work = Path(tempfile.mkdtemp(prefix="pieval-bench-"))
    model_dir, described = c.resolve_checkpoint(args.model, work)

    spec = rope.resolve(AutoConfig.from_pretrained(model_dir), scaling_factor=args.scaling_factor)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    length = args.length or spec.context_length
    if not 0 < length <= spec.context_length:
        sys.exit(f"--length {length}: prompts must fit the extended window L' = {spec.context_length} "
                 f"(L = {spec.base_window} x s = {spec.factor:g}); pass 1 <= --length <= {spec.context_length} "
                 f"or a larger --scaling-factor")  # fmt: skip
    task_model = TaskModel(tokenizer, window=spec.context_length, add_special_tokens=True, context_length=spec.context_length)
    rows = passkey.generate(
        task_model,
        [length],
        trials=args.trials or (2 if args.quick else 4),
        num_distances=args.num_distances or (4 if args.quick else 10),
    )
    task_yaml = load_yaml(c.REPO / "tasks/passkey/passkey.yaml", resolve_func=False)  # lm-eval's loader
    gen_kwargs = dict(task_yaml["generation_kwargs"], max_gen_toks=rows[0]["max_gen_toks"])
    requests = [
        Instance(request_type="generate_until", doc=row, arguments=(row["prompt"], dict(gen_kwargs)), idx=0) for row in rows
    ]
    print(c.machine(args.device))
    print(f"model: {described}, PI s={spec.factor:g}: L={spec.base_window} -> L'={spec.context_length}, {dtype}; "
          f"{len(rows)} prompts of {min(r['prompt_tokens'] for r in rows)}-{max(r['prompt_tokens'] for r in rows)} "
          f"tokens, {gen_kwargs['max_gen_toks']} new tokens each (greedy)")  # fmt: skip
    print("path: pieval.passkey.generate prompts -> PILlama.generate_until (lm-eval HFLM generation)")

    answers, seconds = {}, {}
    for b in (1, args.batch_size):
        lm = PILlama(pretrained=str(model_dir), scaling_factor=args.scaling_factor, batch_size=b,
                     device=args.device, dtype=dtype)  # fmt: skip
        # warm-up with one full batch: first-call overheads (on a GPU, kernel selection for each new
        # batch shape) are not throughput; warming up with one prompt left them in batch B's time
        lm.generate_until(requests[:b], disable_tqdm=True)
        with c.Stopwatch(args.device) as clock:
            answers[b] = lm.generate_until(requests, disable_tqdm=True)
        seconds[b] = clock.seconds
        del lm
        print(f"  batch {b}: {seconds[b]:.2f} s", flush=True)

    B = args.batch_size
    correct = {b: sum(passkey.first_integer(a) == int(r["key"]) for a, r in zip(answers[b], rows)) for b in answers}
    rows_out = [[b, len(rows), seconds[b], len(rows) / seconds[b], f"{correct[b]}/{len(rows)}"] for b in (1, B)]
    print()
    print(c.table(["batch", "prompts", "seconds", "prompts/s", "passkey correct"], rows_out))
    print()
    print(f"RATIO prompts/s batch {B} / batch 1: {seconds[1] / seconds[B]:.2f}x")
    differ = [i for i, (a, b) in enumerate(zip(answers[1], answers[B])) if a != b]
    for i in differ:
        print(f"  prompt {i} (k={rows[i]['k']}): batch 1 {answers[1][i]!r} vs batch {B} {answers[B][i]!r}")
    print(f"SAME-ANSWERS batch {B} vs batch 1: {len(rows) - len(differ)}/{len(rows)} identical: "
          f"{'ok' if not differ else 'DIFFERENT'}")
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
