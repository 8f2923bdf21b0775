"""Checkpoints: nested round trips, refusal of missing/corrupt/foreign/incompatible files, atomic writes."""
import json
import zipfile

import numpy as np
import pytest

from gpucnn import checkpoint as ckpt_module
from gpucnn.checkpoint import (
    CheckpointError,
    check_state_fits,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from gpucnn.models import LeNet5


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
