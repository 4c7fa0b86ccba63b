#!/usr/bin/env bash
# One GPU session of issue 4: graphed-vs-eager checks, the fast-path table of
# benchmarks/flow_throughput.py on a paper-size Glow (K=32, L=3, 512 hidden) at batch 256, the bits/dim
# trajectories of the fast path against the fp32 path (batch 64, same seed, and another seed), the
# batch-1024 rows, dense frames/s plain and fast, and a profile of the step.
#
#   bash benchmarks/gpu_session.sh [CIFAR_NPZ]      # or DENSEAD_CIFAR=... bash benchmarks/gpu_session.sh
#
# Data: ../shared/data does not travel to the GPU machine. Before the run, copy the npz into a
# git-ignored folder and name it in `carry`, e.g.
#   mkdir -p runs/gpu_data && cp ../shared/data/cifar10_test.npz runs/gpu_data/   (28 MB; runs/ is ignored)
#   run(command="bash benchmarks/gpu_session.sh runs/gpu_data/cifar10_test.npz", carry=["runs/gpu_data"],
#       timeout_s=600)
# The path comes from $1, else $DENSEAD_CIFAR, else runs/gpu_data/cifar10_test.npz. The device's own
# python3 runs it (the repo on PYTHONPATH; no install needed: torch and numpy are all it imports).
#
# Output: every table goes to stdout and to $OUT/ (when set; else runs/gpu_session/), one file per part,
# written as rows finish, so a run cut short still returns what it measured; stderr to stderr.log
# (6 files in all: at most 8 come back from the device; names without '+', which do not come back).
#
# Parts, in order, each with a timeout (seconds of SESSION_BUDGET_S, default 570, the whole call); the
# order is by what issue 4 needs most, so a cut loses the least:
#   checks      benchmarks/cuda_graph_check.py --small: graphed training steps and forwards against the
#               eager path (cudagraphs, on+cudagraphs = train.fast: auto on CUDA, all+cudagraphs;
#               capture, replays, fallbacks), ≤ 40 s (ONLY=verify: ≤ 120 s)
#   throughput  batch 256, levers plain all+cudagraphs all-compile+cudagraphs cudagraphs all fused bf16
#               channels_last compile recompute (the rows that matter most first: a cut loses the
#               last); timing only, ≤ 230 s
#   bpd         bits/dim trajectories at batch 64, test bits/dim every 250 steps, as processes side by
#               side on the GPU (their img/s are then not clean: take speeds from the throughput table),
#               ≤ BPD_LIMIT s (default 190): FAST 2000 steps, cudagraphs 2000 steps (fp32, the plain
#               path's kernels replayed: the reference at 2000 steps) and cudagraphs 2000 steps with
#               seed 1 (the yardstick: how far another seed lands), all into bpd.md. FAST is
#               all+cudagraphs, or all-compile+cudagraphs when the throughput table has no number for
#               all+cudagraphs (compiled steps failed to capture). Read them as
#               docs/results_gpu_speed.md says: one checkpoint of the test bits/dim moves by up to 0.02
#               from float rounding alone (measured on CPU, session 9), so compare the mean over the
#               checkpoints 1250-2000 against the seed-1 run's distance.
#   large       batch 1024, all+cudagraphs and all, ≤ 45 s
#   dense       1×3×1024×2048 Glow pixel map and a 256-d feature flow at stride 8, plain then the fast
#               path (fused, channels_last, bf16), ≤ 25 s each
#   profile     benchmarks/profile_step.py: wall vs GPU-kernel time per step, plain / all / all+cudagraphs,
#               batch 256, the rest (appended to checks.md)
# Session 6 (H200) measured the first version: eager steps are host-bound (plain batch 256: 232 ms
# wall, 141 ms of GPU kernels; bf16+fused+channels_last: 276 ms wall, 77 ms of kernels), hence the
# whole-step CUDA graphs (densead.train.GraphedTrainingStep) behind the cudagraphs rows.
# Session 20 (H200) measured every part but the trajectories to 2,000 steps (cut at 500-1,000) and
# the compiled cases of the checks (all+cudagraphs was cut by its 40 s while importing inductor;
# on+cudagraphs, auto's training path on CUDA since session 20, came after): the next GPU session
# runs ONLY=verify, those two in one call (checks ≤ 120 s, then the trajectories: at session 20's
# rates, at least 360 s for the three runs side by side; docs/results_gpu_speed.md).
# If device time is left after it (a warm machine: about 200 s), the table of auto's training path,
# which session 20 did not measure: LEVERS="plain on+cudagraphs" ONLY=table SESSION_BUDGET_S=200.
# ONLY=bpd runs the trajectories alone (in all the time left); ONLY=table the batch-256 table of
# LEVERS; ONLY=large the batch-1024 rows; LEVERS,
# BPD_RUNS ("lever:steps lever:steps:seed ..."; seed 0 when left out; FAST as above), BPD_LIMIT,
# BPD_EVERY, BPD_BATCH override.
# EXTRA_ARGS="--small --iters 1" is the CPU smoke test of this script (with
# EXTRA_PROFILE_ARGS="--small --batch 8 --steps 1"; about 6 min on 2 cores): run it before spending
# GPU time (session 9's run caught an inductor failure of the all lever that way).
set -uo pipefail

cd "$(dirname "$0")/.."
CIFAR="${1:-${DENSEAD_CIFAR:-runs/gpu_data/cifar10_test.npz}}"
OUT_DIR="${OUT:-runs/gpu_session}"
BUDGET="${SESSION_BUDGET_S:-570}"
LEVERS="${LEVERS:-plain all+cudagraphs all-compile+cudagraphs cudagraphs all fused bf16 channels_last compile recompute}"
BPD_RUNS="${BPD_RUNS:-FAST:2000 cudagraphs:2000 cudagraphs:2000:1}"
BPD_LIMIT="${BPD_LIMIT:-190}"
BPD_EVERY="${BPD_EVERY:-250}"
BPD_BATCH="${BPD_BATCH:-64}"
ONLY="${ONLY:-}"
EXTRA=(${EXTRA_ARGS:-})
EXTRA_PROFILE=(${EXTRA_PROFILE_ARGS:-})  # e.g. "--small --batch 8 --steps 1" for the CPU smoke test
mkdir -p "$OUT_DIR"
START=$SECONDS

if [[ ! -f "$CIFAR" ]]; then
    echo "CIFAR-10 npz not found: $CIFAR (pass it as \$1 or DENSEAD_CIFAR; see the header)" >&2
    exit 2
fi
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; elif command -v python3 >/dev/null; then PY=python3; else PY=python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DENSEAD_CIFAR="$CIFAR"
BENCH=(benchmarks/flow_throughput.py)
# One compile cache for the parts that run one after another (a later part reuses what an earlier
# one compiled), emptied after a part that timed out: a process killed while writing a kernel
# left it truncated, and the next part failed loading it (InductorError: "<kernel>.so: file too
# short", seen in the CPU smoke run). Runs side by side (bpd) get their own.
CACHE=$(mktemp -d)
export TORCHINDUCTOR_CACHE_DIR="$CACHE/inductor" TRITON_CACHE_DIR="$CACHE/triton"
trap 'rm -rf "$CACHE"' EXIT

left() { echo $((BUDGET - (SECONDS - START))); }

part() {  # part NAME SECONDS COMMAND...: run with a timeout (at most the time left), append to $OUT_DIR/NAME.md
    local name=$1 limit=$2
    shift 2
    ((limit > $(left) - 5)) && limit=$(($(left) - 5))
    if ((limit < 20)); then
        echo "skipped $name: ${limit}s left" | tee -a "$OUT_DIR/$name.md"
        return
    fi
    echo "== $name (timeout ${limit}s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>>"$OUT_DIR/stderr.log" | tee -a "$OUT_DIR/$name.md"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - START))s"
    if ((status == 124 || status == 137)); then  # timed out: maybe in the middle of a compile
        rm -rf "${CACHE:?}/inductor" "${CACHE:?}/triton"
    fi
}

fast_lever() {  # all+cudagraphs, unless this session's throughput table has no number for it
    if [[ -f "$OUT_DIR/throughput_b256.md" ]] && ! grep -qE '^\| all\+cudagraphs \|[^|]*\| [0-9]+ \| [0-9.]+ \|' \
        "$OUT_DIR/throughput_b256.md"; then
        echo all-compile+cudagraphs
    else
        echo all+cudagraphs
    fi
}

bpd() {  # the trajectories of BPD_RUNS ("lever:steps" or "lever:steps:seed"; FAST: fast_lever) side by side
    local limit=$1 run lever steps seed parts i n=0 fast
    fast=$(fast_lever)
    ((limit > $(left) - 10)) && limit=$(($(left) - 10))
    if ((limit < 20)); then
        echo "skipped bpd: ${limit}s left"
        return
    fi
    echo "== bpd (timeout ${limit}s): ${BPD_RUNS//FAST/$fast}; batch $BPD_BATCH"
    parts=$(mktemp -d)  # one file per run while they run; one bpd.md in $OUT_DIR (8 files come back)
    for run in $BPD_RUNS; do
        IFS=: read -r lever steps seed <<<"$run"
        [[ $lever == FAST ]] && lever=$fast
        n=$((n + 1))
        # Own compile caches: runs compiling the same kernels at once raced on the shared one
        # (InductorError: "<kernel>.so: file too short", seen on CPU with two compiling runs).
        TORCHINDUCTOR_CACHE_DIR="$parts/inductor$n" TRITON_CACHE_DIR="$parts/triton$n" \
            timeout --signal=INT --kill-after=10 "$limit" $PY "${BENCH[@]}" --batch-sizes "$BPD_BATCH" \
            --levers "$lever" --bpd-steps "$steps" --seed "${seed:-0}" --bpd-every "$BPD_EVERY" "${EXTRA[@]}" \
            >"$parts/$n.md" 2>>"$OUT_DIR/stderr.log" &
    done
    wait
    for ((i = 1; i <= n; i++)); do cat "$parts/$i.md"; done | tee -a "$OUT_DIR/bpd.md"
    rm -rf "$parts"
    echo "== bpd: done after $((SECONDS - START))s"
}

# The environment goes to stdout only: at most 8 files come back from $OUT.
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
git rev-parse HEAD 2>/dev/null
$PY -c "import sys, torch, densead.flows; print(sys.executable, 'torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1

table() {
    part throughput_b256 "$1" $PY "${BENCH[@]}" --batch-sizes 256 --levers $LEVERS --iters 20 --no-dense \
        "${EXTRA[@]}"
}

large() {
    part throughput_b1024 "$1" $PY "${BENCH[@]}" --batch-sizes 1024 --levers all+cudagraphs all --iters 10 \
        --no-dense "${EXTRA[@]}"
}

case "$ONLY" in
bpd) bpd $(($(left) - 10)) ;;
verify)
    part checks 120 $PY benchmarks/cuda_graph_check.py --small
    bpd $(($(left) - 10))
    ;;
table) table $(($(left) - 5)) ;;
large) large $(($(left) - 5)) ;;
"")
    part checks 40 $PY benchmarks/cuda_graph_check.py --small
    table 230
    bpd "$BPD_LIMIT"
    large 45
    part dense 25 $PY "${BENCH[@]}" --batch-sizes --iters 10 --dense-fast off "${EXTRA[@]}"
    part dense 25 $PY "${BENCH[@]}" --batch-sizes --iters 10 --dense-fast auto --dense-bf16 "${EXTRA[@]}"
    part checks $(($(left) - 5)) $PY benchmarks/profile_step.py --levers plain all all+cudagraphs --batch 256 \
        "${EXTRA_PROFILE[@]}"
    ;;
*) echo "ONLY: unknown value $ONLY (verify, bpd, table, large or empty)" >&2 && exit 2 ;;
esac
echo "total $((SECONDS - START))s; tables in $OUT_DIR"
