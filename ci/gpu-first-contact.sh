#!/usr/bin/env bash
# The first thing to run the day a GPU is lent: every path of mpbench once, on one GPU, within a
# time budget (default 480 s), leaving records, logs and a one-screen summary in one folder.
#
#   ci/gpu-first-contact.sh [FOLDER]
#
# Steps, in this order (cheap and sure first, the compiled pass last with what is left):
#   env        mpbench env                                   -> env.json
#   modes      mpbench modes                                 -> modes.txt (which modes run here, why not)
#   doctor     mpbench doctor
#   eager      mpbench run, every mode, gpt2-small 8 x 512, 8 steps (3 warm-up)      -> records.jsonl
#   fidelity   mpbench fidelity, every mode, tiny 4 x 64                              -> fidelity.jsonl
#   numerics   mpbench numerics, every format on fp32's tensors, gpt2-small 8 x 512, 20 steps (the
#              statistics' CUDA path: hooks, torchao's casts, chunked sums)            -> numerics.jsonl
#   gemms      mpbench gemms, every mode's GEMMs one by one (the _scaled_mm/_int_mm contracts at the
#              model's shapes, measured vs the datasheet roofline)                       -> run.log
#   fp4        mpbench run --emulate, nvfp4, mxfp4 and fp8-tensorwise under --keep-high last:1,grad_weight, tiny
#              8 x 128: the 4-bit modes' emulated GEMMs and SR generators on CUDA, a GEMM kind kept high in
#              torchao's float8 Linear (nvfp4 native on a 10.x GPU where torchao's kernels load) -> records.jsonl
#   ddp-1rank  bf16 on a one-rank torchrun job under DDP    (--nproc 1 --parallel ddp)  -> records.jsonl
#   fsdp-1rank bf16 on a one-rank torchrun job under FSDP2  (--nproc 1 --parallel fsdp) -> records.jsonl
#   energy     mpbench run --energy-protocol, bf16 and fp8-tensorwise, tiny 8 x 128: NVML's idle wait,
#              the window sizing and the repeats on a real GPU (the step's limit may cut it short;
#              finished records stay)                                                  -> records.jsonl
#   compiled   mpbench run --compile, every mode (tf32, bf16 and the torchao modes first), same sizes
# On a CPU every step runs at tiny sizes (2 x 32, 4 steps) and the compiled pass runs bf16 only;
# the summary says so. Each step runs under `timeout` (at most 10 minutes, and never past the
# budget); each case of a run has --case-timeout, so one hang costs one case. The folder holds
# at most 8 files (what the device tool brings back): summary.txt, steps.tsv, run.log (every
# step's output), env.json, modes.txt, records.jsonl, fidelity.jsonl, numerics.jsonl. summary.txt is rewritten
# as each step starts and ends, so a kill at any moment leaves it current; SIGTERM or SIGINT
# stops the step in flight (mpbench keeps its finished records), runs nothing more, writes the
# summary and exits 143 or 130. Otherwise the exit code is 1 when a step failed, else 0.
#
# FOLDER: default $OUT when set (the device tool's folder), else results/<machine>/first-contact-<UTC time>.
# Needs: torch, and mpbench's dependencies but torchao (without it the torchao modes are skipped,
# and the summary shows it). Runs offline: the `mpbench` command when installed, else this
# checkout's `python -m suite.cli` (nothing to install). Environment, for tests and reruns:
#   FIRST_CONTACT_BUDGET_S  seconds for all steps (default 480)
#   FIRST_CONTACT_STEP_S    a cap on every step (default none: each step's own, at most 585 s)
#   MPBENCH                 the command to test (default: mpbench, else python -m suite.cli)
#   PYTHON                  the Python for the summary and the one-rank cases (default: python3)
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
FOLDER=${1:-${OUT:-}}
[ -n "$FOLDER" ] && FOLDER=$(mkdir -p "$FOLDER" && cd "$FOLDER" && pwd)
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # this checkout, in every process
PY=${PYTHON:-python3}
BUDGET_S=${FIRST_CONTACT_BUDGET_S:-480}
STEP_S=${FIRST_CONTACT_STEP_S:-585}
GRACE_S=15     # after a step's limit: SIGTERM, then SIGKILL this much later
MIN_STEP_S=20  # a step is not started with less than this left
if [ -n "${MPBENCH:-}" ]; then read -r -a MPB <<<"$MPBENCH"
elif command -v mpbench >/dev/null 2>&1; then MPB=(mpbench)
else MPB=("$PY" -m suite.cli); fi
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
STOPPED='' CHILD='' FAILED=0
# the env step decides the folder when none was given: until then, a staging folder
DIR=${FOLDER:-$(mktemp -d "${TMPDIR:-/tmp}/first-contact.XXXXXX")}
touch "$DIR/run.log" "$DIR/steps.tsv" "$DIR/records.jsonl" "$DIR/fidelity.jsonl" "$DIR/numerics.jsonl"

# shellcheck disable=SC2317  # called by the traps below
on_signal() {  # stop the step in flight (timeout passes SIGTERM on to its command's group); run nothing more
    STOPPED=$1
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

summary() { "$PY" "$HERE/first_contact.py" summary "$DIR" "$BUDGET_S" 2>>"$DIR/run.log"; }
lines() { wc -l <"$DIR/$1" | tr -d ' '; }
row() {  # name state rc seconds log_from log_to records rec_from rec_to expect what note command
    local IFS=$'\t'
    echo "$*" | tr -d '\n' >>"$DIR/steps.tsv"
    echo >>"$DIR/steps.tsv"
}
not_run() {  # NAME WHAT WHY
    row "$1" "not run" "" "" 0 0 "" 0 0 "" "$2" "$3" ""
}

# step NAME CAP_S WHAT RECORDS EXPECT STDOUT -- COMMAND...: run it under `timeout`, its output
# appended to run.log (stdout to STDOUT instead when given), and note how it ended.
step() {
    local name=$1 cap=$2 what=$3 records=$4 expect=$5 stdout=$6
    shift 7
    if [ -n "$STOPPED" ]; then not_run "$name" "$what" "stopped by SIG$STOPPED first"; return; fi
    local left=$((DEADLINE - $(date +%s) - GRACE_S))
    if [ "$left" -lt "$MIN_STEP_S" ]; then
        not_run "$name" "$what" "not reached: the ${BUDGET_S} s budget was spent"
        summary
        return
    fi
    local limit=$cap
    for bound in "$left" "$STEP_S" 585; do [ "$bound" -lt "$limit" ] && limit=$bound; done
    local log_from rec_from=0 t0 rc
    [ -n "$records" ] && rec_from=$(lines "$records")
    printf '=== %s (limit %s s, %s): %s\n' "$name" "$limit" "$(date -u +%H:%M:%S)" "$*" >>"$DIR/run.log"
    log_from=$(stat -c %s "$DIR/run.log")
    row "$name" running "" "" "$log_from" 0 "$records" "$rec_from" 0 "$expect" "$what" "" "$*"
    summary
    echo "first contact: $name (limit $limit s): $what" >&2
    t0=$(date +%s.%N)
    if [ -n "$stdout" ]; then
        timeout -k "$GRACE_S" "$limit" "$@" >"$DIR/$stdout" 2>>"$DIR/run.log" &
    else
        timeout -k "$GRACE_S" "$limit" "$@" >>"$DIR/run.log" 2>&1 &
    fi
    CHILD=$!
    wait "$CHILD"
    rc=$?
    if [ -n "$STOPPED" ]; then  # the wait was cut short by the signal: wait for the step itself
        wait "$CHILD"
        local again=$?
        [ "$again" -ne 127 ] && rc=$again
    fi
    CHILD=''
    local seconds note=
    seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
    124) note="stopped at its limit of $limit s" ;;
    137) note="killed $GRACE_S s after its limit of $limit s, or by SIGKILL" ;;
    esac
    [ -n "$STOPPED" ] && note="stopped by SIG$STOPPED"
    echo "first contact: $name: exit $rc in $seconds s${note:+ ($note)}" >&2
    [ "$rc" -ne 0 ] && FAILED=1
    local rec_to=0
    [ -n "$records" ] && rec_to=$(lines "$records")
    row "$name" "done" "$rc" "$seconds" "$log_from" "$(stat -c %s "$DIR/run.log")" "$records" "$rec_from" "$rec_to" \
        "$expect" "$what" "$note" "$*"
    summary
}

# ---------------------------------------------------------------- what the machine is
step env 60 "mpbench env: environment, peak FLOP/s row, NVML" "" "" env.json -- "${MPB[@]}" env
read -r DEVICE MACHINE < <("$PY" "$HERE/first_contact.py" facts "$DIR" || echo unknown unknown)
if [ "$DEVICE" != cuda ] && [ "$DEVICE" != cpu ]; then  # env failed: ask torch, so the sizes still suit the machine
    DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)
fi
if [ -z "$FOLDER" ]; then
    FOLDER=$ROOT/results/$MACHINE/first-contact-$(date -u +%Y-%m-%dT%H%M%SZ)
    mkdir -p "$FOLDER" && mv "$DIR"/* "$FOLDER"/ && rmdir "$DIR"
    DIR=$FOLDER
fi
summary

if [ "$DEVICE" = cuda ]; then
    SIZES=(--model gpt2-small --batch-size 8 --seq-len 512 --steps 8 --warmup 3)
    SIZE_TEXT="gpt2-small 8x512, 8 steps"
    WHATIF=(--model gpt2-small --batch-size 8 --seq-len 512 --steps 20)
    WHATIF_TEXT="gpt2-small 8x512, 20 fp32 steps"
    GEMMS=(--model gpt2-small --batch-size 8 --seq-len 512)
    GEMMS_TEXT="gpt2-small 8x512"
    ENERGY=(--model tiny --batch-size 8 --seq-len 128 --steps 20 --warmup 5)
    ENERGY_TEXT="tiny 8x128, 3 repeats"
    FP4=(--model tiny --batch-size 8 --seq-len 128 --steps 8 --warmup 2)
    FP4_TEXT="tiny 8x128, 8 steps"
    COMPILE_FIRST=fp32,tf32,bf16,fp8-tensorwise,int8-mixed,amp-fp16,fp8-rowwise,mxfp8,pure-bf16-sr,pure-bf16,pure-fp16
else
    SIZES=(--model tiny --batch-size 2 --seq-len 32 --steps 4 --warmup 2)
    SIZE_TEXT="tiny 2x32, 4 steps"
    WHATIF=(--model tiny --batch-size 2 --seq-len 32 --steps 4)
    WHATIF_TEXT="tiny 2x32, 4 fp32 steps"
    GEMMS=(--model tiny --batch-size 2 --seq-len 32 --repeats 2)
    GEMMS_TEXT="tiny 2x32"
    ENERGY=("${SIZES[@]}")
    ENERGY_TEXT="$SIZE_TEXT, 3 repeats, no NVML"
    FP4=("${SIZES[@]}")
    FP4_TEXT="$SIZE_TEXT"
    not_run gpu-sizes "gpt2-small 8x512, eager and compiled" "no GPU: tiny sizes instead"
    COMPILE_FIRST=bf16
fi

step modes 60 "mpbench modes: what runs here, and why not" "" "" modes.txt -- "${MPB[@]}" modes
MODES=$("$PY" "$HERE/first_contact.py" modes "$DIR")  # empty when `mpbench modes` failed: then "all"
EAGER=${MODES:-all}
if [ "$DEVICE" = cuda ]; then  # every mode, in the order above; modes added later go last
    COMPILED=$(tr ',' '\n' <<<"$COMPILE_FIRST,$MODES" | awk -v known=",$MODES," 'index(known, "," $0 ",") && !seen[$0]++' |
        paste -sd, -)
    [ -n "$MODES" ] || COMPILED=all
else
    COMPILED=$COMPILE_FIRST
    not_run gpu-compile "mpbench run --compile, the other modes" "no GPU: a CPU compiles bf16 only"
fi

# ---------------------------------------------------------------- the checks and the matrix
step doctor 150 "mpbench doctor" "" "" "" -- "${MPB[@]}" doctor
step eager 240 "mpbench run, every mode, $SIZE_TEXT" records.jsonl "$MODES" "" -- \
    "${MPB[@]}" run --modes "$EAGER" "${SIZES[@]}" --case-timeout 60 --out "$DIR/records.jsonl"
step fidelity 120 "mpbench fidelity, every mode, tiny 4x64" fidelity.jsonl "$MODES" "" -- \
    "${MPB[@]}" fidelity --model tiny --batch-size 4 --seq-len 64 --out "$DIR/fidelity.jsonl"
step numerics 120 "mpbench numerics, every format, $WHATIF_TEXT" numerics.jsonl fp32 "" -- \
    "${MPB[@]}" numerics "${WHATIF[@]}" --out "$DIR/numerics.jsonl"
step gemms 90 "mpbench gemms, every mode, $GEMMS_TEXT" "" "" "" -- "${MPB[@]}" gemms --modes "$EAGER" "${GEMMS[@]}"
step fp4 150 "mpbench run --emulate, nvfp4, mxfp4, fp8-tensorwise keeping grad_weight high, $FP4_TEXT" records.jsonl \
    nvfp4,mxfp4,fp8-tensorwise "" -- "${MPB[@]}" run --emulate --modes nvfp4,mxfp4,fp8-tensorwise \
    --keep-high last:1,grad_weight "${FP4[@]}" --case-timeout 60 --out "$DIR/records.jsonl"
for parallel in ddp fsdp; do
    step "$parallel-1rank" 150 "one-rank torchrun ${parallel^^}, bf16, $SIZE_TEXT" records.jsonl bf16 "" -- \
        "${MPB[@]}" run --modes bf16 --nproc 1 --parallel "$parallel" "${SIZES[@]}" --case-timeout 120 \
        --out "$DIR/records.jsonl"
done
step energy 150 "mpbench run --energy-protocol, bf16 and fp8-tensorwise, $ENERGY_TEXT" records.jsonl "" "" -- \
    "${MPB[@]}" run --energy-protocol --modes bf16,fp8-tensorwise "${ENERGY[@]}" --case-timeout 60 \
    --out "$DIR/records.jsonl"
step compiled 585 "mpbench run --compile, $SIZE_TEXT" records.jsonl "${COMPILED#all}" "" -- \
    "${MPB[@]}" run --compile --modes "$COMPILED" "${SIZES[@]}" --case-timeout 150 --out "$DIR/records.jsonl"

summary
cat "$DIR/summary.txt"
case $STOPPED in
INT) exit 130 ;;
TERM) exit 143 ;;
esac
exit $FAILED
