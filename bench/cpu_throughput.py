"""LeNet-5 training throughput on the CPU: gpucnn (NumPy) against PyTorch's CPU build, side by side.

    python bench/cpu_throughput.py [--threads 2] [--batch-sizes 64,256] [--rounds 7] [--steps 20]

Both libraries train the same LeNet-5 (modern form) with Adam 1e-3 on float32 images held in memory,
each batch gathered by fresh random indices from a pool of random images. Rounds alternate between
the two libraries so machine noise falls on both; each round times `--steps` steps after warm-up, and
the table reports the median images/s over rounds and the ratio gpucnn / PyTorch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--pool", type=int, default=4096, help="random images to draw batches from")
    parser.add_argument("--libraries", default="gpucnn,pytorch",
                        help="which to time (one alone shows what sharing the process with the other costs)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return parser.parse_args()


def main():
    args = parse_args()
    # Thread counts must be fixed before NumPy's BLAS starts its pool.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, str(ROOT))

    import numpy as np
    import torch

    from gpucnn import models, ops, optim

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    pool_x = rng.standard_normal((args.pool, 1, 28, 28), dtype=np.float32)
    pool_y = rng.integers(0, 10, args.pool)

    def batches(batch_size):
        while True:
            idx = rng.integers(0, args.pool, batch_size)
            yield pool_x[idx], pool_y[idx]

    # gpucnn
    def gpucnn_stepper(batch_size):
        model = models.LeNet5(seed=0)
        opt = optim.Adam(model.parameters(), lr=1e-3)
        source = batches(batch_size)

        def step():
            x, y = next(source)
            opt.zero_grad()
            logits = model(x)
            loss, probs = ops.softmax_cross_entropy(logits, y)
            model.backward(ops.softmax_cross_entropy_backward(probs, y))
            opt.step()
            return float(loss)
        return step

    # PyTorch, the same network
    def torch_stepper(batch_size):
        torch.manual_seed(0)
        nn = torch.nn
        model = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        lossf = nn.CrossEntropyLoss()
        source = batches(batch_size)

        def step():
            x, y = next(source)
            xt, yt = torch.from_numpy(x), torch.from_numpy(y)
            opt.zero_grad()
            loss = lossf(model(xt), yt)
            loss.backward()
            opt.step()
            return float(loss.detach())
        return step

    def time_round(step, batch_size):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        return args.steps * batch_size / (time.perf_counter() - start)

    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        makers = {"gpucnn": gpucnn_stepper, "pytorch": torch_stepper}
        steppers = {name: makers[name](batch_size) for name in args.libraries.split(",")}
        for step in steppers.values():
            for _ in range(args.warmup):
                step()
        rates = {name: [] for name in steppers}
        for _ in range(args.rounds):
            for name, step in steppers.items():
                rates[name].append(time_round(step, batch_size))
        med = {name: float(np.median(r)) for name, r in rates.items()}
        row = {"batch_size": batch_size}
        for name in steppers:
            row[f"{name}_images_per_s"] = med[name]
            row[f"{name}_rounds"] = rates[name]
        if len(steppers) == 2:
            row["ratio"] = med["gpucnn"] / med["pytorch"]
        results.append(row)

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
           "numpy": np.__version__, "torch": torch.__version__, "steps_per_round": args.steps,
           "rounds": args.rounds, "optimizer": "Adam(lr=1e-3)", "model": "LeNet-5 (modern)"}
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    names = args.libraries.split(",")
    print(f"{'batch':>6}" + "".join(f" {name + ' img/s':>14}" for name in names)
          + (f" {'gpucnn/pytorch':>15}" if len(names) == 2 else ""))
    for r in results:
        print(f"{r['batch_size']:>6}" + "".join(f" {r[name + '_images_per_s']:>14.0f}" for name in names)
              + (f" {r['ratio']:>15.2f}" if "ratio" in r else ""))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
