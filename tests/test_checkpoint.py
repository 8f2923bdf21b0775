"""Checkpoints: nested round trips, refusal of missing/corrupt/foreign/incompatible files, atomic writes."""
import json
import os
import random
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gpucnn import checkpoint as ckpt_module
from gpucnn import optim
from gpucnn.checkpoint import CheckpointError, check_state_fits, load_checkpoint, model_from_checkpoint, save_checkpoint
from gpucnn.metrics import METRICS_CSV
from gpucnn.models import LeNet5, build_model
from gpucnn.runfolder import LOCK_FILE
from gpucnn.train import BEST_FILE, CHECKPOINT_FILE, METRICS_FILE, Trainer
from tests.helpers import (
    EPOCHS,
    assert_one_line_error,
    assert_same_run,
    resume_args,
    run_cli,
    run_cli_together,
    start_cli,
    train_args,
    wait_until,
)
from tests.synthetic_data import random_images


def nested_parts():
    rng = np.random.default_rng(0)
    return {
        "model": {"conv1.weight": rng.standard_normal((6, 1, 5, 5)).astype(np.float32),
                  "conv1.bias": np.zeros(6, np.float32)},
        "optimizer": {"type": "Adam", "hyperparameters": {"lr": 1e-3, "betas": (0.9, 0.999)},
                      "state": [{"step": 7, "exp_avg": rng.standard_normal(3)}, {}]},
        "rng": {"3.rng": np.random.default_rng(5).bit_generator.state},
        "by_index": {0: "zero", 1: np.float32(0.5)},
        "epoch": 3,
        "nothing": None,
        "values": [1.5, float("inf"), "text", True, np.int64(9), np.float16(0.25)],
    }


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_keeps_structure_types_and_dtypes(tmp_path):
    parts = nested_parts()
    path = save_checkpoint(tmp_path / "c.npz", **parts)
    loaded = load_checkpoint(path)
    assert loaded.pop("gpucnn_version") == "0.1.0"
    assert_same(parts, loaded)
    assert isinstance(loaded["by_index"][1], np.float32)  # a NumPy scalar keeps its dtype
    assert isinstance(loaded["optimizer"]["hyperparameters"]["betas"], tuple)


def test_saved_file_is_a_plain_npz_without_pickles(tmp_path):
    path = save_checkpoint(tmp_path / "c.npz", **nested_parts())
    with np.load(path, allow_pickle=False) as npz:
        assert "model/conv1.weight" in npz.files
        meta = json.loads(str(npz["__gpucnn__"]))
    assert meta["format"] == "gpucnn-checkpoint"


def test_dict_shaped_like_a_marker_survives(tmp_path):
    tricky = {"__array__": "not an array reference"}
    path = save_checkpoint(tmp_path / "c.npz", tricky=tricky)
    assert load_checkpoint(path)["tricky"] == tricky


def test_save_refuses_bad_parts(tmp_path):
    with pytest.raises(TypeError, match="cannot store 'thing'"):
        save_checkpoint(tmp_path / "c.npz", thing=object())
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c.npz", gpucnn_version="9")
    with pytest.raises(ValueError, match="at least one part"):
        save_checkpoint(tmp_path / "c.npz")
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.npz")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_garbage_and_truncated_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(CheckpointError, match="not an .npz archive"):
        load_checkpoint(garbage)
    good = save_checkpoint(tmp_path / "good.npz", **nested_parts())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.npz"):
        load_checkpoint(truncated)


def test_corrupt_member_is_refused(tmp_path):
    good = save_checkpoint(tmp_path / "good.npz", model={"w": np.arange(1000, dtype=np.float32)})
    raw = bytearray(good.read_bytes())
    offset = raw.find(np.arange(1000, dtype=np.float32).tobytes()[400:420])
    raw[offset:offset + 20] = b"\xff" * 20  # payload damaged, zip directory intact: the CRC check fails
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(damaged)


def test_foreign_npz_and_foreign_metadata_are_refused(tmp_path):
    plain = tmp_path / "plain.npz"
    np.savez(plain, weights=np.ones(3))
    with pytest.raises(CheckpointError, match="not a gpucnn checkpoint"):
        load_checkpoint(plain)
    other = tmp_path / "other.npz"
    np.savez(other, __gpucnn__=np.array(json.dumps({"format": "something-else", "parts": {}})))
    with pytest.raises(CheckpointError, match="not a gpucnn checkpoint"):
        load_checkpoint(other)
    not_json = tmp_path / "not_json.npz"
    np.savez(not_json, __gpucnn__=np.array("{oops"))
    with pytest.raises(CheckpointError, match="not JSON"):
        load_checkpoint(not_json)


def test_dangling_array_reference_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.npz", model={"w": np.ones(2)})
    with np.load(path) as npz:
        meta = str(npz["__gpucnn__"])
    broken = tmp_path / "broken.npz"
    np.savez(broken, __gpucnn__=np.array(meta))  # the metadata without its array
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(broken)


def test_newer_format_version_is_refused(tmp_path):
    meta = {"format": "gpucnn-checkpoint", "format_version": 99, "parts": {}}
    future = tmp_path / "future.npz"
    np.savez(future, __gpucnn__=np.array(json.dumps(meta)))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(future)


def test_check_state_fits_names_every_kind_of_mismatch():
    expected = {"a": np.zeros((2, 3)), "b": np.zeros(4)}
    check_state_fits({"a": np.ones((2, 3)), "b": np.ones(4)}, expected)
    with pytest.raises(CheckpointError, match=r"missing b; unexpected c; a is \(3, 2\) in the checkpoint but \(2, 3\)"):
        check_state_fits({"a": np.ones((3, 2)), "c": np.ones(1)}, expected)
    with pytest.raises(CheckpointError, match="not a dict"):
        check_state_fits([1, 2], expected)


def test_model_from_checkpoint_rebuilds_and_refuses_incompatible_weights(tmp_path):
    model = LeNet5(seed=3)
    path = save_checkpoint(tmp_path / "m.npz", model=model.state_dict(), config={"model": model.config})
    rebuilt = model_from_checkpoint(load_checkpoint(path))
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert np.array_equal(a, b), name

    other = LeNet5(num_classes=4, seed=3)  # fc3 is 84->4
    wrong = save_checkpoint(tmp_path / "wrong.npz", model=other.state_dict(), config={"model": model.config})
    with pytest.raises(CheckpointError, match=r"does not fit the model: fc3.weight is \(4, 84\) in the checkpoint"):
        model_from_checkpoint(load_checkpoint(wrong))

    anonymous = save_checkpoint(tmp_path / "anon.npz", model=model.state_dict(), config={})
    with pytest.raises(CheckpointError, match="does not record which model"):
        model_from_checkpoint(load_checkpoint(anonymous))
    unknown = save_checkpoint(tmp_path / "unknown.npz", model=model.state_dict(), config={"model": {"name": "vgg"}})
    with pytest.raises(CheckpointError, match="cannot be built"):
        model_from_checkpoint(load_checkpoint(unknown))


def test_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.npz", model={"w": np.arange(5.0)}, epoch=1)
    before = path.read_bytes()
    real_savez = np.savez

    def savez_that_dies_midway(file, **arrays):
        real_savez(file, **{k: v for k, v in list(arrays.items())[:1]})  # some bytes reach the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_module.np, "savez", savez_that_dies_midway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model={"w": np.arange(5.0) * 2}, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left behind


def test_overwrite_replaces_the_whole_file(tmp_path):
    path = save_checkpoint(tmp_path / "c.npz", model={"w": np.arange(5.0)}, epoch=1)
    save_checkpoint(path, model={"w": np.arange(3.0)}, epoch=2)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and np.array_equal(loaded["model"]["w"], np.arange(3.0))
    assert zipfile.is_zipfile(path)


# ------------------------------------------------------------------------------------------------
# Checkpoints under SIGKILL and Ctrl-C, corrupt and incompatible ones


def checkpoint_key(path: Path):
    """Identifies one version of a file written by rename: (inode, mtime), or None while it is absent."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns)


def save_temporaries(out: Path) -> list[Path]:
    return list(out.glob(".checkpoint.npz.*.tmp")) + list(out.glob(".best.npz.*.tmp"))


@pytest.mark.slow
def test_sigkill_at_any_moment_keeps_a_loadable_checkpoint_and_resume_is_bitwise(random_mnist, reference_run,
                                                                                    tmp_path):
    out = tmp_path / "run"
    path = out / CHECKPOINT_FILE
    rng = random.Random(20251125)
    process = start_cli(*train_args(random_mnist, out))
    last, epoch, kills, mid_write_kills = None, 0, 0, 0
    for cycle in range(8):
        # Wait for a new checkpoint (so every cycle makes progress), then SIGKILL: on even cycles the
        # moment a save's temporary file appears (mid-write), on odd ones after a random delay.
        assert wait_until(lambda: checkpoint_key(path) not in (None, last) or process.poll() is not None,
                          timeout=120), "no new checkpoint within 120 s"
        if process.poll() is not None:  # it finished all epochs before this cycle could kill it
            assert process.returncode == 0, process.communicate()[1]
            break
        if cycle % 2 == 0:
            wait_until(lambda: save_temporaries(out) or process.poll() is not None, timeout=60)
            writing = bool(save_temporaries(out))
        else:
            time.sleep(rng.uniform(0.0, 0.25))
            writing = False
        process.kill()
        process.communicate(timeout=60)
        kills += process.returncode == -signal.SIGKILL
        mid_write_kills += writing and process.returncode == -signal.SIGKILL
        last = checkpoint_key(path)
        saved = load_checkpoint(path)  # never half-written, whenever the kill came
        model_from_checkpoint(saved)
        assert saved["epoch"] >= epoch and saved["step"] == 0
        epoch = saved["epoch"]
        if epoch >= EPOCHS:
            break
        process = start_cli(*resume_args(random_mnist, out))
    else:
        process.communicate(timeout=300)
        assert process.returncode == 0
    assert kills >= 4 and mid_write_kills >= 1, (kills, mid_write_kills)
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {CHECKPOINT_FILE, BEST_FILE, METRICS_FILE,
                                                                            METRICS_CSV}
    assert all(p.name.endswith(".tmp") or p.name == LOCK_FILE for p in out.iterdir() if p.name.startswith("."))
    assert_same_run(out, reference_run)


def test_temporary_files_of_killed_saves_are_never_read_and_cleaned_later(reference_run, tmp_path):
    good = (reference_run / CHECKPOINT_FILE).read_bytes()
    target = tmp_path / CHECKPOINT_FILE
    target.write_bytes(good)
    dead = tmp_path / ".checkpoint.npz.k1ll3d.tmp"   # what a save killed halfway leaves behind
    dead.write_bytes(good[: len(good) // 2])
    live = tmp_path / ".checkpoint.npz.busy.tmp"     # a save in progress elsewhere: recent
    live.write_bytes(good[:100])
    assert load_checkpoint(target)["epoch"] == EPOCHS
    stale = time.time() - 2 * ckpt_module.STALE_TEMP_S
    os.utime(dead, (stale, stale))
    save_checkpoint(target, model={"w": np.zeros(2, np.float32)})
    assert not dead.exists() and live.exists()


def test_metrics_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    data = random_images()
    model = LeNet5(num_classes=4, seed=0)
    Trainer(model, optim.Adam(model.parameters(), lr=1e-3), device="cpu", out_dir=tmp_path).fit(
        data, data, epochs=1, batch_size=8, progress=False)
    metrics = tmp_path / METRICS_FILE
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"epoch": 2, "train_loss": 1.2')  # epoch 2's line, cut off where the process died
    resumed = LeNet5(num_classes=4, seed=0)
    Trainer(resumed, optim.Adam(resumed.parameters(), lr=1e-3), device="cpu", out_dir=tmp_path).fit(
        data, data, epochs=2, batch_size=8, resume=tmp_path / CHECKPOINT_FILE, progress=False)
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_and_resume_is_bitwise(random_mnist, reference_run, tmp_path):
    out = tmp_path / "run"
    process = start_cli(*train_args(random_mnist, out))
    assert wait_until(lambda: (out / CHECKPOINT_FILE).exists(), timeout=120)
    time.sleep(random.Random(7).uniform(0.0, 0.2))
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"interrupted; continue with: gpucnn train --resume "
                                               f"{out / CHECKPOINT_FILE} --epochs {EPOCHS}")
    saved = load_checkpoint(out / CHECKPOINT_FILE)
    assert saved["epoch"] < EPOCHS
    resumed = run_cli(*resume_args(random_mnist, out), check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference_run)


def test_corrupt_checkpoints_are_refused_with_the_reason(reference_run, tmp_path):
    good = (reference_run / CHECKPOINT_FILE).read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[: len(good) // 2])
    text = tmp_path / "notes.npz"
    text.write_text("not a checkpoint")
    result, resumed_from_text = run_cli_together(("evaluate", truncated, "--device", "cpu"),
                                                 ("train", "--resume", text, "--device", "cpu"))
    assert_one_line_error(result.returncode, result.stderr, f"checkpoint {truncated} is not an .npz archive "
                                                            "(truncated, corrupt, or another kind of file)")
    flipped = tmp_path / "flipped.npz"
    data = bytearray(good)
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF  # flipped bits inside a stored member
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {flipped} is corrupt"):
        load_checkpoint(flipped)
    result = resumed_from_text
    assert_one_line_error(result.returncode, result.stderr, "is not an .npz archive")


def test_incompatible_checkpoints_are_refused_with_the_reason(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 4, 16)

    def trainer(model, out=None):
        return Trainer(model, optim.Adam(model.parameters(), lr=1e-3), device="cpu", out_dir=out)

    trainer(LeNet5(num_classes=4, variant="classic", seed=0), tmp_path).fit(
        (images, labels), (images, labels), epochs=1, batch_size=8, progress=False)
    path = tmp_path / CHECKPOINT_FILE
    # Same names and shapes, other model: refused by name.
    with pytest.raises(CheckpointError, match=f"checkpoint {path} holds a lenet5-classic model, but this run "
                                              "trains lenet5"):
        trainer(LeNet5(num_classes=4)).fit((images, labels), (images, labels), epochs=2, batch_size=8,
                                           resume=path, progress=False)
    # Other shapes: the mismatched parameters are named.
    with pytest.raises(CheckpointError, match=r"does not fit the model: fc3.weight is \(4, 84\) in the checkpoint "
                                              r"but \(10, 84\) in the model"):
        trainer(build_model("lenet5-classic", num_classes=10)).fit(
            (images, labels), (images, labels), epochs=2, batch_size=8, resume=path, progress=False)
    # A checkpoint of something else entirely.
    foreign = save_checkpoint(tmp_path / "foreign.npz", weights={"w": np.zeros(3)})
    result = run_cli("evaluate", foreign, "--device", "cpu", check=False)
    assert_one_line_error(result.returncode, result.stderr, "the checkpoint holds no model weights")
