"""What a checkpoint records about how it was made: the ``pieval`` key of its config.json.

`pieval finetune` writes every fact about a checkpoint once, into the checkpoint itself, so
anything that reads it later (`pi_llama`, `pieval info`, the leaderboard through the results
JSON) needs no other file. A saved checkpoint's config.json holds, beside transformers' own
standard rope settings (which plain transformers loads unchanged)::

    "pieval": {
        "method": "pi",            # "pi" (Position Interpolation) or "direct" (the paper's FT baseline)
        "base_window": 256,        # L, the window the base model was pre-trained on
        "factor": 4.0,             # s = L'/L
        "context_length": 1024,    # L', the window it was fine-tuned at
        "steps": 200,              # optimizer steps taken (0 = extended, not yet trained)
        "base_model": "models/kjv-llama-tiny",  # --model as given (path or hub id)
        "base_revision": null,     # hub commit of the base model, when it came from the hub
        "base_sha": "9f2c...",     # sha256 over the base's local weight files (null for a hub id)
        "data": "models/corpus/kjv/train.jsonl.gz",  # --data as given (null = the default)
        "data_revision": null,     # hub dataset revision, when pinned
        "task": "lm",              # lm (packed documents) or govreport (prompt + summary)
        "seed": 0,
        "pieval_version": "0.1.0"
    }

L lives here rather than in ``rope_parameters.original_max_position_embeddings``: transformers
(5.24) accepts that key only for yarn/llama3/longrope and warns about it for ``linear`` and
``default`` rope, which is what PI and direct checkpoints run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

CONFIG_KEY = "pieval"
METHODS = ("pi", "direct")  # how the window was extended while fine-tuning


@dataclass(frozen=True)
class FinetuneFacts:
    method: str
    base_window: int
    factor: float
    context_length: int
    steps: int
    base_model: str
    base_revision: str | None
    base_sha: str | None
    data: str | None
    data_revision: str | None
    task: str
    seed: int
    pieval_version: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def at_step(self, steps: int) -> FinetuneFacts:
        return dataclasses.replace(self, steps=steps)


def recorded(config) -> dict:
    """The facts a checkpoint's config records (``{}`` for a checkpoint pieval did not make).

    ``config`` is a transformers config or the torch-free view `pieval.loading.read_config` gives;
    both keep config.json's unknown keys as attributes.
    """
    facts = getattr(config, CONFIG_KEY, None)
    return dict(facts) if isinstance(facts, dict) else {}
