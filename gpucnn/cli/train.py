"""``gpucnn train``: the run's plan (options or a resumed checkpoint's settings), data, model and Trainer."""
from __future__ import annotations

import contextlib
import math
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from gpucnn import backend, distributed, runfolder
from gpucnn.checkpoint import CheckpointError, load_checkpoint
from gpucnn.cli import data as cli_data
from gpucnn.cli.errors import EXIT_INTERRUPTED, rank_error_text
from gpucnn.cli.options import (apply_options, data_dir_option, dataset_option, device_option, folder_path,
                                grey_option, image_size_option, model_option, skip_bad_images_option, use_device)
from gpucnn.metrics import METRICS_FILE
from gpucnn.data.augment import CHOICES as AUGMENT_CHOICES
from gpucnn.data.augment import Augment
from gpucnn.models import DROPOUT_MODELS, build_model
from gpucnn.train import CHECKPOINT_FILE, Trainer

DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
DEFAULT_MOMENTUM = 0.9          # SGD only
DEFAULT_ADAMW_WEIGHT_DECAY = 0.01
STEP_GAMMA = 0.1                # --schedule step: lr x0.1 every third of the run
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.1, 2   # --schedule plateau: lr x0.1 after more than 2 epochs without improvement
# The run settings a resumed run takes from its checkpoint (option name -> config key).
RESUMED_SETTINGS = {"dataset": "dataset", "model": "model_name", "batch_size": "batch_size", "lr": "lr",
                    "optimizer": "optimizer", "momentum": "momentum", "weight_decay": "weight_decay",
                    "schedule": "schedule", "seed": "seed", "val_split": "val_split", "patience": "patience",
                    "monitor": "monitor", "warmup_epochs": "warmup_epochs", "augment": "augment", "dropout": "dropout"}
# Settings newer than some checkpoints: what a checkpoint without them was trained with.
SETTINGS_DEFAULTS = {"val_split": None, "patience": None, "monitor": "accuracy", "warmup_epochs": 0, "augment": "none",
                     "dropout": 0.0}
AUGMENT_HELP = ("Augment the training images per batch, reproducibly from --seed: crop (a random crop from the "
                "image padded by 2 black pixels at 28x28, 4 at 32x32), flip (a random horizontal flip), or both. "
                "Flipping suits clothes and photographs (fashion-mnist, cifar10) but is wrong for digits: a "
                "mirrored 2 is no 2, so use crop alone on mnist.")



class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which pass its range comparisons)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return number



def _make_optimizer(name, params, lr, momentum, weight_decay):
    from gpucnn import optim  # noqa: PLC0415 - kept out of the import path of summary/predict
    if name == "sgd":
        return optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _make_scheduler(name, optimizer, epochs, warmup_epochs=0, monitor="accuracy"):
    """The --schedule over the epochs after the warm-up, behind a LinearWarmup when there is one."""
    from gpucnn import optim  # noqa: PLC0415
    rest = max(1, epochs - warmup_epochs)
    scheduler = None
    if name == "step":
        scheduler = optim.StepLR(optimizer, step_size=max(1, rest // 3), gamma=STEP_GAMMA)
    elif name == "cosine":
        scheduler = optim.CosineAnnealingLR(optimizer, T_max=rest)
    elif name == "plateau":
        scheduler = optim.ReduceLROnPlateau(optimizer, mode="max" if monitor == "accuracy" else "min",
                                            factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE)
    return optim.LinearWarmup(optimizer, warmup_epochs, scheduler) if warmup_epochs else scheduler


def _check_out_dir(out: Path, resume: Path | None) -> None:
    """Claim ``out`` for this run (see gpucnn.runfolder), prove it writable now, not after the first
    epoch, and refuse a folder holding another run: a fresh run's, or a resumed run's other than its own."""
    runfolder.claim(out)  # held until this process ends; a second run into it is refused meanwhile
    with tempfile.TemporaryFile(dir=out):
        pass
    held = runfolder.describe_run(out)
    if held is None:
        return
    if resume is None:
        raise ValueError(f"{held}, or choose another --out.")
    if out.resolve() != resume.parent.resolve():  # the folders, not where a linked checkpoint points
        raise ValueError(f"--out {out} holds another run ({', '.join(runfolder.run_files(out))}); a resumed run "
                         f"continues in its own folder {resume.parent} (drop --out) or in an empty one.")
    _refuse_rewinding(out, resume)


def _refuse_rewinding(out: Path, resume: Path) -> None:
    """An older checkpoint of a run (best.npz, a copy) resumed in its folder would overwrite the later
    checkpoint.npz and drop the later epochs' metrics: refused; branching into an empty --out is fine."""
    latest = out / CHECKPOINT_FILE
    if not latest.exists() or latest.resolve() == resume.resolve():
        return
    now, then = load_checkpoint(latest), load_checkpoint(resume)
    position = (now.get("epoch"), now.get("step"))
    if all(isinstance(v, int) for v in (*position, then.get("epoch"), then.get("step"))) and \
            position > (then["epoch"], then["step"]):
        raise ValueError(f"resuming {resume} (epoch {then['epoch']}) in {out} would overwrite its {CHECKPOINT_FILE} "
                         f"(epoch {now['epoch']}) and drop the metrics of the epochs after {then['epoch']}; resume "
                         f"{latest}, or branch the run into an empty --out.")


def _settings_from_checkpoint(ctx, resume, given: dict) -> dict:
    """The run settings stored in the checkpoint; refuses explicit options that contradict them."""
    config = load_checkpoint(resume).get("config") or {}
    missing = [key for key in RESUMED_SETTINGS.values() if key not in config and key not in SETTINGS_DEFAULTS]
    if missing:
        raise CheckpointError(f"checkpoint {resume} lacks the run settings {', '.join(missing)}; "
                              "it was not written by 'gpucnn train'.")
    settings = {option: config.get(key, SETTINGS_DEFAULTS.get(key)) for option, key in RESUMED_SETTINGS.items()}
    for option, value in given.items():
        source = ctx.get_parameter_source(option)
        explicit = source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")
        if explicit and value != settings[option]:
            flag = "--" + option.replace("_", "-")
            raise ValueError(f"{flag} {value} differs from the checkpoint's {settings[option]}; a resumed run "
                             f"keeps the settings it started with (drop {flag}).")
    settings["planned_epochs"] = config.get("epochs")
    return settings


def _training_data(plan, data_dir, no_download, quiet, image_size, grey, skip_bad_images, resume):
    """cli_data.training_data with a resumed run's stored data settings (image mode, statistics)."""
    stored = None
    if resume is not None:
        config = load_checkpoint(resume).get("config") or {}
        if "normalization" in config:
            stored = cli_data.DataSettings.from_config(config, where=f"checkpoint {resume}")
    return cli_data.training_data(plan.dataset, plan.model, data_dir, download=not no_download, progress=not quiet,
                                  image_size=image_size, grey=grey, skip_bad_images=skip_bad_images, stored=stored,
                                  val_split=plan.val_split, seed=plan.seed)


# The options of train, in --help order.
_TRAIN_OPTIONS = [
    device_option,
    dataset_option(default="mnist"),
    data_dir_option,
    image_size_option,
    grey_option,
    skip_bad_images_option,
    model_option,
    click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
                 help="Epochs in total (a resumed run counts the checkpoint's epochs; asking a resumed run for "
                      "more epochs than it was planned for stretches its schedule over the new total)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                 help="Images per batch (one training step)."),
    click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=None,
                 help="Learning rate. [default: 1e-3 for adam/adamw, 0.01 for sgd]"),
    click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="adam", show_default=True,
                 help="sgd (with momentum), adam, or adamw (decoupled weight decay)."),
    click.option("--momentum", type=FiniteFloatRange(min=0, max=1, max_open=True), default=None,
                 help=f"SGD momentum (sgd only). [default: {DEFAULT_MOMENTUM}]"),
    click.option("--weight-decay", type=FiniteFloatRange(min=0), default=None,
                 help=f"L2 penalty (decoupled for adamw). [default: {DEFAULT_ADAMW_WEIGHT_DECAY} for adamw, else 0]"),
    click.option("--schedule", type=click.Choice(["none", "step", "cosine", "plateau"]), default="cosine",
                 show_default=True,
                 help="Per-epoch learning-rate schedule: cosine to 0 over the run, x0.1 every third of it, or "
                      f"plateau: x{PLATEAU_FACTOR:g} when the --monitor value has not improved for more than "
                      f"{PLATEAU_PATIENCE} epochs."),
    click.option("--warmup-epochs", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Epochs of linear learning-rate warm-up before the --schedule: epoch k of N runs at "
                      "lr*k/(N+1)."),
    click.option("--val-split", type=FiniteFloatRange(min=0, max=1, min_open=True, max_open=True), default=None,
                 help="Hold out this fraction of the training images (drawn by --seed) as a validation split; it, "
                      "not the test split, then picks best.npz and drives --patience and --schedule plateau."),
    click.option("--patience", type=click.IntRange(min=1), default=None,
                 help="Stop early after N epochs in a row without a better --monitor value (best.npz keeps the "
                      "best epoch). [default: run every epoch]"),
    click.option("--monitor", type=click.Choice(["accuracy", "loss"]), default="accuracy", show_default=True,
                 help="The watched metric: picks best.npz, and drives --patience and --schedule plateau; of the "
                      "validation split with --val-split, else of the test split."),
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Seeds the initial weights, the batch order and the augmentation."),
    click.option("--augment", type=click.Choice(AUGMENT_CHOICES), default="none", show_default=True,
                 help=AUGMENT_HELP),
    click.option("--dropout", type=FiniteFloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True,
                 help="Dropout probability before the classifier's last layer, for the models with a place for "
                      f"it ({', '.join(DROPOUT_MODELS)})."),
    click.option("--out", type=click.Path(file_okay=False), callback=folder_path, default=None,
                 help="Where to write the results: a folder for checkpoint.npz, best.npz and metrics.jsonl. "
                      "[default: runs/<dataset>-<timestamp>, or the checkpoint's folder with --resume]"),
    click.option("--resume", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Continue the run saved in this checkpoint, with its settings, up to --epochs."),
    click.option("--no-download", is_flag=True, help="Fail instead of downloading missing data."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bars, and no per-epoch lines."),
    click.option("--distributed", "data_parallel", is_flag=True,
                 help="Train data-parallel on every rank of an MPI job (mpirun -n N gpucnn train --distributed ...): "
                      "gradients averaged by MPI (cpu) or NCCL (gpu, one GPU per rank); --batch-size is per rank. "
                      "Needs gpucnn[mpi]."),
    click.option("--graph/--no-graph", "graph", default=None,
                 help="Replay each training step as one recorded CUDA graph (gpu, emulator) instead of running it "
                      "op by op. [default: --graph on the gpu, --no-graph on the emulator; ignored on the cpu]"),
]


@click.command()
@apply_options(_TRAIN_OPTIONS)
@click.pass_context
@distributed.abort_on_error(describe=rank_error_text, passthrough=(click.exceptions.Exit,))
def train(ctx, device, dataset, data_dir, image_size, grey, skip_bad_images, model, epochs, batch_size, lr,
          optimizer, momentum, weight_decay, schedule, warmup_epochs, val_split, patience, monitor, seed, augment,
          dropout, out, resume, no_download, quiet, data_parallel, graph):
    """Train a model, writing metrics and checkpoints to --out.

    Each epoch appends a line to metrics.jsonl and rewrites checkpoint.npz (and
    best.npz when the test accuracy improved). Ctrl-C (SIGTERM, SIGHUP) saves checkpoint.npz after
    the current step and exits with status 130 (143, 129); --resume continues exactly there.
    A run owns its --out folder while it lives: a second run into it is refused.

    \b
    Examples:
      gpucnn train --dataset fashion-mnist --epochs 5 --device cpu
      gpucnn train --dataset cifar10 --model vgg-small --device cpu
      gpucnn train --dataset fashion-mnist --model resnet20 --batch-size 128 --augment crop+flip
      gpucnn train --dataset folder --data-dir photos/ --epochs 10
      gpucnn train --resume runs/fashion-mnist-20250101-120000/checkpoint.npz --epochs 10
    """
    given = {"dataset": dataset, "model": model, "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
             "momentum": momentum, "weight_decay": weight_decay, "schedule": schedule, "seed": seed,
             "val_split": val_split, "patience": patience, "monitor": monitor, "warmup_epochs": warmup_epochs,
             "augment": augment, "dropout": dropout}
    plan = _resumed_plan(ctx, resume, given, epochs, out) if resume is not None else _new_plan(given, epochs, out)
    resolved = use_device(device, echo=False)   # the one resolution; everything below gets the name
    comm = distributed.init(resolved) if data_parallel else distributed.Communicator()
    main_rank = comm.rank == 0  # the only rank that prints and writes files
    quiet = quiet or not main_rank
    if main_rank:
        click.echo(f"device: {backend.describe(resolved)}")  # after init: a rank's own GPU
        if data_parallel:
            click.echo(f"distributed: {comm.describe()}; batch {plan.batch_size} per rank, "
                       f"{plan.batch_size * comm.size} per step")
        _check_out_dir(plan.out, resume)
    if not main_rank:
        comm.barrier()  # rank 0 reads the data first, so that a download happens once
    data = _training_data(plan, data_dir, no_download, quiet, image_size, grey, skip_bad_images, resume)
    if main_rank:
        comm.barrier()
    if not quiet:
        click.echo(data.summary)
    trainer = _make_trainer(plan, data, resolved, comm, graph)
    if not quiet:
        click.echo(plan.describe(epochs))
    history = trainer.fit(data.train, data.test, epochs=epochs, batch_size=plan.batch_size, resume=resume,
                          reschedule=plan.extended, progress=not quiet, val_data=data.val, patience=plan.patience,
                          monitor=plan.monitor)
    if trainer.interrupted:
        if main_rank:
            command = f"mpirun -n {comm.size} gpucnn train --distributed" if data_parallel else "gpucnn train"
            stopped_by = trainer.stop_signal
            how = {signal.SIGTERM: "terminated (SIGTERM)", getattr(signal, "SIGHUP", None): "hung up (SIGHUP)"}.get(
                stopped_by, "interrupted")
            with contextlib.suppress(OSError):  # after SIGHUP stderr may be a terminal that is gone
                click.echo(f"{how}; continue with: {command} --resume {trainer.checkpoint_path} --epochs {epochs}",
                           err=True)
        ctx.exit(EXIT_INTERRUPTED if trainer.stop_signal in (None, signal.SIGINT) else 128 + trainer.stop_signal)
    if main_rank:
        files = f"checkpoint {plan.out / CHECKPOINT_FILE}, metrics {plan.out / METRICS_FILE}"
        if not history:
            click.echo(f"done: the run had already stopped early, after epoch {trainer.watch.best_epoch} and "
                       f"{trainer.watch.bad_epochs} more (--patience {plan.patience}); {files}")
            return
        last = history[-1]
        split = "validation " if data.val is not None else ""
        best = f"best {split}{trainer.best_accuracy:.2%}"
        if trainer.watch.monitor == "loss":
            best = (f"best {split}loss {trainer.watch.best:.4f} in epoch {trainer.watch.best_epoch}, "
                    f"accuracy {trainer.best_accuracy:.2%}")
        early = "stopped early: " if trainer.stopped_early else ""
        click.echo(f"done: {early}epoch {last['epoch']} test accuracy {last['test_acc']:.2%} ({best}); {files}")


@dataclass
class _RunPlan:
    """The settings of a training run: the options given, or those stored in the checkpoint it resumes."""
    dataset: str
    model: str
    batch_size: int
    lr: float
    optimizer: str
    momentum: float | None   # SGD only
    weight_decay: float
    schedule: str
    seed: int
    val_split: float | None  # the fraction of training images held out for validation
    patience: int | None     # early stopping
    monitor: str             # "accuracy" or "loss": the watched metric
    warmup_epochs: int
    augment: str             # "none", "crop", "flip" or "crop+flip"
    dropout: float
    out: Path
    planned_epochs: int      # what the schedule spans
    extended: bool = False   # a resumed run asked for more epochs than it was planned for

    def config(self, data) -> dict:
        """The run settings the checkpoints store (see RESUMED_SETTINGS)."""
        return {"dataset": self.dataset, "model_name": self.model, "optimizer": self.optimizer, "lr": self.lr,
                "momentum": self.momentum, "weight_decay": self.weight_decay, "schedule": self.schedule,
                "epochs": self.planned_epochs, "val_split": self.val_split, "patience": self.patience,
                "monitor": self.monitor, "warmup_epochs": self.warmup_epochs, "augment": self.augment,
                "dropout": self.dropout, **data.settings.record()}

    def describe(self, epochs: int) -> str:
        text = (f"run: {self.model}, {self.optimizer} lr {self.lr:g}, schedule {self.schedule}, "
                f"batch {self.batch_size}, seed {self.seed}, epochs {epochs}; writing to {self.out}")
        extras = [f"warm-up {self.warmup_epochs} epochs" if self.warmup_epochs else "",
                  f"validation {self.val_split:g} of the training images" if self.val_split else "",
                  f"early stop after {self.patience} epochs without a better {self.monitor}" if self.patience else "",
                  f"watching the {self.monitor}" if self.monitor != "accuracy" and not self.patience else "",
                  f"augment {self.augment}" if self.augment != "none" else "",
                  f"dropout {self.dropout:g}" if self.dropout else ""]
        if any(extras):
            text += "\n" + "; ".join(extra for extra in extras if extra)
        if self.extended:
            text += f"\nextending the run to {epochs} epochs: the {self.schedule} schedule now spans all {epochs}"
        return text


def _new_plan(given: dict, epochs: int, out) -> _RunPlan:
    """A fresh run's settings: the options, with the defaults that depend on the optimizer filled in."""
    optimizer, momentum, weight_decay = given["optimizer"], given["momentum"], given["weight_decay"]
    if momentum is not None and optimizer != "sgd":
        raise ValueError(f"--momentum applies to --optimizer sgd only, not {optimizer}.")
    if given["warmup_epochs"] >= epochs:
        raise ValueError(f"--warmup-epochs {given['warmup_epochs']} must be fewer than --epochs {epochs}.")
    if given["dropout"] and given["model"] not in DROPOUT_MODELS:
        raise ValueError(f"--dropout applies to the models with a place for it ({', '.join(DROPOUT_MODELS)}), "
                         f"not {given['model']}.")
    momentum = (DEFAULT_MOMENTUM if momentum is None else momentum) if optimizer == "sgd" else None
    if weight_decay is None:
        weight_decay = DEFAULT_ADAMW_WEIGHT_DECAY if optimizer == "adamw" else 0.0
    out = out if out is not None else Path("runs") / f"{given['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    return _RunPlan(**{**given, "lr": DEFAULT_LR[optimizer] if given["lr"] is None else given["lr"],
                       "momentum": momentum, "weight_decay": weight_decay}, out=out, planned_epochs=epochs)


def _resumed_plan(ctx, resume, given: dict, epochs: int, out) -> _RunPlan:
    """A resumed run's settings, from its checkpoint; asked for more epochs, its schedule spans the new total."""
    settings = _settings_from_checkpoint(ctx, resume, given)
    stored_plan = settings.pop("planned_epochs") or epochs
    # Extending a run: the schedule spans the new total (a cosine fitted to the old one would be at 0).
    extended = epochs > stored_plan
    return _RunPlan(**settings, out=out if out is not None else resume.parent,
                    planned_epochs=epochs if extended else stored_plan, extended=extended)


def _make_trainer(plan: _RunPlan, data, device: str, comm, graph) -> Trainer:
    """The model, optimizer, scheduler and Trainer of a run, on the resolved ``device``."""
    extra = {"dropout": plan.dropout} if plan.dropout else {}
    network = build_model(plan.model, seed=plan.seed, **extra, **data.model_kwargs).to(device)
    opt = _make_optimizer(plan.optimizer, list(network.parameters()), plan.lr, plan.momentum or 0.0,
                          plan.weight_decay)
    scheduler = _make_scheduler(plan.schedule, opt, plan.planned_epochs, plan.warmup_epochs, plan.monitor)
    black = [-m / s for m, s in zip(data.settings.mean, data.settings.std)]  # a black pixel, normalised
    augment = Augment.from_name(plan.augment, fill=black)
    if augment is not None and comm.distributed:
        raise ValueError("--augment is not available with --distributed yet; train in one process to augment.")
    return Trainer(network, opt, scheduler, device=device, out_dir=plan.out, seed=plan.seed,
                   config=plan.config(data), comm=comm, graph=graph, augment=augment)


