#!/usr/bin/env bash
# Prepares the carry folders of the GPU check (benchmarks/gpu_check.sh). Run it HERE, in the
# checkout that the device tool sends (its repository root), after `make real-model`:
#
#     bash benchmarks/gpu_prepare.sh [GGUF]     # default models/smollm2-135m/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
#
# It fills three git-ignored folders (listed in .git/info/exclude, so no tracked file changes):
#   .whl/        the Python packages pieval needs that the GPU machine's image lacks, as wheels
#   .gpu-part1/  the first part of the xz-compressed GGUF file (travels with .whl in stage 1)
#   .gpu-part2/  the second part (travels alone in stage 2)
# and sizes the parts so that each call stays under the device tool's 64 MiB, working tree included.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PYTHON=${PYTHON:-python3}
GGUF=${1:-models/smollm2-135m/gguf/SmolLM2-135M-Instruct.Q4_1.gguf}
LIMIT=$((64 * 1024 * 1024))  # what one call of the device tool carries
MARGIN=$((2 * 1024 * 1024))  # for files that change between this script and the calls

# pieval's and lm-eval's requirements that are not on the image (KINDS.md's package list), at
# the versions pieval is tested with; --no-deps, so each needed dependency is named here.
# datasets pins fsspec<=2026.9.0, and the image's fsspec version is unknown: carry that one.
# Not carried: rouge-score (only the govreport task imports it, which does not run there; PyPI
# has no wheel of it) and lm-eval's optional extras.
WHEELS=(lm-eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 evaluate==0.4.6 gguf==0.19.0)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.gpu-part1/ /.gpu-part2/; do
    grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"
done

# The device README's recipe: CPython 3.12 on x86-64 manylinux, binary wheels only.
rm -rf .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls .whl

total_bytes() { xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
# what travels in every call: tracked files and untracked ones that git does not ignore
tree=$(git ls-files -z --cached --others --exclude-standard | total_bytes)
wheels=$(find .whl -type f -print0 | total_bytes)
first=$((LIMIT - MARGIN - tree - wheels))
second=$((LIMIT - MARGIN - tree))
echo "working tree $tree bytes, wheels $wheels bytes: part 1 may hold $first bytes, part 2 $second"
if ((first <= 0)); then
    echo "gpu_prepare.sh: the working tree and the wheels alone fill a call ($tree + $wheels bytes of $LIMIT): commit or ignore large untracked files" >&2
    exit 1
fi
"$PYTHON" benchmarks/gpu_check.py split "$GGUF" --first-max "$first" --second-max "$second"

cat <<EOF

Ready. On the GPU machine, through the device tool (second call right after the first):
  1. run  command: bash benchmarks/gpu_check.sh stage1    carry: [".whl", ".gpu-part1"]   timeout_s: 270
  2. run  command: bash benchmarks/gpu_check.sh stage2    carry: [".gpu-part2"]           timeout_s: 450
EOF
