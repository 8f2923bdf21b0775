#!/usr/bin/env bash
# Everything a GPU session runs, as one command of at most 8 minutes, from the repository root or anywhere:
#
#     bench/run_gpu.sh [tests] [train] [ops] [e2e]      (no argument: all four, in this order)
#
#   tests  pytest -m gpu over tests/ (the ops on every backend's GPU row, the kernels, the captured step)
#   train  cli.py train --device gpu --dataset fashion-mnist --epochs 2, on the data the command carries
#   ops    bench/gpu_ops.py --batches 64,256          (per op against cuDNN / PyTorch, device ceilings)
#   e2e    bench/gpu_train.py                         (training steps: gpucnn captured and eager, PyTorch
#                                                      eager, torch.compile reduce-overhead, jax.jit)
#
# Time: the whole run stops within $GPUCNN_TOTAL_SECONDS (default 440) of its start, which fits one
# 8-minute command of a 15-minute GPU budget with the machine's start-up. Every step runs under
# `timeout`: its own limit (below) or what is left of the total, whichever is smaller; a step with
# under 15 s left is skipped. A failed or timed-out step does not stop the others; the script exits 1
# if any failed.
#
# Raw outputs go to bench/results/gpu-<UTC date-time>/ (or $GPUCNN_RESULTS_DIR/gpu-<...>/):
# environment.txt (date, device, driver, CUDA, CuPy, PyTorch, JAX versions, nvidia-smi), one
# <step>.log per step (stdout and stderr), the benchmarks' JSON, the training run's metrics, and
# status.txt with each step's exit status and seconds. Without a usable GPU it stops at once with one
# line, "no GPU: <reason>", exit status 1, and writes nothing.
#
# Fashion-MNIST without a network: the GPU machine reaches none, so the command carries the data.
# Prepare it once on a machine that has the four IDX files (gpucnn's cache after one
# `python cli.py train --dataset fashion-mnist ...` there, or a download from
# https://github.com/zalandoresearch/fashion-mnist):
#
#     mkdir -p bench/data/fashion-mnist
#     cp train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
#        t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz bench/data/fashion-mnist/
#
# bench/data/ is ignored by git; send it with the command (the device tool's carry: ["bench/data"]).
# $GPUCNN_DATA_DIR points elsewhere. Without the files the train step is skipped, and says so.
# $PYTHON picks the interpreter (default: python3, else python).
#
# GPUCNN_RUN_GPU_SCALE=small runs every step scaled down to seconds (the GPU tests of
# tests/test_backend.py, one epoch, batch 2 rows without PyTorch, one round of the gpucnn variants):
# for the script's own test on the CuPy stand-in (tests/test_run_gpu.py), not for figures. The scale
# is written to environment.txt.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL_SECONDS=${GPUCNN_TOTAL_SECONDS:-440}
DATA_DIR=${GPUCNN_DATA_DIR:-bench/data/fashion-mnist}
export CUPY_TF32=0
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX shares the GPU with CuPy and PyTorch
# Each step's own limit in seconds: together under the total, the e2e benchmark last and largest.
declare -A LIMIT=([tests]=100 [train]=60 [ops]=80 [e2e]=170)
DATA_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

SCALE=${GPUCNN_RUN_GPU_SCALE:-full}
case "$SCALE" in
    full)
        TESTS_ARGS=(tests)
        TRAIN_ARGS=(--epochs 2 --batch-size 64)
        OPS_ARGS=(--batches 64,256 --reps 20)
        E2E_ARGS=() ;;
    small)
        TESTS_ARGS=(tests/test_backend.py)
        TRAIN_ARGS=(--epochs 1 --batch-size 16)
        OPS_ARGS=(--batches 2 --reps 1 --warmup 0 --inner 1 --copy-mib 1 --gemm-n 8 --no-torch --only relu,adam)
        E2E_ARGS=(--batch-sizes 4 --rounds 1 --round-steps 1 --warmup-steps 1 --pool 1 --determinism-steps 1
                  --only gpucnn-graph,gpucnn-eager --no-torch --no-compile-times) ;;
    *) echo "GPUCNN_RUN_GPU_SCALE must be full or small, not '$SCALE'" >&2; exit 2 ;;
esac

steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then
    steps=(tests train ops e2e)
fi
for step in "${steps[@]}"; do
    case "$step" in
        tests|train|ops|e2e) ;;
        *) echo "unknown step '$step'; choose from: tests train ops e2e" >&2; exit 2 ;;
    esac
done

# One clear line, and nothing written, where there is no GPU.
if ! timeout 60 "$PYTHON" -c 'import sys; sys.path.insert(0, "bench"); import gpu_env; gpu_env.require_gpu()'; then
    exit 1
fi

out="${GPUCNN_RESULTS_DIR:-bench/results}/gpu-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$out"
echo "results: $out"
deadline=$((SECONDS + TOTAL_SECONDS))
failed=0

# run_step NAME COMMAND...: COMMAND under timeout, stdout and stderr to NAME.log, a line in status.txt.
run_step() {
    local name=$1
    shift
    local left=$((deadline - SECONDS))
    local limit=${LIMIT[$name]}
    if [ "$left" -lt "$limit" ]; then
        limit=$left
    fi
    if [ "$limit" -lt 15 ]; then
        echo "$name skipped: ${left}s of the ${TOTAL_SECONDS}s left" | tee -a "$out/status.txt"
        failed=1
        return 0
    fi
    echo "== $name (at most ${limit}s): $*"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1 || rc=$?
    local note=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        note=" (timed out)"
    fi
    echo "$name exit=$rc seconds=$((SECONDS - start))$note" | tee -a "$out/status.txt"
    tail -n 30 "$out/$name.log" || true
    if [ "$rc" -ne 0 ]; then
        failed=1
    fi
}

{
    echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git_commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "git_changed_files: $(git status --porcelain 2>/dev/null | grep -c . || true)"
    echo "steps: ${steps[*]}"
    echo "scale: $SCALE"
    timeout 40 "$PYTHON" - <<'EOF' || echo "environment: the version probe failed or timed out"
import importlib.metadata
import sys
sys.path.insert(0, "bench")
import gpu_env
cp = gpu_env.require_gpu()
try:
    torch = gpu_env.require_torch()
except SystemExit as exc:
    print(f"torch: unusable ({exc})")
    torch = None
for key, value in gpu_env.environment(cp, torch).items():
    print(f"{key}: {value}")
for package in ("jax", "jaxlib"):
    try:
        print(f"{package}: {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{package}: not installed")
EOF
    echo
    timeout 20 nvidia-smi || echo "nvidia-smi: not available or timed out"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

for step in "${steps[@]}"; do
    case "$step" in
        tests)
            run_step tests "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider "${TESTS_ARGS[@]}" ;;
        train)
            missing=()
            for f in "${DATA_FILES[@]}"; do
                [ -f "$DATA_DIR/$f" ] || missing+=("$f")
            done
            if [ ${#missing[@]} -gt 0 ]; then
                echo "train skipped: $DATA_DIR lacks ${missing[*]} (see the top of bench/run_gpu.sh)" \
                    | tee -a "$out/status.txt"
                failed=1
            else
                run_step train "$PYTHON" cli.py train --device gpu --dataset fashion-mnist --data-dir "$DATA_DIR" \
                    "${TRAIN_ARGS[@]}" --quiet --out "$out/train-fashion-mnist"
            fi ;;
        ops)
            run_step ops "$PYTHON" bench/gpu_ops.py "${OPS_ARGS[@]}" --json "$out/gpu_ops.json" ;;
        e2e)
            run_step e2e "$PYTHON" bench/gpu_train.py "${E2E_ARGS[@]}" --json "$out/gpu_train.json" ;;
    esac
done

echo "results in $out ($((SECONDS)) s)"
exit $failed
