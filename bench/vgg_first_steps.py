"""The first training steps of vgg-small and vgg-small-bn: does the loss spike?

    python bench/vgg_first_steps.py [--steps 40] [--batch-size 64] [--json out.json]

Both models (default width 64, grey 32x32 input: Fashion-MNIST padded by 2 black pixels) start from
seed 0 and train with the CLI's defaults (Adam, lr 1e-3) on the same batches; the script prints every
step's training loss for both and, per model, the first loss, the largest later one and the step it
came at. A spike is a later loss above the first (ln 10 = 2.30 is chance for 10 classes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from gpucnn import optim  # noqa: E402
from gpucnn.data import DATASETS, BatchIterator, load_dataset, normalize  # noqa: E402
from gpucnn.models import build_model  # noqa: E402
from gpucnn.ops import softmax_cross_entropy, softmax_cross_entropy_backward  # noqa: E402

MODELS = ("vgg-small", "vgg-small-bn")


def losses(name, x, y, steps, batch_size):
    model = build_model(name, seed=0, in_channels=1, input_size=32)
    opt = optim.Adam(model.parameters(), lr=1e-3)
    found = []
    for step, (xb, yb) in enumerate(BatchIterator(x, y, batch_size, seed=0)):
        if step == steps:
            break
        opt.zero_grad()
        loss, probs = softmax_cross_entropy(model(xb), yb)
        model.backward(softmax_cross_entropy_backward(probs, yb), input_grad=False)
        opt.step()
        found.append(float(loss))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    spec = DATASETS["fashion-mnist"]
    images, labels = load_dataset("fashion-mnist", "train", data_dir=args.data_dir, download=False, progress=False)
    count = args.steps * args.batch_size * 4
    black = (0.0 - spec.mean) / spec.std
    x = np.pad(normalize(images[:count], spec.mean, spec.std), ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=black)
    y = labels[:count].astype(np.int64)
    print(f"date={time.strftime('%Y-%m-%d %H:%M:%S %Z')} load={os.getloadavg()} steps={args.steps} "
          f"batch={args.batch_size}", flush=True)
    curves = {name: losses(name, x, y, args.steps, args.batch_size) for name in MODELS}
    print("step " + " ".join(f"{name:>13}" for name in MODELS))
    for step in range(args.steps):
        print(f"{step + 1:>4} " + " ".join(f"{curves[name][step]:>13.4f}" for name in MODELS))
    for name, curve in curves.items():
        later = int(np.argmax(curve[1:])) + 1
        verdict = "SPIKE" if curve[later] > curve[0] else "no spike"
        print(f"{name}: first loss {curve[0]:.4f}, largest later {curve[later]:.4f} at step {later + 1}, "
              f"last {curve[-1]:.4f}: {verdict}")
    print(f"load={os.getloadavg()}")
    if args.json is not None:
        args.json.write_text(json.dumps({"steps": args.steps, "batch": args.batch_size, "losses": curves}) + "\n")


if __name__ == "__main__":
    main()
