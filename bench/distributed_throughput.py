"""Data-parallel training throughput on the CPU: 1 process against 2 MPI ranks at the same global batch.

    python bench/distributed_throughput.py [--batch-sizes 64,256] [--images 6400] [--rounds 3] [--json FILE]

Each configuration is a fresh process (or mpirun job) that trains LeNet-5 with
Adam 1e-3 for one epoch over ``--images`` random 28x28 images with the real
``Trainer.fit`` and reports the trainer's own ``images_per_s`` (global images
over the training loop's seconds, evaluation excluded). Configurations, for
each global batch G:

    single-2t   one process, no MPI, BLAS with 2 threads (what a plain run uses here)
    single-1t   one process, no MPI, BLAS with 1 thread
    mpi-1x1t    mpirun -n 1 ... --distributed, batch G (the cost of the distributed path alone)
    mpi-2x1t    mpirun -n 2 ... --distributed, batch G/2 per rank, 1 BLAS thread per rank

Rounds alternate the configurations so that machine noise falls on all; the
table gives the median over rounds. The load average is recorded before and
after. Needs mpirun and mpi4py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("single-2t", "single-1t", "mpi-1x1t", "mpi-2x1t")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="64,256", help="global batch sizes, comma-separated (even)")
    parser.add_argument("--images", type=int, default=6400, help="training images per measured epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(args) -> None:
    """One measurement: train one epoch; rank 0 prints a JSON line with images/s."""
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from gpucnn import distributed, models, optim
    from gpucnn.train import Trainer

    comm = distributed.init("cpu") if args.distributed else None
    rng = np.random.default_rng(0)
    train = (rng.standard_normal((args.images, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, args.images))
    test = (train[0][:500], train[1][:500])
    model = models.LeNet5(seed=0)
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-3), device="cpu", seed=0, comm=comm)
    record = trainer.fit(train, test, epochs=1, batch_size=args.batch_size, progress=False)[0]
    if comm is None or comm.rank == 0:
        print(json.dumps({"images_per_s": record["images_per_s"], "train_loss": record["train_loss"]}))


def measure(config: str, global_batch: int, images: int) -> float:
    ranks = 2 if config == "mpi-2x1t" else 1
    threads = "2" if config == "single-2t" else "1"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--images", str(images),
               "--batch-size", str(global_batch // ranks)]
    if config.startswith("mpi"):
        command = [shutil.which("mpirun"), "-n", str(ranks), *command, "--distributed"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUCNN_")}
    env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])["images_per_s"]


def main():
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if shutil.which("mpirun") is None:
        raise SystemExit("no mpirun: apt-get install -y openmpi-bin libopenmpi-dev, then pip install mpi4py")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if any(b < 2 or b % 2 for b in batch_sizes):
        raise SystemExit("--batch-sizes must be even numbers >= 2 (2 ranks split them).")
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    samples = {(b, c): [] for b in batch_sizes for c in CONFIGS}
    for _ in range(args.rounds):
        for b in batch_sizes:
            for config in CONFIGS:
                samples[(b, config)].append(measure(config, b, args.images))
    load_after = os.getloadavg()

    import numpy as np
    from mpi4py import MPI

    header = (f"date={started} machine={platform.machine()} cpu_count={os.cpu_count()} "
              f"python={platform.python_version()} numpy={np.__version__} "
              f"mpi={MPI.Get_library_version().splitlines()[0].split(',')[0].strip()} images={args.images} "
              f"rounds={args.rounds} model=LeNet-5 optimizer=Adam(lr=1e-3)\n"
              f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
              f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    lines = [header, f"{'global batch':>12} " + " ".join(f"{c:>10}" for c in CONFIGS) + "  2 ranks / best single"]
    for b in batch_sizes:
        medians = {c: statistics.median(samples[(b, c)]) for c in CONFIGS}
        ratio = medians["mpi-2x1t"] / max(medians["single-2t"], medians["single-1t"])
        lines.append(f"{b:>12} " + " ".join(f"{medians[c]:>10,.0f}" for c in CONFIGS) + f"  {ratio:>21.2f}")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({
            "date": started, "cpu_count": os.cpu_count(), "images": args.images, "rounds": args.rounds,
            "load_average_before": load_before, "load_average_after": load_after,
            "images_per_s": {f"{b}/{c}": samples[(b, c)] for b in batch_sizes for c in CONFIGS},
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
