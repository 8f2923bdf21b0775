"""Files as a user's disk has them (issue 22): weights that are not finite floats, archives renamed or
with damaged headers, FIFOs and devices, tampered checkpoints, a damaged image-folder cache, 16-bit
and float images, and the modes of the files gpucnn writes."""
import json
import os
import stat
import zipfile

import numpy as np
import pytest

pytest.importorskip("PIL")  # absent on a bare GPU machine: skip, not a collection error
from PIL import Image  # noqa: E402

from gpucnn import files
from gpucnn.checkpoint import META_KEY, CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from gpucnn.data import DataError, datasets, load_image_folder, read_image, read_model_input, write_idx
from gpucnn.data import folder as folder_module
from gpucnn.models import LeNet5
from gpucnn.train import CHECKPOINT_FILE
from tests.helpers import assert_one_line_error, run_cli, run_cli_together
from tests.synthetic_data import write_random_split


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real one-epoch training run of gpucnn train: its folder (checkpoint.npz, best.npz, metrics.jsonl)."""
    root = tmp_path_factory.mktemp("files-data")
    (root / "mnist").mkdir()
    write_random_split(root / "mnist", "train", seed=0, n=32)
    write_random_split(root / "mnist", "test", seed=1, n=16)
    out = root / "run"
    run_cli("train", "--device", "cpu", "--data-dir", root, "--no-download", "--epochs", 1, "--batch-size", 16,
            "--out", out, "--quiet")
    return out


def tampered(run, tmp_path, name="tampered.npz", **changes):
    """A copy of the run's checkpoint with parts replaced (a function of the old value, or a value)."""
    parts = load_checkpoint(run / CHECKPOINT_FILE)
    parts.pop("gpucnn_version")
    for key, change in changes.items():
        parts[key] = change(parts[key]) if callable(change) else change
    return save_checkpoint(tmp_path / name, **parts)


def raw_checkpoint(path, meta, arrays=None):
    """An npz with the given metadata JSON text (and arrays), as a tampering hand would write it."""
    np.savez(path, **{META_KEY: np.array(meta)}, **(arrays or {}))
    return path


# ---------------------------------------------------------------- item 8: weights that are not finite floats

@pytest.mark.parametrize("make_bad, error, fragment", [
    (lambda w: np.where(np.arange(w.size).reshape(w.shape) == 3, np.nan, w).astype(np.float32), ValueError,
     "'conv1.weight' holds NaN or infinite values (1 of 150)"),
    (lambda w: np.full(w.shape, np.inf, np.float32), ValueError, "NaN or infinite values (150 of 150)"),
    (lambda w: np.ones(w.shape, np.int64), TypeError, "'conv1.weight' must be a float array, not int64"),
    (lambda w: w.astype(np.complex64), TypeError, "must be a float array, not complex64"),
    (lambda w: w > 0, TypeError, "must be a float array, not bool"),
], ids=["nan", "inf", "int", "complex", "bool"])
def test_load_state_dict_refuses_weights_that_are_not_finite_floats(make_bad, error, fragment):
    model = LeNet5(seed=0)
    before = model.state_dict()
    state = dict(before, **{"conv1.weight": make_bad(before["conv1.weight"])})
    with pytest.raises(error) as raised:
        model.load_state_dict(state)
    assert fragment in str(raised.value)
    for name, value in model.state_dict().items():  # nothing was copied
        np.testing.assert_array_equal(value, before[name])


def test_a_checkpoint_with_nan_weights_is_refused_not_predicted_as_nan_percent(run, tmp_path):
    def poison(model):
        return {**model, "fc3.bias": np.full_like(model["fc3.bias"], np.nan)}
    bad = tampered(run, tmp_path, model=poison)
    with pytest.raises(ValueError, match="fc3.bias' holds NaN"):
        model_from_checkpoint(load_checkpoint(bad))
    image = tmp_path / "digit.npy"
    np.save(image, np.zeros((28, 28), np.uint8))
    result = run_cli("predict", bad, image, "--device", "cpu", check=False)
    assert_one_line_error(result.returncode, result.stderr, "'fc3.bias' holds NaN or infinite values")
    assert "nan%" not in result.stdout


# ---------------------------------------------------------------- item 14: renamed archives, damaged headers

def _damage_npy_header(data: bytes) -> bytes:
    """An .npy file's bytes with its header dict cut open (NumPy's parser raises TokenError)."""
    start = data.index(b"{")
    return data[:start + 10] + b"(" + data[start + 11:]


def test_npz_named_npy_and_damaged_npy_headers_are_one_line(run, tmp_path):
    renamed = tmp_path / "digits.npy"
    with open(renamed, "wb") as f:  # an .npz archive under a .npy name
        np.savez(f, x=np.zeros((28, 28), np.uint8))
    damaged = tmp_path / "damaged.npy"
    np.save(damaged, np.zeros((28, 28), np.uint8))
    damaged.write_bytes(_damage_npy_header(damaged.read_bytes()))
    with pytest.raises(ValueError, match="is an .npz archive, not a .npy array"):
        read_model_input(renamed, (1, 28, 28))
    with pytest.raises(ValueError, match="is not a readable .npy array"):
        read_model_input(damaged, (1, 28, 28))
    first, second = run_cli_together(("predict", run / CHECKPOINT_FILE, renamed, "--device", "cpu"),
                                     ("predict", run / CHECKPOINT_FILE, damaged, "--device", "cpu"))
    assert_one_line_error(first.returncode, first.stderr, "is an .npz archive, not a .npy array")
    assert_one_line_error(second.returncode, second.stderr, "is not a readable .npy array")


def test_a_checkpoint_member_with_a_damaged_header_is_a_checkpoint_error(run, tmp_path):
    source, damaged = run / CHECKPOINT_FILE, tmp_path / "damaged.npz"
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            zout.writestr(item, _damage_npy_header(data) if item.filename.startswith("model") else data)
    with pytest.raises(CheckpointError, match=r"checkpoint .*damaged.npz is corrupt \(TokenError"):
        load_checkpoint(damaged)


# ---------------------------------------------------------------- item 15: FIFOs and devices

def test_fifos_and_devices_are_refused_not_read_forever(run, tmp_path):
    fifo, zero = tmp_path / "pipe.npy", tmp_path / "zero.npz"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="is a device, not a regular file"):
        load_checkpoint(zero)
    with pytest.raises(CheckpointError, match=r"is a FIFO \(named pipe\), not a regular file"):
        load_checkpoint(fifo)
    with pytest.raises(DataError, match="is a FIFO"):
        read_model_input(fifo, (1, 28, 28))
    # before the fix each of these blocked for ever (the timeout fails the test instead)
    results = run_cli_together(("predict", zero, fifo, "--device", "cpu"),
                               ("predict", run / CHECKPOINT_FILE, fifo, "--device", "cpu"),
                               ("evaluate", fifo, "--device", "cpu"), timeout=120)
    for result, fragment in zip(results, ("is a device", "is a FIFO", "is a FIFO")):
        assert_one_line_error(result.returncode, result.stderr, fragment)


def test_an_idx_file_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "images.idx")
    with pytest.raises(DataError, match="IDX file .*images.idx is a FIFO"):
        datasets.read_idx(tmp_path / "images.idx")


# ---------------------------------------------------------------- item 16: tampered checkpoints

def test_tampered_checkpoints_are_checkpoint_errors(run, tmp_path):
    good = json.loads(str(np.load(run / CHECKPOINT_FILE)[META_KEY]))
    config_list = dict(good, parts={**good["parts"], "config": ["not", "a", "dict"]})
    model_list = dict(good, parts={**good["parts"], "config": {**good["parts"]["config"], "model": [1, 2]}})
    nested = '{"format": "gpucnn-checkpoint", "format_version": 1, "parts": ' + "[" * 100000 + "]" * 100000 + "}"
    header = json.dumps(dict(good, parts={}))[:-3]  # '{..., "parts": '
    nested_decoded = header + '{"config": ' + '{"a": [' * 450 + "1" + "]}" * 450 + "}}"
    bad_marker = json.dumps(dict(good, parts={"model": {"__items__": 5}}))
    arrays = {k: v for k, v in np.load(run / CHECKPOINT_FILE).items() if k != META_KEY}
    cases = [(json.dumps(config_list), "its config is a list, not a dict"),
             (json.dumps(model_list), "its model config is a list, not a dict"),
             (nested, "nested too deeply"), (nested_decoded, "nested too deeply"),
             (bad_marker, "its metadata is malformed")]
    for i, (meta, fragment) in enumerate(cases):
        path = raw_checkpoint(tmp_path / f"case{i}.npz", meta, arrays)
        with pytest.raises(CheckpointError) as raised:
            load_checkpoint(path)
        assert fragment in str(raised.value), (i, str(raised.value))


@pytest.mark.parametrize("change, fragment", [
    ({"trainer": lambda t: {k: v for k, v in t.items() if k not in ("seed", "optimizer_class")}},
     "its trainer state lacks seed, optimizer_class"),
    ({"trainer": [1, 2]}, "its trainer state is a list, not a dict"),
    ({"trainer": lambda t: {**t, "partial": {"loss": 1.0}}}, "its partial epoch is malformed"),
    ({"step": "three"}, "its step is 'three', not a count"),
    ({"rng": [0]}, "its rng entry is a list, not a dict"),
], ids=["missing-keys", "trainer-list", "partial", "step", "rng"])
def test_tampered_trainer_state_is_refused_on_resume(run, tmp_path, change, fragment):
    bad = tampered(run, tmp_path, **change)
    result = run_cli("train", "--resume", bad, "--epochs", 2, "--device", "cpu", "--quiet", "--no-download",
                     "--data-dir", run.parent, "--out", tmp_path / "out", check=False)
    assert_one_line_error(result.returncode, result.stderr, fragment)


# ---------------------------------------------------------------- item 5: images of more than 8 bits

def _digit16():
    """A 16-bit grey 'digit' using the whole range, and its exact 8-bit rendering."""
    rng = np.random.default_rng(0)
    pixels16 = (rng.integers(0, 256, (28, 28)) * 257).astype(np.uint16)
    return pixels16, (pixels16 // 257).astype(np.uint8)


def test_16_bit_png_tiff_and_float_images_are_scaled_by_their_bit_depth(tmp_path):
    pixels16, pixels8 = _digit16()
    Image.fromarray(pixels16).save(tmp_path / "g16.png")
    Image.fromarray(pixels16).save(tmp_path / "g16.tif")
    Image.fromarray(pixels8.astype(np.float32) / 255).save(tmp_path / "float.tif")
    Image.fromarray(pixels8).save(tmp_path / "g8.png")
    Image.fromarray(pixels16.astype(np.int32) * 32768).save(tmp_path / "i32.tif")  # 16 bits in the top of 31
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    expected = read_image(tmp_path / "g8.png", grey=True)
    np.testing.assert_array_equal(expected[0], pixels8)
    for name in ("g16.png", "g16.tif", "float.tif", "i32.tif"):
        got = read_image(tmp_path / name, grey=True)
        assert got.dtype == np.uint8
        assert np.abs(got.astype(int) - expected).max() <= 1, name  # before the fix: 0 or 255 (clipped)
        colour = read_image(tmp_path / name)  # a colour model gets the grey in all three channels
        assert colour.shape == (3, 28, 28) and np.abs(colour.astype(int) - expected).max() <= 1, name
        pixels = read_model_input(tmp_path / name, (1, 28, 28))  # what predict feeds the model
        assert np.abs(pixels[0, 0] - pixels8 / 255).max() <= 1 / 255 + 1e-6, name


def test_float_images_outside_0_1_and_negative_integers_are_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 2.5, np.float32)).save(tmp_path / "bright.tif")
    Image.fromarray(np.full((4, 4), -3, np.int32)).save(tmp_path / "negative.tif")
    with pytest.raises(DataError, match="float pixels exceed 1"):
        read_image(tmp_path / "bright.tif")
    with pytest.raises(DataError, match="negative or non-finite"):
        read_image(tmp_path / "negative.tif")


def test_a_folder_of_16_bit_images_is_not_binarised(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    pixels16, pixels8 = _digit16()
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / "photos" / split / name).mkdir(parents=True)
            Image.fromarray(pixels16).save(tmp_path / "photos" / split / name / "1.png")
    train = load_image_folder(tmp_path / "photos", "train", image_size=28, grey=True)
    assert len(np.unique(train.images)) > 100  # before the fix: 0 and 255 only
    assert np.abs(train.images[0, 0].astype(int) - pixels8).max() <= 1


# ---------------------------------------------------------------- item 10: a damaged folder cache

def _photos(tmp_path):
    for split in ("train", "test"):
        for name, value in (("dark", 30), ("light", 220)):
            (tmp_path / "photos" / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), value + i, np.uint8)).save(
                    tmp_path / "photos" / split / name / f"{i}.png")
    return tmp_path / "photos"


def _flip_bit(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


@pytest.mark.parametrize("damage", [
    lambda data: data[:len(data) // 2],                 # cut short
    lambda data: _flip_bit(data, len(data) // 2),       # one bit of the images flipped: the CRC catches it
    lambda data: _flip_bit(data, 0),                    # the zip header
    lambda data: b"",                                   # empty
], ids=["truncated", "flipped-bit", "header", "empty"])
def test_a_damaged_folder_cache_is_decoded_again_and_said(tmp_path, monkeypatch, damage):
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    photos = _photos(tmp_path)
    first = load_image_folder(photos, "train", image_size=8)
    cache = next((tmp_path / "cache").rglob("train.npz"))
    cache.write_bytes(damage(cache.read_bytes()))
    with pytest.warns(UserWarning, match=r"the image cache .*train.npz is damaged .*decoding the images again"):
        again = load_image_folder(photos, "train", image_size=8)
    assert not again.from_cache
    np.testing.assert_array_equal(again.images, first.images)
    third = load_image_folder(photos, "train", image_size=8)  # the cache was written afresh
    assert third.from_cache
    np.testing.assert_array_equal(third.images, first.images)


def test_a_cache_of_the_wrong_shape_is_decoded_again(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    photos = _photos(tmp_path)
    load_image_folder(photos, "train", image_size=8)
    cache = next((tmp_path / "cache").rglob("train.npz"))
    with np.load(cache) as npz:
        parts = dict(npz)
    np.savez(cache, **{**parts, "labels": parts["labels"][:2]})  # a valid archive, the wrong content
    with pytest.warns(UserWarning, match="is damaged"):
        assert not load_image_folder(photos, "train", image_size=8).from_cache


def test_the_folder_cache_is_written_with_fsync(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    load_image_folder(_photos(tmp_path), "train", image_size=8)
    cache = next((tmp_path / "cache").rglob("train.npz"))
    assert cache.parent.parent.name == folder_module.CACHE_SUBDIR
    assert any(path.startswith(str(cache.parent / ".train.npz.")) for path in synced), synced  # before the rename
    assert str(cache.parent) in synced  # the folder, after it: the rename is durable


# ---------------------------------------------------------------- item 19: file modes follow the umask

@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_umask_mode_not_0600(tmp_path, monkeypatch, mask, mode):
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    previous = os.umask(mask)
    try:
        written = [save_checkpoint(tmp_path / "checkpoint.npz", model=LeNet5(seed=0).state_dict()),
                   write_idx(tmp_path / "labels.idx", np.arange(5, dtype=np.uint8)),
                   write_idx(tmp_path / "labels.idx.gz", np.arange(5, dtype=np.uint8))]
        load_image_folder(_photos(tmp_path), "train", image_size=8)
        written.append(next((tmp_path / "cache").rglob("train.npz")))
        assert files.umask() == mask
    finally:
        os.umask(previous)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path  # before the fix: 0600 for every umask


def test_a_training_run_writes_its_files_with_the_umask_mode(run):
    for path in run.iterdir():  # checkpoint.npz, best.npz, metrics.jsonl (umask 022 in the CLI's process)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~files.umask(), path


def test_a_download_lands_with_the_umask_mode(tiny_cache, server, tmp_path):
    from tests.helpers import MNIST_FILES  # noqa: PLC0415
    for key, name in MNIST_FILES.items():
        server.routes[f"/good/{name}"] = tiny_cache.files[key]
    previous = os.umask(0o022)
    try:
        datasets.load_dataset("tiny", "test", mirrors=[server.url + "/good/"], progress=False)
    finally:
        os.umask(previous)
    downloaded = sorted(tiny_cache.cache.iterdir())
    assert [p.name for p in downloaded] == sorted([MNIST_FILES["test-images"], MNIST_FILES["test-labels"]])
    for path in downloaded:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # before the fix: mkstemp's 0600


def test_a_broken_link_or_fifo_among_a_folders_images_is_a_bad_image_not_silently_left_out(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    photos = _photos(tmp_path)
    (photos / "train" / "dark" / "9-broken.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(photos / "train" / "light" / "8-pipe.png")
    with pytest.raises(DataError, match=r"cannot read image .*9-broken.png: it is a broken link or not a regular "
                                        r"file \(2 such\)\. .*--skip-bad-images"):
        load_image_folder(photos, "train", image_size=8)  # before: 6 images, no word about the other 2
    for _ in range(2):  # decoded, then from the cache: the same count of skipped files
        train = load_image_folder(photos, "train", image_size=8, skip_bad_images=True)
        assert len(train.labels) == 6
        assert sorted(train.skipped) == ["train/dark/9-broken.png", "train/light/8-pipe.png"]
    assert train.from_cache


def test_a_folder_cache_write_killed_midway_is_cleaned_up_later(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "cache"))
    photos = _photos(tmp_path)
    load_image_folder(photos, "train", image_size=8)
    cache = next((tmp_path / "cache").rglob("train.npz"))
    dead, live = cache.with_name(".train.npz.k1ll3d.tmp"), cache.with_name(".train.npz.busy.tmp")
    dead.write_bytes(b"half a cache")  # what a run SIGKILLed while writing the cache leaves
    live.write_bytes(b"a write in progress")
    stale = os.path.getmtime(dead) - 2 * files.STALE_TEMP_S
    os.utime(dead, (stale, stale))
    (photos / "train" / "dark" / "0.png").touch()  # changed: the next load decodes and writes the cache again
    load_image_folder(photos, "train", image_size=8)
    assert not dead.exists() and live.exists()  # before: every killed write's temporary stayed for ever


def test_a_download_onto_a_full_disk_says_so_not_that_every_mirror_failed(tiny_cache, server, tmp_path):
    """A real 8 KiB tmpfs as the cache; the test images (200 of them) do not fit."""
    import json  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from tests.helpers import MNIST_FILES, ROOT, clean_env, mount_namespace  # noqa: PLC0415
    from tests.test_download import DOWNLOAD_SCRIPT  # noqa: PLC0415
    prefix = mount_namespace()
    if prefix is None:
        pytest.skip("needs a small tmpfs: unshare and mount in a mount namespace (root, or user namespaces)")
    for key, name in MNIST_FILES.items():
        server.routes[f"/good/{name}"] = tiny_cache.files[key]
    disk = tmp_path / "disk"
    disk.mkdir()
    spec = json.dumps({k: [f.filename, f.md5] for k, f in tiny_cache.spec.files.items()})
    result = subprocess.run([*prefix, sys.executable, "-c",
                             f"import subprocess, sys; subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8k', "
                             f"'tmpfs', {str(disk)!r}], check=True); "
                             f"exec(compile({DOWNLOAD_SCRIPT!r}, 'download', 'exec'))",
                             server.url + "/good/", str(disk / "cache"), spec], cwd=ROOT,
                            env=clean_env(disk / "cache"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "CacheWriteError: cannot write the download to" in last and "(No space left on device)" in last, last
    assert "every mirror failed" not in result.stderr  # before: that, and advice to check the network
