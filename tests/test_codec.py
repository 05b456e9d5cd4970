"""The array codec: exact round trips, compact constants, clear errors on bad blobs."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnwatch.codec import (
    MAGIC,
    CodecError,
    decode_arrays,
    decode_moments,
    encode_arrays,
    encode_moments,
    raw_moment_bytes,
)
from bnwatch.stats import ChannelMoments


@settings(max_examples=200, deadline=None)
@given(
    arrays=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 5), st.integers(0, 40)),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=64),
    )
)
def test_round_trip_is_bitwise(arrays: np.ndarray) -> None:
    back = decode_arrays(encode_arrays(arrays))
    assert back.shape == arrays.shape
    np.testing.assert_array_equal(back.view(np.int64), arrays.view(np.int64))


def test_moments_round_trip_and_are_smaller_than_raw() -> None:
    x = np.random.default_rng(0).normal(size=(50, 300, 4))
    m = ChannelMoments.from_values(x)
    blob = encode_moments(m)
    back = decode_moments(blob)
    for a, b in zip(m.as_arrays(), back.as_arrays(), strict=True):
        np.testing.assert_array_equal(a, b)
    # count, n and nonfinite are constant across channels: one value each
    assert len(blob) < 0.8 * raw_moment_bytes(300)


def test_constant_detection_is_bitwise() -> None:
    """0.0 and -0.0 compare equal but are different bits: not a constant."""
    a = np.array([[0.0, -0.0, 0.0]])
    np.testing.assert_array_equal(decode_arrays(encode_arrays(a)).view(np.int64), a.view(np.int64))


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"XXXX<f8\0" + b"\0" * 8,
        encode_arrays(np.ones((2, 3)))[:-3],
        encode_arrays(np.ones((2, 3))) + b"x",
    ],
)
def test_bad_blobs_raise(blob: bytes) -> None:
    with pytest.raises(CodecError):
        decode_arrays(blob)


def test_moment_blob_needs_thirteen_fields() -> None:
    with pytest.raises(CodecError, match="moment blob"):
        decode_moments(encode_arrays(np.ones((3, 4))))


def test_a_header_claiming_more_arrays_than_the_bytes_hold_is_refused_before_allocating() -> None:
    """[13, 2**24] claimed by a 25-byte blob: refused from its length, not after allocating
    13 * 2**24 float64 (1.7 GB)."""
    blob = struct.pack("<4s4sII", MAGIC, b"<f8\0", 13, 1 << 24) + b"\x01" + b"\0" * 8
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="13 arrays"):
            decode_arrays(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
