"""LeNet-5 on real handwritten digits without the MNIST training images.

    python bench/mnist_small.py [MNIST_DIR] [--epochs 10] [--device cpu] [--out bench/results/mnist-small]

Trains on the first 8,000 images of the official MNIST test set and evaluates on
the last 2,000 (MNIST_DIR holds t10k-images-idx3-ubyte(.gz) and
t10k-labels-idx1-ubyte(.gz); default ../shared/datasets/mnist relative to the
repository). Adam 1e-3, batch 64, cosine schedule, seed 0: the CLI's defaults.
Writes metrics.jsonl and checkpoints to --out and prints one line per epoch
and a final line with the test accuracy.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from gpucnn import __version__, backend, optim  # noqa: E402
from gpucnn.data import DATASETS, normalize, read_idx  # noqa: E402
from gpucnn.models import LeNet5  # noqa: E402
from gpucnn.train import Trainer, describe_epoch  # noqa: E402

TRAIN_COUNT, TEST_COUNT = 8000, 2000
TARGET_ACCURACY = 0.97


def find_file(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"error: {directory} holds neither {name} nor {name}.gz")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mnist_dir", nargs="?", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=backend.DEVICES)
    parser.add_argument("--out", type=Path, default=None, help="folder for metrics.jsonl and checkpoints")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    images = read_idx(find_file(args.mnist_dir, "t10k-images-idx3-ubyte"))
    labels = read_idx(find_file(args.mnist_dir, "t10k-labels-idx1-ubyte")).astype(np.int64)
    if len(images) < TRAIN_COUNT + TEST_COUNT:
        raise SystemExit(f"error: {args.mnist_dir} holds {len(images)} images; this needs {TRAIN_COUNT + TEST_COUNT}.")
    spec = DATASETS["mnist"]
    x = normalize(images, spec.mean, spec.std)
    train = (x[:TRAIN_COUNT], labels[:TRAIN_COUNT])
    test = (x[-TEST_COUNT:], labels[-TEST_COUNT:])

    device = backend.resolve_device(args.device)
    print(f"date={time.strftime('%Y-%m-%d %H:%M:%S %Z')} machine={platform.machine()} "
          f"python={platform.python_version()} gpucnn={__version__} device={backend.describe(device)}")
    print(f"data: {args.mnist_dir}, train on images 0..{TRAIN_COUNT - 1}, test on the last {TEST_COUNT}")
    print(f"run: lenet5, adam lr {args.lr:g}, cosine over {args.epochs} epochs, batch {args.batch_size}, "
          f"seed {args.seed}")

    model = LeNet5(num_classes=10, seed=args.seed).to(device)
    opt = optim.Adam(model.parameters(), lr=args.lr)
    scheduler = optim.CosineAnnealingLR(opt, T_max=args.epochs)
    trainer = Trainer(model, opt, scheduler, device=device, out_dir=args.out, seed=args.seed,
                      config={"dataset": "mnist-test-8000/2000", "lr": args.lr, "optimizer": "adam"})
    started = time.perf_counter()
    history = trainer.fit(train, test, epochs=args.epochs, batch_size=args.batch_size, progress=not args.quiet)
    if args.quiet:
        for record in history:
            print(describe_epoch(record, args.epochs))
    final = history[-1]["test_acc"]
    verdict = "PASS" if final >= TARGET_ACCURACY else "FAIL"
    print(f"final test accuracy {final:.2%} on {TEST_COUNT} images after {args.epochs} epochs "
          f"({time.perf_counter() - started:.0f} s); target {TARGET_ACCURACY:.0%}: {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
