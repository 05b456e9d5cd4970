"""Where closed windows go: the :class:`Sink` protocol and the in-memory sink.

``bnwatch.capture`` hands every closed window to a sink and knows nothing else about
storage; ``bnwatch.watch`` picks the sink from ``store=``.  A sink's :meth:`Sink.write` is
called from the monitor's window thread (never from inside a forward pass) and must not
block for long: sinks that do I/O queue the window and write it in the background.
"""

from __future__ import annotations

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


class MemorySink:
    """Keeps the last ``max_windows`` windows in memory (``store=None``)."""

    def __init__(self, max_windows: int = 1000) -> None:
        check_positive_int("max_windows", max_windows)
        self._windows: deque[WindowRecord] = deque(maxlen=max_windows)
        self._lock = threading.Lock()
        self._evicted = 0

    def write(self, window: WindowRecord) -> None:
        with self._lock:
            if len(self._windows) == self._windows.maxlen:
                self._evicted += 1
            self._windows.append(window)

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
            return list(self._windows)
