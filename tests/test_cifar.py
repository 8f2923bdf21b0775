"""CIFAR-10 from binary batch files: reading, the search order, and a verified download from 127.0.0.1."""
import hashlib
import io
import tarfile

import numpy as np
import pytest

from gpucnn.data import DataError, cifar, datasets, load_cifar10
from tests.colour_data import write_cifar_dir


@pytest.fixture(autouse=True)
def isolated_places(tmp_path, monkeypatch):
    """No test sees the user's cache, GPUCNN_DATA_DIR or /usr/share/datasets."""
    monkeypatch.setenv(datasets.CACHE_DIR_ENV, str(tmp_path / "user-cache"))
    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_DATA_ROOT", tmp_path / "system")


def test_a_batch_file_reads_back_label_then_red_green_blue_planes(tmp_path):
    record = np.zeros(cifar.RECORD_BYTES, np.uint8)
    record[0] = 7
    record[1:1025] = 10       # red plane
    record[1025:2049] = 20    # green plane
    record[2049:] = 30        # blue plane
    record[1 + 32 * 2 + 5] = 99  # red, row 2, column 5
    record.tofile(tmp_path / "one.bin")
    images, labels = cifar.read_batch(tmp_path / "one.bin")
    assert images.shape == (1, 3, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == [7] and labels.dtype == np.int64
    assert images[0, :, 0, 0].tolist() == [10, 20, 30] and images[0, 0, 2, 5] == 99


def test_write_and_read_round_trip(tmp_path):
    written = write_cifar_dir(tmp_path, train_per_batch=3, test=4)
    images, labels = cifar.read_batch(tmp_path / "data_batch_2.bin")
    np.testing.assert_array_equal(images, written["data_batch_2.bin"][0])
    np.testing.assert_array_equal(labels, written["data_batch_2.bin"][1])


@pytest.mark.parametrize("size, fragment", [(cifar.RECORD_BYTES * 2 - 100, "not a whole number of 3,073-byte"),
                                            (0, "its 0 bytes")], ids=["truncated", "empty"])
def test_truncated_or_wrong_size_files_name_the_file(tmp_path, size, fragment):
    write_cifar_dir(tmp_path, train_per_batch=2)
    bad = tmp_path / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:size] if size else b"")
    with pytest.raises(DataError, match=fragment) as info:
        load_cifar10("train", data_dir=tmp_path, download=False)
    assert str(bad) in str(info.value)


def test_labels_above_nine_are_refused(tmp_path):
    write_cifar_dir(tmp_path, train_per_batch=2)
    data = bytearray((tmp_path / "test_batch.bin").read_bytes())
    data[cifar.RECORD_BYTES] = 57   # the second record's label byte (CIFAR-100 has 100 classes)
    (tmp_path / "test_batch.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="record 1 has label 57"):
        load_cifar10("test", data_dir=tmp_path, download=False)


def test_smaller_batches_in_the_official_layout_load_in_order(tmp_path):
    written = write_cifar_dir(tmp_path / "cifar-10-batches-bin", train_per_batch=5, test=7)
    images, labels = load_cifar10("train", data_dir=tmp_path, download=False)
    assert images.shape == (25, 3, 32, 32) and labels.shape == (25,)
    expected = np.concatenate([written[name][0] for name in cifar.SPLIT_FILES["train"]])
    np.testing.assert_array_equal(images, expected)
    test_images, _ = load_cifar10("test", data_dir=tmp_path, download=False)
    assert len(test_images) == 7


@pytest.mark.parametrize("layout", ["cifar10/cifar-10-batches-bin", "cifar10", "cifar-10-batches-bin", "."])
def test_every_folder_layout_is_found(tmp_path, layout):
    write_cifar_dir(tmp_path / layout, train_per_batch=1, test=2)
    expected = tmp_path if layout == "." else tmp_path / layout
    assert cifar.find_cifar10_dir(tmp_path, "test") == expected
    assert len(load_cifar10("test", data_dir=tmp_path, download=False)[1]) == 2


def test_data_dir_beats_the_environment_which_beats_the_cache(tmp_path, monkeypatch):
    for place, n in (("given", 1), ("env", 2), ("user-cache/cifar10/cifar-10-batches-bin", 3)):
        write_cifar_dir(tmp_path / place, train_per_batch=1, test=n)
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "env"))
    assert len(load_cifar10("test", data_dir=tmp_path / "given", download=False)[1]) == 1
    assert len(load_cifar10("test", download=False)[1]) == 2
    monkeypatch.delenv(datasets.DATA_DIR_ENV)
    assert len(load_cifar10("test", download=False)[1]) == 3


def test_missing_files_without_download_say_where_it_looked(tmp_path):
    write_cifar_dir(tmp_path, train_per_batch=1)
    (tmp_path / "data_batch_4.bin").unlink()
    assert len(load_cifar10("test", data_dir=tmp_path, download=False)[1]) == 10   # the test split is whole
    with pytest.raises(DataError, match=r"no CIFAR-10 train files \(data_batch_1.bin") as info:
        load_cifar10("train", data_dir=tmp_path, download=False)
    assert str(tmp_path) in str(info.value) and "--data-dir" in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10("test", data_dir=tmp_path / "absent", download=False)


def test_class_names_come_from_batches_meta(tmp_path):
    write_cifar_dir(tmp_path, train_per_batch=1)
    assert cifar.cifar10_classes(tmp_path) == cifar.CLASSES
    (tmp_path / cifar.META_FILE).write_text("\n".join(f"thing{i}" for i in range(10)) + "\n")
    assert cifar.cifar10_classes(tmp_path)[3] == "thing3"
    (tmp_path / cifar.META_FILE).write_text("a\nb\n")
    with pytest.raises(DataError, match="names 2 classes"):
        cifar.cifar10_classes(tmp_path)


# ---- download -----------------------------------------------------------------------------------

def make_archive(tmp_path, extra_member=None, drop=None) -> bytes:
    """cifar-10-binary.tar.gz bytes holding small batches in the official layout."""
    source = tmp_path / "archive-source" / cifar.BATCHES_DIR
    write_cifar_dir(source, train_per_batch=4, test=6)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(source.iterdir()):
            if path.name != drop:
                tar.add(path, arcname=f"{cifar.BATCHES_DIR}/{path.name}")
        if extra_member is not None:
            info = tarfile.TarInfo(extra_member)
            payload = b"should never be written"
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def serve_archive(server, monkeypatch, archive: bytes, md5=None):
    server.routes[f"/kriz/{cifar.ARCHIVE.filename}"] = archive
    monkeypatch.setattr(cifar, "ARCHIVE", datasets.FileSpec(cifar.ARCHIVE.filename,
                                                            md5 or hashlib.md5(archive).hexdigest()))
    monkeypatch.setattr(cifar, "MIRRORS", (f"{server.url}/kriz/",))


def test_download_checks_the_md5_unpacks_and_removes_the_archive(tmp_path, server, monkeypatch):
    serve_archive(server, monkeypatch, make_archive(tmp_path, extra_member="../escape.txt"))
    progress = io.StringIO()
    images, labels = load_cifar10("train", progress=progress)
    assert images.shape == (20, 3, 32, 32) and len(labels) == 20
    folder = tmp_path / "user-cache" / "cifar10"
    assert sorted(p.name for p in folder.iterdir()) == [cifar.BATCHES_DIR]     # archive gone, no .part
    assert len(list((folder / cifar.BATCHES_DIR).iterdir())) == 7
    assert not (tmp_path / "user-cache" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert cifar.ARCHIVE.filename in progress.getvalue()
    # the second load reads the cache: no second request
    assert len(load_cifar10("test")[1]) == 6
    assert server.requests == [f"/kriz/{cifar.ARCHIVE.filename}"]


def test_wrong_md5_leaves_nothing_behind(tmp_path, server, monkeypatch):
    serve_archive(server, monkeypatch, make_archive(tmp_path), md5="0" * 32)
    with pytest.raises(DataError, match="checksum mismatch for cifar-10-binary.tar.gz"):
        load_cifar10("train", progress=False)
    assert list((tmp_path / "user-cache" / "cifar10").iterdir()) == []


def test_dropped_connection_leaves_nothing_behind(tmp_path, server, monkeypatch):
    archive = make_archive(tmp_path)
    serve_archive(server, monkeypatch, archive)
    server.drop.add(f"/kriz/{cifar.ARCHIVE.filename}")
    with pytest.raises(DataError, match="every mirror failed"):
        load_cifar10("test", progress=False)
    assert list((tmp_path / "user-cache" / "cifar10").iterdir()) == []


def test_an_archive_missing_a_batch_is_refused(tmp_path, server, monkeypatch):
    serve_archive(server, monkeypatch, make_archive(tmp_path, drop="data_batch_5.bin"))
    with pytest.raises(DataError, match="lacks cifar-10-batches-bin/data_batch_5.bin"):
        load_cifar10("train", progress=False)
    assert not (tmp_path / "user-cache" / "cifar10" / cifar.BATCHES_DIR).exists()


def test_download_arguments_are_checked():
    with pytest.raises(ValueError, match="mirrors must be"):
        cifar.download_cifar10(mirrors=[])
    with pytest.raises(ValueError, match="timeout"):
        cifar.download_cifar10(timeout=0)
