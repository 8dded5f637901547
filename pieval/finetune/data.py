"""Training examples streamed from a corpus in a seeded order, with a position that resumes exactly.

Two kinds of example:
- ``lm`` (the paper's PI fine-tuning): documents tokenized, each followed by EOS, concatenated
  and cut into sequences of exactly L' tokens. Nothing is dropped: the tokens left after the
  last full sequence of an epoch start the first sequence of the next.
- ``govreport``: one example per report, prompt + reference summary + EOS, loss on the summary.

Order: a buffer shuffle seeded by (seed, epoch), the streaming shuffle of `datasets`, so a
corpus larger than memory is still read once, front to back, per epoch. The position
(epoch, documents consumed, tokens carried over) is saved with every checkpoint; resuming
re-reads the skipped documents' text without tokenizing them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from pieval.documents import Document
from pieval.errors import UserError

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers) skips


class DataError(UserError):
    """A corpus that cannot feed the recipe (too little text, no documents)."""


@dataclass(frozen=True)
class DataPosition:
    """Where the next example starts: document ``docs`` (0-based, shuffled order) of ``epoch``, token ``offset``."""

    epoch: int = 0
    docs: int = 0
    offset: int = 0  # tokens of that document (EOS included) already in earlier sequences

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "docs": self.docs, "offset": self.offset}

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        return cls(int(d["epoch"]), int(d["docs"]), int(d.get("offset", 0)))


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken; otherwise equal to input_ids


def shuffled(docs: Iterable[Document], seed: int, epoch: int, buffer_size: int) -> Iterator[Document]:
    """A buffer shuffle: each incoming document replaces a random slot, whose old occupant is emitted."""
    rng = random.Random(f"pieval-finetune:{seed}:{epoch}")
    buf: list[Document] = []
    for doc in docs:
        if len(buf) < buffer_size:
            buf.append(doc)
            continue
        i = rng.randrange(buffer_size)
        yield buf[i]
        buf[i] = doc
    rng.shuffle(buf)
    yield from buf


class _Epochs:
    """Documents forever, epoch after epoch, each epoch in its own seeded order."""

    def __init__(self, documents: Callable[[], Iterable[Document]], seed: int, buffer_size: int, position: DataPosition):
        self.documents, self.seed, self.buffer_size = documents, seed, buffer_size
        self.epoch, self.docs = position.epoch, position.docs

    def __iter__(self) -> Iterator[Document]:
        skip = self.docs
        while True:
            seen = 0
            for doc in shuffled(self.documents(), self.seed, self.epoch, self.buffer_size):
                seen += 1
                if seen <= skip:
                    continue
                self.docs = seen
                yield doc
            if seen == 0:
                raise DataError("the training data holds no documents; check --data (and --text-field)")
            self.epoch, self.docs, skip = self.epoch + 1, 0, 0


class PackedSequences:
    """Sequences of exactly ``length`` tokens: documents joined by EOS, cut without dropping a token."""

    def __init__(
        self,
        documents: Callable[[], Iterable[Document]],
        encode: Callable[[str], list[int]],
        eos_id: int,
        length: int,
        seed: int,
        shuffle_buffer: int,
        position: DataPosition | None = None,
    ):
        position = position or DataPosition()
        self.encode, self.eos_id, self.length = encode, eos_id, length
        self._epochs = _Epochs(documents, seed, shuffle_buffer, position)
        self._skip = position.offset  # tokens of the first document already trained on
        self._buf: list[int] = []
        self._start = 0  # first token of _buf not yet in a sequence
        self._docs: list[tuple[int, int, int]] = []  # (index in _buf, epoch, doc number) of buffered documents
        self._initial, self._first = position, None  # _first: (epoch, doc) of the first document read
        self._iter = self._sequences()

    @property
    def position(self) -> DataPosition:
        """Resume point after the last sequence returned (document + offset: a few bytes, not the tokens)."""
        if self._first is None:
            return self._initial
        if self._start >= len(self._buf):
            return DataPosition(self._epochs.epoch, self._epochs.docs, 0)
        at, epoch, doc = max(d for d in self._docs if d[0] <= self._start)
        return DataPosition(epoch, doc, self._start - at + (self._skip if (epoch, doc) == self._first else 0))

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        return next(self._iter)

    def _sequences(self) -> Iterator[Example]:
        fresh_epoch, epoch_tokens = self._epochs.docs == 0 and self._skip == 0, 0
        epoch = self._epochs.epoch
        for doc in self._epochs:
            if self._epochs.epoch != epoch:
                if fresh_epoch and epoch_tokens < self.length:
                    raise DataError(
                        f"the training data holds only {epoch_tokens} tokens (documents joined by EOS); one training "
                        f"sequence needs {self.length} (L'). Use more text or a smaller --context-length/--scaling-factor"
                    )
                fresh_epoch, epoch_tokens, epoch = True, 0, self._epochs.epoch
            tokens = self.encode(doc.text) + [self.eos_id]
            epoch_tokens += len(tokens)
            if self._first is None:  # the document a resumed run is part-way through
                self._first = (self._epochs.epoch, self._epochs.docs - 1)
                tokens = tokens[self._skip :]
            self._docs.append((len(self._buf), self._epochs.epoch, self._epochs.docs - 1))
            self._buf.extend(tokens)
            yield from self._cut()

    def _cut(self) -> Iterator[Example]:
        while len(self._buf) - self._start >= self.length:
            seq = self._buf[self._start : self._start + self.length]
            self._start += self.length
            if self._start > len(self._buf) // 2:  # compact, so a long document costs linear time
                self._compact()
            yield Example(seq, seq)

    def _compact(self) -> None:
        keep = max(i for i, d in enumerate(self._docs) if d[0] <= self._start)
        shift = self._docs[keep][0]
        del self._buf[:shift]
        self._start -= shift
        self._docs = [(at - shift, epoch, doc) for at, epoch, doc in self._docs[keep:]]


def supervised_example(prompt_ids: list[int], target_ids: list[int], eos_id: int) -> Example:
    """Prompt + target + EOS, with the loss on the target and EOS only."""
    ids = list(prompt_ids) + list(target_ids) + [eos_id]
    return Example(ids, [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :])


class SupervisedExamples:
    """One example per document, built by ``make`` (e.g. the GovReport prompt + summary)."""

    def __init__(
        self,
        documents: Callable[[], Iterable[Document]],
        make: Callable[[Document], Example],
        seed: int,
        shuffle_buffer: int,
        position: DataPosition | None = None,
    ):
        self._epochs = _Epochs(documents, seed, shuffle_buffer, position or DataPosition())
        self._iter = map(make, self._epochs)

    @property
    def position(self) -> DataPosition:
        return DataPosition(self._epochs.epoch, self._epochs.docs)

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        return next(self._iter)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; no attention mask when all are full length (keeps SDPA's causal fast path)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels}
    if not bool(mask.all()):
        batch["attention_mask"] = mask
    return batch


def predicted_tokens(examples: list[Example]) -> int:
    """Tokens that carry loss: labels after the shift (the first token is never predicted)."""
    return sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples)
