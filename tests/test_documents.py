"""The shared corpus reader: every local format yields the same documents, bad input names the file."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from pieval.documents import DocumentError, HubSource, iter_documents, iter_local

TEXTS = ["In the beginning.", "Second book,\nwith two lines.", "Ünïcödé third."]


def _texts(docs):
    return [d.text for d in docs]


def test_every_local_format_yields_the_same_documents(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    for i, t in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(t, encoding="utf-8")
    (folder / "notes.md").write_text("ignored")
    rows = "".join(json.dumps({"text": t, "title": str(i)}) + "\n" for i, t in enumerate(TEXTS))
    (tmp_path / "d.jsonl").write_text(rows + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(rows)
    pd.DataFrame({"text": TEXTS, "title": ["0", "1", "2"]}).to_parquet(tmp_path / "d.parquet")

    assert _texts(iter_local(folder)) == TEXTS
    for name in ("d.jsonl", "d.jsonl.gz", "d.parquet"):
        docs = list(iter_local(tmp_path / name))
        assert _texts(docs) == TEXTS, name
        assert docs[1].fields == {"title": "1"}
    assert _texts(iter_local(folder / "1.txt")) == [TEXTS[1]]
    assert _texts(iter_documents(folder, HubSource("unused/hub-name"))) == TEXTS


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', r"bad.jsonl:2 is not a JSON object"),
        ("field.jsonl", '{"body": "x"}\n', r"has no 'text' field \(has \['body'\]\)"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), r"not valid UTF-8 .*iconv"),
        ("book.pdf", "x", r"unsupported data file 'book.pdf'"),
    ],
)
def test_bad_input_names_the_file_and_the_fix(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DocumentError, match=message):
        list(iter_local(path))


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(DocumentError, match="does not exist"):
        list(iter_local(tmp_path / "nope"))
    with pytest.raises(DocumentError, match="holds no .txt files"):
        list(iter_local(tmp_path))
    with pytest.raises(DocumentError, match="no data"):
        iter_documents(None, None)
