"""Passkey retrieval (Mohtashami & Jaggi 2023) and the effective context window k_max (PI, Sec. 3.3).

A prompt of total length L' hides a random 5-digit key at a distance of k tokens from the end of
the input; the model must repeat it. Lengths and distances are counted in the evaluated model's
own tokens, exactly as the harness will encode the prompt (BOS included). The prompt occupies
``L' - max_gen_toks`` tokens so that prompt plus answer fit in a window of L' and HFLM never
left-truncates it.

Distance ``k`` is the number of prompt tokens from the key's first token to the end of the
prompt (a key whose first token is the prompt's last token has k = 1). The grid of distances is
``k_i = i * L' / n`` for i = 1..n, uniform over (0, L']; the ends of that grid cannot be met
exactly (the question follows the key, the task description precedes it), so each prompt puts
the key as close to ``k_i`` as the fixed text allows and logs the distance it really got.
``k_max`` is reported in those real distances: the grid point's distance is the smallest
distance its prompts really had (``achieved_distances``), so k_max never claims a distance no
prompt had. Grid points past the farthest reachable distance all land on it (at L' = 1024 with
32 points, the last three on 945 tokens): they are one distance tested with all their keys, so
k_max pools them rather than letting the first of them decide alone while the others' misses at
the same distance go unread. ``k_tested`` is that distance for the last grid point, the farthest the run tested:
a model that answers at every distance gets k_max = k_tested, a little under L' (the question and
the answer's room follow the key).
"""

from __future__ import annotations

import bisect
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from lm_eval.api.metrics import mean

from pieval import task_settings
from pieval.errors import UserError
from pieval.passkey_math import achieved_distances, k_max, success_rates
from pieval.protocol import (
    PASSKEY_KEY_DIGITS,
    PASSKEY_NUM_DISTANCES,
    PASSKEY_SEED,
    PASSKEY_TRIALS,
)
from pieval.task_model import GeneratedPromptTask, TaskModel, check_generation_budget, log

# The prompt of Mohtashami & Jaggi (2023), reused verbatim by the PI paper; lines joined by "\n"
# as in their reference code.
TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
# Ends the paper's prompt. Under a chat template it opens the assistant's turn instead (lm-eval's
# gen_prefix): inside the user's message a small instruct model often answers "The pass key is a
# magical key..." (SmolLM2-135M-Instruct, --apply_chat_template, length 1024, 8 distances x 2 keys:
# 7 of 16 right that way, 15 of 16 with the prefilled turn).
ANSWER_PREFIX = "The pass key is"

DEFAULT_SEED = PASSKEY_SEED
DEFAULT_GEN_TOKS = 10  # room left for the answer: " 12345" is 6 tokens with digit-split tokenizers

_FILLER_WORDS = FILLER.split(" ")
_MAX_FIT_STEPS = 8  # tokenization is near-additive at word boundaries; fits converge in 1-3 steps


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    key: int
    target_tokens: int  # the prompt length asked for (L' - max_gen_toks)
    tokens: int  # its real length in the model's tokens
    distance: int  # the grid distance asked for
    distance_tokens: int  # the key's real distance from the end, in tokens


def filler(words: int) -> str:
    """The first ``words`` words of the filler repeated without end (the paper repeats it X times)."""
    n = len(_FILLER_WORDS)
    return " ".join(_FILLER_WORDS[i % n] for i in range(words))


def render(key: int, prefix_words: int, suffix_words: int, answer_turn: bool = False) -> tuple[str, int]:
    """The prompt and the character offset of the key in it; ``answer_turn`` leaves ANSWER_PREFIX out."""
    question = QUESTION if answer_turn else f"{QUESTION} {ANSWER_PREFIX}"
    head = "\n".join(p for p in (TASK_DESCRIPTION, filler(prefix_words)) if p) + "\n"
    tail = "\n".join(p for p in (KEY_LINE.format(key=key), filler(suffix_words), question) if p)
    return head + tail, len(head) + tail.index(str(key))


class PromptBuilder:
    """Fits the filler before and after the key so a prompt has a given length and key distance."""

    def __init__(self, model: TaskModel, answer_turn: bool = False):
        self._model = model
        self._answer_turn = answer_turn
        self._cum = [0]  # tokens needed for the first w filler words, when tokenized alone
        self._starts: dict[tuple[int, int], tuple[int, int]] = {}  # warm starts per (length, distance)

    def measure(self, key: int, prefix_words: int, suffix_words: int) -> tuple[str, int, int]:
        """(text, length in tokens, distance of the key's first token from the end)."""
        text, key_char = render(key, prefix_words, suffix_words, self._answer_turn)
        ids, offsets = self._model.encode(text, offsets=True)
        first = next(i for i, (_, end) in enumerate(offsets) if end > key_char)
        return text, len(ids), len(ids) - first

    def build(self, key: int, target_tokens: int, distance: int, room: int = 0) -> PasskeyPrompt:
        """A prompt of ``target_tokens`` tokens; ``room`` (the answer's tokens) only names the minimum length."""
        _, n0, k0 = self.measure(key, 0, 0)
        head = n0 - k0  # tokens before the key when there is no filler in front of it
        if n0 > target_tokens:
            least = n0 + room
            raise UserError(
                f"passkey length {target_tokens + room} cannot hold the prompt: its fixed text is {n0} "
                f"tokens of this tokenizer with no filler, plus {room} for the answer; pass lengths >= "
                f"{least}, e.g. --metadata '{{\"lengths\": [{1 << (least - 1).bit_length()}]}}'"
            )
        want_k = min(max(distance, k0), target_tokens - head)
        a, b = self._starts.get((target_tokens, distance), (0, 0))
        text, n, k = self.measure(key, a, b)
        for _ in range(_MAX_FIT_STEPS):
            b_new = self._words_for(self._cum_at(b) + want_k - k)
            a_new = self._words_for(self._cum_at(a) + (target_tokens - n) - (want_k - k))
            if (a_new, b_new) == (a, b):
                break
            a, b = a_new, b_new
            text, n, k = self.measure(key, a, b)
        # The word grid cannot always hit the length exactly: never exceed it (HFLM would cut the
        # task description off the front), give up filler before the key first.
        while n > target_tokens:
            a, b = (a - 1, b) if a > 0 else (a, b - 1)
            text, n, k = self.measure(key, a, b)
        self._starts[(target_tokens, distance)] = (a, b)
        return PasskeyPrompt(text, key, target_tokens, n, distance, k)

    def _cum_at(self, words: int) -> int:
        self._extend(words)
        return self._cum[words]

    def _words_for(self, tokens: int) -> int:
        """The most filler words whose tokens do not exceed ``tokens`` (0 if none fit)."""
        if tokens <= 0:
            return 0
        while self._cum[-1] <= tokens:
            self._extend(2 * len(self._cum) + 64)
        return bisect.bisect_right(self._cum, tokens) - 1

    def _extend(self, words: int) -> None:
        if words < len(self._cum):
            return
        text = filler(words)
        enc = self._model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = [s for s, _ in enc["offset_mapping"]]
        ends, pos = [], 0
        for w in range(words):
            pos += len(_FILLER_WORDS[w % len(_FILLER_WORDS)]) + (1 if w else 0)
            ends.append(pos)
        self._cum = [0] + [bisect.bisect_left(starts, e) for e in ends]


def distances(length: int, num_distances: int = PASSKEY_NUM_DISTANCES) -> list[int]:
    """The grid k_i = i * L' / n, i = 1..n, uniform over (0, L'] (rounded to whole tokens)."""
    if num_distances < 1:
        raise UserError(f"passkey num_distances must be >= 1 (got {num_distances})")
    grid = [round(length * i / num_distances) for i in range(1, num_distances + 1)]
    if len(set(grid)) < len(grid) or grid[0] < 1:
        raise UserError(
            f"passkey length {length} is too short for {num_distances} distinct distances: "
            f"use a length >= {num_distances} or fewer num_distances"
        )
    return grid


def random_key(rng: random.Random) -> int:
    return rng.randint(10 ** (PASSKEY_KEY_DIGITS - 1), 10**PASSKEY_KEY_DIGITS - 1)


def generate(
    model: TaskModel,
    lengths: Iterable[int],
    trials: int = PASSKEY_TRIALS,
    num_distances: int = PASSKEY_NUM_DISTANCES,
    seed: int = DEFAULT_SEED,
    max_gen_toks: int = DEFAULT_GEN_TOKS,
    answer_turn: bool = False,
) -> list[dict[str, Any]]:
    """One row per prompt: length x distance x trial, keys drawn from ``Random(f"{seed}:{length}")``.

    Seeding per length makes a length's prompts the same whatever other lengths are requested.
    With ``answer_turn`` (a chat template) the prompt stops at the question and the row's
    ``answer_prefix`` holds the words that open the model's turn.
    """
    if trials < 1:
        raise UserError(f"passkey trials must be >= 1 (got {trials})")
    builder = PromptBuilder(model, answer_turn)
    rows = []
    for length in lengths:
        if model.window is not None and length > model.window:
            raise UserError(
                f"passkey length {length} exceeds the model's window {model.window}: the harness "
                f"would left-truncate the prompt. Use lengths <= {model.window}, or pass "
                f"--model_args ...,max_length={length} to evaluate beyond the window on purpose"
            )
        if max_gen_toks >= length:
            raise UserError(f"passkey max_gen_toks {max_gen_toks} leaves no room for a prompt of length {length}")
        rng = random.Random(f"{seed}:{length}")
        for k in distances(length, num_distances):
            for trial in range(trials):
                p = builder.build(random_key(rng), length - max_gen_toks, k, max_gen_toks)
                rows.append(
                    {
                        "prompt": p.text,
                        "answer_prefix": ANSWER_PREFIX if answer_turn else "",
                        "key": str(p.key),
                        "length": length,
                        "k": k,
                        "k_tokens": p.distance_tokens,
                        "prompt_tokens": p.tokens,
                        "max_gen_toks": max_gen_toks,
                        "trial": trial,
                    }
                )
    return rows


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, Any]:
    """Per prompt: ``acc_<L>`` (0/1) and the ``k_max_<L>``/``k_tested_<L>`` item, which also logs the answer."""
    answer = first_integer(results[0])
    correct = answer == int(doc["key"])
    length = doc["length"]
    item = {"k": doc["k"], "k_tokens": doc["k_tokens"], "answer": answer, "correct": correct}
    return {f"acc_{length}": float(correct), f"k_max_{length}": item, f"k_tested_{length}": item}


def aggregate_k_max(items: list[Mapping[str, Any]]) -> int:
    """k_max in real token distances, grid points that reach the same one pooled (0 when the nearest fails)."""
    reached = achieved_distances((item["k"], item["k_tokens"]) for item in items)
    return k_max(success_rates((reached[item["k"]], item["correct"]) for item in items))


def aggregate_k_tested(items: list[Mapping[str, Any]]) -> int:
    """The real distance of the farthest grid point: the largest k_max the run could report."""
    reached = achieved_distances((item["k"], item["k_tokens"]) for item in items)
    return reached[max(reached)]


# ---------------------------------------------------------------- lm-eval glue (tasks/passkey/)


@task_settings.register("passkey")
@dataclass(frozen=True)
class PasskeySettings:
    """The passkey task's metadata keys (``--metadata``); the model's come from ``task_model``."""

    lengths: tuple[int, ...] | None = None  # prompt lengths L'; None: the model's L', else max_length
    trials: int = PASSKEY_TRIALS
    num_distances: int = PASSKEY_NUM_DISTANCES
    seed: int = DEFAULT_SEED
    max_gen_toks: int = DEFAULT_GEN_TOKS  # tokens left free for the answer; the task generates that many

    WRITES = ("prompts",)  # the grid and the distances reached, for the results' configs

    def __post_init__(self) -> None:
        problems = [task_settings.positive_int(k, getattr(self, k)) for k in ("trials", "num_distances", "max_gen_toks")]
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            problems.append(f"seed must be an integer (got {self.seed!r})")
        if self.lengths is not None:
            lengths = self.lengths if isinstance(self.lengths, (list, tuple)) else (self.lengths,)
            if not lengths:
                problems.append("lengths is empty: give at least one length, e.g. [8192]")
            bad = [p for v in lengths if (p := task_settings.positive_int("lengths", v))]
            problems += bad[:1]
            if not bad:
                object.__setattr__(self, "lengths", tuple(dict.fromkeys(lengths)))  # repeats run once
        task_settings.raise_problems("passkey", problems)


def build_dataset(render=None, chat: bool = False, **metadata: Any):
    """The prompts for ``metadata`` (task metadata merged with model_args), as sent after ``render``."""
    import datasets

    from pieval import task_model

    settings = task_settings.from_metadata(PasskeySettings, metadata, "passkey")
    if settings.lengths is None and metadata.get("max_seq_lengths") is not None:
        # lm-eval's ruler tasks call the same thing max_seq_lengths (and lm-eval suggests it)
        settings = replace(settings, lengths=metadata["max_seq_lengths"])
        log.info("passkey: lengths %s from max_seq_lengths (ruler's key; passkey's own is lengths)", list(settings.lengths))
    model = task_model.from_metadata(metadata, "passkey", render)
    if settings.lengths is not None:
        lengths = list(settings.lengths)
    elif (default := model.context_length or model.window) is not None:
        lengths = [default]
    else:
        raise UserError(
            "passkey cannot tell the model's window: pass --metadata '{\"lengths\": [L]}' "
            "or --model_args ...,max_length=L"
        )
    rows = generate(
        model,
        lengths,
        trials=settings.trials,
        num_distances=settings.num_distances,
        seed=settings.seed,
        max_gen_toks=settings.max_gen_toks,
        answer_turn=chat,
    )
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def grid_summary(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per length: the grid of distances asked for, the real distances and prompt lengths (for the results)."""
    by_length: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_length[row["length"]].append(row)
    out = {}
    for length, items in sorted(by_length.items()):
        reached = achieved_distances((r["k"], r["k_tokens"]) for r in items)
        tokens = [r["prompt_tokens"] for r in items]
        out[str(length)] = {
            "grid": list(reached),
            "achieved": list(reached.values()),  # the smallest real distance of each grid point's prompts
            "prompts": len(items),
            "prompt_tokens": [min(tokens), max(tokens)],
            "max_gen_toks": items[0]["max_gen_toks"],
        }
    return out


class PasskeyTask(GeneratedPromptTask):
    """The ``passkey`` task: a ConfigurableTask whose metrics are named after the lengths run.

    lm-eval's ``metric_list`` is fixed before the prompts exist, and ``k_max`` needs its own
    aggregation over all prompts of a length, so the task names its metrics in ``aggregation()``.
    The grid and the distances really reached are written into the task's metadata, which lands in
    the results file's ``configs``.
    """

    TEXT_FIELD = "prompt"
    build_dataset = staticmethod(build_dataset)

    def _marker_doc(self, marker: str, chat: bool) -> dict:
        return {**super()._marker_doc(marker, chat), "answer_prefix": ANSWER_PREFIX if chat else ""}

    def _build(self, render=None, chat: bool = False):
        dataset = super()._build(render, chat)
        summary = grid_summary(dataset["test"])
        self.config.metadata["prompts"] = summary
        for length, s in summary.items():
            log.info(
                "passkey: %d prompts at length %s (%d distances from %d to %d tokens; prompts of %d-%d tokens "
                "+ %d generated)", s["prompts"], length, len(s["grid"]), s["achieved"][0], s["achieved"][-1],
                *s["prompt_tokens"], s["max_gen_toks"],
            )  # fmt: skip
        return dataset

    def __init__(self, config: dict | None = None):
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        # metrics are named after the lengths, known once the prompts exist: see aggregation()
        super().__init__(config=config | {"metric_list": []})
        # The prompts were sized for this many answer tokens: generate exactly that many.
        self.config.generation_kwargs["max_gen_toks"] = self.dataset["test"][0]["max_gen_toks"]
        self._lengths = sorted(set(self.dataset["test"]["length"]))

    def aggregation(self) -> dict:
        """``acc_<L>``, ``k_max_<L>``, ``k_tested_<L>`` for each length run (process_results scores)."""
        metrics = {}
        for length in self._lengths:
            metrics |= {f"acc_{length}": mean, f"k_max_{length}": aggregate_k_max, f"k_tested_{length}": aggregate_k_tested}
        return metrics

    def higher_is_better(self) -> dict:
        return dict.fromkeys(self.aggregation(), True)

    def construct_requests(self, doc, ctx, **kwargs):
        check_generation_budget("passkey", self.config.generation_kwargs, doc["max_gen_toks"])
        return super().construct_requests(doc, ctx, **kwargs)
