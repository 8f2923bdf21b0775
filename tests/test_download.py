"""Data set lookup, download and loading, against a local HTTP server and temporary folders (no network)."""
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpucnn.data import DATASETS, DataError, DatasetSpec, FileSpec, find_dataset_dir, load_dataset, normalize
from gpucnn.data import datasets, write_idx
from gpucnn.data.datasets import download_dataset
from tests.helpers import MNIST_FILES, ROOT, clean_env, wait_until

MNIST_DIR = Path("/work/shared/datasets/mnist")
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FILENAMES = MNIST_FILES


@pytest.fixture(autouse=True)
def isolated_places(tmp_path, monkeypatch):
    """No test sees the user's cache, GPUCNN_DATA_DIR or /usr/share/datasets unless it asks."""
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "user-cache"))
    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_DATA_ROOT", tmp_path / "system")


def make_split(n, label_value=None, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8) if label_value is None else np.full(n, label_value, np.uint8)
    return images, labels


def write_dataset(directory, label_value=None, gz=True, splits=("train", "test")):
    """Tiny MNIST-layout files in ``directory``; returns {key: (bytes, array)}."""
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", 12), ("test", 5)):
        if split not in splits:
            continue
        images, labels = make_split(n, label_value, seed=len(written))
        for kind, array in (("images", images), ("labels", labels)):
            name = FILENAMES[f"{split}-{kind}"]
            path = write_idx(directory / (name if gz else name[:-3]), array)
            written[f"{split}-{kind}"] = (path.read_bytes(), array)
    return written


def tiny_spec(files, mirrors=("http://127.0.0.1:9/",), bad_md5_for=None):
    md5s = {key: hashlib.md5(data).hexdigest() for key, (data, _) in files.items()}
    if bad_md5_for:
        md5s[bad_md5_for] = "0" * 32
    return DatasetSpec(name="tiny", files={k: FileSpec(FILENAMES[k], md5s[k]) for k in FILENAMES},
                       mirrors=tuple(mirrors), mean=0.5, std=0.25, classes=tuple("0123456789"))


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A registered 'tiny' data set: its files and its spec (checksums of those files)."""
    files = write_dataset(tmp_path / "source")
    monkeypatch.setitem(DATASETS, "tiny", tiny_spec(files))
    return files


def cache_files(tmp_path):
    folder = tmp_path / "cache" / "tiny"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_verifies_and_caches(tmp_path, server, tiny):
    server.serve("/good", tiny)
    images, labels = load_dataset("tiny", "train", mirrors=[server.url + "/good/"],
                                  cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(images, tiny["train-images"][1])
    np.testing.assert_array_equal(labels, tiny["train-labels"][1])
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert cache_files(tmp_path) == sorted([FILENAMES["train-images"], FILENAMES["train-labels"]])
    # the second load comes from the cache: no further requests
    count = len(server.requests)
    again, _ = load_dataset("tiny", "train", mirrors=[server.url + "/good/"], cache_dir=tmp_path / "cache",
                            progress=False)
    np.testing.assert_array_equal(again, images)
    assert len(server.requests) == count == 2


def test_progress_bar_goes_to_the_given_stream(tmp_path, server, tiny):
    server.serve("/good", tiny)
    stream = io.StringIO()
    load_dataset("tiny", "test", mirrors=[server.url + "/good"], cache_dir=tmp_path / "cache", progress=stream)
    assert FILENAMES["test-images"] in stream.getvalue()


def test_first_mirror_404_then_a_good_one(tmp_path, server, tiny):
    server.serve("/good", tiny)
    images, _ = load_dataset("tiny", "test", mirrors=[server.url + "/missing/", server.url + "/good/"],
                             cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(images, tiny["test-images"][1])
    assert server.requests == [f"/missing/{FILENAMES['test-images']}", f"/good/{FILENAMES['test-images']}",
                               f"/missing/{FILENAMES['test-labels']}", f"/good/{FILENAMES['test-labels']}"]


def test_default_mirrors_come_from_the_spec(tmp_path, server, tiny, monkeypatch):
    server.serve("/spec", tiny)
    monkeypatch.setitem(DATASETS, "tiny", tiny_spec(tiny, mirrors=[server.url + "/spec/"]))
    _, labels = load_dataset("tiny", "test", cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(labels, tiny["test-labels"][1])


def test_wrong_checksum_leaves_nothing_behind(tmp_path, server, tiny, monkeypatch):
    monkeypatch.setitem(DATASETS, "tiny", tiny_spec(tiny, bad_md5_for="train-images"))
    server.serve("/good", tiny)
    with pytest.raises(DataError) as info:
        load_dataset("tiny", "train", mirrors=[server.url + "/good/"], cache_dir=tmp_path / "cache",
                     progress=False)
    message = str(info.value)
    assert FILENAMES["train-images"] in message
    assert "expected MD5 " + "0" * 32 in message
    assert "got " + hashlib.md5(tiny["train-images"][0]).hexdigest() in message
    assert cache_files(tmp_path) == []


def test_all_mirrors_failing_lists_them(tmp_path, server, tiny):
    mirrors = [server.url + "/a/", server.url + "/b/"]
    with pytest.raises(DataError, match="every mirror failed") as info:
        load_dataset("tiny", "test", mirrors=mirrors, cache_dir=tmp_path / "cache", progress=False)
    for mirror in mirrors:
        assert mirror + FILENAMES["test-images"] in str(info.value)
    assert "404" in str(info.value)
    assert cache_files(tmp_path) == []


def test_dropped_connection_leaves_no_broken_file(tmp_path, server, tiny):
    server.serve("/flaky", tiny)
    server.drop.add(f"/flaky/{FILENAMES['test-images']}")
    with pytest.raises(DataError, match=r"closed after \d+ of \d+ bytes"):
        load_dataset("tiny", "test", mirrors=[server.url + "/flaky/"], cache_dir=tmp_path / "cache",
                     progress=False)
    assert cache_files(tmp_path) == []
    # with a good second mirror the same load succeeds
    server.serve("/good", tiny)
    images, _ = load_dataset("tiny", "test", mirrors=[server.url + "/flaky/", server.url + "/good/"],
                             cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(images, tiny["test-images"][1])
    assert cache_files(tmp_path) == sorted([FILENAMES["test-images"], FILENAMES["test-labels"]])


def test_requests_time_out(tmp_path, server, tiny):
    server.serve("/slow", tiny)
    server.stall.add(f"/slow/{FILENAMES['test-images']}")
    start = time.monotonic()
    with pytest.raises(DataError, match="timed out"):
        download_dataset("tiny", "test", mirrors=[server.url + "/slow/"], cache_dir=tmp_path / "cache",
                         progress=False, timeout=0.3)
    assert time.monotonic() - start < 1.5
    assert cache_files(tmp_path) == []


def test_download_validates_its_arguments(tmp_path, tiny):
    with pytest.raises(ValueError, match="mirrors must be a non-empty sequence"):
        download_dataset("tiny", "test", mirrors=[], cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="timeout must be a positive"):
        download_dataset("tiny", "test", mirrors=["http://127.0.0.1:9/"], cache_dir=tmp_path / "cache", timeout=0)


def test_no_download_and_nothing_found_says_where_it_looked(tmp_path, tiny):
    with pytest.raises(DataError) as info:
        load_dataset("tiny", "test", download=False, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(tmp_path / "cache" / "tiny") in message
    assert str(tmp_path / "system" / "tiny") in message
    assert "data_dir" in message and "GPUCNN_DATA_DIR" in message
    assert not (tmp_path / "cache").exists()


def test_fashion_mnist_hint_names_the_debian_package():
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", download=False)


# ---- search order -------------------------------------------------------------------------------

@pytest.fixture
def four_places(tmp_path, monkeypatch, tiny):
    """The tiny data set in all four places; labels say where it came from (0 data_dir ... 3 system)."""
    places = {
        "data_dir": tmp_path / "given",
        "env": tmp_path / "env",
        "cache": tmp_path / "user-cache",
        "system": tmp_path / "system",
    }
    write_dataset(places["data_dir"], label_value=0)                   # the files directly
    write_dataset(places["env"] / "tiny", label_value=1)               # a <name>/ subfolder
    write_dataset(places["cache"] / "tiny", label_value=2)
    write_dataset(places["system"] / "tiny", label_value=3)
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(places["env"]))
    return places


def source_label(**kwargs):
    _, labels = load_dataset("tiny", "test", download=False, **kwargs)
    assert len(set(labels.tolist())) == 1
    return int(labels[0])


def test_data_dir_beats_env_beats_cache_beats_system(four_places, monkeypatch):
    assert source_label(data_dir=four_places["data_dir"]) == 0
    assert find_dataset_dir("tiny", four_places["data_dir"]) == four_places["data_dir"]
    assert source_label() == 1
    assert find_dataset_dir("tiny") == four_places["env"] / "tiny"
    monkeypatch.delenv(datasets.DATA_DIR_ENV)
    assert source_label() == 2
    assert find_dataset_dir("tiny") == four_places["cache"] / "tiny"
    shutil.rmtree(four_places["cache"])
    assert source_label() == 3
    assert find_dataset_dir("tiny") == four_places["system"] / "tiny"
    shutil.rmtree(four_places["system"])
    assert find_dataset_dir("tiny") is None
    with pytest.raises(DataError, match="no tiny test files"):
        source_label()


def test_cache_dir_argument_overrides_the_env_cache(four_places, tmp_path, monkeypatch):
    monkeypatch.delenv(datasets.DATA_DIR_ENV)
    write_dataset(tmp_path / "other-cache" / "tiny", label_value=4)
    assert source_label(cache_dir=tmp_path / "other-cache") == 4


def test_data_dir_with_name_subfolder_and_uncompressed_files(tmp_path, tiny):
    written = write_dataset(tmp_path / "root" / "tiny", gz=False)
    assert not any(p.suffix == ".gz" for p in (tmp_path / "root" / "tiny").iterdir())
    images, labels = load_dataset("tiny", "train", data_dir=tmp_path / "root", download=False)
    np.testing.assert_array_equal(images, written["train-images"][1])
    np.testing.assert_array_equal(labels, written["train-labels"][1])


def test_a_folder_with_one_split_serves_that_split_only(tmp_path, tiny):
    write_dataset(tmp_path / "d", splits=("test",))
    assert find_dataset_dir("tiny", tmp_path / "d", split="test") == tmp_path / "d"
    assert find_dataset_dir("tiny", tmp_path / "d", split="train") is None
    assert find_dataset_dir("tiny", tmp_path / "d") == tmp_path / "d"
    with pytest.raises(DataError, match="no tiny train files"):
        load_dataset("tiny", "train", data_dir=tmp_path / "d", download=False)


def test_data_dir_files_are_not_checksummed(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(DATASETS, "tiny", tiny_spec(tiny, bad_md5_for="test-images"))
    written = write_dataset(tmp_path / "d")
    images, _ = load_dataset("tiny", "test", data_dir=tmp_path / "d", download=False)
    np.testing.assert_array_equal(images, written["test-images"][1])


def test_missing_data_dir_and_bad_env_are_errors(tmp_path, tiny, monkeypatch):
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist"):
        load_dataset("tiny", "test", data_dir=tmp_path / "nowhere")
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"GPUCNN_DATA_DIR=.*gone is not a folder"):
        find_dataset_dir("tiny")


def test_unusable_cache_folder_is_a_clear_error(tmp_path, tiny):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError, match="cannot create the cache folder .*; set GPUCNN_CACHE_DIR"):
        download_dataset("tiny", "test", mirrors=["http://127.0.0.1:9/"], cache_dir=tmp_path / "a-file")


def test_bad_names_and_splits(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar'; choose one of fashion-mnist, mnist"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="split must be one of train, test, not 'val'"):
        load_dataset("mnist", "val")
    with pytest.raises(TypeError, match="dataset name must be a string"):
        find_dataset_dir(3)


# ---- structural validation of local folders ----------------------------------------------------

def put(directory, key, array):
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / FILENAMES[key], array)


def test_image_and_label_counts_must_match(tmp_path, tiny):
    images, labels = make_split(6)
    put(tmp_path / "d", "test-images", images)
    put(tmp_path / "d", "test-labels", labels[:5])
    with pytest.raises(DataError, match="holds 6 images but .* holds 5 labels"):
        load_dataset("tiny", "test", data_dir=tmp_path / "d", download=False)


def test_labels_must_be_in_range(tmp_path, tiny):
    images, labels = make_split(6)
    labels[3] = 10
    put(tmp_path / "d", "test-images", images)
    put(tmp_path / "d", "test-labels", labels)
    with pytest.raises(DataError, match=r"contains label 10, but tiny has 10 classes \(0\.\.9\)"):
        load_dataset("tiny", "test", data_dir=tmp_path / "d", download=False)


def test_images_must_be_uint8_28x28(tmp_path, tiny):
    _, labels = make_split(6)
    put(tmp_path / "d", "test-labels", labels)
    put(tmp_path / "d", "test-images", np.zeros((6, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"shape \(6, 32, 32\), but tiny images are uint8 of shape \(N, 28, 28\)"):
        load_dataset("tiny", "test", data_dir=tmp_path / "d", download=False)
    put(tmp_path / "d", "test-images", np.zeros((6, 28, 28), np.float32))
    with pytest.raises(DataError, match="holds float32 values"):
        load_dataset("tiny", "test", data_dir=tmp_path / "d", download=False)


def test_swapped_files_are_caught(tmp_path, tiny):
    images, labels = make_split(6)
    put(tmp_path / "d", "test-images", labels)
    put(tmp_path / "d", "test-labels", images)
    with pytest.raises(DataError, match="images are uint8 of shape"):
        load_dataset("tiny", "test", data_dir=tmp_path / "d", download=False)


def test_truncated_local_file_names_the_file(tmp_path, tiny):
    write_dataset(tmp_path / "d", gz=False)
    path = tmp_path / "d" / FILENAMES["test-images"][:-3]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is truncated: expected 3920 bytes of data, found 3910"):
        load_dataset("tiny", "test", data_dir=tmp_path / "d", download=False)


# ---- the real data ------------------------------------------------------------------------------

@pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason=f"no MNIST in {MNIST_DIR}")
def test_real_mnist_test_split_from_a_data_dir():
    images, labels = load_dataset("mnist", "test", data_dir=MNIST_DIR, download=False)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]


@pytest.mark.skipif(not (DEBIAN_FASHION_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_is_found(monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_DATA_ROOT", DEBIAN_FASHION_DIR.parent)
    assert find_dataset_dir("fashion-mnist") == DEBIAN_FASHION_DIR
    images, labels = load_dataset("fashion-mnist", "test", download=False)
    assert images.shape == (10000, 28, 28)
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert np.bincount(labels).tolist() == [1000] * 10


# ---- normalize ----------------------------------------------------------------------------------

def test_normalize_values_and_layout():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    out = normalize(images, mean=0.5, std=0.25)
    assert out.shape == (1, 1, 2, 2) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out[0, 0], [[-2.0, 2.0], [-1.2, -0.4]], rtol=1e-6)


@pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(), reason=f"no MNIST in {MNIST_DIR}")
def test_normalize_with_the_mnist_statistics_standardises_real_digits():
    spec = DATASETS["mnist"]
    images, _ = load_dataset("mnist", "test", data_dir=MNIST_DIR, download=False)
    out = normalize(images, spec.mean, spec.std)
    assert out.shape == (10000, 1, 28, 28)
    # the statistics are the training set's; the test set is close to them
    assert abs(float(out.mean())) < 0.02
    assert abs(float(out.std()) - 1.0) < 0.02


def test_normalize_validates_inputs():
    with pytest.raises(TypeError, match="expects uint8 images, not float32"):
        normalize(np.zeros((1, 2, 2), np.float32), 0.1, 0.3)
    with pytest.raises(ValueError, match=r"shape \(N, H, W\) or \(N, C, H, W\), not \(1, 2\)"):
        normalize(np.zeros((1, 2), np.uint8), 0.1, 0.3)
    with pytest.raises(ValueError, match=r"one mean or one per channel \(3\)"):
        normalize(np.zeros((1, 3, 2, 2), np.uint8), (0.1, 0.2), 0.3)
    with pytest.raises(ValueError, match="positive finite std"):
        normalize(np.zeros((1, 2, 2), np.uint8), 0.1, 0.0)
    with pytest.raises(TypeError, match="needs a NumPy or CuPy array"):
        normalize([[[0]]], 0.1, 0.3)


# ------------------------------------------------------------------------------------------------
# Downloads killed midway and checksum mismatches


DOWNLOAD_SCRIPT = """
import json, sys
from gpucnn.data import DATASETS, DatasetSpec, FileSpec, download_dataset
files = {key: FileSpec(name, md5) for key, (name, md5) in json.loads(sys.argv[3]).items()}
DATASETS["tiny"] = DatasetSpec(name="tiny", files=files, mirrors=(sys.argv[1],), mean=0.5, std=0.25,
                               classes=tuple("0123456789"))
download_dataset("tiny", "test", cache_dir=sys.argv[2], progress=False, timeout=60)
"""


def test_download_killed_midway_leaves_no_broken_file_and_the_part_is_cleaned_later(tiny_cache, server, tmp_path):
    for key, name in MNIST_FILES.items():
        server.routes[f"/stall/{name}"] = tiny_cache.files[key]
        server.routes[f"/good/{name}"] = tiny_cache.files[key]
    server.hang.add(f"/stall/{MNIST_FILES['test-images']}")
    spec_json = json.dumps({k: [f.filename, f.md5] for k, f in tiny_cache.spec.files.items()})
    process = subprocess.Popen([sys.executable, "-c", DOWNLOAD_SCRIPT, server.url + "/stall/",
                                str(tmp_path / "cache"), spec_json], cwd=ROOT, env=clean_env(tmp_path / "cache"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: any(p.stat().st_size > 0 for p in tiny_cache.cache.glob("*.part")), timeout=60), \
            "the download never started writing"
    finally:
        process.kill()  # SIGKILL: no cleanup code can run
        process.wait(30)
    assert process.returncode == -signal.SIGKILL
    parts = list(tiny_cache.cache.glob("*.part"))
    assert len(parts) == 1 and parts[0].name.startswith(MNIST_FILES["test-images"] + ".")
    assert not (tiny_cache.cache / MNIST_FILES["test-images"]).exists()  # nothing under the real name
    # The .part is never read: without a download the split is simply missing.
    with pytest.raises(DataError, match="no tiny test files"):
        load_dataset("tiny", "test", download=False)
    # A fresh .part may belong to a live download, so it is left alone; the download completes beside it.
    images, labels = load_dataset("tiny", "test", mirrors=[server.url + "/good/"], progress=False)
    assert images.shape == (200, 28, 28) and labels.shape == (200,)
    assert parts[0].exists()
    # Once stale, the next download into that folder deletes it.
    stale = time.time() - 2 * datasets.STALE_PART_S
    os.utime(parts[0], (stale, stale))
    download_dataset("tiny", "train", mirrors=[server.url + "/good/"], progress=False)
    assert not parts[0].exists()
    assert sorted(p.name for p in tiny_cache.cache.iterdir()) == sorted(MNIST_FILES.values())


def test_checksum_mismatch_names_the_file_and_what_to_do(tiny_cache, server):
    for key, name in MNIST_FILES.items():
        server.routes[f"/mirror/{name}"] = tiny_cache.files[key]
    server.routes[f"/mirror/{MNIST_FILES['test-labels']}"] = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(DataError) as info:
        load_dataset("tiny", "test", mirrors=[server.url + "/mirror/"], progress=False)
    message = str(info.value)
    assert f"checksum mismatch for {MNIST_FILES['test-labels']}: expected MD5 {tiny_cache.spec.files['test-labels'].md5}" \
        in message
    assert "put the files in a folder and pass it as data_dir (--data-dir)" in message
    assert not (tiny_cache.cache / MNIST_FILES["test-labels"]).exists()
    assert not list(tiny_cache.cache.glob("*.part"))
