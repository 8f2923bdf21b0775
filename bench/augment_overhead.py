"""What augmentation costs a CPU training epoch: the same Trainer epochs with and without --augment crop+flip.

    python bench/augment_overhead.py [--model lenet5] [--images 12000] [--rounds 3] [--batch-size 128]

Fashion-MNIST's first --images training images, one epoch per timed run (a fresh Trainer each, seed 0),
rounds alternating plain / augmented in one process; prints every epoch's seconds, the medians, their
ratio, and the augmentation alone (the crops and flips of one epoch's batches, no training). The issue's
bound: an augmented epoch at most 10% slower. Record the load (``uptime``) with the figures: on a shared
machine the epochs are noisy.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from gpucnn import optim  # noqa: E402
from gpucnn.data import DATASETS, Augment, BatchIterator, load_dataset, normalize  # noqa: E402
from gpucnn.models import build_model  # noqa: E402
from gpucnn.train import Trainer  # noqa: E402


def epoch_seconds(model_name, train, test, batch_size, augment) -> float:
    model = build_model(model_name, seed=0, **({"in_channels": 1, "input_size": 28} if model_name == "resnet20"
                                               else {}))
    opt = optim.Adam(model.parameters(), lr=1e-3)
    trainer = Trainer(model, opt, device="cpu", seed=0, augment=augment)
    record = trainer.fit(train, test, epochs=1, batch_size=batch_size, progress=False)[-1]
    return len(train[1]) / record["images_per_s"]  # the training part of the epoch


def augmentation_alone(images, labels, batch_size, augment) -> float:
    batches = BatchIterator(images, labels, batch_size, seed=0, augment=augment)
    started = time.perf_counter()
    for _ in batches:
        pass
    plain = BatchIterator(images, labels, batch_size, seed=0)
    gathered = time.perf_counter()
    for _ in plain:
        pass
    return (gathered - started) - (time.perf_counter() - gathered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = parser.parse_args()
    spec = DATASETS["fashion-mnist"]
    images, labels = load_dataset("fashion-mnist", "train", data_dir=args.data_dir, download=False, progress=False)
    x = normalize(images[:args.images], spec.mean, spec.std)
    y = labels[:args.images].astype(np.int64)
    test = (x[:500], y[:500])
    augment = Augment.from_name("crop+flip", fill=(0.0 - spec.mean) / spec.std)
    print(f"date={time.strftime('%Y-%m-%d %H:%M:%S %Z')} load={os.getloadavg()} model={args.model} "
          f"images={args.images} batch={args.batch_size} rounds={args.rounds}", flush=True)
    plain, augmented = [], []
    for round_index in range(args.rounds):
        plain.append(epoch_seconds(args.model, (x, y), test, args.batch_size, None))
        augmented.append(epoch_seconds(args.model, (x, y), test, args.batch_size, augment))
        print(f"round {round_index + 1}: plain {plain[-1]:.2f} s, crop+flip {augmented[-1]:.2f} s, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    alone = statistics.median(augmentation_alone(x, y, args.batch_size, augment) for _ in range(3))
    ratio = statistics.median(augmented) / statistics.median(plain)
    print(f"median epoch: plain {statistics.median(plain):.2f} s, crop+flip {statistics.median(augmented):.2f} s, "
          f"ratio {ratio:.3f}; the crops and flips alone: {alone:.3f} s an epoch "
          f"({alone / statistics.median(plain):.1%} of a plain epoch); load {os.getloadavg()}")


if __name__ == "__main__":
    main()
