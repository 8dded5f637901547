"""lm-eval on two CPU processes (gloo) shards pi_llama's documents and gives one process's metrics.

lm-eval's own CLI runs as a subprocess under ``torchrun`` and under ``accelerate launch``; the
reference is the same command in one process. Perplexity is compared exactly: each document is
scored alone (batch size 1) and the aggregation sums with ``math.fsum``, which is exact, so the
order the ranks' documents are gathered in cannot change a bit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# MKL_CBWR=COMPATIBLE: MKL's fp32 kernels otherwise pick code paths by memory alignment on some
# CPUs (seen on an AMD EPYC, 2026-12-02: two documents differed in the 10th digit between one
# process and two), and "the same bits" needs the same kernels.
ENV = {
    **os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}  # fmt: skip
DOCS = 3  # odd: the second rank's share is padded by lm-eval (numpad), and the repeat must not count
METADATA = {
    "max_docs": DOCS, "max_doc_tokens": 512, "windows": [256], "stride": 128,
    "lengths": [256], "trials": 2, "num_distances": 3,
}  # fmt: skip
LAUNCHERS = {
    "one process": [],
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2"],
    # `accelerate launch --cpu` starts one process (accelerate's multi-CPU launcher is mpirun);
    # --multi_gpu is its torchrun launcher, and pi_llama joins the gloo group on a CPU-only machine
    "accelerate launch": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no"],
}  # fmt: skip


def lm_eval(launcher: list[str], model: Path, heldout: Path, out: Path) -> tuple[dict, dict, str]:
    """lm-eval's CLI on local_ppl + passkey: (results JSON, {task: samples}, the log)."""
    metadata = json.dumps({**METADATA, "data_path": str(heldout)})
    argv = [
        sys.executable, *launcher, "-m", "lm_eval", "--model", "pi_llama", "--model_args", f"pretrained={model}",
        "--device", "cpu", "--batch_size", "1", "--tasks", "local_ppl,passkey", "--metadata", metadata,
        "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=600, cwd=out.parent)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    (results,) = out.glob("*/results_*.json")
    samples = {
        task: [json.loads(line) for line in next(out.glob(f"*/samples_{task}_*.jsonl")).read_text().splitlines()]
        for task in ("local_ppl", "passkey")
    }
    return json.loads(results.read_text()), samples, log


@pytest.fixture(scope="module")
def single(ref_model_dir, heldout_dir, tmp_path_factory):
    return lm_eval(LAUNCHERS["one process"], ref_model_dir, heldout_dir, tmp_path_factory.mktemp("one") / "out")


def metrics(results: dict) -> dict:
    return {t: {k: v for k, v in m.items() if k != "alias"} for t, m in results["results"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate launch"])
def test_two_processes_split_the_documents_and_match_one(launcher, single, ref_model_dir, heldout_dir, tmp_path):
    results, samples, log = lm_eval(LAUNCHERS[launcher], ref_model_dir, heldout_dir, tmp_path / "out")
    one_results, one_samples, _ = single
    assert metrics(results) == metrics(one_results)  # perplexity to the last bit, passkey acc and k_max
    assert results["results"]["local_ppl"]["scored_tokens_256,none"] == DOCS * 512

    # each rank built and scored its own share; the padded repeat on rank 1 was not scored again
    for task in ("local_ppl", "passkey"):
        assert f"Building contexts for {task} on rank 0" in log and f"Building contexts for {task} on rank 1" in log
    shares = {int(r): int(n) for r, n in re.findall(r"sliding-window perplexity \(process (\d) of 2\): (\d+) document", log)}
    assert shares == {0: 2, 1: 1}

    # rank 0 gathered every document exactly once, with the answers one process gives
    for task in ("local_ppl", "passkey"):
        got = sorted((s["doc_id"], json.dumps(s["filtered_resps"])) for s in samples[task])
        want = sorted((s["doc_id"], json.dumps(s["filtered_resps"])) for s in one_samples[task])
        assert got == want
        assert [d for d, _ in got] == list(range(len(want)))
    assert len(samples["passkey"]) == 2 * 3  # trials x distances
