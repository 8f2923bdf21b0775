"""IDX reader/writer: round trips, the exact byte layout, every malformed-file error, the real MNIST files."""
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from gpucnn.data import DATASETS, DataError, read_idx, write_idx
from gpucnn.data import load_dataset
from tests.helpers import MNIST_FILES, fill_cache
from tests.synthetic_data import write_random_split

MNIST_DIR = Path("/work/shared/datasets/mnist")
DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
SHAPES = [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2)]


def random_array(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return (rng.standard_normal(shape) * 1e3).astype(dtype)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip(tmp_path, dtype, shape, compress):
    array = random_array(dtype, shape)
    path = write_idx(tmp_path / "a.idx", array, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable
    assert [p.name for p in tmp_path.iterdir()] == ["a.idx"]  # no temporary file left behind


def test_compression_follows_the_name_and_reading_follows_the_magic(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz = write_idx(tmp_path / "x-idx2-ubyte.gz", array)
    raw = write_idx(tmp_path / "x-idx2-ubyte", array)
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    assert raw.read_bytes()[:2] == b"\x00\x00"
    # gzip bytes under a plain name and raw bytes under a .gz name are both read correctly
    (tmp_path / "plain-name").write_bytes(gz.read_bytes())
    (tmp_path / "fake.gz").write_bytes(raw.read_bytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-name"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "fake.gz"), array)


def test_byte_layout_is_big_endian_idx(tmp_path):
    path = write_idx(tmp_path / "s.idx", np.array([[1, -2], [258, 3]], dtype=np.int16))
    expected = bytes([0, 0, 0x0B, 2, 0, 0, 0, 2, 0, 0, 0, 2,
                      0x00, 0x01, 0xFF, 0xFE, 0x01, 0x02, 0x00, 0x03])
    assert path.read_bytes() == expected
    # a hand-built float file reads back as native float32
    handmade = bytes([0, 0, 0x0D, 1, 0, 0, 0, 2]) + np.array([1.5, -2.0], dtype=">f4").tobytes()
    (tmp_path / "f.idx").write_bytes(handmade)
    back = read_idx(tmp_path / "f.idx")
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, [1.5, -2.0])


def test_write_replaces_an_existing_file(tmp_path):
    path = tmp_path / "a.idx.gz"
    write_idx(path, np.zeros(5, np.uint8))
    write_idx(path, np.ones((2, 2), np.int32))
    np.testing.assert_array_equal(read_idx(path), np.ones((2, 2), np.int32))
    assert [p.name for p in tmp_path.iterdir()] == ["a.idx.gz"]


def test_gzip_output_is_reproducible(tmp_path):
    array = np.arange(100, dtype=np.uint8)
    a = write_idx(tmp_path / "a.gz", array).read_bytes()
    b = write_idx(tmp_path / "b.gz", array).read_bytes()
    assert a == b


def uint8_idx_bytes(shape, payload_len=None):
    n = int(np.prod(shape))
    payload_len = n if payload_len is None else payload_len
    header = bytes([0, 0, 0x08, len(shape)]) + np.asarray(shape, dtype=">u4").tobytes()
    return header + bytes(range(256)) * (payload_len // 256) + bytes(payload_len % 256)


@pytest.mark.parametrize("compressed", [False, True])
def test_truncated_payload(tmp_path, compressed):
    data = uint8_idx_bytes((10, 28, 28), payload_len=7000)
    path = tmp_path / "t.idx"
    path.write_bytes(gzip.compress(data) if compressed else data)
    with pytest.raises(DataError, match=r"t\.idx is truncated: expected 7840 bytes of data, found 7000"):
        read_idx(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "h.idx"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0, 10, 0, 0]))
    with pytest.raises(DataError, match=r"h\.idx is truncated inside its header: expected 16"):
        read_idx(path)


def test_extra_bytes(tmp_path):
    path = tmp_path / "e.idx"
    path.write_bytes(uint8_idx_bytes((4, 5), payload_len=23))
    with pytest.raises(DataError, match=r"e\.idx has 3 extra bytes .* expected 20 bytes of data, found 23"):
        read_idx(path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "m.idx"
    path.write_bytes(b"\x01\x00\x08\x01" + bytes(4) + b"")
    with pytest.raises(DataError, match=r"m\.idx has a wrong magic number \(first bytes 01000801"):
        read_idx(path)


def test_text_file_is_not_idx(tmp_path):
    path = tmp_path / "page.html"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DataError, match="wrong magic number"):
        read_idx(path)


def test_bad_dtype_code(tmp_path):
    path = tmp_path / "d.idx"
    path.write_bytes(bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 0]))
    with pytest.raises(DataError, match=r"d\.idx has an unknown dtype code 0x0A"):
        read_idx(path)


@pytest.mark.parametrize("ndim", [0, 5])
def test_bad_dimension_count(tmp_path, ndim):
    path = tmp_path / "n.idx"
    path.write_bytes(bytes([0, 0, 0x08, ndim]) + bytes(4 * ndim) + b"")
    with pytest.raises(DataError, match=rf"n\.idx declares {ndim} dimensions"):
        read_idx(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.idx"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.idx is empty"):
        read_idx(path)


def test_header_shorter_than_magic(tmp_path):
    path = tmp_path / "short.idx"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match=r"short\.idx is too short for an IDX header"):
        read_idx(path)


def test_corrupt_gzip_stream(tmp_path):
    rng = np.random.default_rng(1)
    source = write_idx(tmp_path / "src.gz", rng.integers(0, 8, size=(50, 28, 28), dtype=np.uint8))
    data = bytearray(source.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"corrupt\.gz is a corrupt or truncated gzip stream"):
        read_idx(corrupt)


def test_cut_gzip_stream(tmp_path):
    source = write_idx(tmp_path / "src.gz", np.arange(5000, dtype=np.int32))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(source.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"cut\.gz is a corrupt or truncated gzip stream"):
        read_idx(cut)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.idx does not exist"):
        read_idx(tmp_path / "nothere.idx")
    with pytest.raises(DataError, match="is a directory"):
        read_idx(tmp_path)


@pytest.mark.parametrize("dtype", [np.bool_, np.int64, np.uint16, np.complex64])
def test_write_refuses_dtypes_idx_cannot_hold(tmp_path, dtype):
    with pytest.raises(TypeError, match="write_idx cannot store dtype"):
        write_idx(tmp_path / "x.idx", np.zeros(3, dtype=dtype))


def test_write_validates_its_inputs(tmp_path):
    with pytest.raises(ValueError, match="1 to 4 dimensions, not 0"):
        write_idx(tmp_path / "x.idx", np.array(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="1 to 4 dimensions, not 5"):
        write_idx(tmp_path / "x.idx", np.zeros((1, 1, 1, 1, 1), dtype=np.uint8))
    with pytest.raises(TypeError, match="needs a NumPy or CuPy array"):
        write_idx(tmp_path / "x.idx", [1, 2, 3])
    with pytest.raises(ValueError, match="does not exist"):
        write_idx(tmp_path / "no" / "x.idx", np.zeros(3, dtype=np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_big_endian_input_is_written_correctly(tmp_path):
    array = np.array([1, 256, -3], dtype=">i4")
    back = read_idx(write_idx(tmp_path / "b.idx", array))
    np.testing.assert_array_equal(back, [1, 256, -3])


needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                 reason=f"the MNIST files are not in {MNIST_DIR}")


@needs_mnist
def test_real_mnist_test_files():
    images = read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert np.bincount(labels, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert images.max() == 255 and images.min() == 0


@needs_mnist
def test_real_mnist_train_labels():
    labels = read_idx(MNIST_DIR / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (60000,)
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]


@needs_mnist
def test_published_mnist_checksums_match_the_real_files():
    files = {spec.filename: spec.md5 for spec in DATASETS["mnist"].files.values()}
    present = [p for p in sorted(MNIST_DIR.glob("*.gz")) if p.name in files]
    assert len(present) >= 2
    for path in present:
        assert hashlib.md5(path.read_bytes()).hexdigest() == files[path.name], path.name


# ------------------------------------------------------------------------------------------------
# Damaged, missing and forged data files


def test_missing_files_say_where_gpucnn_looked(tiny_cache, tmp_path):
    with pytest.raises(DataError, match=r"no tiny test files \(t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, "
                                        r"or without .gz\) found in .*cache/tiny.*allow downloading"):
        load_dataset("tiny", "test", download=False)
    with pytest.raises(DataError, match=r"IDX file .*absent.idx does not exist"):
        read_idx(tmp_path / "absent.idx")
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist or is not a folder"):
        load_dataset("tiny", "test", data_dir=tmp_path / "nowhere", download=False)


def test_truncated_gzip_in_the_cache_says_delete_and_download_again(tiny_cache):
    fill_cache(tiny_cache)
    images = tiny_cache.cache / MNIST_FILES["test-images"]
    os.truncate(images, images.stat().st_size // 2)  # a real file cut short, as by a full disk or a bad copy
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz is a corrupt or truncated gzip stream .*gpucnn's "
                                        r"cached download: delete .*t10k-images-idx3-ubyte.gz and .*t10k-labels"
                                        r"-idx1-ubyte.gz and run again to download them afresh"):
        load_dataset("tiny", "test", download=False)


def test_corrupt_gzip_in_the_cache_is_detected(tiny_cache):
    fill_cache(tiny_cache)
    labels = tiny_cache.cache / MNIST_FILES["test-labels"]
    raw = bytearray(labels.read_bytes())
    raw[-6] ^= 0xFF  # inside the CRC-32 trailer: the stream decompresses but does not check out
    labels.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"corrupt or truncated gzip stream.*run again to download them afresh"):
        load_dataset("tiny", "test", download=False)


def test_wrong_idx_magic_in_the_cache_is_detected(tiny_cache):
    fill_cache(tiny_cache)
    images = tiny_cache.cache / MNIST_FILES["test-images"]
    images.write_bytes(gzip.compress(b"<html>404 Not Found</html>"))  # what a captive portal serves
    with pytest.raises(DataError, match=r"has a wrong magic number \(first bytes 3c68746d.*it is not an IDX file.*"
                                        r"delete .* and run again"):
        load_dataset("tiny", "test", download=False)


def test_image_and_label_counts_that_differ(tiny_cache, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    write_random_split(folder, "test", seed=3, n=5)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match=r"holds 5 images but .*t10k-labels-idx1-ubyte holds 4 labels; the two files "
                                        r"come from different data sets or splits"):
        load_dataset("tiny", "test", data_dir=folder, download=False)


def test_forged_idx_headers_are_refused_not_crashing(tmp_path):
    path = tmp_path / "forged.idx"
    # 65536**4 bytes wrapped to 0 in int64, and the empty payload then crashed reshape.
    path.write_bytes(bytes([0, 0, 0x08, 4]) + np.full(4, 65536, ">u4").tobytes())
    with pytest.raises(DataError, match=r"declares shape \(65536, 65536, 65536, 65536\), too large for any array"):
        read_idx(path)
    # Found by tests/test_properties.py: a zero size does not make (0, 141977, 4294846392, 7563) allocatable.
    path.write_bytes(bytes([0, 0, 0x0B, 4]) + np.array([0, 141977, 4294846392, 7563], ">u4").tobytes())
    with pytest.raises(DataError, match="too large for any array"):
        read_idx(path)
    # A plausible shape with too few bytes is called truncated, with both counts.
    path.write_bytes(bytes([0, 0, 0x08, 3]) + np.array([60000, 28, 28], ">u4").tobytes() + bytes(1000))
    with pytest.raises(DataError, match="is truncated: expected 47040000 bytes of data, found 1000"):
        read_idx(path)
