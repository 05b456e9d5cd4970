"""Compact binary encoding of per-channel arrays (never JSON text).

A blob is a small header followed by the arrays, all little-endian::

    magic  b"BNA1"                      4 bytes
    dtype  b"<f8" (float64) or b"<f4" (float32), NUL-padded to 4 bytes
    rows   uint32   number of arrays (e.g. 13 moment fields)
    cols   uint32   length of every array (the channel count C)
    then, per array:
        flag  uint8  0 = C values follow, 1 = one value follows (the array is constant)

Constant arrays -- the per-channel sample and element counts, which are equal for every
channel unless non-finite values were excluded -- cost one value instead of C.  Values are
stored bit for bit: decoding gives back exactly the float64 numbers that were encoded.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bnwatch.errors import ShapeError
from bnwatch.stats import MOMENT_FIELDS, ChannelMoments

MAGIC = b"BNA1"
_HEADER = struct.Struct("<4s4sII")


class CodecError(ShapeError):
    """A stored blob is not a bnwatch array blob (or is truncated)."""


_DTYPES: dict[bytes, tuple[np.dtype[Any], type[np.signedinteger[Any]]]] = {
    b"<f8": (np.dtype("<f8"), np.int64),
    b"<f4": (np.dtype("<f4"), np.int32),
}


def encode_arrays(arrays: Sequence[NDArray[Any]] | NDArray[Any], dtype: str = "<f8") -> bytes:
    """Encode equal-length 1-D arrays (or a 2-D array, one row per array) as ``dtype``
    (``"<f8"``, exact for statistics, or ``"<f4"`` for samples such as reservoirs)."""
    code = dtype.encode()
    if code not in _DTYPES:
        raise ShapeError("array dtype", sorted(k.decode() for k in _DTYPES), dtype)
    np_dtype, bits = _DTYPES[code]
    stacked = np.asarray(arrays, dtype=np_dtype)
    if stacked.ndim != 2:
        raise ShapeError("arrays to encode", "[rows, C]", stacked.shape)
    rows, cols = stacked.shape
    parts = [_HEADER.pack(MAGIC, code.ljust(4, b"\0"), rows, cols)]
    # one vectorized test for every row: is it bitwise constant?
    as_bits = stacked.view(bits)
    constant = (as_bits == as_bits[:, :1]).all(axis=1) if cols else np.zeros(rows, bool)
    for row, flat in zip(stacked, constant.tolist(), strict=True):
        if flat:
            parts.append(b"\x01")
            parts.append(row[:1].tobytes())
        else:
            parts.append(b"\x00")
            parts.append(row.tobytes())
    return b"".join(parts)


def blob_shape(blob: bytes | memoryview) -> tuple[str, int, int]:
    """``(dtype, rows, cols)`` from a blob's header alone -- to check what a blob claims to hold
    before :func:`decode_arrays` allocates it."""
    data = bytes(blob[: _HEADER.size])
    if len(data) < _HEADER.size:
        raise CodecError("array blob", f">= {_HEADER.size} bytes", len(data))
    magic, dtype, rows, cols = _HEADER.unpack_from(data)
    code = dtype.rstrip(b"\0")
    if magic != MAGIC or code not in _DTYPES:
        raise CodecError("array blob header", (MAGIC, sorted(_DTYPES)), (magic, dtype))
    return code.decode(), int(rows), int(cols)


def decode_arrays(blob: bytes | memoryview) -> NDArray[Any]:
    """The ``[rows, C]`` array a blob of :func:`encode_arrays` holds, in its stored dtype.

    A blob too short for the arrays its header claims (every array takes at least a flag
    and, unless C is 0, one value) is refused before the array is allocated.  A header can
    still claim a huge C in few bytes (constant arrays cost one value): callers decoding
    untrusted blobs check :func:`blob_shape` against what they expect first.
    """
    code, rows, cols = blob_shape(blob)
    data = bytes(blob)
    np_dtype = _DTYPES[code.encode()][0]
    width = np_dtype.itemsize
    if len(data) < _HEADER.size + rows * (1 + (width if cols else 0)):
        raise CodecError("array blob", f"{rows} arrays of {cols}", f"{len(data)} bytes")
    out = np.empty((rows, cols), dtype=np_dtype)
    pos = _HEADER.size
    for r in range(rows):
        if pos >= len(data):
            raise CodecError("array blob", f"{rows} arrays", r)
        flag = data[pos]
        pos += 1
        n = 1 if flag == 1 else cols
        end = pos + width * n
        if end > len(data) or flag not in (0, 1):
            raise CodecError("array blob", f"{rows} arrays of {cols}", f"truncated at array {r}")
        values = np.frombuffer(data, dtype=np_dtype, count=n, offset=pos)
        out[r] = values[0] if flag == 1 else values
        pos = end
    if pos != len(data):
        raise CodecError("array blob", f"{pos} bytes", len(data))
    return out


def encode_moments(moments: ChannelMoments) -> bytes:
    """A window's sufficient statistics, fields in :data:`~bnwatch.stats.MOMENT_FIELDS` order."""
    return encode_arrays(np.stack(moments.as_arrays()))


def decode_moments(blob: bytes | memoryview) -> ChannelMoments:
    arrays = decode_arrays(blob)
    if arrays.shape[0] != len(MOMENT_FIELDS):
        raise CodecError("moment blob", len(MOMENT_FIELDS), arrays.shape[0])
    return ChannelMoments.from_arrays(list(arrays))


def raw_moment_bytes(channels: int) -> int:
    """Bytes of the sufficient statistics as plain float64 arrays: the storage yardstick."""
    return len(MOMENT_FIELDS) * 8 * channels
