"""Per-layer time of one training step on the CPU (gpucnn only), fast path or reference.

    python bench/cpu_layer_profile.py [--model lenet5|vgg-small] [--batch-size 256] [--steps 25]
                                      [--cpu-path fast|reference] [--clock wall|cpu]

Runs the layers one by one in the model's run order (each max-pool before its ReLU), times each
layer's forward and backward (the first layer without an input gradient, as the Trainer), the loss
and Adam, and prints the median over the steps after the first five, in ms. --clock cpu times the
process's CPU time instead of wall time (all threads summed): on a shared, loaded machine the work
each layer does, which other processes' load barely moves (compare it at one thread). Set the threads before
starting: OPENBLAS_NUM_THREADS=2 GPUCNN_CPU_THREADS=2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from gpucnn import dispatch, models, ops, optim  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cpu-path", choices=dispatch.CPU_PATHS, default="fast")
    parser.add_argument("--model", choices=("lenet5", "vgg-small"), default="lenet5")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args(argv)
    if args.steps < 6:
        parser.error("--steps must be at least 6 (the first five are not counted)")
    rng = np.random.default_rng(0)
    model = models.LeNet5(seed=0) if args.model == "lenet5" else models.VGGSmall(seed=0)
    x = rng.standard_normal((args.batch_size, *model.input_shape), dtype=np.float32)
    labels = rng.integers(0, 10, args.batch_size)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    names = model._run_order()
    forward, backward = {n: [] for n in names}, {n: [] for n in names}
    loss_times, adam_times = [], []
    with dispatch.cpu_path(args.cpu_path):
        for _ in range(args.steps):
            opt.zero_grad()
            h = x
            for name in names:
                start = clock()
                h = model[name](h)
                forward[name].append(clock() - start)
            start = clock()
            _, probs = ops.softmax_cross_entropy(h, labels)
            grad = ops.softmax_cross_entropy_backward(probs, labels)
            loss_times.append(clock() - start)
            for name in reversed(names):
                start = clock()
                grad = model[name].backward(grad, input_grad=name != names[0])
                backward[name].append(clock() - start)
            start = clock()
            opt.step()
            adam_times.append(clock() - start)

    def ms(values):
        return 1e3 * float(np.median(values[5:]))

    total = ms(loss_times) + ms(adam_times)
    print(f"{args.model}, batch {args.batch_size}, cpu path {args.cpu_path}, {args.clock} clock, median of {args.steps - 5} steps, ms")
    for name in names:
        print(f"{name:8s} forward {ms(forward[name]):6.2f} backward {ms(backward[name]):6.2f}")
        total += ms(forward[name]) + ms(backward[name])
    print(f"loss {ms(loss_times):.2f}  adam {ms(adam_times):.2f}  sum {total:.2f}")


if __name__ == "__main__":
    main()
