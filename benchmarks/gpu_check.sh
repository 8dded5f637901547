#!/usr/bin/env bash
# The prepared GPU check: one NVIDIA H200 lent through the device tool, no network there.
# Prepared and dry-run on a CPU machine only; see benchmarks/README.md, "GPU check".
#
#   bash benchmarks/gpu_check.sh stage1 [--budget S] [--dry-run]              carry: .whl .gpu-part1
#   bash benchmarks/gpu_check.sh stage2 [--budget S] [--steps N] [--dry-run]  carry: .gpu-part2
#
# (bash benchmarks/gpu_prepare.sh fills those folders, here.) Stage 2 must follow stage 1 at
# once: it needs what stage 1 left in $WORK, which lasts only while the machine stays warm.
#
# stage1 (~3 min): installs the carried wheels into $WORK/site and keeps part 1 of the model
#   there; says what it found (GPU, versions, whether flash_attn imports); checks pieval's fused
#   flash-attn rotary against sdpa logits when flash_attn imports; runs perplexity_memory.py at
#   W = 32768 with LLaMA-7B's width (2 layers), the scaling note's case.
# stage2 (~5 min): joins the model's two parts, converts them to a checkpoint
#   (models/smollm2-135m/make.py --gguf, with its golden check), and fine-tunes SmolLM2-135M by
#   PI from L = 8192 to L' = 16384, evaluating perplexity at 8192 and 16384 and passkey at 16384
#   at steps 0, N/2 and N (the shape of the paper's Tables 3 and 4). A second stage 2 on a
#   still-warm machine resumes the run.
#
# Each stage writes $OUT/<stage>.log (and stage 2 $OUT/stage2-results.tar.gz) and keeps to its
# --budget: a step that would overrun it gets SIGINT (pieval and the benchmarks stop cleanly
# and print what they have), and the stage goes on to report.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${PIEVAL_GPU_WORK:-/tmp/pieval-gpu}  # outside the repository copy, kept between the two calls
PYTHON=${PYTHON:-python3}                 # the image's python3 holds torch

usage() { sed -n '5,6p' "${BASH_SOURCE[0]}" | sed 's/^#//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }
positive() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 $2: pass a positive whole number"; }

stage="" budget="" steps=200 dry=""
while (($#)); do
    case $1 in
        stage1 | stage2) stage=$1 ;;
        --budget) positive "$1" "${2-}"; budget=$2; shift ;;
        --steps) positive "$1" "${2-}"; steps=$2; shift ;;
        --dry-run) dry=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1'; usage:$(usage)" ;;
    esac
    shift
done
[[ -n $stage ]] || die "name a stage, stage1 or stage2; usage:$(usage)"
((steps >= 2)) || die "--steps $steps: pass at least 2 (the run is evaluated at steps 0, N/2 and N)"
# Seconds of each stage's own work, the machine's start not included: ~8 minutes of the
# 15-minute device allowance in all, so that a start, the gap between the calls and the
# machine's idle time after them fit.
budget=${budget:-$([[ $stage == stage1 ]] && echo 210 || echo 390)}
if [[ -z ${OUT-} ]]; then
    [[ -n $dry ]] || die "OUT is not set: run this through the device tool (it sets OUT), or set OUT=DIR"
    OUT=$(mktemp -d)
fi
cd "$REPO" || exit 2
HELDOUT_BOOKS=(models/corpus/kjv/heldout/*.txt)
export PYTHONPATH="$WORK/site:$REPO" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEADLINE=$((SECONDS + budget))

left() { echo $((DEADLINE - SECONDS)); }

# step NAME LIMIT CMD...: log it; run it (not in a dry run) under a time limit, SIGINT first;
# log how it ended. The exit status is the command's (124: stopped at its limit).
step() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo
    echo "=== $name [$(date -u +%H:%M:%S) UTC, limit ${limit} s]"
    echo "+ ${*@Q}"
    [[ -z $dry ]] || return 0
    if ((limit < 5)); then
        echo "=== $name: SKIPPED, the stage's budget is spent"
        return 124
    fi
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s$( ((rc == 124)) && echo ', STOPPED at its time limit')"
    return $rc
}

stage1() {
    # Stage 2 needs these two; the measurements below do not, so a failure here stops nothing.
    step "keep part 1 of the model in $WORK" 30 bash -c 'mkdir -p "$1" && cp .gpu-part1/* "$1"/' _ "$WORK" \
        || echo "=== no part 1 kept (was .gpu-part1 carried?): stage 2 cannot run after this stage 1"
    step "install the carried wheels into $WORK/site" 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
        || echo "=== the wheels are not installed (was .whl carried?): lm-eval and gguf are missing for stage 2"
    step "what this machine has" 60 "$PYTHON" benchmarks/gpu_check.py env
    if [[ -n $dry ]] || "$PYTHON" -c 'import flash_attn' 2>/dev/null; then
        [[ -z $dry ]] || echo "(next step only when flash_attn imports)"
        step "pieval's fused flash-attn rotary vs sdpa logits (tests/test_flash_rotary.py)" 150 \
            "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_flash_rotary.py
    else
        echo
        echo "=== flash_attn does NOT import here (see 'import flash_attn' above): the fused flash-attn rotary is NOT checked on this GPU"
    fi
    step "perplexity_memory.py at W = 32768, LLaMA-7B's width, 2 layers" $(($(left) - 10)) \
        "$PYTHON" benchmarks/perplexity_memory.py --device cuda --windows 32768 --vocab 32000 --hidden 4096 \
        --intermediate 11008 --heads 32 --layers 2 --max-positions 32768
    step "finetune_memory.py at L' = 8192, 16384 (vocab 32000, hidden 2048, 2 layers)" 240 \
        "$PYTHON" benchmarks/finetune_memory.py --device cuda --lengths 8192 16384 --hidden 2048 --intermediate 5504 --heads 16
    echo
    if stage1_kept; then
        echo "=== stage 1 done: part 1 and the packages are in $WORK; run stage 2 now (carry .gpu-part2)"
    else
        echo "=== stage 1 done, but stage 2 cannot follow it: part 1 or the packages are missing from $WORK (above)"
    fi
}

stage1_kept() { [[ -d $WORK/site && -f $WORK/gguf.json ]]; }

stage2() {
    local model=$WORK/smollm2/hf run=$WORK/ft text=$WORK/kjv-heldout.txt
    if [[ -z $dry ]] && ! stage1_kept; then
        echo "gpu_check.sh: stage 1's files are not in $WORK (the machine was given back between the calls): run stage1 again, then stage2 right after it" >&2
        return 3
    fi
    step "join the model's two parts, check their sha256" 90 "$PYTHON" benchmarks/gpu_check.py join "$WORK" .gpu-part2 "$WORK/model.gguf" \
        || return 1
    if ! step "convert it to a checkpoint and check it against golden.json" 180 \
        "$PYTHON" models/smollm2-135m/make.py --gguf "$WORK/model.gguf" --out "$WORK/smollm2"; then
        [[ -f $model/config.json ]] || return 1
        echo "=== the golden check FAILED (above), but the checkpoint was written: the fine-tune goes on with it"
    fi
    # One document of ~37k SmolLM2 tokens: the six held-out books, so that windows of 16384 slide
    # over text (every book alone but Mark is shorter than 8192 tokens).
    step "the evaluation text: the held-out KJV books as one document" 10 \
        bash -c 'for f in "${@:2}"; do cat "$f"; echo; done >"$1"' _ "$text" "${HELDOUT_BOOKS[@]}"

    # The paper's recipe (lr 2e-5, 20 warm-up steps from 10%, AdamW 0.9/0.95, bf16) at a global
    # batch of 1 sequence of 16384 tokens instead of 64, for few steps. Stride 1024 and 8 x 2
    # passkey prompts keep each evaluation near half a minute.
    local meta
    meta=$(printf '{"data_path": "%s", "windows": [8192, 16384], "stride": 1024, "max_docs": 1, "lengths": [16384], "num_distances": 8, "trials": 2}' "$text")
    local train=(--model "$model" --scaling-factor 2 --data models/corpus/kjv/train.jsonl.gz --max-steps "$steps"
        --global-batch 1 --micro-batch 1 --lr 2e-5 --warmup-steps 20 --warmup-start 0.1 --precision bf16
        --gradient-checkpointing --attn-implementation sdpa --save-every $((steps / 2)) --keep-training-state 1
        --no-progress)
    local evals=(--eval-tasks local_ppl,passkey --eval-every $((steps / 2)) --eval-batch-size 1
        --eval-metadata "$meta" --eval-log-samples)
    local args=("${train[@]}" "${evals[@]}" --output "$run") rc
    [[ ! -f $run/run.json ]] || args+=(--resume)
    if [[ -n $dry ]]; then
        "$PYTHON" benchmarks/gpu_check.py finetune-args "${args[@]}" || return 1
    fi
    step "pieval finetune: SmolLM2-135M, PI 8192 -> 16384, $steps steps" $(($(left) - 20)) "$PYTHON" -m pieval finetune "${args[@]}"
    rc=$?
    # A run that broke before its first step (an evaluation failing on this image, say) still
    # owes the training speed: train once more without evaluations in the time left.
    if [[ -z $dry ]] && ((rc != 0 && rc != 124)) && [[ ! -s $run/metrics.jsonl ]] && (($(left) > 90)); then
        run=$WORK/ft-no-eval
        step "pieval finetune again, without evaluations (the run above broke before training)" $(($(left) - 20)) \
            "$PYTHON" -m pieval finetune "${train[@]}" --output "$run" --overwrite
    fi
    step "summary" 20 "$PYTHON" benchmarks/gpu_check.py summary "$run"
    step "pack the results (no weights)" 20 tar -czf "$OUT/stage2-results.tar.gz" -C "$WORK" --exclude='*.safetensors' \
        --exclude=training_state --exclude='tokenizer*' "${run#"$WORK"/}" smollm2/hf/pieval_recipe.json
}

main() {
    echo "gpu_check.sh $stage: budget $budget s, work dir $WORK, output $OUT$([[ -n $dry ]] && echo ', DRY RUN: nothing is run')"
    local packed
    packed=$(sed -n 's/.*"commit": *"\([^"]*\)".*/\1/p' .gpu-part[12]/gguf.json 2>/dev/null | sort -u)
    echo "packed by gpu_prepare.sh at: ${packed:-no manifest carried}"
    "$stage"
}

main 2>&1 | tee "$OUT/$stage.log"
exit "${PIPESTATUS[0]}"
