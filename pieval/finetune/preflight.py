"""Check a fine-tuning run's model, data and evaluation tasks before anything is written.

A run that is refused after it has created its run directory leaves a trace the corrected
command must step over, so every check that can fail on the user's input runs first, and
reads only as much as it needs: the model's config (not its weights), the tokenizer, the
data up to one training sequence of L' tokens, lm-eval's task index. What the checks load
is handed on (`Plan`), so the run does not read it twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pieval import loading, rope
from pieval.documents import Document, DocumentError, HubSource, iter_documents
from pieval.errors import UserError
from pieval.finetune.config import DEFAULT_HUB_DATA, FinetuneConfig
from pieval.finetune.data import DataError
from pieval.finetune.evaluate import check_tasks


@dataclass(frozen=True)
class Plan:
    """What the checks read: the base model's config with the extension written into it, and its tokenizer."""

    source: loading.Source
    hf_config: object
    tokenizer: object
    spec: rope.RopeSpec


def check(config: FinetuneConfig) -> Plan:
    """The run's `Plan`, or the first `UserError` its settings meet (model, then data, then tasks)."""
    plan = check_model(config)
    check_data(config, plan.tokenizer, plan.spec.context_length)
    check_tasks(config.eval_tasks, config.eval_include_path)
    return plan


def check_model(config: FinetuneConfig) -> Plan:
    """Config first (a RoPE model? extended how?), the tokenizer only then: no weights are read."""
    source = loading.Source.of(config.model, config.gguf_file, trust_remote_code=config.trust_remote_code)
    hf_config = loading.load_config(source)
    if config.scaling_factor is None and config.context_length is None and rope.saved_factor(hf_config) == 1.0:
        raise UserError(
            f"--model {config.model} is not extended yet: pass --scaling-factor S or --context-length L' "
            f"(its trained window is L = {rope.base_window(hf_config)})"
        )
    spec = rope.resolve(hf_config, config.scaling_factor, config.context_length, "pi")
    tokenizer = loading.load_tokenizer(source)
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of {config.model} has no EOS token, which separates packed documents")
    valid_before = _validation_error(hf_config) is None
    if config.method == "pi":
        rope.apply(hf_config, spec)
    else:  # direct fine-tuning: positions as trained, the window just gets longer (L stays in the facts)
        hf_config.max_position_embeddings = spec.context_length
    problem = _validation_error(hf_config) if valid_before else None
    if problem:
        raise UserError(
            f"{type(hf_config).__name__} (model_type {hf_config.model_type}) rejects the rope settings a "
            f"--method {config.method} checkpoint is saved with ({problem}), so transformers could neither "
            "save nor load it; nothing was trained. Evaluate the extension without fine-tuning "
            "(lm_eval --model pi_llama ... scaling_factor=S), or fine-tune with --method direct"
        )
    return Plan(source, hf_config, tokenizer, spec)


def _validation_error(hf_config) -> str | None:
    """What transformers' own config validation (run by save_pretrained) says, or None.

    Checked before training, because a rope the family's config class rejects (Phi-3 accepts
    only longrope) would otherwise fail at the first checkpoint, after the steps it took.
    """
    validate = getattr(hf_config, "validate", None)
    if not callable(validate):
        return None
    from huggingface_hub.errors import StrictDataclassError  # what transformers' validators raise

    try:
        validate()
    except (StrictDataclassError, ValueError, TypeError, KeyError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        return lines[-1] if lines else type(e).__name__
    return None


def local_data(config: FinetuneConfig) -> Path | None:
    """``--data`` as a local path, or None for a hub dataset id."""
    data = config.data or DEFAULT_HUB_DATA
    local = Path(data).expanduser()
    is_local = local.exists() or data.startswith(("/", ".", "~")) or local.suffix in (".txt", ".jsonl", ".gz", ".parquet")
    return local if is_local else None


def corpus(config: FinetuneConfig) -> Callable[[], Iterable[Document]]:
    """The documents of ``--task lm``, in file (or hub) order, read afresh on each call."""
    local = local_data(config)
    data = config.data or DEFAULT_HUB_DATA
    hub = HubSource(data, config.data_config, config.data_split, config.data_revision, config.text_field)
    return lambda: iter_documents(str(local) if local else None, None if local else hub, config.text_field)


def check_data(config: FinetuneConfig, tokenizer, length: int) -> None:
    """The data exists, has the text field, and holds one training example (for lm: L' tokens)."""
    local = local_data(config) if config.task == "lm" or config.data else None
    if local is not None and not local.exists():
        raise DataError(
            f"--data {config.data} does not exist: pass a .txt, .jsonl or .parquet file (optionally .gz), a "
            "directory of .txt files, or a hub dataset id"
        )
    if config.task == "govreport":
        from pieval.finetune import govreport

        reports = govreport.reports(config.data, config.data_split, config.data_revision)()
        if next(iter(reports), None) is None:
            raise DataError(f"--data {config.data or govreport.SCROLLS} holds no reports; pass a jsonl with document/summary fields")
        return
    tokens = 0
    try:
        for doc in corpus(config)():
            tokens += len(tokenizer(doc.text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
            if tokens >= length:
                return
    except DocumentError as e:
        if f"no {config.text_field!r} field" not in str(e):
            raise
        raise DataError(f"--data {config.data}: {e}; pass --text-field with the field that holds the text") from None
    raise DataError(
        f"--data {config.data or DEFAULT_HUB_DATA} holds only {tokens} tokens (documents joined by EOS); one training sequence needs "
        f"{length} (L'). Use more text or a smaller --context-length/--scaling-factor"
    )
