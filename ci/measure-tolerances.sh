#!/usr/bin/env bash
# Re-measure the convergence tolerances (docs/convergence-and-fidelity.md, "Tolerances"): every mode at
# the default sizes of the device found, over SEEDS seeds (default 10), then the bound each mode's
# paired deltas give (suite/reporting/tolerances.py). Paste the printed bounds into
# suite/reporting/convergence.py MEASURED and commit the records under results/tolerances/.
# Usage: ci/measure-tolerances.sh [OUT.jsonl]   (env: SEEDS, MPBENCH_DEVICE, MPBENCH_TOL_ARGS)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/tolerances/$(hostname)-$(date +%Y%m%d).jsonl}
mkdir -p "$(dirname "$OUT")"
# --resume: an interrupted measurement goes on where it stopped
resume=()
[ -s "$OUT" ] && resume=(--resume "$OUT")
mpbench run --device "${MPBENCH_DEVICE:-auto}" --modes all --seeds "${SEEDS:-10}" --out "$OUT" "${resume[@]}" \
    ${MPBENCH_TOL_ARGS:-} --quiet || [ $? -eq 1 ]  # a failed case is a record and a verdict, not the end
mpbench check "$OUT" || true  # the verdicts under today's table, for the log
python -m suite.reporting.tolerances "$OUT"
