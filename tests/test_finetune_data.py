"""Training data: packing into exact L' sequences, seeded order, exact resume, GovReport masking."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from pieval.documents import Document
from pieval.finetune.data import (
    IGNORE_INDEX,
    DataError,
    DataPosition,
    PackedSequences,
    collate,
    predicted_tokens,
    shuffled,
)

EOS = 2
L = 64


def encode(text: str) -> list[int]:
    """A toy tokenizer: one token per character, never EOS, so documents are recoverable."""
    return [3 + ord(c) for c in text]


def corpus(n: int = 23, seed: int = 7) -> list[Document]:
    rng = random.Random(seed)
    # lengths from 1 character to several sequences long, all documents distinct
    return [Document(f"d{i}", f"{i:03d}" + "".join(rng.choice("abcdefgh") for _ in range(rng.choice([0, 5, 40, 63, 64, 200])))) for i in range(n)]


def stream(docs, seed=0, buffer=1000, position=None, length=L):
    return PackedSequences(lambda: iter(docs), encode, EOS, length, seed, buffer, position)


def take(s, n):
    return [next(s).input_ids for _ in range(n)]


def split_docs(tokens: list[int]) -> list[str]:
    """The token stream cut at EOS, decoded back to document texts."""
    out, cur = [], []
    for t in tokens:
        if t == EOS:
            out.append("".join(chr(c - 3) for c in cur))
            cur = []
        else:
            cur.append(t)
    return out


def test_sequences_are_exactly_L_tokens_and_documents_are_eos_separated():
    docs = corpus()
    seqs = take(stream(docs), 60)
    assert all(len(s) == L for s in seqs)
    flat = [t for s in seqs for t in s]
    texts = split_docs(flat)
    assert texts[: len(docs)] != [d.text for d in docs]  # shuffled ...
    assert sorted(texts[: len(docs)]) == sorted(d.text for d in docs)  # ... each document once per epoch
    assert sorted(texts[len(docs) : 2 * len(docs)]) == sorted(d.text for d in docs)  # and again in epoch 2


def test_no_token_dropped_or_duplicated_across_an_epoch():
    docs = corpus()
    epoch_tokens = sum(len(encode(d.text)) + 1 for d in docs)
    n = epoch_tokens // L + 3  # spans the epoch boundary
    flat = [t for s in take(stream(docs), n) for t in s]
    # The first epoch is a permutation of (document + EOS) blocks with nothing missing or extra ...
    assert Counter(flat[:epoch_tokens]) == Counter(t for d in docs for t in encode(d.text) + [EOS])
    assert flat[epoch_tokens - 1] == EOS
    # ... and the tokens after it start the second epoch's first document, with no gap.
    second = [t for d in shuffled(docs, 0, 1, 1000) for t in encode(d.text) + [EOS]]
    assert flat[epoch_tokens:] == second[: len(flat) - epoch_tokens]


def test_order_is_a_function_of_the_seed():
    docs = corpus()
    assert take(stream(docs, seed=1), 20) == take(stream(docs, seed=1), 20)
    assert take(stream(docs, seed=1), 20) != take(stream(docs, seed=2), 20)
    in_file_order = [t for d in docs for t in encode(d.text) + [EOS]]
    assert [t for s in take(stream(docs, buffer=1), 10) for t in s] == in_file_order[: 10 * L]


def test_resuming_at_any_position_continues_the_same_stream():
    docs = corpus()
    reference = take(stream(docs, buffer=5), 90)  # two epochs, a small shuffle buffer
    s = stream(docs, buffer=5)
    for k in range(90):
        pos = s.position
        restored = DataPosition.from_dict(pos.to_dict())
        assert take(stream(docs, buffer=5, position=restored), 90 - k) == reference[k:], k
        next(s)


def test_position_is_small_even_inside_a_long_document():
    docs = [Document("long", "x" * 10_000), Document("short", "y")]
    s = stream(docs, buffer=1)
    take(s, 3)
    assert s.position.to_dict() == {"epoch": 0, "docs": 0, "offset": 3 * L}  # not the 9808 tokens left


def test_too_little_data_says_how_much_is_needed():
    with pytest.raises(DataError, match=r"holds only 7 tokens .* needs 64"):
        next(stream([Document("a", "abc"), Document("b", "de")]))
    with pytest.raises(DataError, match="no documents"):
        next(stream([]))


def test_collate_pads_only_when_needed():
    from pieval.finetune.data import Example

    same = collate([Example([1, 5, 6], [1, 5, 6]), Example([1, 7, 8], [1, 7, 8])], pad_id=0)
    assert "attention_mask" not in same  # full-length rows keep SDPA's causal fast path
    ragged = collate([Example([1, 5, 6], [-100, 5, 6]), Example([1, 7], [-100, 7])], pad_id=0)
    assert ragged["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert ragged["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert torch.equal(ragged["input_ids"], torch.tensor([[1, 5, 6], [1, 7, 0]]))
    assert predicted_tokens([Example([1, 5, 6], [-100, 5, 6]), Example([1, 7], [-100, 7])]) == 3


def test_govreport_example_masks_exactly_the_prompt(ref_tokenizer):
    from pieval import govreport
    from pieval.finetune.govreport import example_maker

    tok = ref_tokenizer
    report = "In the beginning God created the heaven and the earth. " * 40
    summary = "God made the world in six days."
    ex = example_maker(tok, 1024)(Document("r", report, {"summary": summary}))
    n_prompt = sum(1 for t in ex.labels if t == IGNORE_INDEX)
    prompt_ids = ex.input_ids[:n_prompt]
    # the masked tokens are the paper's prompt around the (whole, short) report, BOS first ...
    assert prompt_ids == tok(govreport.prompt(report))["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id
    # ... and every token after them (summary + EOS) carries loss
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:-1]) == " " + summary
    assert ex.input_ids[-1] == tok.eos_token_id

    long = example_maker(tok, 512)(Document("r", report * 10, {"summary": summary * 200}))
    assert len(long.input_ids) <= 512  # document and summary cut to fit L'
    assert sum(1 for t in long.labels if t != IGNORE_INDEX) == 256 + 1  # summary cut to half the window, + EOS
    assert "Now summarize the above article.\nSummary:" in tok.decode(
        [t for t, lab in zip(long.input_ids, long.labels) if lab == IGNORE_INDEX]
    )


def test_supervised_examples_resume_across_epochs():
    from pieval.finetune.data import SupervisedExamples, supervised_example

    docs = corpus(5)

    def make(doc):
        return supervised_example(encode(doc.text[:3]), encode(doc.text[3:]), EOS)

    def examples(position=None):
        return SupervisedExamples(lambda: iter(docs), make, 3, 2, position)

    reference = [e.input_ids for e, _ in zip(examples(), range(13))]
    s = examples()
    for k in range(13):
        restored = DataPosition.from_dict(s.position.to_dict())
        assert [e.input_ids for e, _ in zip(examples(restored), range(13 - k))] == reference[k:], k
        next(s)
    # each epoch holds every document once
    assert sorted(map(tuple, reference[:5])) == sorted(tuple(make(d).input_ids) for d in docs)
