"""Accuracy side by side: the same network and recipe trained by gpucnn and by PyTorch on Fashion-MNIST.

    python bench/accuracy_side_by_side.py run --library gpucnn --model resnet20 --augment none --seed 0
    python bench/accuracy_side_by_side.py matrix            # every cell not yet in --out, one process each
    python bench/accuracy_side_by_side.py table             # the markdown table of what --out holds

The recipe (issue 20): 5 epochs, Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8), cosine decay of the lr
over the epochs (stepped once an epoch), batch 128, softmax cross-entropy; models resnet20
(gpucnn.models.ResNet20 for grey 28x28) and lenet5; augmentation none or crop+flip (crop from
the image padded by 2 black pixels, horizontal flip; gpucnn.data.Augment). Both libraries get
the same normalised images, the same initial weights (gpucnn's seeded initialisation, loaded
into the PyTorch model by its torchvision-style names), the same batch order
(gpucnn.data.epoch_permutation) and the same crops and flips (Augment.generator(seed, epoch,
batch)): what differs is the arithmetic. Each run writes one JSON file to --out (per-epoch
test accuracy, train loss/accuracy and seconds; versions, threads, load averages, dates).

``matrix`` runs the missing cells one after another, each in its own process, the two libraries
alternating, seeds outermost (so a cut-short matrix still has whole comparisons for the first
seeds). The full matrix is 2 libraries x (resnet20 x 2 augmentations + lenet5) x 3 seeds =
18 runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from gpucnn.data import DATASETS, Augment, epoch_permutation, load_dataset, normalize  # noqa: E402
from gpucnn.models import build_model  # noqa: E402

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
OUT_DIR = ROOT / "bench" / "results" / "accuracy-fashion-mnist"
LIBRARIES = ("gpucnn", "torch")
MODELS = ("resnet20", "lenet5")
AUGMENTS = ("none", "crop+flip")
SEEDS = (0, 1, 2)
EPOCHS, BATCH, LR, EVAL_BATCH = 5, 128, 1e-3, 1000


def cells(models=MODELS, augments=AUGMENTS, seeds=SEEDS):
    """(library, model, augment, seed) of the matrix, in the order ``matrix`` runs them."""
    for seed in seeds:
        for model in models:
            for augment in (augments if model == "resnet20" else ("none",)):
                for library in LIBRARIES:
                    yield library, model, augment, seed


def result_path(out: Path, library, model, augment, seed) -> Path:
    return out / f"{model}-{augment.replace('+', '-')}-seed{seed}-{library}.json"


def load_data(data_dir: Path):
    """((train images, labels), (test images, labels), black): float32 (N, 1, 28, 28) normalised as gpucnn does."""
    spec = DATASETS["fashion-mnist"]
    train = load_dataset("fashion-mnist", "train", data_dir=data_dir, download=False, progress=False)
    test = load_dataset("fashion-mnist", "test", data_dir=data_dir, download=False, progress=False)
    black = (0.0 - spec.mean) / spec.std
    return ((normalize(train[0], spec.mean, spec.std), train[1].astype(np.int64)),
            (normalize(test[0], spec.mean, spec.std), test[1].astype(np.int64)), black)


def initial_model(name: str, seed: int):
    return build_model(name, seed=seed, **({"in_channels": 1, "input_size": 28} if name == "resnet20" else {}))


def load_average() -> list:
    return [round(v, 2) for v in os.getloadavg()]


# --------------------------------------------------------------------------------- gpucnn


def run_gpucnn(model_name, augment, seed, data, epochs, report, run_dir):
    """Train with gpucnn's Trainer on the CPU (its default fast path); returns the per-epoch records.

    One ``fit`` call an epoch, each resuming the last one's checkpoint in ``run_dir`` (bit for bit the
    same as one call), so ``report(records)`` can save the epochs done so far.
    """
    from gpucnn import optim  # noqa: PLC0415
    from gpucnn.train import Trainer  # noqa: PLC0415

    train, test, _ = data
    model = initial_model(model_name, seed)
    opt = optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    scheduler = optim.CosineAnnealingLR(opt, T_max=epochs)
    trainer = Trainer(model, opt, scheduler, device="cpu", seed=seed, augment=augment, out_dir=run_dir)
    records = []
    for epoch in range(epochs):
        resume = None if epoch == 0 else run_dir / "checkpoint.npz"
        record = trainer.fit(train, test, epochs=epoch + 1, batch_size=BATCH, progress=False, resume=resume)[-1]
        train_seconds = len(train[1]) / record["images_per_s"]
        records.append({"epoch": record["epoch"], "test_acc": record["test_acc"], "test_loss": record["test_loss"],
                        "train_loss": record["train_loss"], "train_acc": record["train_acc"],
                        "train_seconds": train_seconds, "eval_seconds": record["seconds"] - train_seconds})
        print(json.dumps(records[-1]), flush=True)
        report(records)
    return records


# --------------------------------------------------------------------------------- PyTorch


def torch_model(name: str, seed: int):
    """The PyTorch twin of gpucnn's model, holding gpucnn's seeded initial weights (loaded by name)."""
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet20(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.layer1 = nn.Sequential(*[Block(16, 16, 1) for _ in range(3)])
            self.layer2 = nn.Sequential(Block(16, 32, 2), Block(32, 32, 1), Block(32, 32, 1))
            self.layer3 = nn.Sequential(Block(32, 64, 2), Block(64, 64, 1), Block(64, 64, 1))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.flatten(nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2), 1)
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    model = ResNet20() if name == "resnet20" else LeNet5()
    state = {k: torch.from_numpy(np.array(v)) for k, v in initial_model(name, seed).state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def run_torch(model_name, augment, seed, data, epochs, report, run_dir):
    """Train the PyTorch twin with the same recipe, batches, crops and flips; returns the per-epoch records."""
    import torch  # noqa: PLC0415

    (train_x, train_y), (test_x, test_y), _ = data
    model = torch_model(model_name, seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    records = []
    for epoch in range(epochs):
        model.train()
        started = time.perf_counter()
        order = epoch_permutation(len(train_y), seed, epoch)
        loss_sum, correct = 0.0, 0
        for b in range(-(-len(train_y) // BATCH)):
            index = order[b * BATCH:(b + 1) * BATCH]
            images = train_x[index]
            if augment is not None:
                images = augment(images, Augment.generator(seed, epoch, b))
            x, y = torch.from_numpy(images), torch.from_numpy(train_y[index])
            opt.zero_grad()
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(index)
            correct += int((logits.argmax(1) == y).sum())
        scheduler.step()
        train_seconds = time.perf_counter() - started
        test_loss, test_acc = _torch_evaluate(model, test_x, test_y)
        records.append({"epoch": epoch + 1, "test_acc": test_acc, "test_loss": test_loss,
                        "train_loss": loss_sum / len(train_y), "train_acc": correct / len(train_y),
                        "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - started - train_seconds})
        print(json.dumps(records[-1]), flush=True)
        report(records)
    return records


def _torch_evaluate(model, images, labels):
    import torch  # noqa: PLC0415

    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(labels), EVAL_BATCH):
            x = torch.from_numpy(images[start:start + EVAL_BATCH])
            y = torch.from_numpy(labels[start:start + EVAL_BATCH])
            logits = model(x)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return loss_sum / len(labels), correct / len(labels)


# --------------------------------------------------------------------------------- commands


def command_run(args) -> None:
    data = load_data(args.data_dir)
    augment = None if args.augment == "none" else Augment.from_name(args.augment, fill=data[2])
    path = result_path(args.out, args.library, args.model, args.augment, args.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"library": args.library, "model": args.model, "augment": args.augment, "seed": args.seed,
              "complete": False, "epochs": [],
              "recipe": {"epochs": args.epochs, "batch": BATCH, "optimizer": "adam", "lr": LR, "schedule": "cosine",
                         "data": str(args.data_dir)},
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_before": load_average(),
              "cpus": os.cpu_count(), "commit": _commit(), "versions": _versions(args.library)}

    def report(records):  # after every epoch: a cut-short run still leaves the epochs it finished
        result.update(epochs=list(records), complete=len(records) == args.epochs,
                      final_test_acc=records[-1]["test_acc"], finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      load_after=load_average())
        partial = path.with_suffix(".json.part")
        partial.write_text(json.dumps(result, indent=1) + "\n")
        partial.replace(path)

    runner = run_gpucnn if args.library == "gpucnn" else run_torch
    with tempfile.TemporaryDirectory(prefix="accuracy-run-") as run_dir:
        runner(args.model, augment, args.seed, data, args.epochs, report, Path(run_dir))
    print(f"wrote {path}: final test accuracy {result['final_test_acc']:.2%}")


def _versions(library: str) -> dict:
    """The versions and threads of the library that trains, Python's and NumPy's."""
    if library == "gpucnn":
        from gpucnn import __version__  # noqa: PLC0415
        from gpucnn.cpu import threads  # noqa: PLC0415
        own = {"gpucnn": __version__, "gpucnn_threads": threads.THREADS}
    else:
        import torch  # noqa: PLC0415
        own = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    return {**own, "python": platform.python_version(), "numpy": np.__version__}


def _commit() -> str | None:
    """The commit the run's code came from: $BENCH_COMMIT (a copy of the tree outside git), else git's HEAD."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def command_matrix(args) -> None:
    for library, model, augment, seed in cells(args.models, args.augments, args.seeds):
        path = result_path(args.out, library, model, augment, seed)
        if path.exists() and json.loads(path.read_text()).get("complete"):
            continue
        command = [sys.executable, __file__, "run", "--library", library, "--model", model, "--augment", augment,
                   "--seed", str(seed), "--epochs", str(args.epochs), "--out", str(args.out),
                   "--data-dir", str(args.data_dir)]
        print("running:", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)


def command_table(args) -> None:
    results = {}
    for path in sorted(args.out.glob("*.json")):
        r = json.loads(path.read_text())
        results[(r["library"], r["model"], r["augment"], r["seed"])] = r
    lines = ["| model | augment | library | seed | test accuracy after epochs 1-5 (%) | s/epoch (train) | load | commit |",
             "|---|---|---|---|---|---|---|---|"]
    missing = []
    for library, model, augment, seed in sorted(cells(), key=lambda c: (c[1] != "resnet20", c[2], c[0], c[3])):
        r = results.get((library, model, augment, seed))
        if r is None:
            missing.append(f"{model} {augment} {library} seed {seed}")
            continue
        accs = ", ".join(f"{100 * e['test_acc']:.2f}" for e in r["epochs"])
        if not r.get("complete", True):
            accs += f" (stopped after {len(r['epochs'])} of {r['recipe']['epochs']} epochs)"
        seconds = np.median([e["train_seconds"] for e in r["epochs"]])
        lines.append(f"| {model} | {augment} | {library} | {seed} | {accs} | {seconds:.0f} | "
                     f"{r['load_before'][0]}-{r['load_after'][0]} | {(r.get('commit') or '-')[:7]} |")
    lines += ["", "Means over the seeds that ran (final epoch):", ""]
    for model in MODELS:
        for augment in (AUGMENTS if model == "resnet20" else ("none",)):
            for library in LIBRARIES:
                finals = [r["final_test_acc"] for (lib, m, a, _), r in results.items()
                          if (lib, m, a) == (library, model, augment) and r.get("complete", True)]
                if finals:
                    lines.append(f"- {model} {augment} {library}: {100 * np.mean(finals):.2f}% over {len(finals)} "
                                 f"seed(s)")
    lines += _paired_lines(results)
    if missing:
        lines += ["", "Not run: " + "; ".join(missing) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write is not None:
        args.write.write_text(text)


def _paired_lines(results) -> list:
    """The issue's two comparisons over the seeds where both sides finished: gpucnn against PyTorch on each
    (model, augmentation), and each library's resnet20 against its LeNet-5 (no augmentation)."""
    def finals(library, model, augment):
        return {seed: r["final_test_acc"] for (lib, m, a, seed), r in results.items()
                if (lib, m, a) == (library, model, augment) and r.get("complete", True)}

    lines = ["", "Paired over the seeds both sides finished (final epoch; difference of the means, points):", ""]
    pairs = [(f"{model} {augment}: gpucnn - PyTorch", finals("gpucnn", model, augment), finals("torch", model, augment))
             for model in MODELS for augment in (AUGMENTS if model == "resnet20" else ("none",))]
    pairs += [(f"{library}: resnet20 - lenet5 (no augmentation)", finals(library, "resnet20", "none"),
               finals(library, "lenet5", "none")) for library in LIBRARIES]
    for label, left, right in pairs:
        seeds = sorted(set(left) & set(right))
        if seeds:
            a, b = np.mean([left[s] for s in seeds]), np.mean([right[s] for s in seeds])
            lines.append(f"- {label}: {100 * a:.2f} - {100 * b:.2f} = {100 * (a - b):+.2f} over seeds "
                         f"{', '.join(map(str, seeds))}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder of the per-run JSON files")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="one cell, in this process")
    run.add_argument("--library", choices=LIBRARIES, required=True)
    run.add_argument("--model", choices=MODELS, default="resnet20")
    run.add_argument("--augment", choices=AUGMENTS, default="none")
    run.add_argument("--seed", type=int, default=0)
    matrix = commands.add_parser("matrix", help="every cell not yet in --out, each in its own process")
    matrix.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    matrix.add_argument("--augments", nargs="+", choices=AUGMENTS, default=list(AUGMENTS))
    matrix.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    table = commands.add_parser("table", help="the markdown table of the results in --out")
    table.add_argument("--write", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    {"run": command_run, "matrix": command_matrix, "table": command_table}[args.command](args)


if __name__ == "__main__":
    main()
