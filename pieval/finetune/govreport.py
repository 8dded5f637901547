"""GovReport fine-tuning examples: the paper's prompt + the reference summary, loss on the summary.

The paper fine-tunes its 16K model on the GovReport train split before scoring (Sec. 3.4).
Prompt, truncation and data readers are `pieval.govreport`'s (the evaluation task's), so a
model is trained on exactly the prompt it is scored with. The document is cut to its first
15000 tokens and further until prompt + summary + EOS fit in L'; the summary is cut to 1000
tokens, and to half the window on windows too small for that (the document keeps the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pieval import govreport
from pieval.documents import Document
from pieval.finetune.data import Example, supervised_example
from pieval.protocol import GOVREPORT_MAX_DOC_TOKENS, GOVREPORT_MAX_GEN_TOKS
from pieval.task_model import TaskModel

SCROLLS = govreport.SCROLLS_REPO


def reports(data: str | None, split: str, revision: str | None) -> Callable[[], Iterator[Document]]:
    """Training documents (text = report, fields["summary"] = its first reference summary)."""

    def read() -> Iterator[Document]:
        if data in (None, SCROLLS):
            source = govreport.iter_scrolls(split, revision or "main")
        else:
            source = govreport.iter_local(data)
        for r in source:
            yield Document(r.doc_id, r.document, {"summary": r.summaries[0]})

    return read


def example_maker(tokenizer, length: int) -> Callable[[Document], Example]:
    """Document -> Example whose labels are IGNORE_INDEX exactly on the prompt tokens."""
    max_summary = min(GOVREPORT_MAX_GEN_TOKS, length // 2)

    def make(doc: Document) -> Example:
        summary = tokenizer(" " + doc.fields["summary"].strip(), add_special_tokens=False)["input_ids"][:max_summary]
        # The prompt is encoded as the pi_llama backend encodes a context (BOS included).
        model = TaskModel(tokenizer, window=length, add_special_tokens=True)
        text, _ = govreport.fit(model, doc.text, GOVREPORT_MAX_DOC_TOKENS, max_gen_toks=len(summary) + 1)
        return supervised_example(model.encode(govreport.prompt(text)), summary, tokenizer.eos_token_id)

    return make
