"""The IDX file format (LeCun et al.), gzip-compressed or raw: MNIST and every dataset in it.

Layout: two zero bytes, a type code, the number of dimensions n, then n big-endian uint32 sizes,
then the values in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from pathlib import Path

import numpy as np

# IDX type code -> big-endian NumPy dtype.
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """A data file is missing, truncated, corrupt or not what it claims to be."""


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(f"{path}: the gzip stream is truncated or corrupt ({err}); delete the file and "
                        "download it again") from err


def read_idx(path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a NumPy array of its native type and shape.

    Raises:
        DataError: naming the file, when it is truncated, has a bad header or extra bytes.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_TYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header ({len(data)} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[type_code]
    expected = header + math.prod(shape) * dtype.itemsize  # (Python's integers: no int64 wrap-around)
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(f"{path}: {kind}: {len(data)} bytes, header {shape} needs {expected}")
    try:
        values = np.frombuffer(data, dtype, offset=header).reshape(shape)
    except ValueError as err:  # (a size of 0 beside sizes NumPy cannot address: no values, no array)
        raise DataError(f"{path}: header sizes {shape} make no array ({err})") from err
    return values.astype(dtype.newbyteorder("="))


def write_idx(path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip when ``compress`` or the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_TYPES.items()}
    code = codes.get(array.dtype)
    if code is None:
        raise ValueError(f"IDX has no type for dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(IDX_TYPES[code]).tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()
