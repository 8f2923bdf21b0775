"""Training conveniences: early stopping, a validation split, ReduceLROnPlateau, warm-up; all resumable."""
import json

import numpy as np
import pytest

from gpucnn import optim
from gpucnn.checkpoint import load_checkpoint
from gpucnn.models import LeNet5
from gpucnn.train import BEST_FILE, CHECKPOINT_FILE, METRICS_FILE, Trainer
from gpucnn.watch import Watch
from tests.helpers import assert_one_line_error, clean_env, run_cli, run_cli_together
from tests.test_train import CLASSES, TEST, TRAIN, assert_bitwise_equal, synthetic

VAL = synthetic(40, seed=3)


def plateau_values(values, mode, patience, factor=0.1, lr=1.0, threshold=1e-4):
    """The lr after each epoch, following the rule as documented (a second, plain implementation)."""
    best, bad, out = None, 0, []
    for value in values:
        if mode == "min":
            better = best is None or value < best * (1 - threshold)
        else:
            better = best is None or value > best * (1 + threshold)
        if better:
            best, bad = value, 0
        else:
            bad += 1
            if bad > patience:
                lr, bad = lr * factor, 0
        out.append(lr)
    return out


@pytest.mark.parametrize("mode", ["min", "max"])
def test_reduce_lr_on_plateau_follows_the_rule_and_resumes(mode):
    values = [1.0, 0.9, 0.95, 0.91, 0.92, 0.8, 0.85, 0.86, 0.87, 0.7]
    if mode == "max":
        values = [2 - v for v in values]
    opt = optim.SGD(LeNet5(seed=0).parameters(), lr=1.0)
    plateau = optim.ReduceLROnPlateau(opt, mode=mode, factor=0.1, patience=2)
    lrs = []
    for i, value in enumerate(values):
        if i == 5:   # a checkpoint here, restored into a fresh scheduler, continues alike
            state = plateau.state_dict()
            opt = optim.SGD(LeNet5(seed=0).parameters(), lr=1.0)
            plateau = optim.ReduceLROnPlateau(opt, mode=mode, factor=0.1, patience=2)
            plateau.load_state_dict(json.loads(json.dumps(state)))
        plateau.step(value)
        lrs.append(opt.lr)
    assert lrs == pytest.approx(plateau_values(values, mode, 2))
    assert min(lrs) < 1.0


def test_reduce_lr_on_plateau_matches_pytorch():
    torch = pytest.importorskip("torch")
    values = [1.0, 0.9, 0.95, 0.91, 0.92, 0.8, 0.85, 0.86, 0.87, 0.7, 0.71, 0.72, 0.73]
    param = torch.nn.Parameter(torch.zeros(1))
    torch_opt = torch.optim.SGD([param], lr=1.0)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(torch_opt, mode="min", factor=0.1, patience=2)
    opt = optim.SGD(LeNet5(seed=0).parameters(), lr=1.0)
    ours = optim.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=2)
    for value in values:
        theirs.step(value)
        ours.step(value)
        assert opt.lr == pytest.approx(torch_opt.param_groups[0]["lr"])


def test_linear_warmup_then_the_schedule_and_resume_mid_warmup():
    def make():
        opt = optim.Adam(LeNet5(seed=0).parameters(), lr=0.3)
        return opt, optim.LinearWarmup(opt, 2, optim.CosineAnnealingLR(opt, T_max=4))
    opt, warm = make()
    lrs = [opt.lr]
    for _ in range(6):
        warm.step()
        lrs.append(opt.lr)
    cosine = [0.3 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(5)]
    assert lrs == pytest.approx([0.1, 0.2, *cosine])     # 0.3 * 1/3, 0.3 * 2/3, then the cosine from 0.3
    opt, warm = make()
    warm.step()
    state = json.loads(json.dumps(warm.state_dict()))
    opt, again = make()
    again.load_state_dict(state)
    assert opt.lr == pytest.approx(0.2)
    for expected in lrs[2:]:
        again.step()
        assert opt.lr == pytest.approx(expected)


def test_watch_counts_epochs_without_improvement():
    watch = Watch("loss", patience=2)
    improved = [watch.update({"loss": v, "accuracy": 0}, e) for e, v in enumerate([0.5, 0.4, 0.45, 0.4, 0.3], 1)]
    assert improved == [True, True, False, False, True] and not watch.should_stop
    watch.update({"loss": 0.31, "accuracy": 0}, 6)
    watch.update({"loss": 0.3, "accuracy": 0}, 7)         # equal is not better
    assert watch.should_stop and watch.best_epoch == 5 and watch.bad_epochs == 2
    with pytest.raises(ValueError, match="resume with the same --monitor"):
        Watch("accuracy").load_state_dict(watch.state_dict())


def trainer(out_dir, scheduler="plateau"):
    model = LeNet5(num_classes=CLASSES, seed=0)
    opt = optim.Adam(model.parameters(), lr=2e-3)
    after = optim.ReduceLROnPlateau(opt, mode="min", patience=1) if scheduler == "plateau" else None
    return Trainer(model, opt, optim.LinearWarmup(opt, 1, after), device="cpu", out_dir=out_dir, seed=0)


def test_early_stopping_on_the_validation_loss_keeps_the_best_epoch(tmp_path):
    run = trainer(tmp_path)
    history = run.fit(TRAIN, TEST, epochs=30, batch_size=40, progress=False, val_data=VAL, patience=2,
                      monitor="loss")
    assert run.stopped_early and len(history) < 30
    losses = [r["val_loss"] for r in history]
    best = int(np.argmin(losses))
    assert len(history) == best + 1 + 2                              # two epochs without a lower val loss
    assert run.watch.best_epoch == best + 1 == load_checkpoint(tmp_path / BEST_FILE)["epoch"]
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["epoch"] == len(history)
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert lines == history and {"val_loss", "val_acc", "test_loss", "test_acc"} <= set(lines[0])
    # resuming the stopped run trains nothing more
    again = trainer(tmp_path)
    assert again.fit(TRAIN, TEST, epochs=30, batch_size=40, progress=False, val_data=VAL, patience=2, monitor="loss",
                     resume=tmp_path / CHECKPOINT_FILE) == []
    assert again.stopped_early


def test_a_run_with_warmup_plateau_and_validation_resumes_bit_for_bit(tmp_path):
    kwargs = dict(batch_size=40, progress=False, val_data=VAL, patience=3, monitor="loss")
    whole = trainer(tmp_path / "whole")
    history = whole.fit(TRAIN, TEST, epochs=5, **kwargs)
    part = trainer(tmp_path / "part")
    part.fit(TRAIN, TEST, epochs=2, **kwargs)
    resumed = trainer(tmp_path / "part")
    rest = resumed.fit(TRAIN, TEST, epochs=5, resume=tmp_path / "part" / CHECKPOINT_FILE, **kwargs)
    assert_bitwise_equal(whole.model.state_dict(), resumed.model.state_dict())
    drop = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in history[2:]] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rest]
    assert [r["lr"] for r in history][:2] == pytest.approx([1e-3, 2e-3])     # the warm-up epoch, then lr


def test_cli_validation_split_patience_and_warmup(random_mnist, tmp_path):
    base = ("train", "--device", "cpu", "--dataset", "mnist", "--data-dir", random_mnist, "--no-download",
            "--batch-size", 32, "-q")
    run, too_long = run_cli_together(
        (*base, "--epochs", 3, "--val-split", 0.25, "--warmup-epochs", 1, "--schedule", "plateau",
         "--patience", 5, "--monitor", "loss", "--out", tmp_path / "run"),
        (*base, "--epochs", 2, "--warmup-epochs", 2, "--out", tmp_path / "bad"))
    assert run.returncode == 0, run.stderr
    assert_one_line_error(too_long.returncode, too_long.stderr, "--warmup-epochs 2 must be fewer than --epochs 2")
    config = load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)["config"]
    assert (config["val_split"], config["patience"], config["monitor"], config["warmup_epochs"]) == \
        (0.25, 5, "loss", 1)
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and "val_acc" in records[0]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc"]
    # a resumed run keeps the split (the same held-out images) and refuses another one
    resumed, other = run_cli_together(
        ("train", "--resume", tmp_path / "run" / CHECKPOINT_FILE, "--epochs", 4, "--data-dir", random_mnist,
         "--no-download", "--device", "cpu"),
        ("train", "--resume", tmp_path / "run" / CHECKPOINT_FILE, "--epochs", 4, "--val-split", 0.5,
         "--data-dir", random_mnist, "--no-download", "--device", "cpu"), env=clean_env())
    assert resumed.returncode == 0, resumed.stderr
    assert "held out for validation" in resumed.stdout and "done: " in resumed.stdout
    assert_one_line_error(other.returncode, other.stderr, "--val-split 0.5 differs from the checkpoint's 0.25")
