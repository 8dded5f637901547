"""`pieval leaderboard` on committed lm-eval 0.4.13 result fixtures (tests/fixtures/results/).

The fixtures were written by lm-eval's own EvaluationTracker (make_fixtures.py); the golden
CSVs by the command in tests/fixtures/results/README.md.
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pieval.cli import main
from pieval.leaderboard import build, claims, provenance, tables
from pieval.leaderboard.results import ResultsError, ResultsFile, load

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "results"
GOOD, BAD, GOLDEN = FIXTURES / "good", FIXTURES / "bad", FIXTURES / "golden"
TABLES = sorted(p.name for p in GOLDEN.glob("*.csv"))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lb") / "leaderboards"
    assert main(["leaderboard", str(GOOD), "--out", str(out)]) == 0
    return out


def test_golden_tables(written):
    assert TABLES == [
        "govreport.csv", "methods.csv", "original_window.csv", "passkey.csv", "ppl_local.csv",
        "ppl_pg19.csv", "ppl_proofpile.csv", "ppl_vs_steps.csv",
    ]
    assert sorted(p.name for p in written.glob("*.csv")) == TABLES
    for name in TABLES:
        assert (written / name).read_bytes() == (GOLDEN / name).read_bytes(), name


def test_rows_hold_the_results_json_values(written):
    """Each measured cell is the value in its results file (token-weighted ppl, acc/ROUGE in %)."""
    ppl = pd.read_csv(written / "ppl_local.csv", dtype=str, keep_default_na=False)
    measured = ppl[ppl.source == "measured"]
    assert list(ppl.columns[:10]) == ["source", "model", "base_model", "method", "L", "L'", "steps", "256", "512", "1024"]
    assert set(provenance.COLUMNS) <= set(ppl.columns)
    for _, row in measured.iterrows():
        data = json.loads((FIXTURES / row.results_file).read_text())
        for w in ("256", "512", "1024"):
            assert float(row[w]) == pytest.approx(data["results"]["local_ppl"][f"token_ppl_{w},none"], abs=5e-5)
        assert row.torch_version == "2.13.0+cpu" and row.lm_eval_version == "0.4.13" and row.stride == "256"
    by_method = {(r.method, r.steps): r for _, r in measured.iterrows()}
    assert set(by_method) == {("base", "0"), ("PI", "0"), ("PI", "100"), ("PI", "200"), ("FT", "200")}
    assert (by_method["FT", "200"].L, by_method["FT", "200"]["L'"]) == ("256", "1024")  # L from the fine-tune record
    assert by_method["PI", "200"].base_model == "models/kjv-llama-tiny"

    ow = pd.read_csv(written / "original_window.csv", dtype=str, keep_default_na=False)
    base = ow[(ow.source == "measured") & (ow.method == "base")].iloc[0]
    assert (base.boolq, base.race_h, base.race_m) == ("62.1400", "30.1200", "")  # lm-eval's race is RACE-high
    assert "boolq=aps/super_glue:boolq" in base.dataset  # per-task provenance kept when tasks differ
    gov = pd.read_csv(written / "govreport.csv", dtype=str, keep_default_na=False)
    assert gov[gov.source == "measured"][["rouge1", "rouge2", "rougeL"]].values.tolist() == [["22.3100", "4.1200", "15.3300"]]


def test_passkey_rows_match_their_samples(written):
    """k_max and k_tested in passkey.csv are those the samples log implies: the grid's k_max, reported
    as the smallest real distance of that grid point's prompts (pieval.passkey's definition)."""
    from pieval import passkey_math
    from pieval.leaderboard import heatmap

    pk = pd.read_csv(written / "passkey.csv", dtype=str, keep_default_na=False)
    for _, row in pk[pk.source == "measured"].iterrows():
        rf = load(FIXTURES / row.results_file, row.results_file)
        samples = [json.loads(line) for line in rf.samples["passkey"].read_text().splitlines()]
        grid_k = passkey_math.k_max(heatmap.heat_map(samples)[int(row.length)])
        docs = [s["doc"] for s in samples if s["doc"]["length"] == int(row.length)]
        expected = min(d["k_tokens"] for d in docs if d["k"] == grid_k) if grid_k else 0
        assert int(row.k_max) == expected
        assert int(row.k_tested) == min(d["k_tokens"] for d in docs if d["k"] == max(d["k"] for d in docs))


def test_rerun_is_byte_identical_whatever_the_input_order(written, tmp_path):
    """Same inputs, same bytes: a second run, and a run given the directories in another order."""
    parts = sorted(p for p in GOOD.iterdir() if p.is_dir())
    again = tmp_path / "again"
    assert main(["leaderboard", *map(str, reversed(parts)), "--out", str(again)]) == 0
    # labels are relative to each given directory's parent, which is GOOD here instead of FIXTURES
    for name in TABLES:
        assert (again / name).read_text().replace(",base/", ",good/base/").replace(",pi/", ",good/pi/").replace(
            ",finetune-", ",good/finetune-"
        ) == (written / name).read_text(), name
    same = tmp_path / "same"
    assert main(["leaderboard", str(GOOD), "--out", str(same)]) == 0
    assert main(["leaderboard", str(GOOD), "--out", str(same)]) == 0
    match, mismatch, errors = filecmp.cmpfiles(written, same, TABLES, shallow=False)
    assert (mismatch, errors) == ([], [])
    assert not [p for p in same.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_reference_rows_are_separate_and_optional(written, tmp_path):
    for name in TABLES:
        frame = pd.read_csv(written / name, dtype=str, keep_default_na=False)
        ref = frame[frame.source == "reference"]
        assert set(frame.source) <= {"measured", "reference"}
        # measured rows first; a reference row has the paper table and no provenance of a run
        assert list(frame.source) == sorted(frame.source, key=["measured", "reference"].index)
        assert (ref.reference.str.startswith("Chen et al. 2023")).all() and (ref.results_file == "").all()
        assert (frame[frame.source == "measured"].reference == "").all()
    out = tmp_path / "noref"
    assert main(["leaderboard", str(GOOD), "--out", str(out), "--no-reference"]) == 0
    assert "ppl_pg19.csv" not in {p.name for p in out.iterdir()}
    assert "reference" not in set(pd.read_csv(out / "passkey.csv").source)


def test_bad_inputs_are_named_and_the_rest_goes_in(tmp_path, capsys):
    out = tmp_path / "lb"
    rc = main(["leaderboard", str(GOOD), *map(str, sorted(BAD.iterdir())), str(tmp_path / "missing"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0
    expected = {
        "bad/empty": "holds no lm-eval results",
        "foreign/results_2026-11-25T09-00-00.json": "is not an lm-eval results file",
        "truncated/results_2026-11-25T10-23-00.json": "is not valid JSON",
        "missing_column/results_2026-11-25T10-23-00.json": "has no token_ppl_512",
        "no_provenance/results_2026-11-25T10-13-00.json": "the run used --model hf, not pi_llama",
        "missing": "does not exist",
    }
    lines = [line for line in err.splitlines() if line.startswith("pieval leaderboard: skipped:")]
    assert len(lines) == len(expected), err
    for name, why in expected.items():
        assert any(name in line and why in line for line in lines), (name, err)
    for name in TABLES:  # the good runs are all there, untouched by the bad ones
        assert (out / name).read_bytes() == (GOLDEN / name).read_bytes(), name

    assert main(["leaderboard", str(GOOD), str(BAD / "foreign"), "--out", str(tmp_path / "strict"), "--strict"]) == 1
    assert main(["leaderboard", str(BAD / "foreign"), str(BAD / "empty"), "--out", str(tmp_path / "none")]) == 2
    assert "no measured row could be built" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_original_window_columns_cover_the_protocol_tasks():
    from pieval.protocol import ORIGINAL_WINDOW_TASKS

    assert set(tables.ORIGINAL_WINDOW_TASK_COLUMN) == set(ORIGINAL_WINDOW_TASKS)
    assert set(tables.ORIGINAL_WINDOW_TASK_COLUMN.values()) <= set(tables.ORIGINAL_WINDOW_COLUMNS)


def test_load_rejects_other_tools_files(tmp_path):
    path = tmp_path / "results_x.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ResultsError, match="not an lm-eval results file"):
        load(path, "results_x.json")


def _rf(**pieval_overrides) -> ResultsFile:
    path = next((GOOD / "pi").rglob("results_*.json"))
    data = json.loads(path.read_text())
    data["config"]["pieval"].update(pieval_overrides)
    return ResultsFile(path, "x.json", data)


@pytest.mark.parametrize(
    "overrides, method",
    [
        ({}, "PI"),
        ({"rope_method": "as_saved"}, "PI"),  # an extended checkpoint loaded as saved is still PI
        ({"rope_method": "none"}, "PI"),  # as_saved's old name, in results written before the rename
        ({"rope_method": "yarn", "rope_type": "yarn"}, "yarn"),
        ({"rope_method": "ntk", "rope_type": "dynamic"}, "ntk"),
        ({"rope_method": "as_saved", "rope_type": "default", "factor": 1.0}, "base"),
        ({"rope_method": "as_saved", "rope_type": "default", "factor": 1.0, "finetune": {"steps": 50, "method": "direct"}}, "FT"),
    ],
)
def test_method_labels(overrides, method):
    assert provenance.row_id(_rf(**overrides)).method == method


def test_row_without_a_required_field_is_refused():
    rf = _rf(theta=None)
    assert provenance.missing(rf) == ["config.pieval.theta missing"]
    with pytest.raises(provenance.ProvenanceError, match=r"x.json: no provenance \(config.pieval.theta missing\)"):
        provenance.row_id(rf)


def test_metrics_prefer_the_none_filter():
    rf = _rf()
    rf.data["results"]["passkey"]["acc_1024,strict"] = 0.0
    assert tables.metrics(rf, "passkey")["acc_1024"] == rf.data["results"]["passkey"]["acc_1024,none"]


def test_plots_without_a_display(written, tmp_path):
    board = build.build([GOOD])
    from pieval.leaderboard import plots

    paths = plots.draw(board, tmp_path)
    stems = {p.stem for p in paths}
    assert stems == {
        "ppl_vs_window_local", "kmax_vs_steps", "ppl_vs_steps", "passkey_heatmap_256", "passkey_heatmap_1024",
        "methods_local",
    }  # fmt: skip
    for p in paths:
        assert p.stat().st_size > 1000, p
        head = p.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" if p.suffix == ".png" else head.startswith(b"<?xml")
    labels = {
        "ppl_vs_window_local": (plots.WINDOW_LABEL, plots.PPL_LABEL, "L=256", "L'=1024"),
        "kmax_vs_steps": (plots.STEPS_LABEL, plots.KMAX_LABEL),
        "ppl_vs_steps": (plots.STEPS_LABEL, "perplexity at W = L"),
        "passkey_heatmap_1024": (plots.DISTANCE_LABEL, "target length 1024", "success rate"),
        "methods_local": (plots.WINDOW_LABEL, plots.KMAX_LABEL, "no fine-tuning", "PI (L'=1024)", "base (L'=256)"),
    }
    for stem, texts in labels.items():
        svg = (tmp_path / f"{stem}.svg").read_text()
        for text in texts:
            assert text in svg, (stem, text)


def test_ft_lines_start_from_the_unmodified_model():
    """The FT run's step 0 is the unmodified model (method "base"); its line must start there."""
    from pieval.leaderboard import plots

    rows = pd.DataFrame(
        [("m", "base", 256, 0, 256, 256), ("m", "base", 1024, 0, 1024, 0), ("m", "FT", 1024, 500, 1024, 608),
         ("m", "PI", 1024, 0, 1024, 0), ("m", "PI", 1024, 500, 1024, 96)],
        columns=["base_model", "method", "L'", "steps", "length", "k_max"],
    )  # fmt: skip
    got = plots._with_ft_start(rows, ["base_model", "method", "length"])
    lines = {k: sorted(g["steps"]) for k, g in got.groupby(["method", "L'"])}
    assert lines == {("FT", 1024): [0, 500], ("PI", 1024): [0, 500], ("base", 256): [0]}


def test_cli_plots_flag(tmp_path):
    assert main(["leaderboard", str(GOOD / "base"), "--out", str(tmp_path), "--plots"]) == 0
    assert (tmp_path / "plots" / "ppl_vs_window_local.png").stat().st_size > 0
    assert (tmp_path / "plots" / "passkey_heatmap_256.svg").stat().st_size > 0


# ------------------------------------------------------------------ claims


def test_claims_from_the_written_tables(written):
    got = claims.check(written, L=256, L_prime=1024)
    assert [c.number for c in got] == ["1", "2", "3a", "3b", "4", "5"]
    assert all(c.status == claims.PASS for c in got), "\n".join(map(str, got))
    by = {c.number: c for c in got}
    # the numbers shown are those of the CSVs
    assert "9.812 at W=256 -> 412.6 at W=512 (x42.0" in by["1"].measured
    assert "FT 382 (200 steps) vs PI 945 (200 steps)" in by["4"].measured
    assert "(+3.2%;" in by["5"].measured
    assert str(by["3b"]).startswith("[PASS] (3b) PI + fine-tune: passkey k_max = L'")
    assert claims.summary(got).splitlines()[-1] == "6 PASS, 0 FAIL, 0 MISSING"


def test_claims_fail_and_missing_are_reported(written, tmp_path):
    shutil.copytree(written, tmp_path / "lb")
    pk = pd.read_csv(tmp_path / "lb" / "passkey.csv", dtype=str, keep_default_na=False)
    pk.loc[(pk.source == "measured") & (pk.method == "FT"), "k_max"] = "1024"
    pk.to_csv(tmp_path / "lb" / "passkey.csv", index=False)
    ppl = pd.read_csv(tmp_path / "lb" / "ppl_local.csv", dtype=str, keep_default_na=False)
    ppl.loc[(ppl.source == "measured") & (ppl.method == "base"), "512"] = "12.0"
    ppl.to_csv(tmp_path / "lb" / "ppl_local.csv", index=False)
    by = {c.number: c for c in claims.check(tmp_path / "lb", 256, 1024)}
    assert by["1"].status == claims.FAIL and "(x1.2;" in by["1"].measured
    assert by["4"].status == claims.FAIL and "FT 1024" in by["4"].measured
    assert by["3b"].status == claims.PASS
    (tmp_path / "lb" / "passkey.csv").unlink()
    by = {c.number: c for c in claims.check(tmp_path / "lb", 256, 1024)}
    assert by["3b"].status == by["4"].status == claims.MISSING
    assert by["2"].status == claims.PASS
    # a target window nobody measured: every claim that needs it is MISSING, never PASS
    assert {c.status for c in claims.check(written, 256, 4096) if c.number != "1"} == {claims.MISSING}


def test_a_real_stock_cli_run(tmp_path):
    """An unedited `lm_eval --model pi_llama` output (tests/fixtures/results/real): values and provenance."""
    board = build.build([FIXTURES / "real"], with_reference=False)
    assert [p for p in board.problems if p.skipped] == []
    (path,) = (FIXTURES / "real").rglob("results_*.json")
    data = json.loads(path.read_text())
    (row,) = board.tables["ppl_local"].to_dict("records")
    for w in (256, 512, 1024):
        assert row[str(w)] == data["results"]["local_ppl"][f"token_ppl_{w},none"]
    assert (row["model"], row["method"], row["L"], row["L'"], row["steps"]) == ("tiny-llama", "PI", 256, 1024, 0)
    assert (row["dataset"], row["docs"], row["stride"], row["truncation"]) == ("heldout", 1, 128, "first 1536 tokens (1 docs cut)")
    assert all(row[c] not in (None, "") for c in provenance.COLUMNS if c not in ("model_sha", "dataset_revision", "seed"))
    (pk,) = board.tables["passkey"].to_dict("records")
    assert (pk["length"], pk["k_max"], pk["acc"], pk["seed"]) == (1024, 0.0, 0.0, 0)
    from pieval.leaderboard import plots

    assert {p.name for p in plots.draw(board, tmp_path)} >= {"passkey_heatmap_1024.png", "ppl_vs_window_local.svg"}


def test_rows_come_from_the_results_json_alone(tmp_path):
    """A checkpoint folder beside the results is never read: the results JSON's fine-tune facts
    (copied by pi_llama from the checkpoint's config.json) are the only record."""
    src = sorted((GOOD / "finetune-ft").rglob("results_*.json"))[0]
    data = json.loads(src.read_text())
    run = tmp_path / "ft-1024"
    (run / "eval" / "checkpoint-000200").mkdir(parents=True)
    (run / "eval" / "checkpoint-000200" / src.name).write_text(json.dumps(data))
    (run / "checkpoint-000200").mkdir()
    (run / "checkpoint-000200" / "trainer_state.json").write_text(json.dumps({"step": 999}))
    (row,) = build.build([run], with_reference=False).tables["ppl_local"].to_dict("records")
    assert (row["method"], row["steps"], row["L"], row["L'"], row["base_model"]) == ("FT", 200, 256, 1024, "models/kjv-llama-tiny")
    del data["config"]["pieval"]["finetune"]  # results of a model pieval did not fine-tune
    (run / "eval" / "checkpoint-000200" / src.name).write_text(json.dumps(data))
    (row,) = build.build([run], with_reference=False).tables["ppl_local"].to_dict("records")
    assert (row["method"], row["steps"], row["L"]) == ("base", 0, 256)


@pytest.mark.parametrize(
    "drop, message, kept, lost",
    [
        ("passkey/acc_1024,none", "x.json: passkey has k_max_1024 but no acc_1024; that row is not written", "ppl", "passkey"),
        (
            "local_ppl/token_ppl_1024,none",
            "x.json: local_ppl has no token_ppl_1024 (windows [1024]) though other metrics of that window are "
            "there; re-run the task with pieval's perplexity tasks; that row is not written",
            "passkey",
            "ppl",
        ),
    ],
)
def test_a_task_missing_a_column_is_named_and_the_other_task_goes_in(drop, message, kept, lost):
    rf = _rf()
    task, metric = drop.split("/")
    del rf.data["results"][task][metric]
    problems = []
    cells = tables.collect([rf], problems)
    assert [p.message for p in problems] == [message]
    assert cells[kept] and not cells[lost]


def test_govreport_missing_rouge_and_non_numbers():
    path = next((GOOD / "finetune-pi").rglob("results_2026-11-25T11-48-00.json"))
    data = json.loads(path.read_text())
    del data["results"]["govreport_pi"]["rougeL,none"]
    data["results"]["boolq"]["acc,none"] = "N/A"
    problems = []
    cells = tables.collect([ResultsFile(path, "g.json", data)], problems)
    messages = sorted(p.message for p in problems)
    assert messages[0] == "g.json: boolq acc is 'N/A', not a number; that row is not written"
    assert messages[1].startswith("g.json: govreport_pi reports") and "but not rougeL" in messages[1]
    assert {c.column for c in cells["original_window"]} == {"piqa", "race_h", "winogrande"}


def test_exploded_perplexity_is_written_as_inf():
    rf = _rf()
    rf.data["results"]["local_ppl"]["token_ppl_1024,none"] = float("inf")
    board = build.Leaderboard({}, {}, [rf], [])
    frame = tables.assemble(tables.collect([rf], board.problems)["ppl"], (), ["256", "512", "1024"], board.problems)
    assert build.csv_text(frame, ["256", "512", "1024"]).splitlines()[1].split(",")[7:10] == ["11.9021", "11.2037", "inf"]


# ------------------------------------------------------------------ the registry of tables


def test_every_table_is_one_registry_entry():
    """Names unique, derived tables drawn from a table that takes tasks, plots that exist; and every
    golden CSV comes from an entry."""
    from pieval.leaderboard import plots

    names = [t.name for t in tables.TABLES]
    assert len(set(names)) == len(names) and set(tables.BY_NAME) == set(names)
    for table in tables.TABLES:
        assert table.of is None or all(tables.BY_NAME[name].takes is not None for name in table.of), table.name
        for plot in table.plots:
            assert callable(getattr(plots, plot)), (table.name, plot)
    board = build.build([GOOD])
    stems = {stem for parts in board.parts.values() for stem in parts.values()}
    assert {f"{s}.csv" for s in stems} == set(TABLES) and set(board.parts) == set(names)


def test_a_new_table_is_one_entry(tmp_path, monkeypatch):
    """Copy this test for a new table: one `tables.Table` entry, and its CSV is written."""
    src = next((GOOD / "base").rglob("results_2026-11-25T10-13-00.json"))
    data = json.loads(src.read_text())
    data["results"] = {"arc_easy": {**data["results"]["piqa"], "acc,none": 0.5}}
    data["configs"] = {"arc_easy": {**data["configs"]["piqa"], "dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy"}}
    (tmp_path / "runs" / "m").mkdir(parents=True)
    (tmp_path / "runs" / "m" / src.name).write_text(json.dumps(data))
    arc = tables.Table(
        "arc",
        metric_columns=("arc_easy",),
        takes=lambda rf, task: task == "arc_easy",
        cells=tables.accuracy_cells({"arc_easy": "arc_easy"}),
        fields=provenance.lmeval_task_fields,
    )
    monkeypatch.setattr(tables, "TABLES", (*tables.TABLES, arc))
    assert main(["leaderboard", str(tmp_path / "runs"), "--out", str(tmp_path / "lb")]) == 0
    (row,) = pd.read_csv(tmp_path / "lb" / "arc.csv", dtype=str, keep_default_na=False).to_dict("records")
    assert (row["source"], row["method"], row["arc_easy"], row["dataset"]) == ("measured", "base", "50.0000", "allenai/ai2_arc:ARC-Easy")
    assert row["results_file"] == f"runs/m/{src.name}"


def test_a_table_entry_is_either_taking_tasks_or_derived():
    with pytest.raises(ValueError, match="table x: give takes, cells and fields, or of and derive"):
        tables.Table("x", takes=lambda rf, task: True, of=("ppl",), derive=list)
    with pytest.raises(ValueError, match="table x: a table that takes tasks needs cells and fields"):
        tables.Table("x", takes=lambda rf, task: True)


def test_heat_map_from_logged_samples():
    """{length: {k: success rate}} on the grid, from the samples of a passkey run."""
    from pieval.leaderboard import heatmap

    def sample(length, k, correct):
        return {"doc": {"length": length, "k": k}, f"k_max_{length}": {"correct": correct}}

    samples = [sample(256, 8, True), sample(256, 8, False), sample(256, 16, False), sample(512, 8, True)]
    assert heatmap.heat_map(samples) == {256: {8: 0.5, 16: 0.0}, 512: {8: 1.0}}


_IMPORTED = """
import json, sys
from pieval.cli import main
rc = main(sys.argv[1:])
heavy = ("lm_eval", "datasets", "torch", "transformers", "matplotlib")
print(json.dumps([rc, sorted(m for m in sys.modules if m.split(".")[0] in heavy)]))
"""


@pytest.mark.parametrize("plots", [False, True])
def test_leaderboard_stays_light(tmp_path, plots):
    """`pieval leaderboard` imports neither lm-eval, datasets, torch nor transformers (and matplotlib
    only for --plots): building tables needs none of them, and they cost seconds."""
    import subprocess
    import sys

    args = ["leaderboard", str(GOOD), "--out", str(tmp_path), *(["--plots"] if plots else [])]
    out = subprocess.run([sys.executable, "-c", _IMPORTED, *args], capture_output=True, text=True, check=True)
    rc, heavy = json.loads(out.stdout.splitlines()[-1])
    assert rc == 0 and (tmp_path / "passkey.csv").is_file()
    assert {m.split(".")[0] for m in heavy} == ({"matplotlib"} if plots else set()), heavy
