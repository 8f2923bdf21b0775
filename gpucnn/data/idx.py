"""IDX files (the MNIST file format): read and write, gzip-compressed or raw.

Layout: two zero bytes, one dtype code byte, one byte with the number of
dimensions, then one big-endian uint32 per dimension, then the values in
C order, big-endian. Compression is recognised by the gzip magic bytes
(1f 8b), never by the file name.
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from gpucnn import backend
from gpucnn.files import require_regular_file, write_atomically

GZIP_MAGIC = b"\x1f\x8b"
MAX_NDIM = 4

# IDX dtype code -> big-endian NumPy dtype of the stored values.
IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """A data file or data source is missing, malformed or failed to download."""


def _code_for(dtype: np.dtype) -> int:
    """The IDX dtype code for a NumPy dtype of either byte order."""
    big_endian = dtype.newbyteorder(">") if dtype.itemsize > 1 else dtype
    for code, idx_dtype in IDX_DTYPES.items():
        if idx_dtype == big_endian:
            return code
    supported = ", ".join(str(d.newbyteorder("=")) for d in IDX_DTYPES.values())
    raise TypeError(f"write_idx cannot store dtype {dtype}; IDX holds only {supported}.")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it starts with the gzip magic."""
    if path.is_dir():
        raise DataError(f"IDX path {path} is a directory, not a file.")
    require_regular_file(path, "IDX file", DataError)  # a FIFO or /dev/zero would never end
    raw = path.read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"IDX file {path} is a corrupt or truncated gzip stream ({exc}); "
                        "delete it and download or copy it again.") from None


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a native-endian NumPy array.

    Returns an array of shape (D0, ..., Dk) as stated in the header
    (e.g. (N, 28, 28) uint8 for MNIST images, (N,) uint8 for labels).
    Raises DataError naming the file for a bad magic, dtype code, dimension
    count, corrupt gzip stream, or a payload that is shorter or longer than the
    header promises.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) == 0:
        raise DataError(f"IDX file {path} is empty; delete it and download or copy it again.")
    if len(data) < 4:
        raise DataError(f"IDX file {path} is too short for an IDX header ({len(data)} bytes, need 4); "
                        "delete it and download or copy it again.")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"IDX file {path} has a wrong magic number (first bytes {data[:4].hex()}, "
                        "expected 0000 then a dtype code and a dimension count); it is not an IDX file.")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"IDX file {path} has an unknown dtype code 0x{code:02X} (known: {known}).")
    if not 1 <= ndim <= MAX_NDIM:
        raise DataError(f"IDX file {path} declares {ndim} dimensions; gpucnn reads 1 to {MAX_NDIM}.")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"IDX file {path} is truncated inside its header: expected {header_len} header "
                        f"bytes, found {len(data)}.")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    # NumPy refuses shapes whose nonzero sizes multiply past its index range, even with a zero size.
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize > np.iinfo(np.intp).max:
        raise DataError(f"IDX file {path} declares shape {shape}, too large for any array; it is not a valid "
                        "IDX file.")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a forged header cannot overflow this
    found = len(data) - header_len
    if found < expected:
        raise DataError(f"IDX file {path} is truncated: expected {expected} bytes of data, found {found}; "
                        "delete it and download or copy it again.")
    if found > expected:
        raise DataError(f"IDX file {path} has {found - expected} extra bytes after the data: expected "
                        f"{expected} bytes of data, found {found}; it is not a valid IDX file.")
    values = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # a native-endian, writable copy


def write_idx(path, array, compress: bool | None = None) -> Path:
    """Write ``array`` (1 to 4 dimensions, a dtype IDX can hold) as an IDX file.

    ``compress=None`` gzips when the name ends in ``.gz``. The file is written
    to a temporary file in the same directory and moved into place with
    ``os.replace``, so a reader never sees a half-written file. Returns the path.
    """
    path = Path(path)
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise TypeError(f"write_idx needs a NumPy or CuPy array, not {type(array).__name__}.")
    values = backend.to_numpy(array)
    if not 1 <= values.ndim <= MAX_NDIM:
        raise ValueError(f"write_idx writes arrays of 1 to {MAX_NDIM} dimensions, not {values.ndim}.")
    if any(d >= 2**32 for d in values.shape):
        raise ValueError(f"write_idx cannot store shape {values.shape}: IDX dimensions are 32-bit.")
    code = _code_for(values.dtype)
    if not path.parent.is_dir():
        raise ValueError(f"write_idx cannot write {path}: the folder {path.parent} does not exist.")
    if compress is None:
        compress = path.suffix == ".gz"
    header = bytes([0, 0, code, values.ndim]) + np.asarray(values.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(values, dtype=IDX_DTYPES[code]).tobytes()
    if compress:
        payload = gzip.compress(payload, mtime=0)  # mtime=0: identical arrays give identical files

    return write_atomically(path, lambda f: f.write(payload), durable=False)
