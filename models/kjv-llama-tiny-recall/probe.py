"""Quick trial measurements of a checkpoint under PI, before any fine-tuning (the recipe's levers).

Passkey with the paper's prompt at a length L' under PI (rotary frequencies / s, the same as
`pieval`'s linear rope), and held-out perplexity on disjoint windows, at the model's own
positions and under PI. Cheap on purpose (a few keys per distance); `make demo` is the real check:

    python models/kjv-llama-tiny-recall/probe.py models/kjv-llama-tiny-recall --scale 4
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]


def _train_module():
    """The reference model's train.py (its passkey wording: one copy for the trials and its probes),
    loaded the way its fine-tune-mix script loads it."""
    sys.path.insert(0, str(REPO / "models/kjv-llama-tiny"))
    from make_finetune_mix import load_train_module

    return load_train_module()


_TRAIN = _train_module()
HEAD, FILL = _TRAIN.PASSKEY_HEAD, _TRAIN.PASSKEY_FILL


def prompt(tok, key: int, length: int, distance: int) -> list[int]:
    """Filler before and after the key so the prompt has about ``length`` tokens, key ``distance`` back."""
    fill = tok(FILL, add_special_tokens=False).input_ids
    key_ids = tok(f" The pass key is {key}. Remember it. {key} is the pass key.", add_special_tokens=False).input_ids
    question = tok(" What is the pass key? The pass key is", add_special_tokens=False).input_ids
    head = tok(HEAD).input_ids
    after = max(0, distance - len(key_ids) - len(question))
    before = max(0, length - len(head) - len(key_ids) - after - len(question))
    body = (fill * (before // len(fill) + 1))[:before] + key_ids + (fill * (after // len(fill) + 1))[:after]
    return head + body + question


@torch.no_grad()
def passkey(model, tok, length: int, distances: int, trials: int) -> dict[int, float]:
    rng, out = random.Random(f"probe:{length}"), {}
    for i in range(1, distances + 1):
        k, hits = round(length * i / distances) - 16, 0
        for _ in range(trials):
            key = rng.randint(10000, 99999)
            ids = torch.tensor([prompt(tok, key, length - 10, max(k, 40))])
            gen = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=tok.eos_token_id)
            m = re.search(r"\d+", tok.decode(gen[0, ids.shape[1]:]))
            hits += bool(m and int(m.group()) == key)
        out[k] = hits / trials
    return out


@torch.no_grad()
def heldout_ppl(model, tok, window: int, max_tokens: int = 4096) -> float:
    nll, n = 0.0, 0
    for p in sorted((REPO / "models/corpus/kjv/heldout").glob("*.txt")):
        ids = tok(p.read_text(encoding="utf-8"), add_special_tokens=False).input_ids[:max_tokens]
        for s in range(0, len(ids) - 1, window - 1):
            chunk = torch.tensor([[tok.bos_token_id] + ids[s : s + window - 1]])
            loss = model(input_ids=chunk, labels=chunk).loss.item()
            nll += loss * (chunk.shape[1] - 1)
            n += chunk.shape[1] - 1
    return float(torch.tensor(nll / n).exp())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--distances", type=int, default=8)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    L = model.config.max_position_embeddings
    rotary = model.model.rotary_emb
    own = rotary.inv_freq.clone()
    rec = {"model": args.model, "ppl_W=L": heldout_ppl(model, tok, L)}
    rotary.inv_freq.copy_(own / args.scale)
    rec["pi_ppl_W=L"] = heldout_ppl(model, tok, L)
    rec["pi_ppl_W=L'"] = heldout_ppl(model, tok, int(L * args.scale))
    for length in (L, int(L * args.scale)):
        acc = passkey(model, tok, length, args.distances, args.trials)
        rec[f"pi_passkey_{length}"] = acc
        rec[f"pi_passkey_{length}_mean"] = sum(acc.values()) / len(acc)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
