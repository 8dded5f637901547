"""`pieval finetune` end to end on CPU: checkpoints plain transformers and lm-eval load, exact resume
after SIGKILL, fallback past a corrupt checkpoint, evaluation as it trains, LoRA, bad input.

Mechanics run on the random 2-layer LLaMA (`tiny_llama_dir`, L=256 -> L'=1024) in seconds; the
loss and loading checks use the reference model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pieval.cli import main

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "models" / "corpus" / "kjv" / "train.jsonl.gz"
ENV = {
    **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}  # fmt: skip


def tiny_args(model: Path, output: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--model", str(model), "--data", str(CORPUS), "--scaling-factor", "4", "--output", str(output),
        "--global-batch", "4", "--micro-batch", "2", "--lr", "1e-3", "--warmup-steps", "2", "--save-every", "3",
        "--no-progress", *extra,
    ]  # fmt: skip


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pieval", *argv], env=ENV, capture_output=True, text=True, timeout=600)


def curve(output: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows]


# ---------------------------------------------------------------- the reference model: loss and loading


@pytest.fixture(scope="module")
def pi_run(ref_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pi_run") / "run"
    rc = main([
        "finetune", "--model", str(ref_model_dir), "--data", str(CORPUS), "--scaling-factor", "4",
        "--output", str(out), "--max-steps", "40", "--global-batch", "2", "--micro-batch", "2",
        "--lr", "3e-4", "--warmup-steps", "5", "--save-every", "20", "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    return out


# Runs in a subprocess without pieval on the path (nor its lm-eval hook): what any user sees.
PLAIN_LOAD = r"""
import json, sys, torch
from pathlib import Path
import logging
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging
warned = []
class Keep(logging.Handler):
    def emit(self, record):
        warned.append(record.getMessage())
hf_logging.get_logger().addHandler(Keep(level=logging.WARNING))
base, ckpt, heldout = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(ckpt)
model = AutoModelForCausalLM.from_pretrained(ckpt)
loaded_warnings = list(warned)
cfg = AutoConfig.from_pretrained(base)
cfg.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": cfg.rope_parameters["rope_theta"]}
untrained = AutoModelForCausalLM.from_pretrained(base, config=cfg)  # PI applied, no fine-tuning
d = model.config.head_dim
inv = model.model.rotary_emb.inv_freq
base_inv = 1.0 / (model.config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
ids = tok("".join(p.read_text() for p in sorted(Path(heldout).glob("*.txt"))))["input_ids"]
windows = torch.tensor([ids[i * 1024:(i + 1) * 1024] for i in range(4)])
with torch.no_grad():
    loss = lambda m: m(input_ids=windows, labels=windows).loss.item()
    out = {"rope": model.config.rope_parameters, "max_pos": model.config.max_position_embeddings,
           "inv_freq_max_abs_diff": (inv - base_inv / 4).abs().max().item(),
           "loss_untrained": loss(untrained), "loss_finetuned": loss(model),
           "pieval_imported": sorted(m for m in sys.modules if m.startswith("pieval")),
           "load_warnings": loaded_warnings, "facts": model.config.pieval}
print(json.dumps(out))
"""


def test_pi_finetune_lowers_loss_at_L_prime_and_loads_in_plain_transformers(pi_run, ref_model_dir, heldout_dir):
    final = pi_run / "checkpoint-000040"
    assert (pi_run / "final").resolve() == final.resolve()
    umask = os.umask(0)
    os.umask(umask)
    # readable by whoever may read its folder, as save_pretrained's other files are (safetensors writes 0600)
    assert {f.name: f.stat().st_mode & 0o777 for f in final.iterdir() if f.is_file()} == {
        f.name: 0o666 & ~umask for f in final.iterdir() if f.is_file()
    }
    env = {**ENV, "PIEVAL_LM_EVAL_HOOK": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(ref_model_dir), str(final), str(heldout_dir)],
        env=env, capture_output=True, text=True, timeout=600, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["pieval_imported"] == []
    assert out["load_warnings"] == []  # the "pieval" key of config.json costs plain transformers nothing
    assert out["rope"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert out["max_pos"] == 1024
    assert out["inv_freq_max_abs_diff"] == 0.0
    # 40 steps of 2 x 1024 tokens lower the held-out loss at L' (numbers logged for the record)
    print(out)
    assert out["loss_finetuned"] < out["loss_untrained"] - 0.02
    losses = [loss for _, loss, _ in curve(pi_run)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    saved = json.loads((final / "finetune_config.json").read_text())
    assert saved["lr"] == 3e-4 and saved["scaling_factor"] == 4.0 and saved["global_batch"] == 2
    # every fact about the checkpoint, in its config.json (pieval.facts), as plain transformers reads it
    from pieval.finetune.checkpoint import weights_sha
    from pieval.loading import Source

    assert out["facts"] == {
        "method": "pi", "base_window": 256, "factor": 4.0, "context_length": 1024, "steps": 40,
        "base_model": str(ref_model_dir), "base_revision": None, "base_sha": weights_sha(Source.of(str(ref_model_dir))),
        "data": str(CORPUS), "data_revision": None, "task": "lm", "seed": 0, "pieval_version": "0.1.0",
    }  # fmt: skip
    first = json.loads((pi_run / "checkpoint-000020" / "config.json").read_text())["pieval"]
    assert first == {**out["facts"], "steps": 20}


@pytest.mark.slow
def test_stock_lm_eval_cli_scores_the_checkpoint_without_scaling_arguments(pi_run, heldout_dir, tmp_path):
    final = pi_run / "checkpoint-000040"
    metadata = {"data_path": str(heldout_dir), "max_docs": 1, "max_doc_tokens": 2048, "windows": [1024]}
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "pi_llama", "--model_args", f"pretrained={final}",
         "--tasks", "local_ppl", "--metadata", json.dumps(metadata), "--output_path", str(tmp_path / "res")],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "res").rglob("results_*.json")
    results = json.loads(path.read_text())
    prov = results["config"]["pieval"]
    assert (prov["rope_type"], prov["factor"], prov["base_window"], prov["context_length"]) == ("linear", 4.0, 256, 1024)
    assert 1 < results["results"]["local_ppl"]["token_ppl_1024,none"] < 2048


# ---------------------------------------------------------------- resume: SIGKILL and corrupt checkpoints


@pytest.fixture(scope="module")
def reference_curve(tiny_llama_dir, tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = cli(*tiny_args(tiny_llama_dir, out, "--max-steps", "12"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, curve(out)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_loss_curve_exactly(tiny_llama_dir, reference_curve, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "pieval", *tiny_args(tiny_llama_dir, out, "--max-steps", "12")]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    # kill after the step-3 checkpoint, part-way to the step-6 one
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "checkpoint-000012").exists()
    assert not (out / "final").exists()  # named only at the end of a run that finished
    resumed = cli(*tiny_args(tiny_llama_dir, out, "--max-steps", "12", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-" in resumed.stdout + resumed.stderr
    assert curve(out) == reference_curve[1]  # same steps, same losses and lrs, to the last bit
    assert os.readlink(out / "final") == "checkpoint-000012"


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_llama_dir, reference_curve, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_curve[0], out, symlinks=True)
    weights = out / "checkpoint-000012" / "training_state" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a torn file
    resumed = cli(*tiny_args(tiny_llama_dir, out, "--max-steps", "12", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "cannot resume from checkpoint-000012" in log
    assert "resuming from checkpoint-000009 (step 9), falling back past: checkpoint-000012" in log
    assert curve(out) == reference_curve[1]


def test_damaged_weights_of_the_newest_checkpoint_are_not_resumed_from(tiny_llama_dir, reference_curve, tmp_path):
    """The product (model.safetensors) is checked too, not only the training state: resuming past a
    torn one would leave that checkpoint unloadable; falling back re-saves it whole."""
    import shutil

    from pieval.finetune.checkpoint import verify_weights

    out = tmp_path / "run"
    shutil.copytree(reference_curve[0], out, symlinks=True)
    weights = out / "checkpoint-000012" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])  # a copy cut short, a full disk
    resumed = cli(*tiny_args(tiny_llama_dir, out, "--max-steps", "12", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    damage = f"DamagedCheckpoint: model.safetensors holds {size // 2} bytes where its header describes {size}"
    assert f"cannot resume from checkpoint-000012: {damage}" in log
    assert f"resuming from checkpoint-000009 (step 9), falling back past: checkpoint-000012 ({damage})" in log
    assert curve(out) == reference_curve[1]
    verify_weights(out / "checkpoint-000012")  # whole again
    assert os.readlink(out / "final") == "checkpoint-000012"


def test_verify_weights_names_a_missing_or_torn_file_and_final_past_the_resume_point_goes(tmp_path):
    from safetensors.torch import save_file

    from pieval.finetune.checkpoint import DamagedCheckpoint, drop_final_after, link_final, verify_weights

    path = tmp_path / "checkpoint-000006"
    path.mkdir()
    with pytest.raises(DamagedCheckpoint, match="^model.safetensors is missing$"):
        verify_weights(path)
    save_file({"w": torch.zeros(4, 4)}, path / "model.safetensors")
    verify_weights(path)
    whole = (path / "model.safetensors").read_bytes()
    for torn, message in ((whole + b"\0", "holds .* bytes where its header describes"), (whole[:4], "no readable safetensors header")):
        (path / "model.safetensors").write_bytes(torn)
        with pytest.raises(DamagedCheckpoint, match=message):
            verify_weights(path)
    link_final(tmp_path, path)
    drop_final_after(tmp_path, 6)  # resumed from it: a finished run's final stays
    assert os.readlink(tmp_path / "final") == path.name
    drop_final_after(tmp_path, 3)  # resumed from an older one (it fell back past this one)
    assert not (tmp_path / "final").exists()


@pytest.mark.slow
def test_a_second_run_into_the_same_output_is_refused_while_the_first_runs(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    argv = tiny_args(tiny_llama_dir, out, "--max-steps", "1000", "--save-every", "1000")
    first = subprocess.Popen([sys.executable, "-m", "pieval", *argv], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics, deadline = out / "metrics.jsonl", time.time() + 300
        while time.time() < deadline and first.poll() is None and not (metrics.is_file() and metrics.read_text()):
            time.sleep(0.05)
        second = cli(*argv)
        assert first.poll() is None, "the first run ended before the second one was refused"
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert f"{out} is being written by pid {first.pid} on host " in second.stderr
    assert f"or pass another --output (lock file: {tmp_path / '.run.lock'})" in second.stderr
    steps = [s for s, _, _ in curve(out)]
    assert steps == list(range(1, len(steps) + 1))  # each step once: only the first run wrote
    assert not (out / "final").exists()
    resumed = cli(*tiny_args(tiny_llama_dir, out, "--max-steps", "1", "--resume"))  # the lock is the killed run's
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"pieval finetune: note: took over the lock {tmp_path / '.run.lock'} left by pid {first.pid}" in resumed.stderr
    assert not (tmp_path / ".run.lock").exists()


def test_optimizer_state_is_kept_only_in_the_newest_checkpoints(reference_curve):
    out = reference_curve[0]
    with_state = sorted(p.name for p in out.glob("checkpoint-*") if (p / "training_state").is_dir())
    assert with_state == ["checkpoint-000009", "checkpoint-000012"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{s:06d}" for s in (3, 6, 9, 12)]


# ---------------------------------------------------------------- evaluation as it trains


def test_eval_tasks_run_on_each_checkpoint_and_build_a_table(tiny_llama_dir, heldout_dir, tmp_path):
    out = tmp_path / "run"
    metadata = json.dumps({"data_path": str(heldout_dir), "max_docs": 1, "max_doc_tokens": 1024, "windows": [512, 1024]})
    rc = main(tiny_args(tiny_llama_dir, out, "--max-steps", "4", "--save-every", "4", "--eval-tasks", "local_ppl",
                        "--eval-every", "2", "--eval-metadata", metadata))  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]  # step 0 = interpolated, not yet fine-tuned
    assert [r["tokens"] for r in rows] == [0, 2 * 4 * 1024, 4 * 4 * 1024]
    assert all(r["metrics"]["local_ppl"]["scored_tokens_1024"] == 1024 for r in rows)
    table = (out / "eval" / "table.csv").read_text().splitlines()
    assert table[0].startswith("step,tokens,") and "local_ppl/token_ppl_1024" in table[0] and len(table) == 4
    full = json.loads((out / rows[-1]["results_file"]).read_text())
    assert full["config"]["pieval"]["factor"] == 4.0 and full["config"]["pieval"]["context_length"] == 1024
    assert full["results"]["local_ppl"]["token_ppl_1024,none"] == rows[-1]["metrics"]["local_ppl"]["token_ppl_1024"]
    assert (out / "checkpoint-000002").is_dir()  # eval-every adds checkpoints between save-every ones


def test_eval_log_samples_feed_the_leaderboards_heat_map(tiny_llama_dir, tmp_path):
    """--eval-log-samples writes lm-eval's samples files beside each results file, as the
    `lm_eval --log_samples` CLI does, so `pieval leaderboard` draws the run's passkey heat map."""
    from pieval.leaderboard import plots
    from pieval.leaderboard.build import build

    out = tmp_path / "run"
    metadata = json.dumps({"lengths": [512], "trials": 1, "num_distances": 2})
    rc = main(tiny_args(tiny_llama_dir, out, "--max-steps", "1", "--eval-tasks", "passkey",
                        "--eval-metadata", metadata, "--eval-log-samples"))  # fmt: skip
    assert rc == 0
    for step in ("checkpoint-000000", "checkpoint-000001"):
        (results,) = (out / "eval" / step).glob("results_*.json")
        date = results.name[len("results_") : -len(".json")]
        samples = [json.loads(line) for line in (results.parent / f"samples_passkey_{date}.jsonl").read_text().splitlines()]
        assert len(samples) == 2 and all("gen_args_0" in s["arguments"] for s in samples)
        assert "samples" not in json.loads(results.read_text())
    board = build([out])
    success = plots.passkey_success(board, [])
    assert sorted(rid.steps for rid in success[512]) == [0, 1]
    assert main(["leaderboard", str(out), "--out", str(tmp_path / "boards"), "--plots"]) == 0
    assert (tmp_path / "boards" / "plots" / "passkey_heatmap_512.png").stat().st_size > 0


# ---------------------------------------------------------------- variants


def test_lora_saves_a_plain_merged_checkpoint(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    rc = main(tiny_args(tiny_llama_dir, out, "--max-steps", "2", "--lora", "--lora-target-modules", "q_proj,v_proj", "--lr", "1e-2"))
    assert rc == 0
    base = load_file(tiny_llama_dir / "model.safetensors")
    tuned = load_file(out / "checkpoint-000002" / "model.safetensors")
    assert set(tuned) == set(base)  # no adapter keys: a plain checkpoint
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(".q_proj." in k or ".v_proj." in k for k in changed)
    config = json.loads((out / "checkpoint-000002" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["max_position_embeddings"] == 1024


def test_direct_finetuning_baseline_keeps_rope_and_sets_the_window(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = tiny_args(tiny_llama_dir, out, "--max-steps", "1", "--method", "direct", "--gradient-checkpointing")
    argv[argv.index("--scaling-factor") : argv.index("--scaling-factor") + 2] = ["--context-length", "1024"]
    assert main(argv) == 0
    config = json.loads((out / "checkpoint-000001" / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert config["max_position_embeddings"] == 1024
    assert {k: config["pieval"][k] for k in ("method", "base_window", "factor", "context_length", "steps")} == {
        "method": "direct", "base_window": 256, "factor": 4.0, "context_length": 1024, "steps": 1,
    }  # fmt: skip
    capsys.readouterr()
    assert main(["info", str(out / "checkpoint-000001"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["base_window"], info["factor"], info["context_length"]) == (256, 1.0, 1024)
    assert main(["info", str(out / "checkpoint-000001")]) == 0
    assert f"directly to L'=1024, 1 steps from {tiny_llama_dir}" in capsys.readouterr().out


def test_leaderboard_rows_outlive_the_checkpoints(ref_model_dir, heldout_dir, tmp_path):
    """Fine-tune the reference model (L = 256 -> 1024) with PI and directly, evaluating as it trains;
    the leaderboard built from the run directories is byte-identical once the checkpoints are gone."""
    import shutil

    metadata = json.dumps({"data_path": str(heldout_dir), "max_docs": 1, "max_doc_tokens": 1024, "windows": [1024]})
    runs = []
    for method in ("pi", "direct"):
        out = tmp_path / method
        argv = tiny_args(ref_model_dir, out, "--method", method, "--max-steps", "2", "--save-every", "2",
                         "--global-batch", "2", "--eval-tasks", "local_ppl", "--eval-metadata", metadata)  # fmt: skip
        assert main(argv) == 0
        runs.append(str(out))
    assert main(["leaderboard", *runs, "--out", str(tmp_path / "before"), "--no-reference"]) == 0
    rows = (tmp_path / "before" / "ppl_local.csv").read_text().splitlines()
    got = sorted(tuple(r.split(",")[2:7]) for r in rows[1:])
    base = str(ref_model_dir)
    assert got == sorted([
        (base, "PI", "256", "1024", "0"), (base, "PI", "256", "1024", "2"),
        (base, "base", "256", "1024", "0"), (base, "FT", "256", "1024", "2"),
    ])  # fmt: skip
    for run in runs:
        for checkpoint in Path(run).glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
        (Path(run) / "final").unlink()
    assert main(["leaderboard", *runs, "--out", str(tmp_path / "after"), "--no-reference"]) == 0
    before = sorted(p.name for p in (tmp_path / "before").glob("*.csv"))
    assert before == sorted(p.name for p in (tmp_path / "after").glob("*.csv")) and "ppl_local.csv" in before
    for name in before:
        assert (tmp_path / "after" / name).read_bytes() == (tmp_path / "before" / name).read_bytes(), name


def test_activation_checkpointing_on_old_and_new_transformers_names(tiny_llama_dir):
    """transformers 5.17 (the GPU machine's) has only gradient_checkpointing_enable; 5.24 renamed it."""
    from transformers import AutoModelForCausalLM

    from pieval.finetune.recipe import enable_activation_checkpointing

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    enable_activation_checkpointing(model)
    assert model.is_gradient_checkpointing

    class OldModel:  # the 5.17 surface: no activation_checkpointing_enable
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.kwargs = gradient_checkpointing_kwargs

    old = OldModel()
    enable_activation_checkpointing(old)
    assert old.kwargs == {"use_reentrant": False}


def test_govreport_mode_trains_on_prompt_and_summary(tiny_llama_dir, tmp_path):
    docs = tmp_path / "gov.jsonl"
    text = (REPO / "models" / "corpus" / "kjv" / "heldout").glob("*.txt")
    book = next(iter(sorted(text))).read_text()
    docs.write_text("".join(json.dumps({"document": book[i * 5000 : (i + 1) * 5000], "summary": book[i * 100 : i * 100 + 200]}) + "\n" for i in range(3)))
    out = tmp_path / "run"
    argv = tiny_args(tiny_llama_dir, out, "--max-steps", "2", "--task", "govreport")
    argv[argv.index("--data") + 1] = str(docs)
    assert main(argv) == 0
    state = json.loads((out / "checkpoint-000002" / "trainer_state.json").read_text())
    assert state["data_position"] == {"epoch": 2, "docs": 2, "offset": 0}  # 8 examples of 3 documents
    assert main([*argv, "--max-steps", "3", "--resume"]) == 0  # the later --max-steps wins
    state = json.loads((out / "checkpoint-000003" / "trainer_state.json").read_text())
    assert state["data_position"] == {"epoch": 3, "docs": 3, "offset": 0} and state["tokens_seen"] > 0  # 12 = 4 x 3


# ---------------------------------------------------------------- bad input


def test_scaling_factor_below_one(tiny_llama_dir, tmp_path, capsys):
    assert main(tiny_args(tiny_llama_dir, tmp_path / "o", "--scaling-factor", "0.5")) == 2
    assert "scaling_factor must be >= 1 (got 0.5)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    argv = tiny_args(tiny_llama_dir, tmp_path / "o")
    del argv[argv.index("--scaling-factor") : argv.index("--scaling-factor") + 2]
    assert main(argv) == 2
    assert "is not extended yet: pass --scaling-factor S or --context-length L' (its trained window is L = 256)" in capsys.readouterr().err


def test_non_rope_model(tmp_path, ref_model_dir, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=2048)).save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(ref_model_dir).save_pretrained(tmp_path / "gpt2")
    assert main(tiny_args(tmp_path / "gpt2", tmp_path / "o")) == 2
    assert "no rotary position embedding" in capsys.readouterr().err


def test_too_little_text_says_how_much_is_needed(tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "small.txt").write_text("In the beginning God created the heaven and the earth.")
    argv = tiny_args(tiny_llama_dir, tmp_path / "o", "--max-steps", "1")
    argv[argv.index("--data") + 1] = str(tmp_path / "small.txt")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds only" in err and "needs 1024 (L')" in err
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_output_holding_a_different_run_is_refused_unless_overwrite(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_llama_dir, out, "--max-steps", "1")) == 0
    assert main(tiny_args(tiny_llama_dir, out, "--max-steps", "1", "--lr", "5e-4")) == 2
    err = capsys.readouterr().err
    assert "holds a different run (lr: 0.001 there vs 0.0005 now)" in err and "--overwrite" in err
    assert main(tiny_args(tiny_llama_dir, out, "--max-steps", "1")) == 2  # same run: --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(tiny_args(tiny_llama_dir, out, "--max-steps", "1", "--lr", "5e-4", "--overwrite")) == 0
    assert json.loads((out / "checkpoint-000001" / "finetune_config.json").read_text())["lr"] == 5e-4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(tiny_args(tiny_llama_dir, tmp_path / "other", "--max-steps", "1")) == 2
    assert "holds no pieval fine-tuning run" in capsys.readouterr().err


def test_missing_data_path(tiny_llama_dir, tmp_path, capsys):
    argv = tiny_args(tiny_llama_dir, tmp_path / "o")
    argv[argv.index("--data") + 1] = str(tmp_path / "nope.jsonl")
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_out_of_memory_names_the_remedies(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from pieval.finetune import recipe

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(recipe, "optimizer_step", oom)
    out = tmp_path / "o"
    assert main(tiny_args(tiny_llama_dir, out, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--gradient-checkpointing" in err and "--micro-batch" in err and "--lora" in err
    assert not (out / "final").exists() and not (tmp_path / ".o.lock").exists()
    # the corrected command (other settings) takes over the run that never took a step, without --overwrite
    monkeypatch.undo()
    assert main(tiny_args(tiny_llama_dir, out, "--max-steps", "1", "--micro-batch", "1", "--lr", "5e-4")) == 0
    assert "held a run that failed before its first step; starting this one there" in capsys.readouterr().err
    assert os.readlink(out / "final") == "checkpoint-000001"


def test_remote_code_is_refused_unless_asked(tmp_path, capsys):
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {"AutoConfig": "configuration_mine.MineConfig"}}))
    (model / "configuration_mine.py").write_text("raise SystemExit('remote code ran')\n")
    assert main(tiny_args(model, tmp_path / "o")) == 2
    assert "runs its own Python code to load: allow it (model_args trust_remote_code, pieval finetune --trust-remote-code) only if you trust that code" in capsys.readouterr().err


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tracker_that_is_not_installed(tiny_llama_dir, tmp_path, capsys):
    assert main(tiny_args(tiny_llama_dir, tmp_path / "o", "--log-with", "tensorboard")) == 2
    assert "pip install tensorboard" in capsys.readouterr().err


def test_resume_runs_an_evaluation_the_killed_run_missed(tiny_llama_dir, heldout_dir, tmp_path):
    out = tmp_path / "run"
    metadata = json.dumps({"data_path": str(heldout_dir), "max_docs": 1, "max_doc_tokens": 512, "windows": [1024]})
    argv = tiny_args(tiny_llama_dir, out, "--max-steps", "2", "--eval-tasks", "local_ppl", "--eval-metadata", metadata)
    assert main(argv) == 0
    results = out / "eval" / "results.jsonl"
    rows = results.read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [0, 2]
    results.write_text(rows[0] + "\n")  # as if killed between saving checkpoint-2 and evaluating it
    assert main([*argv, "--resume"]) == 0
    assert [json.loads(r)["step"] for r in results.read_text().splitlines()] == [0, 2]


def test_no_process_passes_a_checkpoint_save_before_it_is_in_place(tmp_path):
    """The race CI caught: rank 1 went on to load checkpoint-2 for evaluation while rank 0 was still
    renaming it into place. Every barrier after the writes must come after the rename too."""
    from pieval.finetune.checkpoint import _shared_tmp_dir

    path = tmp_path / "checkpoint-000002"
    seen = []

    class MainProcess:
        is_main_process, num_processes = True, 1

        def wait_for_everyone(self):
            seen.append(path.is_dir())

    with _shared_tmp_dir(MainProcess(), path) as tmp:
        (tmp / "config.json").write_text("{}")
    assert seen == [False, True]  # writes done -> rename -> everyone released
    assert (path / "config.json").is_file()


@pytest.mark.slow
def test_two_cpu_processes_train_and_evaluate_like_one_and_resume(tiny_llama_dir, heldout_dir, reference_curve, tmp_path):
    """DDP over gloo (torchrun + accelerate): each process takes its slice of the same global batch,
    and lm-eval shards the evaluation requests over both."""
    from pieval.finetune.evaluate import Evaluator

    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pieval"]
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    metadata = {"data_path": str(heldout_dir), "max_docs": 2, "max_doc_tokens": 1024, "windows": [1024]}
    evaluate = ["--eval-tasks", "local_ppl", "--eval-metadata", json.dumps(metadata)]
    for extra in (["--max-steps", "2", "--save-every", "2", *evaluate], ["--max-steps", "4", "--save-every", "2", "--resume"]):
        proc = subprocess.run([*launch, *tiny_args(tiny_llama_dir, out, *extra)], env=env, capture_output=True, text=True, timeout=600)
        # a failing rank's own one-line error comes long before torchrun's tracebacks of the others
        errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
        assert proc.returncode == 0, "\n".join(errors[:10]) + "\n...\n" + proc.stderr[-2000:]
        assert "2 process(es) x 1 micro-batches of 2" in proc.stdout + proc.stderr
    got, want = curve(out), reference_curve[1][:4]
    assert [(s, lr) for s, _, lr in got] == [(s, lr) for s, _, lr in want]
    assert [loss for _, loss, _ in got] == pytest.approx([loss for _, loss, _ in want], rel=1e-6)
    assert sorted(p.name for p in (out / "checkpoint-000004" / "training_state").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"
    ]  # fmt: skip
    rows = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2]  # the first leg's start and end
    row = rows[0]
    assert row["metrics"]["local_ppl"]["scored_tokens_1024"] == 2048  # both documents
    single = Evaluator(tmp_path / "single", ["local_ppl"], "cpu", metadata=metadata).evaluate(out / "checkpoint-000000", 0, 0)
    assert row["metrics"]["local_ppl"]["token_ppl_1024"] == pytest.approx(single["metrics"]["local_ppl"]["token_ppl_1024"], rel=1e-6)


def test_fsdp2_recipe_on_cpu_processes_is_refused_not_run_as_ddp(tiny_llama_dir, tmp_path):
    """accelerate 1.16 turns FSDP on only for GPU-like process groups: on two CPU processes the
    FSDP2 recipe would silently become DDP. The recipe, launched as a user would, is refused."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "models" / "recipes" / "fsdp2.yaml"),
              "--num_processes", "2", "--mixed_precision", "no", "-m", "pieval"]  # fmt: skip
    proc = subprocess.run([*launch, *tiny_args(tiny_llama_dir, tmp_path / "run", "--max-steps", "1")], env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("pieval finetune: error:")]
    assert proc.returncode != 0 and len(errors) == 2, proc.stderr[-3000:]  # one line from each process
    assert "asks for FSDP (fsdp_version 2), but accelerate" in errors[0] and "MULTI_CPU" in errors[0]
    assert not (tmp_path / "run" / "checkpoint-000001").exists()


def test_default_data_is_the_pile_from_the_hub(tiny_llama_dir, tmp_path, capsys):
    argv = tiny_args(tiny_llama_dir, tmp_path / "o", "--max-steps", "1")
    del argv[argv.index("--data") : argv.index("--data") + 2]
    assert main(argv) == 2  # offline here: the message says what was tried and how to pass local data
    err = capsys.readouterr().err
    assert "cannot load hub dataset 'monology/pile-uncopyrighted' (split 'train')" in err and "--data PATH" in err
