#!/usr/bin/env bash
# One GPU session of issue 4: the fast-path table of benchmarks/flow_throughput.py on a paper-size
# Glow (K=32, L=3, 512 hidden), then dense frames/s plain and with the fast path.
#
#   bash benchmarks/gpu_session.sh [CIFAR_NPZ]      # or DENSEAD_CIFAR=... bash benchmarks/gpu_session.sh
#
# Data: ../shared/data does not travel to the GPU machine. Before the run, copy the npz into a
# git-ignored folder and name it in `carry`, e.g.
#   mkdir -p runs/gpu_data && cp ../shared/data/cifar10_test.npz runs/gpu_data/   (28 MB; runs/ is ignored)
#   run(command="bash benchmarks/gpu_session.sh runs/gpu_data/cifar10_test.npz", carry=["runs/gpu_data"])
# The path comes from $1, else $DENSEAD_CIFAR, else runs/gpu_data/cifar10_test.npz.
#
# Output: every table goes to stdout and to $OUT/ (when set; else runs/gpu_session/), one file per part,
# written as rows finish, so a run cut short still returns what it measured.
#
# Sizing (whole script ≤ ~8 min on one H100; each part has its own timeout, from SESSION_BUDGET_S):
#   reference (issue 4): public Glow K=32 L=3 512 hidden trains at 781 img/s, batch 256, TF32, i.e.
#   ~0.33 s per batch-256 step; flow_throughput.py counts 24.1 GFLOP/img train and 8.0 eval
#   (18.8 TFLOP/s at 781 img/s, ~4% of the H100's TF32 dense peak).
#   * per row, timing: 2 warm-up + 10 timed train steps and as many eval batches, ~5 s at batch 256
#     (plain), less with the levers, ~2 s at batch 64;
#   * per row, --bpd-steps 50: 50 × 0.33 s ≈ 17 s at batch 256 plain, ≈ 8 s with bf16, ≈ 5 s at batch 64;
#     6 levers × 2 batch sizes ≈ 2 min in all, plus ~2 s of test-set evaluation per row;
#   * compile (rows "compile" and "all"): flow steps compile in place, one code object for all 96 steps,
#     a few variants (3 scale shapes, train/eval, bf16); assume 30–60 s per row, ~3 min for 4 rows;
#   * dense: 1×3×1024×2048 is 16.5 TFLOP per frame (8.0 GFLOP per 32×32 tile × 2048 tiles), ~1 s per
#     frame plain, 12 frames per measurement, 4 measurements (plain / fast+bf16), ~1 min.
#   * large batch (the 6,000 img/s target): batch 1024, rows all / all+recompute / all+cudagraphs,
#     timing only (no bpd), ~1 min with compile;
#   Total ≈ 7–8 min plus start-up. Batch 256 runs first (the reference's batch); if compile is slower
#   than assumed, the per-part timeouts cut the later parts rather than the session.
#   The ≤ 0.01 bpd check after 2,000 steps does not fit in this call: run it in a call of its own,
#     ONLY=bpd LEVERS="all plain" BPD_STEPS=2000 SESSION_BUDGET_S=570 bash benchmarks/gpu_session.sh ...
#   (timeout_s=600). The fast row goes first; plain fp32 at batch 64 needs 2,000 × 64 / (img/s) seconds —
#   at the public implementation's 195 img/s that is 656 s, more than a call: if the plain row is cut,
#   take its img/s from the main table and rerun with BPD_STEPS as large as that allows, both rows.
set -uo pipefail

cd "$(dirname "$0")/.."
CIFAR="${1:-${DENSEAD_CIFAR:-runs/gpu_data/cifar10_test.npz}}"
OUT_DIR="${OUT:-runs/gpu_session}"
BUDGET="${SESSION_BUDGET_S:-480}"
LEVERS="${LEVERS:-plain bf16 channels_last compile fused recompute cudagraphs all}"
BPD_STEPS="${BPD_STEPS:-50}"
ONLY="${ONLY:-}"  # "bpd": only the bits/dim comparison at batch 64 (BPD_STEPS steps per lever)
EXTRA=(${EXTRA_ARGS:-})  # e.g. EXTRA_ARGS="--small --iters 1" for a CPU smoke test of this script
mkdir -p "$OUT_DIR"
START=$SECONDS

if [[ ! -f "$CIFAR" ]]; then
    echo "CIFAR-10 npz not found: $CIFAR (pass it as \$1 or DENSEAD_CIFAR; see the header)" >&2
    exit 2
fi
PY=python
[[ -x .venv/bin/python ]] && PY=.venv/bin/python

left() { echo $((BUDGET - (SECONDS - START))); }

part() {  # part NAME SHARE_OF_REMAINING_PERCENT COMMAND...: run with a timeout, tee to $OUT_DIR/NAME.md
    local name=$1 share=$2
    shift 2
    local limit=$(($(left) * share / 100))
    if ((limit < 20)); then
        echo "skipped $name: ${limit}s left" | tee "$OUT_DIR/$name.md"
        return
    fi
    echo "== $name (timeout ${limit}s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>"$OUT_DIR/$name.stderr" | tee "$OUT_DIR/$name.md"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - START))s"
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
    git rev-parse HEAD 2>/dev/null
    git status --short 2>/dev/null
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >"$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

export DENSEAD_CIFAR="$CIFAR"
if [[ "$ONLY" == bpd ]]; then
    part bpd_b64 95 $PY benchmarks/flow_throughput.py --batch-sizes 64 --levers $LEVERS \
        --bpd-steps "$BPD_STEPS" --iters 2 --no-dense "${EXTRA[@]}"
    echo "total $((SECONDS - START))s; tables in $OUT_DIR"
    exit 0
fi
# Shares of the time left when each part starts: 256 gets 50%, 64 then 55%, batch 1024 50%, dense the rest.
part throughput_b256 50 $PY benchmarks/flow_throughput.py --batch-sizes 256 --levers $LEVERS \
    --bpd-steps "$BPD_STEPS" --iters 10 --no-dense "${EXTRA[@]}"
part throughput_b64 55 $PY benchmarks/flow_throughput.py --batch-sizes 64 --levers $LEVERS \
    --bpd-steps "$BPD_STEPS" --iters 10 --no-dense "${EXTRA[@]}"
part throughput_b1024 50 $PY benchmarks/flow_throughput.py --batch-sizes 1024 \
    --levers plain all all+recompute all+cudagraphs --iters 5 --no-dense "${EXTRA[@]}"
# --batch-sizes with no value: dense table only
part dense_plain 45 $PY benchmarks/flow_throughput.py --batch-sizes --iters 10 --dense-fast off "${EXTRA[@]}"
part dense_fast 95 $PY benchmarks/flow_throughput.py --batch-sizes --iters 10 --dense-fast auto --dense-bf16 \
    "${EXTRA[@]}"
echo "total $((SECONDS - START))s; tables in $OUT_DIR"
