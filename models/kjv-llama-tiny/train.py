"""Train the reference model: a 1M-parameter LLaMA that reads KJV prose and retrieves in context.

One file, top to bottom: recipe -> tokenizer -> synthetic mixture -> training loop -> probes ->
`save_pretrained`. Re-create the committed checkpoint (about 25 minutes on 2 idle CPU cores):

    python models/kjv-llama-tiny/train.py --recipe models/kjv-llama-tiny/recipe.yaml \
        --out models/kjv-llama-tiny

The run is resumable (``state.pt`` every ``save_every`` steps, not committed) and logs one JSON
line per logged step to ``train_log.jsonl``. Every batch is a pure function of (seed, step), so
a resumed run sees the same data as an uninterrupted one.

The mixture (none of it uses the passkey prompt's wording):
- ``random_repeat``: a random-token segment repeated; induction heads form fastest on this.
- ``alphabet_repeat``: the same over a small alphabet (often digits), where copying needs
  more than the last token.
- ``passage_repeat``: a prose passage, a gap, the same passage again.
- ``fact_recall``: facts ("The code for the red gate is 4821.") scattered in prose or in
  repetitive filler, then a question whose answer is the number stated earlier.
- ``restated_recall``: facts stated twice ("... is 4821. ... 4821 is the code ..."), then asked.
- ``open_recall``: facts about keys of 1-3 random KJV words ("The gather vine is 4821."), asked
  as "What is the gather vine? The gather vine is", so recall must match any preceding words.
- ``prose``: plain KJV windows.

Two more tasks exist for the fine-tuning mix only (make_finetune_mix.py --mix; no pre-training
stage uses them): ``multi_recall`` (4-8 open_recall facts, every one asked) and ``far_repeat``
(short digit strings copied again at the end of the window).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in LLaMA


@dataclass
class Stage:
    until: int  # last step (exclusive) of this stage
    window: int  # training sequence length (BOS included)
    batch_size: int
    mix: dict[str, float]
    repeat_max: float = 0.5  # longest random_repeat segment, as a fraction of the window
    # Rotary position scales s -> weight, one drawn per step: the step runs at positions m / s,
    # what PI with factor s feeds the model, so interpolated positions are not foreign to it.
    position_scales: dict[float, float] | None = None


@dataclass
class Recipe:
    seed: int = 1234
    threads: int = 2
    corpus: str = "models/corpus/kjv/train.jsonl.gz"
    init_from: str | None = None  # a model folder (repo-relative) whose weights and tokenizer the run continues
    vocab_size: int = 2048
    window: int = 256
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    rope_theta: float = 10000.0
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_schedule_steps: int | None = None  # cosine horizon (default: all steps); min_lr after it
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Curriculum: induction heads form in time ~quadratic in the context length, so the
    # copying tasks start on short windows and grow to L before the full mixture.
    stages: list[Stage] = field(default_factory=list)
    log_every: int = 10
    probe_every: int = 100
    save_every: int = 50

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        data = yaml.safe_load(Path(path).read_text())
        if "extends" in data:  # a trial: another recipe (repo-relative) with the keys given here replaced
            data = yaml.safe_load((REPO / data.pop("extends")).read_text()) | data
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown recipe keys {sorted(unknown)} in {path}")
        data["stages"] = [Stage(**st) for st in data.get("stages", [])]
        return cls(**data)

    @property
    def steps(self) -> int:
        return self.stages[-1].until

    def stage(self, step: int) -> Stage:
        return next(st for st in self.stages if step < st.until)


# ---------------------------------------------------------------- corpus and tokenizer


def load_books(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(books: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE, digits one per token (as LLaMA's sentencepiece does), BOS prepended."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The synthetic vocabulary is part of the tokenizer's training text so it gets whole tokens.
    tok.train_from_iterator(books + [" ".join(ADJECTIVES + NOUNS + NAMES + FILLER_WORDS)] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=10**9
    )


# ---------------------------------------------------------------- synthetic mixture

ADJECTIVES = "red green blue white black golden silver old new small great hidden".split()
NOUNS = "gate door box lamp ring chest tower bridge garden ship road well".split()
NAMES = "Anna Boris Clara David Elena Felix Greta Hugo Irene Jonas Karla Lukas".split()
FILLER_WORDS = "river wide hills high road long night dark wind cold stone grey field open".split()
FACT_TEMPLATES = [
    (" The code for the {a} {n} is {v}.", " What is the code for the {a} {n}? The code for the {a} {n} is {v}."),
    (" {p} keeps the number {v}. {v} is kept by {p}.", " Which number does {p} keep? {p} keeps the number {v}."),
    (" Note well: the {a} {n} is marked {v}.", " How is the {a} {n} marked? The {a} {n} is marked {v}."),
]
# Facts stated twice, the second time with the number first ("{v} is the code ..."), so that
# the word after "is" in the context is more often "the" than the number: recall has to use
# the longer prefix of the question, not the last word.
RESTATED_TEMPLATES = [
    (" The code for the {a} {n} is {v}. Keep it safe. {v} is the code for the {a} {n}.",
     " What is the code for the {a} {n}? The code for the {a} {n} is {v}."),
    (" The number of {p} is {v}. Do not lose it. {v} is the number of {p}.",
     " What is the number of {p}? The number of {p} is {v}."),
]


# Facts about arbitrary things: the key is 1-3 random KJV words, so recall cannot lean on a
# closed set of names and must match whatever words precede "is" in the question.
OPEN_TEMPLATES = [
    (" The {k} is {v}. Keep it safe. {v} is the {k}.", " What is the {k}? The {k} is {v}."),
    (" Mark this well: the {k} is {v}. {v} is the {k}.", " Now tell me the {k}. The {k} is {v}."),
    (" The {k} is {v}.", " What is the {k}? The {k} is {v}."),
    (" Write down the {k}: {v}. The {k} is {v}.", " Which is the {k}? The {k} is {v}."),
]


class Mixture:
    """Samples of ``n`` content tokens (BOS goes first), each a pure function of its rng."""

    def __init__(self, books: list[list[int]], tok: PreTrainedTokenizerFast):
        self.books = books
        self.weights = [len(b) for b in self.books]
        self.tok = tok
        self.vocab = tok.vocab_size

    def enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def prose_span(self, rng: random.Random, length: int) -> list[int]:
        book = rng.choices(self.books, self.weights)[0]
        start = rng.randrange(len(book) - length)
        return book[start : start + length]

    def prose(self, rng: random.Random, n: int) -> list[int]:
        return self.prose_span(rng, n)

    def random_repeat(self, rng: random.Random, n: int, repeat_max: float) -> list[int]:
        seg = [rng.randrange(len(SPECIALS), self.vocab) for _ in range(rng.randint(4, max(4, int(n * repeat_max))))]
        out = self.prose_span(rng, rng.randint(0, n // 6))
        while len(out) < n:
            out += seg
        return out[:n]

    def restated_recall(self, rng: random.Random, n: int) -> list[int]:
        return self.fact_recall(rng, n, RESTATED_TEMPLATES)

    def open_recall(self, rng: random.Random, n: int) -> list[int]:
        """One to three facts whose keys are random KJV words, among prose or filler, then a question."""
        return self.place_facts(rng, n, self.open_facts(rng, rng.randint(1, 3)))

    def multi_recall(self, rng: random.Random, n: int) -> list[int]:
        """Four to eight open_recall facts, then every one of them asked, in random order: a
        document of L' tokens carries one answer per fact, at distances spread over the window,
        where open_recall carries one (make_finetune_mix.py; the pre-training recipe never uses it)."""
        return self.place_facts(rng, n, self.open_facts(rng, rng.randint(4, 8)), ask_all=True)

    def open_facts(self, rng: random.Random, count: int) -> list[tuple[list[int], list[int]]]:
        if not hasattr(self, "words"):  # built on first use: earlier stages never pay for it
            text = self.tok.decode([t for b in self.books for t in b])
            self.words = sorted(set(re.findall(r"\b[a-z]{3,}\b", text)))
        facts, keys = [], set()
        for _ in range(count):
            key = " ".join(rng.choice(self.words) for _ in range(rng.randint(1, 3)))
            if key in keys:
                continue
            keys.add(key)
            state, ask = rng.choice(OPEN_TEMPLATES)
            v = str(rng.randint(10 ** (d := rng.randint(2, 6)), 10 ** (d + 1) - 1))
            facts.append((self.enc(state.format(k=key, v=v)), self.enc(ask.format(k=key, v=v))))
        return facts

    def alphabet_repeat(self, rng: random.Random, n: int) -> list[int]:
        """A repeated segment over a small alphabet (often the digits): each token recurs with
        different successors, so copying needs the longer prefix, as a passkey's digits do."""
        if rng.random() < 0.5:
            alphabet = self.enc("0123456789")
        else:
            alphabet = rng.sample(range(len(SPECIALS), self.vocab), rng.randint(8, 64))
        seg = [rng.choice(alphabet) for _ in range(rng.randint(6, n // 2))]
        out = self.prose_span(rng, rng.randint(0, n // 6))
        while len(out) < n:
            out += seg
        return out[:n]

    def far_repeat(self, rng: random.Random, n: int) -> list[int]:
        """Two to four short segments over a small alphabet (often the digits) at random places in
        background text, then all of them again in random order: copying a digit string with
        repeated digits needs the longer prefix (alphabet_repeat) at distances up to the whole
        window, where alphabet_repeat's copies sit at most n/2 back (make_finetune_mix.py only)."""
        digits = self.enc("0123456789")
        segments = []
        for _ in range(rng.randint(2, 4)):
            alphabet = digits if rng.random() < 0.5 else rng.sample(range(len(SPECIALS), self.vocab), rng.randint(8, 64))
            segments.append(self.enc(" ") + [rng.choice(alphabet) for _ in range(rng.randint(5, 16))])
        facts = [(seg, seg) for seg in segments]
        return self.place_facts(rng, n, facts, ask_all=True)

    def passage_repeat(self, rng: random.Random, n: int) -> list[int]:
        passage = self.prose_span(rng, rng.randint(4, n // 3))
        gap = self.prose_span(rng, rng.randint(0, n - 2 * len(passage)))
        out = passage + gap + passage
        return (self.prose_span(rng, n - len(out)) + out)[:n]

    def background(self, rng: random.Random, length: int) -> list[int]:
        if rng.random() < 0.5:
            return self.prose_span(rng, length)
        sentences = [
            f" The {rng.choice(FILLER_WORDS)} is {rng.choice(FILLER_WORDS)}." for _ in range(rng.randint(2, 6))
        ]
        block = self.enc("".join(sentences))
        return (block * (length // len(block) + 1))[:length]

    def fact_recall(self, rng: random.Random, n: int, templates=FACT_TEMPLATES) -> list[int]:
        facts, used = [], set()
        for _ in range(rng.randint(1, max(1, min(4, n // 64)))):
            state, ask = rng.choice(templates)
            slots = {"a": rng.choice(ADJECTIVES), "n": rng.choice(NOUNS), "p": rng.choice(NAMES)}
            key = (state, tuple(slots.values()))
            if key in used:
                continue
            used.add(key)
            slots["v"] = str(rng.randint(10 ** (d := rng.randint(2, 6)), 10 ** (d + 1) - 1))
            facts.append((self.enc(state.format(**slots)), self.enc(ask.format(**slots))))
        return self.place_facts(rng, n, facts)

    def place_facts(self, rng: random.Random, n: int, facts: list[tuple[list[int], list[int]]], ask_all: bool = False) -> list[int]:
        """Statements at random places in background text, the question about one of them last
        (about each of them, in random order, with ``ask_all``)."""
        if ask_all:
            query = [t for _, ask in rng.sample(facts, len(facts)) for t in ask]
        else:
            query = rng.choice(facts)[1]
        room = n - len(query) - sum(len(s) for s, _ in facts)
        cuts = sorted(rng.randint(0, room) for _ in facts)
        out, prev = [], 0
        for cut, (stated, _) in zip(cuts, facts):
            out += self.background(rng, cut - prev) + stated
            prev = cut
        out += self.background(rng, room - prev) + query
        return out[-n:]

    def batch(self, rng: random.Random, stage: Stage) -> torch.Tensor:
        kinds = rng.choices(list(stage.mix), list(stage.mix.values()), k=stage.batch_size)
        bos = self.tok.bos_token_id
        n = stage.window - 1
        return torch.tensor(
            [[bos] + (self.random_repeat(rng, n, stage.repeat_max) if kind == "random_repeat" else getattr(self, kind)(rng, n))
             for kind in kinds]
        )


# ---------------------------------------------------------------- probes


@torch.no_grad()
def random_copy_loss(model: LlamaForCausalLM, vocab: int, bos: int) -> float:
    """Loss on the second copy of 40 random tokens: drops to ~0 once induction heads exist."""
    seg = torch.randint(len(SPECIALS), vocab, (8, 40), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([torch.full((8, 1), bos), seg, seg], 1).to(model.device)
    logits = model(input_ids=ids).logits[:, 40:-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 41:].reshape(-1)).item()


@torch.no_grad()
def copy_losses(model: LlamaForCausalLM, heldout: list[list[int]], bos: int) -> tuple[float, float]:
    """Mean loss on the first and on the second copy of a 64-token held-out passage."""
    first, second = [], []
    for book in heldout:
        for start in range(0, len(book) - 64, max(64, (len(book) - 64) // 4))[:4]:
            p = book[start : start + 64]
            ids = torch.tensor([[bos] + p + p], device=model.device)
            nll = torch.nn.functional.cross_entropy(
                model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none"
            )
            first.append(nll[:64].mean().item())
            second.append(nll[64:].mean().item())
    return sum(first) / len(first), sum(second) / len(second)


PASSKEY_HEAD = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_FILL = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@torch.no_grad()
def passkey_accuracy(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, window: int, trials: int = 20) -> float:
    """Quick in-training probe with the paper's prompt; tests/test_reference_model.py is the real check."""
    rng, hits = random.Random(0), 0
    for t in range(trials):
        key = rng.randint(10000, 99999)
        before = rng.randint(0, 3)
        for after in range(8, -1, -1):
            text = (
                PASSKEY_HEAD + PASSKEY_FILL * before + f" The pass key is {key}. Remember it. {key} is the pass key."
                + PASSKEY_FILL * after + " What is the pass key? The pass key is"
            )
            ids = tok(text, return_tensors="pt").input_ids.to(model.device)
            if ids.shape[1] <= window - 8:
                break
        out = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=tok.eos_token_id)
        answer = re.search(r"\d+", tok.decode(out[0, ids.shape[1] :]))
        hits += bool(answer and int(answer.group()) == key)
    return hits / trials


# ---------------------------------------------------------------- training


def lr_at(r: Recipe, step: int) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    horizon = r.lr_schedule_steps or r.steps
    progress = min(1.0, (step - r.warmup_steps) / max(1, horizon - r.warmup_steps))
    return r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * progress))


def position_scale(r: Recipe, stage: Stage, step: int) -> float:
    """The step's rotary scale, from its own rng so the batches are those of an unscaled run."""
    if not stage.position_scales:
        return 1.0
    rng = random.Random(f"position-scale:{r.seed}:{step}")
    return float(rng.choices(list(stage.position_scales), list(stage.position_scales.values()))[0])


def build_model(r: Recipe, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=r.hidden_size,
        intermediate_size=r.intermediate_size,
        num_hidden_layers=r.num_layers,
        num_attention_heads=r.num_heads,
        num_key_value_heads=r.num_heads,
        max_position_embeddings=r.window,
        rope_parameters={"rope_type": "default", "rope_theta": r.rope_theta},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def train(r: Recipe, out: Path, max_steps: int | None = None, device: str = "cpu") -> list[dict]:
    """Train (or resume) into ``out``; return the log records written by this call.

    The committed checkpoint was trained on CPU (``device="cpu"``), where the logged losses
    repeat bit for bit on the same CPU (to a float32 ulp on another instruction set); other
    devices are for trying recipe variants quickly.
    """
    torch.set_num_threads(r.threads)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(r.seed)
    torch.manual_seed(r.seed)
    books = load_books(REPO / r.corpus)
    tok_dir = out / "tokenizer_build"
    init = REPO / r.init_from if r.init_from else None
    if (out / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(out)
    elif init is not None:
        tok = PreTrainedTokenizerFast.from_pretrained(init)
    elif tok_dir.exists():
        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tok = train_tokenizer(books, r.vocab_size)
        tok.save_pretrained(tok_dir)
    encoded = [tok.encode(b, add_special_tokens=False) for b in books]
    heldout = [
        tok.encode(p.read_text(encoding="utf-8"), add_special_tokens=False)
        for p in sorted((REPO / "models/corpus/kjv/heldout").glob("*.txt"))
    ]
    mixture = Mixture(encoded, tok)
    model = build_model(r, tok)
    if init is not None:
        model.load_state_dict(LlamaForCausalLM.from_pretrained(init).state_dict())
    model.to(device)
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.clone()  # not saved with the weights: rebuilt from the config on load
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, betas=(0.9, 0.95), weight_decay=r.weight_decay)
    state_path, step = out / "state.pt", 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed at step {step}")
    log_path = out / "train_log.jsonl"
    records = []
    stop = r.steps if max_steps is None else min(r.steps, step + max_steps)
    t0 = time.time()
    while step < stop:
        model.train()
        stage = r.stage(step)
        ids = mixture.batch(random.Random(r.seed * 1_000_003 + step), stage).to(device)
        scale = position_scale(r, stage, step)
        if stage.position_scales:
            rotary.inv_freq.copy_(inv_freq / scale)
        for group in opt.param_groups:
            group["lr"] = lr_at(r, step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rotary.inv_freq.copy_(inv_freq)  # probes and checkpoints see the model's own positions
        step += 1
        if step % r.log_every == 0 or step == 1:
            rec = {"step": step, "window": ids.shape[1], "loss": loss.item(), "lr": lr_at(r, step - 1),
                   "elapsed_s": round(time.time() - t0, 1)}
            if stage.position_scales:
                rec["position_scale"] = scale
            if step % r.probe_every == 0 or step == r.steps:
                model.eval()
                rec["random_copy_loss"] = random_copy_loss(model, mixture.vocab, tok.bos_token_id)
                rec["copy_loss_first"], rec["copy_loss_second"] = copy_losses(model, heldout, tok.bos_token_id)
                rec["passkey_acc"] = passkey_accuracy(model, tok, r.window)
                if stage.position_scales:  # the same probe at the stage's largest scale, as PI feeds it
                    top = max(stage.position_scales)
                    rotary.inv_freq.copy_(inv_freq / top)
                    rec[f"passkey_acc_s{top:g}"] = passkey_accuracy(model, tok, r.window)
                    rotary.inv_freq.copy_(inv_freq)
            records.append(rec)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
        if step % r.save_every == 0 and step < r.steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, state_path)
    if step == r.steps:
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "recipe.resolved.json").write_text(json.dumps(asdict(r), indent=1) + "\n")
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-steps", type=int, help="stop after this many steps of this call (for tests)")
    ap.add_argument("--device", default="cpu", help="cpu (the committed run) or cuda (quick recipe trials)")
    args = ap.parse_args()
    train(Recipe.load(args.recipe), Path(args.out), args.max_steps, args.device)


if __name__ == "__main__":
    main()
