"""Where closed windows go: the :class:`Sink` protocol and the in-memory sink.

``bnwatch.capture`` hands every closed window to a sink and knows nothing else about
storage; ``bnwatch.watch`` picks the sink from ``store=``.  A sink's :meth:`Sink.write` is
called from the monitor's window thread (never from inside a forward pass) and must not
block for long: sinks that do I/O queue the window and write it in the background.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Protocol, runtime_checkable

from bnwatch.errors import check_positive_int
from bnwatch.schema import WindowRecord


@runtime_checkable
class Sink(Protocol):
    """Receives closed windows."""

    def write(self, window: WindowRecord) -> None:
        """Accept one closed window (quickly; queue it if writing takes time)."""

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued (waiting at most ``timeout`` seconds) and release resources."""

    @property
    def dropped(self) -> int:
        """Windows that could not be delivered and were dropped (counted, never silently)."""


_USERS: dict[int, tuple[Sink, int]] = {}
"""id(sink) -> (the sink, the monitors and exporters writing to it): see :func:`acquire`."""
_USERS_LOCK = threading.Lock()


def acquire(sink: Sink) -> None:
    """Count one more writer of ``sink`` (a monitor, or an exporter in front of it): one sink
    may serve several monitors -- one database writer for every model of a process -- and
    :func:`release` closes it only with the last of them."""
    with _USERS_LOCK:
        _, users = _USERS.get(id(sink), (sink, 0))
        _USERS[id(sink)] = (sink, users + 1)


def release(sink: Sink, timeout: float | None = None) -> None:
    """One writer of ``sink`` is done: close the sink (draining it, at most ``timeout``
    seconds) if no other writer acquired it and still uses it; a sink never acquired is
    closed."""
    with _USERS_LOCK:
        _, users = _USERS.pop(id(sink), (sink, 1))
        if users > 1:
            _USERS[id(sink)] = (sink, users - 1)
            return
    sink.close(timeout)


MEMORY_BYTES = 64 << 20
"""Default bound of :class:`MemorySink`'s history: 64 MiB of windows (:attr:`WindowRecord.nbytes`)
-- 1,000 windows of a small model, about 11 of a ResNet-50 (5.5 MB each)."""

QUEUE_BYTES = 256 << 20
"""Default bound of the windows a background sink holds while its destination is slow or away
(:class:`WindowQueue`): 256 MiB -- 1,000 windows of a small model, about 46 of a ResNet-50."""


class MemorySink:
    """Keeps the last windows in memory (``store=None``): at most ``max_windows`` of them and
    at most ``max_bytes`` of their arrays (the newest window is always kept)."""

    def __init__(self, max_windows: int = 1000, max_bytes: int = MEMORY_BYTES) -> None:
        check_positive_int("max_windows", max_windows)
        check_positive_int("max_bytes", max_bytes)
        self.max_bytes = max_bytes
        self._windows: deque[tuple[WindowRecord, int]] = deque()
        self._max_windows = max_windows
        self._bytes = 0
        self._lock = threading.Lock()
        self._evicted = 0

    def write(self, window: WindowRecord) -> None:
        size = window.nbytes
        with self._lock:
            self._windows.append((window, size))
            self._bytes += size
            while len(self._windows) > 1 and (
                len(self._windows) > self._max_windows or self._bytes > self.max_bytes
            ):
                _, evicted = self._windows.popleft()
                self._bytes -= evicted
                self._evicted += 1

    def close(self, timeout: float | None = None) -> None:
        """Nothing to deliver; the windows stay readable."""

    @property
    def dropped(self) -> int:
        """Always 0: evicting the oldest window of a bounded history is not a loss."""
        return 0

    @property
    def evicted(self) -> int:
        """Old windows pushed out of the bounded history."""
        return self._evicted

    @property
    def windows(self) -> list[WindowRecord]:
        """The retained windows, oldest first."""
        with self._lock:
            return [window for window, _ in self._windows]

    @property
    def nbytes(self) -> int:
        """Bytes of the retained windows' arrays."""
        with self._lock:
            return self._bytes


class WindowQueue(queue.Queue[WindowRecord]):
    """A FIFO of windows bounded by their number and by the bytes of their arrays.

    :meth:`put_nowait` raises :class:`queue.Full` -- its message says which bound -- when
    ``maxsize`` windows are queued, or when the window would take the queued bytes past
    ``max_bytes`` (a window is always accepted into an empty queue, however large).  A
    window's bytes are released when it is taken out.  Only the non-blocking put is offered:
    the sinks that use it drop and count what does not fit, they never wait.
    """

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        check_positive_int("maxsize", maxsize)
        check_positive_int("max_bytes", max_bytes)
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.nbytes = 0
        """Bytes of the queued windows' arrays."""
        self._sizes: deque[int] = deque()

    def put_nowait(self, item: WindowRecord) -> None:
        size = item.nbytes
        with self.not_full:
            if self._qsize() >= self.maxsize:
                raise queue.Full(f"{self.maxsize} windows")
            if self._qsize() and self.nbytes + size > self.max_bytes:
                raise queue.Full(f"{self.max_bytes / 2**20:g} MiB of windows")
            self._put(item)
            self._sizes.append(size)
            self.nbytes += size
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def put(self, item: WindowRecord, block: bool = True, timeout: float | None = None) -> None:
        if block:
            raise TypeError("WindowQueue.put never blocks: use put_nowait")
        self.put_nowait(item)

    def _get(self) -> WindowRecord:
        self.nbytes -= self._sizes.popleft()
        return super()._get()
