#!/usr/bin/env bash
# GPU CI: the precision matrix as benchmarks, its gates (convergence vs fp32, memory ordering,
# committed baseline), and an asv comparison of this commit with its base.
# Runs the same on a laptop with a GPU: `ci/gpu-benchmarks.sh [BASE_REF]`.
# Exit code: non-zero when a benchmark gate or the asv comparison finds a regression.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-${MPBENCH_BASE_REF:-origin/main}}
OUT=${MPBENCH_CI_OUT:-ci-artifacts}
mkdir -p "$OUT"

# The runner's own CUDA build of torch stays; mpbench and its dev tools go on top.
python -m pip install --quiet -e ".[dev]"
mpbench env | tee "$OUT/env.json"

status=0
# pytest-benchmark JSON (whole-case times) + every record (mpbench's own figures).
pytest benchmarks/ -rA --benchmark-json="$OUT/benchmarks.json" --mpbench-out="$OUT/records.jsonl" \
    ${MPBENCH_BENCH_ARGS:-} || status=$?

# asv: results for the base and this commit in the current environment, then compare the
# lower-is-better figures; regressions beyond 10% fail the job.
machine=$(python -c "import torch; print((torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu').lower().replace(' ', '-'))")
asv machine --yes --machine "$machine" >/dev/null
head=$(git rev-parse HEAD)
base=$(git rev-parse "$BASE" 2>/dev/null || true)
if [ -n "$base" ] && [ "$base" != "$head" ]; then
    # a base from before asv was set up has nothing to compare with
    ci/asv-commit.sh "$base" "$machine" || { echo "asv: no results for base $base; not compared" >&2; base=""; }
    git checkout --quiet "$head"
    python -m pip install --quiet -e .
fi
ci/asv-commit.sh "$head" "$machine"
# asv 0.6 loads its JavaScript from CDNs, which a GPU runner may not reach: serve it from the html dir
asv publish >/dev/null && python ci/asv_offline.py .asv/html && cp -r .asv/html "$OUT/asv-html"
if [ -n "$base" ] && [ "$base" != "$head" ]; then
    asv compare --factor 1.1 --split --machine "$machine" "$base" "$head" | tee "$OUT/asv-compare.txt"
    # asv compare marks a figure that got worse beyond the factor with '+' in its Change column
    if grep -E '^\|\s*\+\s*\|.*track_lower_' "$OUT/asv-compare.txt" >/dev/null; then
        echo "asv: lower-is-better figures regressed beyond 10% (see $OUT/asv-compare.txt)" >&2
        status=1
    fi
fi
exit $status
