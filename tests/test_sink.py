"""Memory bounds of the sinks: a window's bytes, the byte-bounded queue and history."""

from __future__ import annotations

import queue
from collections import deque
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnwatch.errors import ConfigError
from bnwatch.schema import WindowRecord
from bnwatch.sink import MEMORY_BYTES, QUEUE_BYTES, MemorySink, WindowQueue
from tests.store.helpers import record_windows, renamed


@dataclass(frozen=True)
class Sized:
    """Stands in for a window: all the queue reads of one is ``nbytes``."""

    nbytes: int
    index: int


def sized(nbytes: int, index: int = 0) -> WindowRecord:
    return Sized(nbytes, index)  # type: ignore[return-value]


def test_a_windows_bytes_are_its_own_arrays_and_not_the_shared_references() -> None:
    """Counted independently: every float64 moment (13 per channel), the reservoir's float32
    rows and each per-channel result array -- not ``ref_mean``/``ref_var`` (the monitor's
    running statistics, the same arrays in every window) nor the baseline's moments."""
    first, second = record_windows(2)
    expected = 0
    for report in first.reports.values():
        c = report.channels
        expected += 13 * 8 * c
        if report.stats.reservoir is not None:
            expected += report.stats.reservoir.rows.shape[0] * c * 4
        arrays = [
            name
            for name, value in vars(report).items()
            if isinstance(value, np.ndarray) and value.shape == (c,)
        ]
        assert {"mean", "d", "drift_d", "ref_mean", "ref_var"} <= set(arrays)
        expected += 8 * c * (len(arrays) - 2)
        assert report.ref_mean is second.reports[report.layer].ref_mean  # shared indeed
    assert first.nbytes == expected > 0


def test_the_queue_bounds_windows_and_says_which_bound_was_hit() -> None:
    q = WindowQueue(maxsize=3, max_bytes=1000)
    for i in range(3):
        q.put_nowait(sized(100, i))
    with pytest.raises(queue.Full, match="3 windows"):
        q.put_nowait(sized(1))
    assert q.nbytes == 300


def test_the_queue_bounds_bytes_but_always_takes_a_window_when_empty() -> None:
    q = WindowQueue(maxsize=100, max_bytes=1 << 20)
    q.put_nowait(sized(3 << 20, 0))  # larger than the bound, but the queue was empty
    with pytest.raises(queue.Full, match="1 MiB of windows"):
        q.put_nowait(sized(1, 1))
    assert q.get_nowait() == sized(3 << 20, 0) and q.nbytes == 0
    q.put_nowait(sized(600_000, 2))
    q.put_nowait(sized(400_000, 3))
    with pytest.raises(queue.Full):
        q.put_nowait(sized(100_000, 4))
    assert (q.qsize(), q.nbytes) == (2, 1_000_000)


def test_the_queue_never_blocks_and_checks_its_bounds() -> None:
    q = WindowQueue(maxsize=1, max_bytes=1)
    with pytest.raises(TypeError, match="put_nowait"):
        q.put(sized(1))
    q.put(sized(1), block=False)
    assert q.qsize() == 1
    with pytest.raises(ConfigError, match="max_bytes"):
        WindowQueue(maxsize=1, max_bytes=0)
    with pytest.raises(ConfigError, match="maxsize"):
        WindowQueue(maxsize=0, max_bytes=1)


@settings(max_examples=200, deadline=None)
@given(
    maxsize=st.integers(1, 6),
    max_bytes=st.integers(1, 500),
    ops=st.lists(st.one_of(st.integers(0, 300), st.none()), max_size=60),
)
def test_the_queue_is_a_fifo_within_both_bounds(
    maxsize: int, max_bytes: int, ops: list[int | None]
) -> None:
    """Against a plain model: a put (an int: the window's bytes) is taken exactly when both
    bounds allow it (or the queue is empty); a get (None) returns the oldest; the queued bytes
    are always the sum of what is queued."""
    q = WindowQueue(maxsize, max_bytes)
    model: deque[WindowRecord] = deque()
    for index, op in enumerate(ops):
        if op is None:
            if model:
                assert q.get_nowait() == model.popleft()
            else:
                with pytest.raises(queue.Empty):
                    q.get_nowait()
        else:
            fits = not model or (
                len(model) < maxsize and sum(w.nbytes for w in model) + op <= max_bytes
            )
            if fits:
                q.put_nowait(sized(op, index))
                model.append(sized(op, index))
            else:
                with pytest.raises(queue.Full):
                    q.put_nowait(sized(op, index))
        assert q.qsize() == len(model)
        assert q.nbytes == sum(w.nbytes for w in model)
        assert q.qsize() <= maxsize
        assert q.nbytes <= max_bytes or q.qsize() == 1


def test_the_memory_history_keeps_the_newest_windows_within_its_bytes() -> None:
    (record,) = record_windows(1)
    size = record.nbytes
    sink = MemorySink(max_windows=100, max_bytes=3 * size + size // 2)
    written = [renamed(record) for _ in range(10)]
    for window in written:
        sink.write(window)
    assert [w.uid for w in sink.windows] == [w.uid for w in written[-3:]]
    assert (sink.evicted, sink.dropped, sink.nbytes) == (7, 0, 3 * size)
    tiny = MemorySink(max_bytes=1)  # the newest window is always kept
    tiny.write(written[0])
    tiny.write(written[1])
    assert [w.uid for w in tiny.windows] == [written[1].uid] and tiny.evicted == 1


def test_the_defaults_hold_about_a_thousand_small_windows() -> None:
    """1,000 windows of the test CNN fit both defaults, so the window bound still decides for
    small models; a ResNet-50 window (5.5 MB) is bounded by bytes."""
    (record,) = record_windows(1)
    assert 1000 * record.nbytes < MEMORY_BYTES < QUEUE_BYTES
