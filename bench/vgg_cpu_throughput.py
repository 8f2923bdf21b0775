"""vgg-small training throughput on the CPU: gpucnn (NumPy) against the same network in PyTorch.

    python bench/vgg_cpu_throughput.py [--threads 2] [--batch-sizes 64] [--rounds 5] [--steps 4] [--warmup 2]
                                       [--json FILE]

The network is gpucnn.models.VGGSmall at 3x32x32 (conv 3->64, 64->64, pool, 64->128, 128->128, pool,
128->256, 256->256, pool, every convolution 3x3 pad 1 with ReLU, then fc 4096->256, ReLU, 256->10;
2,196,810 parameters), trained with Adam 1e-3 and softmax cross-entropy on float32 images held in
memory, each batch gathered by fresh random indices from a pool of random images.

Each library runs in its own process (neither shares a process, a BLAS pool or a cache with the
other), and every round starts a fresh process per library, alternating gpucnn, PyTorch, gpucnn,
... so that changes in the machine's load fall on both. A process warms up (``--warmup`` steps),
times ``--steps`` steps and reports images/s; the table shows the median over rounds and the ratio
gpucnn / PyTorch. The 1-minute load average is read before every round and recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))    # this checkout's gpucnn, not another installed one
sys.path.insert(0, str(ROOT / "bench"))
from train_steps import gpucnn_adam_step, torch_adam_step  # noqa: E402 - the step both CPU benchmarks time
LIBRARIES = ("gpucnn", "pytorch")
POOL = 1024                      # random images the batches are drawn from


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-sizes", default="64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)   # one timed process
    parser.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if min(args.rounds, args.steps, args.threads) < 1 or args.warmup < 0 or not args.batch_sizes \
            or min(args.batch_sizes) < 1:
        parser.error("--rounds, --steps and --threads must be at least 1, --warmup at least 0, batch sizes positive")
    return args


# ---- one timed process ------------------------------------------------------------------------------

def gpucnn_step(batch_size, batches):
    from gpucnn import models
    return gpucnn_adam_step(models.VGGSmall(seed=0), lambda: next(batches))


def torch_step(batch_size, batches):
    import torch
    nn = torch.nn
    torch.manual_seed(0)
    layers, channels = [], 3
    for width in (64, 128, 256):
        for _ in range(2):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
        layers.append(nn.MaxPool2d(2))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(256 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10))
    for module in model.modules():      # He-uniform weights and zero biases, as gpucnn initialises them
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    assert sum(p.numel() for p in model.parameters()) == 2_196_810
    return torch_adam_step(torch, model, lambda: next(batches))


def worker(args) -> None:
    """Time one library in this process; print one JSON line."""
    import numpy as np
    if args.worker == "pytorch":
        import torch
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    pool_x = rng.standard_normal((POOL, 3, 32, 32), dtype=np.float32)
    pool_y = rng.integers(0, 10, POOL)

    def batches():
        while True:
            idx = rng.integers(0, POOL, args.batch_size)
            yield pool_x[idx], pool_y[idx]
    make = gpucnn_step if args.worker == "gpucnn" else torch_step
    step = make(args.batch_size, batches())
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    print(json.dumps({"library": args.worker, "images_per_s": args.steps * args.batch_size / seconds,
                      "seconds": seconds}))


def run_worker(library, batch_size, args) -> float:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)      # fixed before either library starts its thread pool
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", library, "--batch-size", str(batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {library} worker failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["images_per_s"]


def versions() -> dict:
    import numpy
    found = {"python": platform.python_version(), "numpy": numpy.__version__}
    try:
        import torch
        found["torch"] = torch.__version__
    except ImportError:
        found["torch"] = None
    import gpucnn
    found["gpucnn"] = gpucnn.__version__
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    found["commit"] = commit.stdout.strip() or None
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "threads": args.threads, **versions(), "rounds": args.rounds,
           "steps_per_process": args.steps, "warmup_steps": args.warmup, "optimizer": "Adam(lr=1e-3)",
           "model": "vgg-small (3x32x32, 2,196,810 parameters)", "load_average_start": os.getloadavg()[0]}
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    results = []
    for batch_size in args.batch_sizes:
        rates, loads = {name: [] for name in LIBRARIES}, []
        for round_index in range(args.rounds):
            loads.append(round(os.getloadavg()[0], 2))
            # alternate which library goes first, so neither always follows the other
            order = LIBRARIES if round_index % 2 == 0 else LIBRARIES[::-1]
            for name in order:
                rates[name].append(run_worker(name, batch_size, args))
            print(f"batch {batch_size} round {round_index + 1}: load {loads[-1]:.2f}  "
                  + "  ".join(f"{name} {rates[name][-1]:.1f} img/s" for name in LIBRARIES), flush=True)
        medians = {name: statistics.median(r) for name, r in rates.items()}
        results.append({"batch_size": batch_size, **{f"{name}_images_per_s": medians[name] for name in LIBRARIES},
                        **{f"{name}_rounds": rates[name] for name in LIBRARIES}, "load_average_per_round": loads,
                        "ratio": medians["gpucnn"] / medians["pytorch"]})
    env["load_average_end"] = os.getloadavg()[0]
    print(f"{'batch':>6} {'gpucnn img/s':>13} {'pytorch img/s':>14} {'gpucnn/pytorch':>15}")
    for r in results:
        print(f"{r['batch_size']:>6} {r['gpucnn_images_per_s']:>13.1f} {r['pytorch_images_per_s']:>14.1f} "
              f"{r['ratio']:>15.2f}")
    print(f"load average: {env['load_average_start']:.2f} at the start, {env['load_average_end']:.2f} at the end")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
