"""Property-based tests (hypothesis): emulated CUDA kernels against the NumPy reference over random valid
shapes, and the IDX reader against arbitrary bytes (it returns an array or raises DataError, nothing else).

Example counts are kept small so the file runs in well under a minute on two cores; failures that
hypothesis finds are replayed first on the next run from its example database.
"""
from __future__ import annotations

import gzip
import itertools

import numpy as np
import pytest
pytest.importorskip("hypothesis")  # absent on a bare GPU machine: skip, not a collection error
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from gpucnn.data import DataError, read_idx, write_idx
from gpucnn.data.idx import IDX_DTYPES
from gpucnn.emulator import EmulatorRuntime
from tests.kernel_cases import ConvCase, PoolCase, check_avg_pool, check_conv, check_max_pool

KERNEL_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IDX_SETTINGS = settings(max_examples=150, deadline=None)

_runtime = None


def emulator() -> EmulatorRuntime:
    """One emulator for the module (kernels compile once), running threads in a random order."""
    global _runtime
    if _runtime is None:
        _runtime = EmulatorRuntime(order="random", seed=11)
    return _runtime


# ---------------------------------------------------------------------------------------
# emulated kernels == NumPy reference


@st.composite
def conv_cases(draw):
    """A valid convolution: the (dilated) kernel fits the padded input, padding below the kernel size."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    h = draw(st.integers(max(1, span_h - 2 * ph), 12))
    w = draw(st.integers(max(1, span_w - 2 * pw), 12))
    return ConvCase("hypothesis", n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), h=h, w=w,
                    oc=draw(st.integers(1, 9)), kernel=(kh, kw),
                    stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))), padding=(ph, pw),
                    dilation=(dh, dw), relu=draw(st.booleans()), bias=draw(st.booleans()))


@st.composite
def pool_cases(draw):
    """A valid pooling: padding at most half the kernel, the kernel fits the padded input."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), 11))
    w = draw(st.integers(max(1, kw - 2 * pw), 11))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    return PoolCase("hypothesis", n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), h=h, w=w, kernel=(kh, kw),
                    stride=stride, padding=(ph, pw))


@pytest.mark.emulator
@KERNEL_SETTINGS
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_conv2d_kernels_match_the_reference(case, seed):
    check_conv(case, runtime=emulator(), seed=seed)


@pytest.mark.emulator
@KERNEL_SETTINGS
@given(case=pool_cases(), seed=st.integers(0, 2**16))
def test_max_pool2d_kernels_match_the_reference(case, seed):
    check_max_pool(case, runtime=emulator(), seed=seed)  # tie-free input: argmax compared exactly


@pytest.mark.emulator
@KERNEL_SETTINGS
@given(case=pool_cases(), seed=st.integers(0, 2**16))
def test_avg_pool2d_kernels_match_the_reference(case, seed):
    check_avg_pool(case, runtime=emulator(), seed=seed)


# ---------------------------------------------------------------------------------------
# the IDX reader never fails with anything but DataError


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A fresh file path per call (module-scoped: hypothesis runs many examples per test call)."""
    folder = tmp_path_factory.mktemp("idx-properties")
    counter = itertools.count()
    return lambda suffix="": folder / f"case{next(counter)}{suffix}"


def read_or_data_error(path, data: bytes):
    """read_idx's result for a file holding ``data``: an array, or None after a DataError."""
    path.write_bytes(data)
    try:
        return read_idx(path)
    except DataError as exc:
        assert str(path) in str(exc)  # every message names the file
        return None


@st.composite
def idx_like_bytes(draw):
    """Bytes that get past the first checks often: a plausible header, then a payload of any length."""
    code = draw(st.sampled_from(sorted(IDX_DTYPES) + [0x00, 0x0A, 0xFF]))
    ndim = draw(st.integers(0, 6))
    dims = draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 6), min_size=ndim, max_size=ndim))
    header = bytes([0, 0, code, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
    header = header[: draw(st.integers(0, len(header)))]  # possibly cut inside the header
    return header + draw(st.binary(max_size=300))


@IDX_SETTINGS
@given(data=st.binary(max_size=200))
def test_read_idx_on_arbitrary_bytes_returns_or_raises_data_error(scratch, data):
    read_or_data_error(scratch(), data)


@IDX_SETTINGS
@given(data=idx_like_bytes(), compress=st.booleans())
# once crashed reshape: a zero size beside sizes whose product passes NumPy's index range
@example(data=b"\x00\x00\x0b\x04\x00\x00\x00\x00\x00\x02*\x99\xff\xfe'\xb8\x00\x00\x1d\x8b", compress=False)
def test_read_idx_on_idx_like_bytes_returns_or_raises_data_error(scratch, data, compress):
    values = read_or_data_error(scratch(), gzip.compress(data, mtime=0) if compress else data)
    if values is not None:  # accepted: the header's shape and dtype, every byte used
        assert values.ndim == data[3] and values.dtype == IDX_DTYPES[data[2]].newbyteorder("=")
        assert values.nbytes == len(data) - 4 - 4 * data[3]


@IDX_SETTINGS
@given(data=idx_like_bytes(), cut=st.integers(0, 64), flip=st.integers(0, 2**16))
def test_read_idx_on_damaged_gzip_returns_or_raises_data_error(scratch, data, cut, flip):
    stream = bytearray(gzip.compress(data, mtime=0))
    stream[flip % len(stream)] ^= 0x5A           # one damaged byte anywhere, header and trailer included
    read_or_data_error(scratch(".gz"), bytes(stream[: max(2, len(stream) - cut)]))


@st.composite
def idx_arrays(draw):
    dtype = draw(st.sampled_from([np.dtype(d).newbyteorder("=") for d in IDX_DTYPES.values()]))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=4)))
    raw = draw(st.binary(min_size=dtype.itemsize * int(np.prod(shape)), max_size=dtype.itemsize * int(np.prod(shape))))
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


@IDX_SETTINGS
@given(array=idx_arrays(), compress=st.booleans())
def test_write_then_read_is_the_identity_and_any_cut_is_refused(scratch, array, compress):
    path = write_idx(scratch(".gz" if compress else ""), array)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()  # bytes, so NaN payloads compare too
    data = path.read_bytes()
    assume(len(data) > 1)
    assert read_or_data_error(scratch(), data[:-1]) is None
