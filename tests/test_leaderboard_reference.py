"""The paper's reference rows, as the leaderboard writes them, against the paper's tables.

The tables are transcribed from Chen et al. 2023 (arXiv 2306.15595 v2) into fixtures/results/PAPER.md,
which is parsed here with its own regexes (independent of paper_reference.yaml); the
comparison is made on the golden CSVs, i.e. on what a user reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from pieval.leaderboard import reference

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "results"
SNAPSHOT = FIXTURES / "PAPER.md"
PAPER = SNAPSHOT.read_text(encoding="utf-8")


def _ref(name: str) -> pd.DataFrame:
    frame = pd.read_csv(FIXTURES / "golden" / name, dtype=str, keep_default_na=False)
    return frame[frame.source == "reference"]


def _section(start: str, end: str) -> str:
    return PAPER[PAPER.index(start) : PAPER.index(end, PAPER.index(start))]


def _value(text: str) -> str:
    return ">1000" if text.strip() == ">10^3" else f"{float(text):.4f}"


def test_pg19_table():
    rows = re.findall(r"^\| (\d+)B (base \(no extension\)|FT to \d+|PI \d+) \|(.*)\|$", _section("PG-19 perplexity", "Proof-pile"), re.M)
    assert len(rows) == 8
    ref = _ref("ppl_pg19.csv")
    assert len(ref) == len(rows)
    for size, what, cells in rows:
        method, _, window = what.replace("FT to", "FT").partition(" ")
        method, window = ("base", "2048") if method == "base" else (method, window)
        row = ref[(ref.model == f"LLaMA-{size}B") & (ref.method == method) & (ref["L'"] == window)]
        assert len(row) == 1, (size, what)
        for w, cell in zip(("2048", "4096", "8192", "16384", "32768"), cells.split("|")):
            assert row.iloc[0][w] == (_value(cell) if cell.strip() else ""), (size, what, w)


def test_proofpile():
    text = _section("Proof-pile perplexity:", "PG-19 perplexity at the target window")
    ref = _ref("ppl_proofpile.csv")
    assert re.search(r"7B base ([\d.]+) @2048", text).group(1) == "2.77"
    base = ref[ref.method == "base"].iloc[0]
    assert base["2048"] == "2.7700" and base["4096"] == ""
    for method, window in (("PI", "32768"), ("FT", "8192")):
        values = re.search(rf"7B {method} {window}: ([\d. /]+)", text).group(1).strip(" .").split(" / ")
        row = ref[(ref.method == method) & (ref["L'"] == window)].iloc[0]
        assert [row[w] for w in ("2048", "4096", "8192", "16384", "32768")[: len(values)]] == [_value(v) for v in values]
    assert len(ref) == 3


def test_ppl_vs_steps():
    text = _section("PG-19 perplexity at the target window vs PI fine-tuning steps", "Passkey k_max")
    steps = re.search(r"steps ([\d, \n]+)\)", text).group(1).replace("\n", " ").split(", ")
    ref = _ref("ppl_vs_steps.csv")
    for window, values in re.findall(r"L'=(\d+): ([\d., \n]+?)(?:;|\.\s)", text):
        values = values.replace("\n", " ").split(", ")
        rows = ref[ref["L'"] == window]
        assert list(rows.steps) == [s.strip() for s in steps] and list(rows.ppl) == [_value(v) for v in values]
        assert set(rows.window) == {window} and set(rows.benchmark) == {"pg19"}
    assert len(ref) == 12


def test_passkey():
    text = _section("Passkey k_max vs fine-tuning steps", "Original-window")
    targets = re.search(r"PI reaches k_max = L' \(([\d, ]+)\) by\s+step (\d+)", text)
    low, high = map(int, re.search(r"direct FT to 8192 stays at (\d+)–(\d+)", text).groups())
    ref = _ref("passkey.csv")
    for window in targets.group(1).split(", "):
        at = ref[(ref.method == "PI") & (ref["L'"] == window) & (ref.steps == targets.group(2)) & (ref.model == "LLaMA-7B")]
        assert list(at.k_max) == [window]
    ft = ref[(ref.method == "FT") & (ref["L'"] == "8192") & (ref.model == "LLaMA-7B")]
    assert all(low <= int(k) <= high for k in ft.k_max) and int(ft[ft.steps == "10000"].k_max.iloc[0]) == high
    assert (ref.length == ref["L'"]).all()


def test_original_window():
    text = _section("Original-window benchmarks (BoolQ", "GovReport ROUGE")
    ref = _ref("original_window.csv")
    found = re.findall(r"7B (base|PI \d+)\s+([\d./]+)", text)
    assert len(found) == len(ref) == 3
    for what, values in found:
        method, window = ("base", "2048") if what == "base" else what.split(" ")
        row = ref[(ref.method == method) & (ref["L'"] == window)].iloc[0]
        assert [row[c] for c in ("boolq", "piqa", "race_m", "race_h", "winogrande")] == [_value(v) for v in values.strip(";").split("/")]


def test_govreport():
    text = _section("GovReport ROUGE-1/2/L:", "## What the paper")
    ours = re.search(r"LLaMA-7B PI 16K ([\d.]+) / ([\d.]+) / ([\d.]+)", text).groups()
    colt5 = re.search(r"CoLT5 XL 16K: ([\d.]+)/([\d.]+)/([\d.]+)", text).groups()
    ref = _ref("govreport.csv")
    for model, values in (("LLaMA-7B", ours), ("CoLT5-XL", colt5)):
        row = ref[ref.model == model].iloc[0]
        assert [row.rouge1, row.rouge2, row.rougeL] == [_value(v) for v in values]
        assert row["L'"] == "16384"


def test_reference_data_ships_inside_the_package():
    """The YAML is read through importlib.resources, i.e. from wherever the package is installed."""
    assert reference.data()["base_window"] == 2048
    assert (Path(reference.__file__).parent / reference.DATA).is_file()
