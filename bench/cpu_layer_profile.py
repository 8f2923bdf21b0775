"""Per-layer time of one training step on the CPU (gpucnn only), fast path or reference.

    python bench/cpu_layer_profile.py [--model lenet5|vgg-small|vgg-small-bn|resnet20] [--batch-size 256]
                                      [--steps 25] [--cpu-path fast|reference] [--clock wall|cpu]

Runs the model's own training step (its forward, the loss, its backward without the input's gradient,
Adam), so the layers run in the model's order with its fusions (each max-pool before its ReLU; a ReLU
runs inside the BatchNorm, convolution, linear or max-pool layer before it, so it has no row of its own),
and times every layer's forward and backward through hooks on the
layers. Nested models (resnet20's blocks) are walked to their leaves; a block's own row is the time
outside its layers (the residual add and its ReLU). Prints the median over the steps after the
first five, in ms, in the order the forward ran the layers, then the loss and Adam. --clock cpu times
the process's CPU time instead of wall time (all threads summed): on a shared, loaded machine the
work each layer does, which other processes' load barely moves (compare it at one thread). Set the
threads before starting: OPENBLAS_NUM_THREADS=2 GPUCNN_CPU_THREADS=2.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from gpucnn import dispatch, models, ops, optim  # noqa: E402

MODELS = ("lenet5", "vgg-small", "vgg-small-bn", "resnet20")


class LayerClock:
    """Wraps every module's forward and backward to add up, per step, the time inside each (inclusive)."""

    def __init__(self, model, clock):
        self.clock = clock
        self.inclusive = defaultdict(float)  # (name, "forward" | "backward") -> seconds this step
        self.order = []  # module names in the order their forward first ran
        self.children = {name: [f"{name}.{child}" if name else child for child, _ in module.named_children()]
                         for name, module in model.named_modules()}
        for name, module in model.named_modules():
            for part in ("forward", "backward"):
                object.__setattr__(module, part, self._timed(name, part, getattr(module, part)))

    def _timed(self, name, part, method):
        def timed(*args, **kwargs):
            if part == "forward" and name not in self.order:
                self.order.append(name)
            start = self.clock()
            try:
                return method(*args, **kwargs)
            finally:
                self.inclusive[(name, part)] += self.clock() - start
        return timed

    def take_step(self) -> dict:
        """{(name, part): seconds outside the module's children} for the step just run; starts the next."""
        exclusive = {}
        for (name, part), seconds in self.inclusive.items():
            inside = sum(self.inclusive.get((child, part), 0.0) for child in self.children.get(name, ()))
            exclusive[(name, part)] = seconds - inside
        self.inclusive = defaultdict(float)
        return exclusive


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cpu-path", choices=dispatch.CPU_PATHS, default="fast")
    parser.add_argument("--model", choices=MODELS, default="lenet5")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args(argv)
    if args.steps < 6:
        parser.error("--steps must be at least 6 (the first five are not counted)")
    rng = np.random.default_rng(0)
    model = models.build_model(args.model, seed=0)
    x = rng.standard_normal((args.batch_size, *model.input_shape), dtype=np.float32)
    labels = rng.integers(0, 10, args.batch_size)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    layers = LayerClock(model, clock)
    per_step, loss_times, adam_times = [], [], []
    with dispatch.cpu_path(args.cpu_path):
        for _ in range(args.steps):
            opt.zero_grad()
            logits = model(x)
            start = clock()
            _, probs = ops.softmax_cross_entropy(logits, labels)
            grad = ops.softmax_cross_entropy_backward(probs, labels)
            loss_times.append(clock() - start)
            model.backward(grad, input_grad=False)
            start = clock()
            opt.step()
            adam_times.append(clock() - start)
            per_step.append(layers.take_step())

    def ms(values):
        return 1e3 * float(np.median(values[5:]))

    total = ms(loss_times) + ms(adam_times)
    print(f"{args.model}, batch {args.batch_size}, cpu path {args.cpu_path}, {args.clock} clock, "
          f"median of {args.steps - 5} steps, ms")
    for name in layers.order[1:]:  # the model itself ran first; its own time is the loop around the layers
        forward = ms([step.get((name, "forward"), 0.0) for step in per_step])
        backward = ms([step.get((name, "backward"), 0.0) for step in per_step])
        if not layers.children[name] or forward + backward >= 0.05:  # leaves, and blocks with work of their own
            print(f"{name:22s} forward {forward:7.2f} backward {backward:7.2f}")
        total += forward + backward
    print(f"loss {ms(loss_times):.2f}  adam {ms(adam_times):.2f}  sum {total:.2f}")


if __name__ == "__main__":
    main()
