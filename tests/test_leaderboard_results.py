"""pieval's reading of lm-eval's output file names, against lm-eval's own parsers.

`pieval.leaderboard.results` cuts ``results_<date_id>.json`` and ``samples_<task>_<date_id>.jsonl``
itself so that `pieval leaderboard` does not import ``lm_eval.utils`` (requests, jinja2); these
tests run ``lm_eval.utils``' parsers on the same names and require the same answers.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from lm_eval.utils import get_file_datetime, get_file_task_name, get_results_filenames, get_sample_results_filenames

from pieval.leaderboard import results

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "results"
# EvaluationTracker's date id: datetime.now().isoformat() with ":" -> "-" (microseconds when nonzero)
DATE_IDS = ["2026-11-25T10-13-00", datetime(2026, 11, 25, 13, 21, 1, 690190).isoformat().replace(":", "-")]
TASKS = ["passkey", "local_ppl", "govreport_pi", "race"]
FILES = sorted(str(p) for p in FIXTURES.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "name",
    [f"samples_{t}_{d}.jsonl" for t in TASKS for d in DATE_IDS]
    + [Path(f).name for f in get_sample_results_filenames(FILES)],
)
def test_samples_names_read_as_lm_eval_reads_them(name):
    assert results.samples_task(Path(name)) == get_file_task_name(name)
    assert results.date_id(Path(name)) == get_file_datetime(name)


@pytest.mark.parametrize("name", [f"results_{d}.json" for d in DATE_IDS] + [Path(f).name for f in get_results_filenames(FILES)])
def test_results_names_read_as_lm_eval_reads_them(name):
    # lm-eval keeps the ".json" of a results name (it only compares such dates with each other)
    assert results.date_id(Path(name)) == get_file_datetime(name).removesuffix(".json")


def test_every_file_lm_eval_lists_is_read():
    """The results and samples files lm-eval's listing finds are those the leaderboard reads."""
    found = [p for root in FIXTURES.iterdir() if root.is_dir() for p in results._results_paths(root)]
    listed = {Path(f) for f in get_results_filenames(FILES) if f.endswith(".json")}
    assert listed <= set(found)
    samples = {s for p in listed for s in results._samples_beside(p).values()}
    assert samples == {Path(f) for f in get_sample_results_filenames(FILES)}


def test_output_path_json_files_are_read_too():
    """`--output_path out.json` writes out_<date_id>.json, a name lm-eval's results listing skips."""
    name = f"out_{DATE_IDS[1]}.json"
    assert get_results_filenames([f"/x/{name}"]) == []
    assert results._is_json_output_file(Path(name)) and results.date_id(Path(name)) == DATE_IDS[1]
    assert not results._is_json_output_file(Path("tokenizer_config.json"))
