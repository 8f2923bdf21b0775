"""Trainer: a step learns, seeded runs repeat, checkpoints hold everything, resume is bit-exact, NaN stops."""
import json
import os
import signal

import numpy as np
import pytest

from gpucnn import nn, optim
from gpucnn import train as train_module
from gpucnn import backend
from gpucnn.checkpoint import CheckpointError, load_checkpoint
from gpucnn.models import LeNet5
from gpucnn.train import BEST_FILE, CHECKPOINT_FILE, METRICS_FILE, Trainer, TrainingError, evaluate
from tests.helpers import BATCH, assert_one_line_error, invoke, run_cli
from tests.synthetic_data import random_images

CLASSES = 4


def synthetic(n, seed):
    """28x28 images whose class is the quadrant holding a bright square, plus noise; normalised float32."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    images = rng.normal(0.0, 0.3, (n, 1, 28, 28)).astype(np.float32)
    for i, label in enumerate(labels):
        top, left = divmod(int(label), 2)
        y, x = 3 + 14 * top + rng.integers(0, 4), 3 + 14 * left + rng.integers(0, 4)
        images[i, 0, y:y + 6, x:x + 6] += 2.0
    return images, labels.astype(np.int64)


TRAIN = synthetic(150, seed=1)  # 150 = 4 batches of 40 with a short last one
TEST = synthetic(60, seed=2)


def lenet_trainer(out_dir=None, seed=0, schedule=True, lr=2e-3):
    model = LeNet5(num_classes=CLASSES, seed=seed)
    opt = optim.Adam(model.parameters(), lr=lr)
    scheduler = optim.CosineAnnealingLR(opt, T_max=3) if schedule else None
    return Trainer(model, opt, scheduler, device="cpu", out_dir=out_dir, seed=seed, config={"dataset": "synthetic"})


def dropout_trainer(out_dir=None):
    """A small MLP with Dropout, so resuming must restore the dropout generator too."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32, rng=0), nn.ReLU(), nn.Dropout(0.3, rng=7),
                          nn.Linear(32, CLASSES, rng=1))
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Trainer(model, opt, optim.StepLR(opt, step_size=1, gamma=0.5), device="cpu", out_dir=out_dir, seed=3)


def weights(trainer):
    return trainer.model.state_dict()


def assert_bitwise_equal(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def test_train_step_reduces_the_loss():
    trainer = lenet_trainer(schedule=False)
    x, y = TRAIN[0][:32], TRAIN[1][:32]
    first, _ = trainer.train_step(x, y)
    for _ in range(15):
        loss, correct = trainer.train_step(x, y)
    assert float(loss) < 0.5 * float(first)
    assert 0 <= int(correct) <= 32


def test_train_step_checks_shapes():
    trainer = lenet_trainer()
    with pytest.raises(ValueError, match="same N"):
        trainer.train_step(TRAIN[0][:4], TRAIN[1][:5])


def test_evaluate_matches_an_independent_float64_computation():
    trainer = lenet_trainer()
    result = trainer.evaluate(TEST, batch_size=7)
    logits = trainer.model(TEST[0]).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected_loss = -log_probs[np.arange(len(TEST[1])), TEST[1]].mean()
    expected_acc = (logits.argmax(axis=1) == TEST[1]).mean()
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result["accuracy"] == pytest.approx(expected_acc)
    assert trainer.model.training  # evaluation restored training mode


def test_fit_learns_and_writes_metrics_and_checkpoints(tmp_path):
    trainer = lenet_trainer(out_dir=tmp_path)
    history = trainer.fit(TRAIN, TEST, epochs=3, batch_size=40, progress=False)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["test_acc"] >= 0.9
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert lines == history
    assert set(lines[0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "images_per_s",
                             "seconds"}
    assert [r["lr"] for r in lines] == pytest.approx([2e-3, 2e-3 * 0.75, 2e-3 * 0.25])  # cosine, T_max=3
    assert (tmp_path / CHECKPOINT_FILE).is_file() and (tmp_path / BEST_FILE).is_file()
    best_epoch = max(history, key=lambda r: r["test_acc"])["epoch"]  # first epoch reaching the maximum
    assert load_checkpoint(tmp_path / BEST_FILE)["epoch"] == best_epoch


def test_seeded_runs_repeat():
    runs = []
    for _ in range(2):
        trainer = lenet_trainer(seed=5)
        history = trainer.fit(TRAIN, TEST, epochs=2, batch_size=40, progress=False)
        runs.append((weights(trainer), [(r["train_loss"], r["test_loss"], r["test_acc"]) for r in history]))
    assert_bitwise_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    other = lenet_trainer(seed=6)
    other.fit(TRAIN, TEST, epochs=2, batch_size=40, progress=False)
    assert not np.array_equal(weights(other)["conv1.weight"], runs[0][0]["conv1.weight"])


def test_checkpoint_holds_weights_optimizer_scheduler_epoch_and_config(tmp_path):
    trainer = lenet_trainer(out_dir=tmp_path)
    trainer.fit(TRAIN, TEST, epochs=1, batch_size=40, progress=False)
    saved = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert saved["epoch"] == 1 and saved["step"] == 0
    assert_bitwise_equal(saved["model"], weights(trainer))
    live = trainer.optimizer.state_dict()
    assert saved["optimizer"]["hyperparameters"] == live["hyperparameters"]
    for stored, current in zip(saved["optimizer"]["state"], live["state"]):
        assert stored["step"] == current["step"] == 4
        assert np.array_equal(stored["exp_avg"], current["exp_avg"])
        assert np.array_equal(stored["exp_avg_sq"], current["exp_avg_sq"])
    assert saved["scheduler"] == trainer.scheduler.state_dict()
    assert saved["scheduler"]["last_epoch"] == 1
    assert saved["config"]["dataset"] == "synthetic"
    assert saved["config"]["model"] == {"name": "lenet5", "num_classes": CLASSES, "seed": 0}
    assert saved["config"]["batch_size"] == 40 and saved["config"]["seed"] == 0


@pytest.mark.parametrize("make", [lenet_trainer, dropout_trainer], ids=["lenet5-adam-cosine", "dropout-sgd-step"])
def test_resume_at_an_epoch_boundary_is_bitwise_exact(tmp_path, make):
    straight = make()
    straight_history = straight.fit(TRAIN, TEST, epochs=3, batch_size=40, progress=False)

    first = make(out_dir=tmp_path)
    first.fit(TRAIN, TEST, epochs=1, batch_size=40, progress=False)
    second = make(out_dir=tmp_path)
    history = second.fit(TRAIN, TEST, epochs=3, batch_size=40, resume=tmp_path / CHECKPOINT_FILE, progress=False)

    assert [r["epoch"] for r in history] == [2, 3]
    assert_bitwise_equal(weights(second), weights(straight))
    assert [(r["train_loss"], r["lr"]) for r in history] == [(r["train_loss"], r["lr"]) for r in straight_history[1:]]
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 3


def test_interrupt_saves_mid_epoch_and_resumes_bitwise(tmp_path):
    straight = dropout_trainer()
    straight_history = straight.fit(TRAIN, TEST, epochs=2, batch_size=40, progress=False)

    interrupted = dropout_trainer(out_dir=tmp_path)
    real_step = interrupted.train_step
    calls = []

    def step_then_ctrl_c(x, y):
        calls.append(1)
        result = real_step(x, y)
        if len(calls) == 6:  # the second step of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return result

    interrupted.train_step = step_then_ctrl_c
    history = interrupted.fit(TRAIN, TEST, epochs=2, batch_size=40, progress=False)
    assert interrupted.interrupted and len(history) == 1
    saved = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert (saved["epoch"], saved["step"]) == (1, 2)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back

    resumed = dropout_trainer(out_dir=tmp_path)
    history = resumed.fit(TRAIN, TEST, epochs=2, batch_size=40, resume=tmp_path / CHECKPOINT_FILE, progress=False)
    assert_bitwise_equal(weights(resumed), weights(straight))
    assert history[0]["train_loss"] == straight_history[1]["train_loss"]
    assert history[0]["train_acc"] == straight_history[1]["train_acc"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = lenet_trainer(out_dir=tmp_path)
    real_step = trainer.train_step
    calls = []

    def step_going_nan(x, y):
        calls.append(1)
        loss, correct = real_step(x, y)
        return (loss * np.float32("nan") if len(calls) > 5 else loss), correct  # from epoch 2, step 2

    trainer.train_step = step_going_nan
    with pytest.raises(TrainingError, match=r"training loss became nan in epoch 2 .*checkpoint.npz, is unchanged"):
        trainer.fit(TRAIN, TEST, epochs=3, batch_size=40, progress=False)
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["epoch"] == 1
    assert load_checkpoint(tmp_path / BEST_FILE)["epoch"] == 1
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 1


def test_nan_before_any_checkpoint_says_so():
    trainer = lenet_trainer()
    # Finite data whose forward pass overflows (NaN data are refused before training starts).
    bad = (np.full_like(TRAIN[0], np.finfo(np.float32).max), TRAIN[1])
    with np.errstate(all="ignore"), pytest.raises(TrainingError, match="epoch 1 .*no checkpoint had been written"):
        trainer.fit(bad, TEST, epochs=1, batch_size=40, progress=False)


def test_resume_refuses_what_cannot_continue_exactly(tmp_path):
    lenet_trainer(out_dir=tmp_path).fit(TRAIN, TEST, epochs=1, batch_size=40, progress=False)
    path = tmp_path / CHECKPOINT_FILE
    with pytest.raises(ValueError, match="batch size 40"):
        lenet_trainer().fit(TRAIN, TEST, epochs=2, batch_size=30, resume=path, progress=False)
    with pytest.raises(ValueError, match="already completed 1 epochs"):
        lenet_trainer().fit(TRAIN, TEST, epochs=1, batch_size=40, resume=path, progress=False)
    no_scheduler = lenet_trainer(schedule=False)
    with pytest.raises(CheckpointError, match="scheduler CosineAnnealingLR state, but this run uses None"):
        no_scheduler.fit(TRAIN, TEST, epochs=2, batch_size=40, resume=path, progress=False)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        dropout_trainer().fit(TRAIN, TEST, epochs=2, batch_size=40, resume=path, progress=False)


def test_fit_validates_its_inputs():
    trainer = lenet_trainer()
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        trainer.fit(TRAIN, TEST, epochs=0, batch_size=40, progress=False)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        trainer.fit(TRAIN, TEST, epochs=1, batch_size=4.0, progress=False)
    with pytest.raises(ValueError, match=r"images must have shape \(N, C, H, W\)"):
        trainer.fit((TRAIN[0][:, 0], TRAIN[1]), TEST, epochs=1, batch_size=40, progress=False)
    with pytest.raises(ValueError, match="150 images but 149 labels"):
        trainer.fit((TRAIN[0], TRAIN[1][:-1]), TEST, epochs=1, batch_size=40, progress=False)
    with pytest.raises(TypeError, match="must be a pair"):
        trainer.fit(TRAIN[0], TEST, epochs=1, batch_size=40, progress=False)
    with pytest.raises(TypeError, match="model must be a gpucnn.nn.Module"):
        Trainer(object(), trainer.optimizer)
    with pytest.raises(TypeError, match="lacks step"):
        Trainer(trainer.model, object())


def test_progress_bar_output_runs(capsys):
    trainer = lenet_trainer()
    trainer.fit(TRAIN, TEST, epochs=1, batch_size=40, progress=True)
    captured = capsys.readouterr()
    assert "epoch 1/1  train loss" in captured.out


def test_module_evaluate_refuses_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        evaluate(LeNet5(num_classes=CLASSES, seed=0), *TEST, batch_size=0)


def test_metrics_are_read_back_every_refresh_and_at_epoch_end(monkeypatch):
    """The device-side sums are read back every REFRESH_STEPS steps and at the epoch's end, not every step."""
    trainer = lenet_trainer()
    real_check = trainer._check_finite
    reads = []

    def counting_check(value, phase, epoch, step):
        reads.append((phase, step))
        return real_check(value, phase, epoch, step)

    monkeypatch.setattr(train_module, "REFRESH_STEPS", 2)
    trainer._check_finite = counting_check
    trainer.fit(synthetic(40 * 5, seed=4), TEST, epochs=1, batch_size=40, progress=False)
    assert reads == [("training", 2), ("training", 4), ("training", 5), ("test", 5)]


def test_resuming_an_earlier_checkpoint_drops_the_later_metrics_lines(tmp_path):
    lenet_trainer(out_dir=tmp_path).fit(TRAIN, TEST, epochs=2, batch_size=40, progress=False)
    first_epoch = tmp_path / "epoch1.npz"
    lenet_trainer(out_dir=tmp_path / "one").fit(TRAIN, TEST, epochs=1, batch_size=40, progress=False)
    (tmp_path / "one" / CHECKPOINT_FILE).rename(first_epoch)
    lenet_trainer(out_dir=tmp_path).fit(TRAIN, TEST, epochs=3, batch_size=40, resume=first_epoch, progress=False)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert epochs == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# A loss going NaN, running out of memory


def small_data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 28, 28)).astype(np.float32), rng.integers(0, 4, n)


def test_loss_going_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    model = LeNet5(num_classes=4, seed=0)
    opt = optim.Adam(model.parameters(), lr=2e-3)
    # A real divergence: after epoch 1 the schedule multiplies the learning rate by 1e30.
    trainer = Trainer(model, opt, optim.StepLR(opt, step_size=1, gamma=1e30), device="cpu", out_dir=tmp_path)
    data = random_images()
    with np.errstate(all="ignore"), pytest.raises(
            TrainingError, match=f"the training loss became nan in epoch 2 .*the last good checkpoint, "
                                 f"{tmp_path / CHECKPOINT_FILE}, is unchanged; try a smaller learning rate"):
        trainer.fit(data, data, epochs=3, batch_size=8, progress=False)
    saved = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert saved["epoch"] == 1
    assert all(np.isfinite(w).all() for w in saved["model"].values())
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 1


def test_loss_going_nan_in_the_cli_is_one_line(random_mnist, tmp_path):
    result = run_cli("train", "--device", "cpu", "--data-dir", random_mnist, "--no-download", "--epochs", 2,
                     "--batch-size", BATCH, "--optimizer", "sgd", "--lr", 1e30, "--out", tmp_path / "run", "--quiet", check=False)
    assert_one_line_error(result.returncode, result.stderr, "the training loss became nan in epoch 1")
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()


def fake_cupy_out_of_memory():
    """An exception of CuPy's class name and module (cupy.cuda.memory.OutOfMemoryError), without CuPy."""
    cls = type("OutOfMemoryError", (MemoryError,), {"__module__": "cupy.cuda.memory"})
    return cls("Out of memory allocating 1,073,741,824 bytes (allocated so far: 79,456,894,976 bytes).")


def test_is_out_of_memory_recognises_gpu_and_host_allocation_failures():
    assert backend.is_out_of_memory(fake_cupy_out_of_memory())
    runtime_error = type("CUDARuntimeError", (RuntimeError,), {"__module__": "cupy_backends.cuda.api.runtime"})
    assert backend.is_out_of_memory(runtime_error("cudaErrorMemoryAllocation: out of memory"))
    assert backend.is_out_of_memory(MemoryError("Unable to allocate 12.0 GiB"))
    assert not backend.is_out_of_memory(runtime_error("cudaErrorIllegalAddress: an illegal memory access"))
    assert not backend.is_out_of_memory(type("OutOfMemoryError", (Exception,), {"__module__": "mylib"})())
    assert not backend.is_out_of_memory(ValueError("x"))


def test_out_of_memory_in_training_suggests_a_smaller_batch_and_keeps_the_checkpoint(tmp_path):
    data = random_images()
    model = LeNet5(num_classes=4, seed=0)
    Trainer(model, optim.Adam(model.parameters(), lr=1e-3), device="cpu", out_dir=tmp_path).fit(
        data, data, epochs=1, batch_size=8, progress=False)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    resumed = LeNet5(num_classes=4, seed=0)
    calls = []

    def forward_running_out(x):
        calls.append(1)
        if len(calls) == 3:
            raise fake_cupy_out_of_memory()
        return nn.Conv2d.forward(resumed.conv1, x)

    resumed.conv1.forward = forward_running_out
    trainer = Trainer(resumed, optim.Adam(resumed.parameters(), lr=1e-3), device="cpu", out_dir=tmp_path)
    with pytest.raises(TrainingError, match=r"training on the cpu ran out of memory at batch size 8 "
                                            r"\(OutOfMemoryError: Out of memory allocating .*\); training stopped and "
                                            r"the last good checkpoint, .*checkpoint.npz, is unchanged; try a smaller "
                                            r"batch size \(--batch-size 4\)"):
        trainer.fit(data, data, epochs=2, batch_size=8, resume=tmp_path / CHECKPOINT_FILE, progress=False)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before


def test_out_of_memory_in_the_cli_is_one_line(random_mnist, reference_run, tmp_path, monkeypatch):
    def step_running_out(self, x, y):
        raise fake_cupy_out_of_memory()

    monkeypatch.setattr(Trainer, "train_step", step_running_out)
    result = invoke(("train", "--device", "cpu", "--data-dir", random_mnist, "--no-download", "--epochs", 1,
                     "--batch-size", 64, "--out", tmp_path / "run", "--quiet"))
    assert_one_line_error(result.exit_code, result.stderr, "ran out of memory at batch size 64")
    assert "--batch-size 32" in result.stderr

    def evaluate_running_out(*args, **kwargs):
        raise fake_cupy_out_of_memory()

    monkeypatch.setattr("gpucnn.cli.inference.evaluate", evaluate_running_out)
    result = invoke(("evaluate", reference_run / CHECKPOINT_FILE, "--device", "cpu", "--data-dir", random_mnist,
                     "--no-download"))
    assert_one_line_error(result.exit_code, result.stderr, "out of memory (Out of memory allocating")
    assert "try a smaller --batch-size" in result.stderr
