"""One epoch of LeNet-5 training on the GPU: gpucnn against PyTorch eager, in images per second.

    python bench/gpu_train.py [--batch-sizes 64,256] [--images 60000] [--warmup-steps 20]
                              [--determinism-steps 50] [--no-torch] [--no-compile-times] [--json FILE]

60,000 random 28x28 images and labels live on the GPU; each epoch visits them in a fresh random
order (a permutation on the device, batches gathered on the device), with Adam at lr 1e-3. Variants:

  gpucnn        the library as a user calls it: LeNet5().to("gpu"), ops.softmax_cross_entropy and
                optim.Adam (convolutions and pooling on our kernels, linear layers on CuPy's matmul,
                the loss and Adam as CuPy array expressions; the loss checks labels, a host wait).
  gpucnn-fused  the same model with the loss on kernels/loss.cu (no label check) and FusedAdam
                (kernels/optim.cu: one update launch for all parameters).
  pytorch       the same network in PyTorch eager (cuDNN, TF32 off), torch.optim.Adam's default.

Each variant warms up for --warmup-steps steps, then the epoch is timed with the device
synchronised at both ends. Also measured: whether two gpucnn runs from one seed end with bitwise
identical weights, and the time to compile every kernels/*.cu on first use, cold (an empty
CUPY_CACHE_DIR, in a fresh process) and warm (the same cache, another fresh process).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_env  # noqa: E402 - also puts the repository on sys.path

NUM_CLASSES = 10
KERNEL_NAME = re.compile(r'extern "C" __global__ void (\w+)\(')


# ---- training steps -------------------------------------------------------------------------------

def gpucnn_trainer(variant: str, seed: int, device: str = "gpu", runtime=None):
    """(model, step) for a gpucnn variant; step(x, y) trains on one batch and returns the loss array.

    ``device`` and ``runtime`` (for the fused kernels) let tests run it on the CPU emulator.
    """
    from gpucnn import ops, optim
    from gpucnn.cuda import loss as cuda_loss
    from gpucnn.cuda.optim import FusedAdam
    from gpucnn.models import LeNet5

    model = LeNet5(num_classes=NUM_CLASSES, seed=seed).to(device)
    if variant == "gpucnn":
        opt = optim.Adam(model.parameters(), lr=1e-3)

        def step(x, y):
            opt.zero_grad()
            loss, probs = ops.softmax_cross_entropy(model(x), y)
            model.backward(ops.softmax_cross_entropy_backward(probs, y))
            opt.step()
            return loss
    elif variant == "gpucnn-fused":
        opt = FusedAdam(list(model.parameters()), lr=1e-3, runtime=runtime)

        def step(x, y):
            opt.zero_grad()
            loss, probs = cuda_loss.softmax_cross_entropy(model(x), y, check_labels=False, runtime=runtime)
            model.backward(cuda_loss.softmax_cross_entropy_backward(probs, y, check_labels=False, runtime=runtime))
            opt.step()
            return loss
    else:
        raise ValueError(f"unknown gpucnn variant {variant!r}.")
    return model, step


def torch_trainer(torch, seed: int, device: str = "cuda"):
    """(model, step) for the same LeNet-5 in PyTorch eager."""
    torch.manual_seed(seed)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, NUM_CLASSES)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return model, step


def run_epoch(step, images, labels, order, batch_size: int, steps: int | None = None):
    """Train on the images in ``order`` (a device permutation), batch by batch; returns the last loss."""
    loss = None
    count = len(order) if steps is None else min(len(order), steps * batch_size)
    for start in range(0, count, batch_size):
        idx = order[start:start + batch_size]
        loss = step(images[idx], labels[idx])
    return loss


def time_epoch(cp, step, images, labels, order, batch_size: int, warmup_steps: int) -> tuple[float, float]:
    """(seconds, final loss) of one epoch after ``warmup_steps`` untimed steps."""
    run_epoch(step, images, labels, order, batch_size, steps=warmup_steps)
    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    loss = run_epoch(step, images, labels, order, batch_size)
    cp.cuda.Device().synchronize()
    return time.perf_counter() - start, float(loss)


def gpucnn_weights_are_reproducible(cp, variant: str, images, labels, steps: int, device="gpu",
                                    runtime=None) -> bool:
    """Two runs of ``steps`` steps from seed 0: True when every parameter ends bitwise identical."""
    finals = []
    for _ in range(2):
        model, step = gpucnn_trainer(variant, seed=0, device=device, runtime=runtime)
        order = cp.random.RandomState(1).permutation(len(labels))
        run_epoch(step, images, labels, order, 64, steps=steps)
        finals.append([cp.asnumpy(p.data) for p in model.parameters()])
    return all(a.tobytes() == b.tobytes() for a, b in zip(*finals))


# ---- compile times ---------------------------------------------------------------------------------

def compile_probe() -> dict:
    """In this (fresh) process: seconds to compile each kernels/*.cu through CupyRuntime, device ready first."""
    cp = gpu_env.require_gpu()
    from gpucnn.cuda.runtime import CupyRuntime, kernels_dir

    cp.zeros(1).sum()  # the CUDA context exists before the clock starts
    cp.cuda.Device().synchronize()
    runtime = CupyRuntime()
    seconds = {}
    for path in sorted(kernels_dir().glob("*.cu")):
        start = time.perf_counter()
        for name in KERNEL_NAME.findall(path.read_text()):
            runtime.function(path.name, name)
        seconds[path.name] = time.perf_counter() - start
    return seconds


def compile_times() -> dict:
    """Cold (empty CUPY_CACHE_DIR) and warm (same cache) compile seconds per kernel file, each in a fresh process."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpucnn-cupy-cache-") as cache:
        env = {**os.environ, "CUPY_CACHE_DIR": cache}
        env.pop("CUPY_CACHE_IN_MEMORY", None)
        for label in ("cold", "warm"):
            probe = subprocess.run([sys.executable, __file__, "--compile-probe"], env=env, capture_output=True,
                                   text=True, timeout=600)
            if probe.returncode != 0:
                raise SystemExit(f"the compile probe failed: {probe.stderr.strip().splitlines()[-1:]}")
            results[label] = json.loads(probe.stdout.strip().splitlines()[-1])
    return results


# ---- main ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--determinism-steps", type=int, default=50, help="0 skips the reproducibility check")
    parser.add_argument("--no-torch", action="store_true", help="time gpucnn only")
    parser.add_argument("--no-compile-times", action="store_true")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.images < 1 or args.warmup_steps < 0 \
            or args.determinism_steps < 0:
        parser.error("batch sizes and --images must be positive, --warmup-steps and --determinism-steps at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_probe:
        print(json.dumps(compile_probe()))
        return 0
    cp = gpu_env.require_gpu()
    torch = None if args.no_torch else gpu_env.require_torch()
    env = gpu_env.environment(cp, torch)
    print(gpu_env.describe(env), flush=True)

    compiled = None if args.no_compile_times else compile_times()
    random = cp.random.RandomState(0)
    images = random.standard_normal((args.images, 1, 28, 28), dtype=cp.float32)
    labels = random.randint(0, NUM_CLASSES, args.images).astype(cp.int32)
    t_images = None if torch is None else torch.from_dlpack(images)
    t_labels = None if torch is None else torch.from_dlpack(labels).long()

    rows = []
    for batch_size in args.batch_sizes:
        order = random.permutation(args.images)
        timed = {}
        for variant in ("gpucnn", "gpucnn-fused"):
            _, step = gpucnn_trainer(variant, seed=0)
            timed[variant] = time_epoch(cp, step, images, labels, order, batch_size, args.warmup_steps)
        if torch is not None:
            _, step = torch_trainer(torch, seed=0)
            t_order = torch.from_dlpack(order)
            timed["pytorch"] = time_epoch(cp, step, t_images, t_labels, t_order, batch_size, args.warmup_steps)
        for variant, (seconds, loss) in timed.items():
            row = {"variant": variant, "batch_size": batch_size, "seconds": seconds,
                   "images_per_s": args.images / seconds, "final_loss": loss}
            if "pytorch" in timed:
                row["vs_pytorch"] = row["images_per_s"] / (args.images / timed["pytorch"][0])
            rows.append(row)
            print(f"{variant:<13} batch {batch_size:>4}: {seconds:7.2f} s  {row['images_per_s']:>10.0f} images/s"
                  + (f"  x{row['vs_pytorch']:.2f} of pytorch" if "vs_pytorch" in row else ""), flush=True)

    reproducible = {}
    if args.determinism_steps:
        for variant in ("gpucnn", "gpucnn-fused"):
            reproducible[variant] = gpucnn_weights_are_reproducible(cp, variant, images, labels,
                                                                    args.determinism_steps)
            print(f"{variant}: two runs from seed 0, {args.determinism_steps} steps: weights "
                  f"{'bitwise identical' if reproducible[variant] else 'DIFFER'}", flush=True)

    print()
    print(f"{'variant':<13} {'batch':>5} {'seconds':>8} {'images/s':>10} {'vs pytorch':>10} {'final loss':>10}")
    for r in rows:
        ratio = f"{r['vs_pytorch']:10.2f}" if "vs_pytorch" in r else f"{'-':>10}"
        print(f"{r['variant']:<13} {r['batch_size']:>5} {r['seconds']:8.2f} {r['images_per_s']:10.0f} {ratio} "
              f"{r['final_loss']:10.4f}")
    if compiled is not None:
        for label in ("cold", "warm"):
            files = ", ".join(f"{name} {sec:.2f}" for name, sec in compiled[label].items())
            print(f"kernel compile, {label} cache: {sum(compiled[label].values()):.2f} s ({files})")
    if args.json:
        args.json.write_text(json.dumps({
            "environment": env, "settings": {k: v for k, v in vars(args).items() if k not in ("json", "compile_probe")},
            "epochs": rows, "reproducible_weights": reproducible, "compile_seconds": compiled},
            indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
