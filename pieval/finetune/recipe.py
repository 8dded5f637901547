"""The Position Interpolation fine-tuning recipe, top to bottom (Chen et al. 2023, Sec. 3.1).

1. Read the checkpoint's config, write the interpolation into it (``pieval.rope``) and only
   then build the model, so the rotary frequencies are base/s from the first step.
2. Stream documents in a seeded order and pack them into sequences of exactly L' tokens.
3. AdamW (0.9, 0.95), no weight decay, lr 2e-5 after a 20-step linear warm-up from 10%,
   64 sequences per step through gradient accumulation, bf16 on GPUs that have it.
4. Every ``save_every`` steps and at the end, write a plain Hugging Face checkpoint that
   records how it was made (``pieval.facts``), and the state to resume from; optionally
   evaluate it with lm-eval tasks.

`Run` holds a run's state and reads in phases, as torchtune's recipes do: ``setup`` (the
checks of `preflight`, before anything is written; the lock on ``--output``; run directory,
model, optimizer, resume), ``catch_up`` (evaluations a killed run missed), ``train``
(``train_step``, ``save``, ``evaluate``) and ``cleanup`` (``final`` names the last checkpoint
only once the run has finished).

Devices, mixed precision, gradient accumulation and multi-GPU (DDP, FSDP, DeepSpeed through
``accelerate launch``) are accelerate's; this file holds no distribution code of its own.
Each process reads the same global stream of sequences and trains on its own slice of every
global batch, so the data order and the loss normalisation do not depend on the number of
processes.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

import pieval
from pieval import gguf, loading, rope
from pieval.errors import UserError
from pieval.facts import FinetuneFacts
from pieval.finetune import checkpoint as ckpt
from pieval.finetune import preflight
from pieval.finetune.config import DEFAULT_HUB_DATA, FinetuneConfig, resolve_checkpointing, run_identity
from pieval.finetune.data import DataPosition, PackedSequences, SupervisedExamples, collate, predicted_tokens
from pieval.finetune.evaluate import Evaluator, evaluated_steps
from pieval.finetune.loss import DEFAULT_CHUNK, summed_nll
from pieval.locking import OutputLock


# ---------------------------------------------------------------- the optimisation recipe


# Written here rather than taken from transformers.get_cosine_with_min_lr_schedule_with_warmup:
# transformers' warm-ups start from 0, the paper's from 10% of the peak (warmup_start).
def lr_factor(step: int, warmup_steps: int, warmup_start: float, decay_steps: int | None = None, min_ratio: float = 0.1) -> float:
    """Fraction of the peak lr used by optimizer step ``step`` (0-based): linear warm-up, then
    constant, or a cosine from 1 to ``min_ratio`` over ``decay_steps`` and ``min_ratio`` after."""
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    if decay_steps is None:
        return 1.0
    done = min(step - warmup_steps, decay_steps) / decay_steps
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))


def build_optimizer(params, config: FinetuneConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)


def build_scheduler(optimizer, config: FinetuneConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, config.warmup_start, config.decay_steps, config.min_lr_ratio)
    )


# ---------------------------------------------------------------- model and data


def enable_activation_checkpointing(model) -> None:
    """transformers renamed gradient_checkpointing_enable to activation_checkpointing_enable
    during v5 (5.17 has only the old name, 5.24 keeps it as a deprecated alias); use whichever
    this version has, so every transformers 5.x that pyproject allows works."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model(config: FinetuneConfig, plan: preflight.Plan | None = None):
    """(model, tokenizer, rope spec, dtype to save in): the model built with the interpolation in place.

    ``plan`` is what `preflight.check_model` read (it reads it when not given).
    """
    from transformers import AutoModelForCausalLM

    plan = plan or preflight.check_model(config)
    source, hf_config, tokenizer, spec = plan.source, plan.hf_config, plan.tokenizer, plan.spec
    save_dtype = hf_config.dtype if isinstance(hf_config.dtype, torch.dtype) else torch.float32
    kwargs = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    try:
        # fp32 master weights; accelerate's autocast gives the bf16 compute
        model = AutoModelForCausalLM.from_pretrained(
            source.pretrained, config=hf_config, dtype=torch.float32,
            trust_remote_code=source.trust_remote_code, **gguf.load_kwargs(source.gguf_file), **kwargs,
        )  # fmt: skip
    except ValueError as e:
        raise UserError(f"cannot build a causal LM from {config.model!r}: {str(e).splitlines()[0]}") from None
    if config.method == "pi":
        rope.verify(model, spec)
    if resolve_checkpointing(config.gradient_checkpointing, spec.context_length):
        enable_activation_checkpointing(model)
    if config.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=list(config.lora_target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    return model, tokenizer, spec, save_dtype


def finetune_facts(config: FinetuneConfig, spec: rope.RopeSpec, model_config, hash_weights: bool = True) -> FinetuneFacts:
    """What every checkpoint of this run records about how it was made (`pieval.facts`), at step 0.

    ``model_config`` is the built model's config: its ``_commit_hash`` is the base's hub revision.
    """
    source = loading.Source.of(config.model, config.gguf_file)
    data = config.data
    if data is None and config.task == "govreport":
        from pieval.finetune.govreport import SCROLLS as data
    elif data is None:
        data = DEFAULT_HUB_DATA
    return FinetuneFacts(
        method=config.method,
        base_window=spec.base_window,
        factor=spec.factor,
        context_length=spec.context_length,
        steps=0,
        base_model=config.model,
        base_revision=getattr(model_config, "_commit_hash", None),
        base_sha=ckpt.weights_sha(source) if hash_weights else None,
        data=data,
        data_revision=config.data_revision,
        task=config.task,
        seed=config.seed,
        pieval_version=pieval.__version__,
    )


def training_examples(config: FinetuneConfig, tokenizer, length: int, position: DataPosition | None):
    """The run's infinite example stream, resumed at ``position``."""
    if config.task == "govreport":
        from pieval.finetune import govreport

        documents = govreport.reports(config.data, config.data_split, config.data_revision)
        make = govreport.example_maker(tokenizer, length)
        return SupervisedExamples(documents, make, config.seed, config.shuffle_buffer, position)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    documents = preflight.corpus(config)
    return PackedSequences(documents, encode, tokenizer.eos_token_id, length, config.seed, config.shuffle_buffer, position)


# ---------------------------------------------------------------- the run


def finetune(config: FinetuneConfig) -> Path:
    """Run (or resume) the recipe; return the final checkpoint directory."""
    with contextlib.ExitStack() as held:  # the lock on --output, released however the run ends
        run = Run.setup(config, held)
        run.catch_up()
        run.train()
        return run.cleanup()


class Run:
    """One fine-tuning run's state, read in phases: setup, catch_up, train, cleanup.

    Every piece of state the phases share is an attribute here (no closures over
    reassigned variables); ``step`` and ``tokens_seen`` advance in `train_step`.
    """

    # built by setup()
    model: torch.nn.Module  # prepared by accelerate (DDP/FSDP/DeepSpeed wrapper, or the model)
    tokenizer: object
    spec: rope.RopeSpec
    save_dtype: torch.dtype
    facts: FinetuneFacts  # what each saved checkpoint records, at step 0
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    examples: PackedSequences | SupervisedExamples

    def __init__(self, config: FinetuneConfig, accelerator, procs: int) -> None:
        self.config, self.accelerator, self.procs = config, accelerator, procs
        self.output = Path(config.output).expanduser()
        self.per_process = config.global_batch // procs
        self.accum = self.per_process // config.micro_batch  # micro-batches per optimizer step and process
        self.settings = config.to_dict()
        self.bar = None
        self.step, self.tokens_seen, self.last = 0, 0, None
        self.evaluator: Evaluator | None = None

    # ------------------------------------------------------------ setup

    @classmethod
    def setup(cls, config: FinetuneConfig, held: contextlib.ExitStack) -> Run:
        """Checks, lock, run directory, model with the interpolation in place, optimizer, resumed state.

        Everything the user's input can fail on is checked (`preflight`) before the main process
        locks ``--output`` (held in ``held``) and writes into it.
        """
        from accelerate import Accelerator, PartialState
        from accelerate.utils import set_seed

        from pieval import distributed

        # Honour `accelerate launch --cpu`, ACCELERATE_USE_CPU=1, and torchrun on a CPU-only machine: gloo.
        cpu = distributed.use_cpu_group()
        procs = PartialState(cpu=cpu, timeout=timedelta(minutes=config.barrier_timeout_min)).num_processes
        if config.global_batch % (config.micro_batch * procs):
            raise UserError(
                f"global_batch {config.global_batch} is not a multiple of micro_batch {config.micro_batch} x "
                f"{procs} processes; pick --micro-batch so that micro_batch * processes divides it"
            )
        plan = preflight.check(config)
        checkpointing = resolve_checkpointing(config.gradient_checkpointing, plan.spec.context_length)
        accelerator = Accelerator(
            cpu=cpu,
            gradient_accumulation_steps=config.global_batch // (procs * config.micro_batch),
            mixed_precision=_mixed_precision(config.precision),
            log_with=_tracker(config.log_with),
            project_dir=str(Path(config.output).expanduser() / "logs"),
        )
        distributed.refuse_ignored_fsdp(accelerator)
        run = cls(config, accelerator, procs)
        run.settings["resolved"] = {"gradient_checkpointing": checkpointing}
        run.log(f"activation checkpointing {'on' if checkpointing else 'off'} (--gradient-checkpointing {config.gradient_checkpointing}, L'={plan.spec.context_length}); loss {config.loss}")
        if accelerator.is_main_process:
            lock = held.enter_context(OutputLock(run.output, _command(config), option="--output"))
            if lock.took_over is not None:
                _note(lock.took_over.stale_notice(lock.path))
            ckpt.prepare_run_dir(run.output, run_identity(config), run.settings, config.resume, config.overwrite, _note)
        accelerator.wait_for_everyone()
        set_seed(config.seed)
        run._build_model(plan)
        run._build_optimizer()
        run._resume()
        if config.eval_tasks:
            run.evaluator = Evaluator(
                run.output, config.eval_tasks, str(accelerator.device), config.eval_batch_size,
                config.eval_limit, config.eval_metadata, config.eval_include_path, config.eval_log_samples,
            )  # fmt: skip
        return run

    def _build_model(self, plan: preflight.Plan) -> None:
        config = self.config
        self.model, self.tokenizer, self.spec, self.save_dtype = load_model(config, plan)
        # Only the main process writes checkpoints, so only it reads the base weights to hash them.
        self.facts = finetune_facts(config, self.spec, self.model.config, hash_weights=self.accelerator.is_main_process)
        self.log(
            f"{config.method}: {config.model} L={self.spec.base_window} -> L'={self.spec.context_length} "
            f"(s={self.spec.factor:g}), {_count(self.model)} trainable parameters, {self.procs} process(es) x "
            f"{self.accum} micro-batches of {config.micro_batch}"
        )

    def _build_optimizer(self) -> None:
        """FSDP must shard the model before the optimizer sees its parameters; DeepSpeed builds its
        engine from both at once, and cannot infer the micro-batch without a DataLoader."""
        from accelerate.utils import DistributedType

        accelerator, config = self.accelerator, self.config
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.micro_batch
            raw_optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], config)
            self.model, self.optimizer = accelerator.prepare(self.model, raw_optimizer)
        else:
            self.model = accelerator.prepare(self.model)
            raw_optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], config)
            self.optimizer = accelerator.prepare(raw_optimizer)
        # Not prepared: a prepared scheduler steps once per process; this one steps once per optimizer step.
        self.scheduler = build_scheduler(raw_optimizer, config)
        accelerator.register_for_checkpointing(self.scheduler)

    def _resume(self) -> None:
        """Weights, optimizer, schedule, RNG and data position of the newest good checkpoint."""
        state = ckpt.load_newest(self.accelerator, self.output, self.log) if self.config.resume else None
        if state:
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        position = DataPosition.from_dict(state["data_position"]) if state else None
        if self.accelerator.is_main_process:
            ckpt.rewrite_metrics(self.output, ckpt.read_metrics(self.output, self.step))
            ckpt.drop_final_after(self.output, self.step)
        self.examples = training_examples(self.config, self.tokenizer, self.spec.context_length, position)

    # ------------------------------------------------------------ save and evaluate

    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            (self.bar.write if self.bar is not None else print)(msg)

    def eval_due(self, step: int) -> bool:
        every = self.config.eval_every or self.config.save_every
        return self.evaluator is not None and (step == 0 or step % every == 0 or step == self.config.max_steps)

    def save(self, loss: float | None, lr: float | None) -> Path:
        trainer_state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "loss": loss, "lr": lr,
            "data_position": self.examples.position.to_dict(),
        }  # fmt: skip
        path = ckpt.save_checkpoint(
            self.accelerator, self.model, self.tokenizer, self.output, self.step, self.settings, trainer_state,
            self.facts.at_step(self.step), self.save_dtype,
        )  # fmt: skip
        if self.accelerator.is_main_process:
            ckpt.prune_training_state(self.output, self.config.keep_training_state)
        return path

    def evaluate(self, step: int, path: Path) -> None:
        # Every process takes part: with several, lm-eval's HFLM shards the requests over them (data
        # parallel) and gathers the results on the main process, which alone writes them.
        row = self.evaluator.evaluate(path, step, self.tokens_seen)
        if self.accelerator.is_main_process:
            shown = "; ".join(
                f"{t}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()) for t, m in row.get("metrics", {}).items()
            )
            self.log(f"eval step {step}: {shown}")
        self.accelerator.wait_for_everyone()

    def catch_up(self) -> None:
        """Evaluations a killed run saved a checkpoint for but never ran, and step 0 of a new run."""
        if self.evaluator is None:
            return
        done = evaluated_steps(self.output)
        for s, path in ckpt.checkpoints(self.output):
            if s <= self.step and self.eval_due(s) and s not in done:
                self.evaluate(s, path)
        if self.step == 0 and 0 not in evaluated_steps(self.output):
            self.evaluate(0, self.save(None, None))  # the interpolated model before any training (the paper's step 0)

    # ------------------------------------------------------------ train

    def train(self) -> None:
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        if config.log_with:
            accelerator.init_trackers("pieval-finetune", config={k: str(v) for k, v in self.settings.items()})
        show = config.progress and accelerator.is_main_process
        self.bar = tqdm(total=config.max_steps, initial=self.step, disable=not show, unit="step")
        if self.step >= config.max_steps:
            self.log(f"run already at step {self.step} (--max-steps {config.max_steps}): nothing to train")
        while self.step < config.max_steps:
            loss, lr = self.train_step()
            if self.step % config.save_every == 0 or self.step == config.max_steps or self.eval_due(self.step):
                path = self.save(loss, lr)
                if self.eval_due(self.step):
                    self.evaluate(self.step, path)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on the next global batch; log it; return (loss, lr)."""
        config, accelerator = self.config, self.accelerator
        t0 = time.perf_counter()
        batch = [next(self.examples) for _ in range(config.global_batch)]  # the same global batch on every process
        rank = accelerator.process_index
        mine = batch[rank * self.per_process : (rank + 1) * self.per_process]
        # Normalise by the global count of predicted tokens: accelerate divides by `accum`, DDP/FSDP average
        # over processes, so each micro-batch's summed NLL is scaled back up by both.
        scale = self.accum * self.procs / predicted_tokens(batch)
        lr = self.scheduler.get_last_lr()[0]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        micro_batches = [
            collate(mine[i : i + config.micro_batch], pad_id) for i in range(0, self.per_process, config.micro_batch)
        ]
        try:
            nll = optimizer_step(accelerator, self.model, self.optimizer, micro_batches, scale, config.max_grad_norm, config.loss, config.loss_chunk)
        except torch.OutOfMemoryError:
            raise UserError(
                f"out of memory on {accelerator.device} with micro-batches of {config.micro_batch} x "
                f"{self.spec.context_length} tokens: pass --gradient-checkpointing, a smaller --micro-batch (the "
                f"global batch stays {config.global_batch} through accumulation), or --lora"
            ) from None
        self.scheduler.step()
        self.step += 1
        step_tokens = sum(len(e.input_ids) for e in batch)
        self.tokens_seen += step_tokens
        loss = (accelerator.reduce(nll, "sum") / predicted_tokens(batch)).item()
        if not math.isfinite(loss):
            raise UserError(f"the loss is {loss} at step {self.step}: lower --lr or use --precision fp32/bf16 instead of fp16")
        tokens_per_s = round(step_tokens / (time.perf_counter() - t0), 1)
        self.last = {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s}
        if accelerator.is_main_process:
            ckpt.append_metrics(self.output, self.last)
        if config.log_with:
            accelerator.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s}, step=self.step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        return loss, lr

    # ------------------------------------------------------------ cleanup

    def cleanup(self) -> Path:
        """Close the progress bar and trackers; point ``final`` at the last checkpoint and return it.

        Only here, at the end of a run that finished: a failed or killed run leaves ``final``
        as the last finished run left it (or absent).
        """
        self.bar.close()
        if self.config.log_with:
            self.accelerator.end_training()
        final = ckpt.checkpoint_dir(self.output, self.step)
        if self.accelerator.is_main_process:
            ckpt.link_final(self.output, final)
        if self.last is not None:
            self.log(f"done: step {self.step}, loss {self.last['loss']:.4f}, final checkpoint {final}")
        if self.evaluator is not None:
            self.log(f"metrics per step: {self.output / 'eval' / 'table.csv'}")
        return final


def optimizer_step(
    accelerator, model, optimizer, micro_batches: list[dict], scale: float, max_grad_norm: float,
    loss: str = "chunked", loss_chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:  # fmt: skip
    """Accumulate gradients over this process's micro-batches, clip, step; return their summed NLL."""
    model.train()
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for micro in micro_batches:
        micro = {k: v.to(accelerator.device) for k, v in micro.items()}
        with accelerator.accumulate(model):  # gradients are synchronised on the last micro-batch only
            loss_sum = summed_nll(model, micro, loss, loss_chunk)
            accelerator.backward(loss_sum * scale)
        nll += loss_sum.detach().double()
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return nll


def _note(line: str) -> None:
    print(f"pieval finetune: note: {line}", file=sys.stderr)


def _command(config: FinetuneConfig) -> str:
    """How the lock file names this run to a second one refused while it runs."""
    return shlex.join(["pieval", "finetune", "--model", str(config.model), "--output", str(config.output)])


def _mixed_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no"}.get(precision, precision)


def _tracker(log_with: str | None) -> str | None:
    if log_with is None:
        return None
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[log_with]():
        raise UserError(f"--log-with {log_with}: the {log_with} package is not installed; pip install {log_with}")
    return log_with


def _count(model) -> str:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)

