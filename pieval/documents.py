"""Documents from local files or a hub dataset, streamed one at a time.

Shared by the evaluation tasks (perplexity, GovReport) and the fine-tuner, so a corpus is
read the same way everywhere. Local formats: a ``.txt`` file (one document), a directory
of ``.txt`` files (one document each, sorted by name), ``.jsonl`` (one document per line),
``.parquet`` (one per row); ``.txt``/``.jsonl`` may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pieval.errors import UserError


class DocumentError(UserError):
    """A corpus that cannot be read as documents; the message names the file and the fix."""


@dataclass(frozen=True)
class Document:
    doc_id: str  # file name, "file:line" or "dataset[index]": stable across runs
    text: str
    fields: dict | None = None  # the other fields of a jsonl/parquet/hub row


@dataclass(frozen=True)
class HubSource:
    """A hub dataset; ``load_dataset(name, config, split=..., revision=..., streaming=True)``."""

    name: str
    config: str | None = None
    split: str = "test"
    revision: str | None = None
    text_field: str = "text"


def _open_text(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8", errors="strict")


def _read_text(path: Path) -> str:
    try:
        with _open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DocumentError(
            f"{path} is not valid UTF-8 (byte {e.start}: {e.reason}); "
            f"re-encode it, e.g. `iconv -f latin1 -t utf-8 {path.name}`"
        ) from None


def _kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def iter_local(path: str | Path, text_field: str = "text") -> Iterator[Document]:
    path = Path(path).expanduser()
    if not path.exists():
        raise DocumentError(f"data path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _kind(p) == ".txt")
        if not files:
            raise DocumentError(f"directory {path} holds no .txt files (one document per file)")
        for p in files:
            yield Document(p.name, _read_text(p))
        return
    kind = _kind(path)
    if kind == ".txt":
        yield Document(path.name, _read_text(path))
    elif kind == ".jsonl":
        try:
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    yield _row(json.loads(line), text_field, f"{path.name}:{lineno}")
        except UnicodeDecodeError as e:
            raise DocumentError(f"{path} is not valid UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise DocumentError(f"{path}:{lineno} is not a JSON object ({e.msg})") from None
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        for batch_no, batch in enumerate(pq.ParquetFile(path).iter_batches(batch_size=256)):
            for i, row in enumerate(batch.to_pylist()):
                yield _row(row, text_field, f"{path.name}[{batch_no * 256 + i}]")
    else:
        raise DocumentError(
            f"unsupported data file {path.name!r}: use a .txt file, a directory of .txt files, "
            f".jsonl (a {text_field!r} field per line) or .parquet"
        )


def _row(row: dict, text_field: str, doc_id: str) -> Document:
    if not isinstance(row, dict) or text_field not in row:
        have = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DocumentError(f"{doc_id} has no {text_field!r} field (has {have})")
    text = row[text_field]
    if not isinstance(text, str):
        raise DocumentError(f"{doc_id}: field {text_field!r} is {type(text).__name__}, not text")
    return Document(doc_id, text, {k: v for k, v in row.items() if k != text_field})


def iter_hub(source: HubSource) -> Iterator[Document]:
    import datasets

    try:
        rows = datasets.load_dataset(
            source.name, source.config, split=source.split, revision=source.revision, streaming=True
        )
        for i, row in enumerate(rows):
            yield _row(row, source.text_field, f"{source.name}[{i}]")
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DocumentError(
            f"cannot load hub dataset {source.name!r} (split {source.split!r}): {type(e).__name__}: {e}. "
            "Offline? Pass local data instead: a .txt file, a directory of .txt files, a .jsonl with a "
            f"{source.text_field!r} field or a .parquet file, e.g. "
            "--metadata '{\"data_path\": \"/path/to/docs\"}' for a task or --data PATH for finetune"
        ) from None


def iter_documents(data_path: str | Path | None, hub: HubSource | None, text_field: str = "text") -> Iterator[Document]:
    """Local data when ``data_path`` is given, otherwise the hub dataset."""
    if data_path:
        return iter_local(data_path, text_field)
    if hub is None:
        raise DocumentError("no data: pass a local data_path or a hub dataset name")
    return iter_hub(hub)
