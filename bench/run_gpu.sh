#!/usr/bin/env bash
# Everything a GPU session runs, in one command, from the repository root or anywhere:
#
#     bench/run_gpu.sh [tests] [train] [ops] [e2e]      (no argument: all four, in this order)
#
#   tests  python -m pytest -m gpu               (the kernels on the GPU against the NumPy reference)
#   train  python cli.py train --device gpu --dataset fashion-mnist --epochs 5
#   ops    python bench/gpu_ops.py               (per-op timings against cuDNN / PyTorch, device ceilings)
#   e2e    python bench/gpu_train.py             (one LeNet-5 epoch against PyTorch, compile times)
#
# Raw outputs go to bench/results/gpu-<UTC date-time>/ (or $GPUCNN_RESULTS_DIR/gpu-<...>/):
# environment.txt (date, device, driver, CUDA, CuPy, PyTorch versions, nvidia-smi), one <step>.log
# per step, the benchmarks' JSON, the training run's metrics, and status.txt with each step's exit
# status. Each step runs under `timeout` ($GPUCNN_STEP_TIMEOUT seconds, default 540); a failed step
# does not stop the others, and the script exits 1 if any failed.
# Without a usable GPU it stops at once with one line, "no GPU: <reason>", and exit status 1.
# Fashion-MNIST is looked for in --data-dir $GPUCNN_DATA_DIR when set, else where gpucnn looks
# (its cache, /usr/share/datasets), else downloaded. A GPU machine that reaches no network needs the
# four IDX files brought along (e.g. copied into an ignored folder of the checkout, GPUCNN_DATA_DIR
# pointing there). $PYTHON picks the interpreter (default: python3, else python).
set -u -o pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
STEP_TIMEOUT=${GPUCNN_STEP_TIMEOUT:-540}
export CUPY_TF32=0

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
if ! "$PYTHON" -c 'import sys; sys.path.insert(0, "bench"); import gpu_env; gpu_env.require_gpu()'; then
    exit 1
fi

out="${GPUCNN_RESULTS_DIR:-bench/results}/gpu-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$out"
echo "results: $out"

{
    echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git_commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "steps: ${steps[*]}"
    "$PYTHON" - <<'EOF'
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
EOF
    echo
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

failed=0
run_step() {
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$STEP_TIMEOUT" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name exit=$rc seconds=$((SECONDS - start))" | tee -a "$out/status.txt"
    tail -n 25 "$out/$name.log"
    if [ $rc -ne 0 ]; then
        failed=1
    fi
}

for step in "${steps[@]}"; do
    case "$step" in
        tests)
            run_step tests "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider tests ;;
        train)
            data_args=()
            if [ -n "${GPUCNN_DATA_DIR:-}" ]; then
                data_args=(--data-dir "$GPUCNN_DATA_DIR")
            fi
            run_step train "$PYTHON" cli.py train --device gpu --dataset fashion-mnist --epochs 5 --quiet \
                --out "$out/train-fashion-mnist" "${data_args[@]}" ;;
        ops)
            run_step ops "$PYTHON" bench/gpu_ops.py --json "$out/gpu_ops.json" ;;
        e2e)
            run_step e2e "$PYTHON" bench/gpu_train.py --json "$out/gpu_train.json" ;;
    esac
done

echo "results in $out"
exit $failed
