"""The background writer: a :class:`~bnwatch.sink.Sink` that stores windows in a database.

``write()`` never blocks and never touches the database: it puts the window on a bounded
queue, or -- when the queue is full -- drops it and counts it (``dropped``), never silently.
A daemon thread takes up to ``batch_size`` windows at a time and stores them in one
transaction.  A database that is down at start or goes away mid-run is retried with
exponential backoff and logged; inference is unaffected.  ``close()`` drains the queue
(waiting at most ``timeout`` seconds), so a clean shutdown loses nothing; whatever is still
undelivered when the timeout expires is counted as dropped and logged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import SQLAlchemyError

from bnwatch.errors import check_positive_int
from bnwatch.schema import WindowRecord
from bnwatch.sink import QUEUE_BYTES, WindowQueue
from bnwatch.store.engine import SchemaError, parse_url, redacted
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import ChannelMismatchError, Repository

logger = logging.getLogger("bnwatch")


@dataclass(frozen=True)
class WriterStats:
    """What the writer has done: windows written, queued, dropped (queue full or not
    delivered by close), rejected (invalid, e.g. a channel-count mismatch), failed attempts."""

    written: int
    queued: int
    dropped: int
    rejected: int
    failures: int
    last_error: str | None


class StoreSink:
    """Stores closed windows in a SQL database from a background thread.

    Args:
        url: SQLAlchemy URL (validated now: an unusable URL raises ``ConfigError``).
        queue_size: windows held while the database is slow or away; more are dropped.
        queue_bytes: bound of the bytes those windows' arrays hold (:attr:`WindowRecord.nbytes`;
            default 256 MiB, about 46 ResNet-50 windows); more are dropped.  The batch being
            stored is held besides, at most ``batch_size`` windows.
        batch_size: windows stored per transaction.
        retry_initial, retry_max: exponential backoff between failed attempts (seconds).
        create: create the schema in an empty database (``bnwatch db upgrade`` otherwise).
        on_stored: called with the repository and the windows after each stored batch (the
            alert engine's hook); its exceptions are logged, never propagated.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        queue_size: int = 1000,
        queue_bytes: int = QUEUE_BYTES,
        batch_size: int = 32,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        create: bool = True,
        engine: Engine | None = None,
        on_stored: Callable[[Repository, list[WindowRecord]], object] | None = None,
    ) -> None:
        self.url = parse_url(url)
        check_positive_int("queue_size", queue_size)
        check_positive_int("queue_bytes", queue_bytes)
        check_positive_int("batch_size", batch_size)
        self._queue = WindowQueue(queue_size, queue_bytes)
        self._batch_size = batch_size
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._create = create
        self._engine = engine
        self._on_stored = on_stored
        self._repo: Repository | None = None
        self._lock = threading.Lock()
        self._written = 0
        self._dropped = 0
        self._rejected = 0
        self._failures = 0
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._thread = threading.Thread(
            target=self._run, name=f"bnwatch-writer-{redacted(self.url)}", daemon=True
        )
        self._thread.start()

    # -- the Sink protocol ---------------------------------------------------------------
    def write(self, window: WindowRecord) -> None:
        try:
            self._queue.put_nowait(window)
        except queue.Full as full:
            with self._lock:
                self._dropped += 1
                dropped = self._dropped
            if dropped == 1 or dropped % 100 == 0:
                logger.warning(
                    "bnwatch: the store writer's queue is full (%s); %d window(s) "
                    "dropped so far -- the database at %s is too slow or unreachable",
                    full,
                    dropped,
                    redacted(self.url),
                )

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    def close(self, timeout: float | None = 30.0) -> None:
        """Deliver what is queued, waiting at most ``timeout`` seconds, then stop."""
        self._deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        self._stop.set()
        self._thread.join(None if timeout is None else timeout + 5.0)
        lost = self._queue.qsize()
        if lost:
            with self._lock:
                self._dropped += lost
            logger.error(
                "bnwatch: %d window(s) could not be stored in %s before close() timed out",
                lost,
                redacted(self.url),
            )
            while not self._queue.empty():
                self._queue.get_nowait()

    def stats(self) -> WriterStats:
        with self._lock:
            return WriterStats(
                written=self._written,
                queued=self._queue.qsize(),
                dropped=self._dropped,
                rejected=self._rejected,
                failures=self._failures,
                last_error=self._last_error,
            )

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is stored (tests, benchmarks)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    # -- the thread ------------------------------------------------------------------------
    def _take(self) -> list[WindowRecord]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self._repo is not None and self._engine is None:
                self._repo.engine.dispose()  # our engine: release its connections

    def _loop(self) -> None:
        backoff = self._retry_initial
        batch: list[WindowRecord] = []
        while True:
            if not batch:
                if self._stop.is_set() and self._queue.empty():
                    return
                batch = self._take()
                if not batch:
                    continue
            try:
                self._store(batch)
            except (SQLAlchemyError, SchemaError) as err:  # down, locked, away or outdated
                self._failed(err, backoff)
                if self._wait(backoff):
                    with self._lock:  # close() gave up: count the batch in hand as dropped
                        self._dropped += len(batch)
                    for _ in batch:
                        self._queue.task_done()
                    return
                backoff = min(backoff * 2, self._retry_max)
                continue
            except Exception as err:  # pragma: no cover - a bug: never kill the thread
                logger.exception("bnwatch: storing windows failed unexpectedly")
                with self._lock:
                    self._rejected += len(batch)
                    self._last_error = repr(err)
            for _ in batch:
                self._queue.task_done()
            batch = []
            backoff = self._retry_initial

    def _wait(self, seconds: float) -> bool:
        """Sleep before a retry; after close() only until its deadline.  True: give up."""
        if not self._stop.is_set():
            self._stop.wait(seconds)  # close() wakes us for one more attempt at once
            return False
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            return True
        time.sleep(min(seconds, remaining))
        return False

    def _store(self, batch: list[WindowRecord]) -> None:
        if self._repo is None:
            engine = self._engine or engine_for(self.url, create=self._create)
            self._repo = Repository(engine)
            logger.info("bnwatch: storing windows in %s", redacted(self.url))
        pending = list(batch)
        while pending:
            try:
                self._repo.write_windows(pending)
            except ChannelMismatchError as err:
                index = getattr(err, "index", 0)
                logger.error("bnwatch: window rejected: %s", err)
                with self._lock:
                    self._rejected += 1
                    self._last_error = str(err)
                del pending[index]
                continue
            with self._lock:
                self._written += len(pending)
                if self._failures:
                    logger.info("bnwatch: the store at %s is back", redacted(self.url))
                    self._failures = 0
            if self._on_stored is not None:
                try:
                    self._on_stored(self._repo, pending)
                except Exception:  # e.g. alert evaluation: never lose the writer over it
                    logger.exception("bnwatch: the after-store hook failed")
            return

    def _failed(self, err: Exception, backoff: float) -> None:
        with self._lock:
            self._failures += 1
            failures = self._failures
            self._last_error = str(err).splitlines()[0] if str(err) else repr(err)
        if failures == 1 or failures % 10 == 0:
            logger.warning(
                "bnwatch: cannot store windows in %s (%s); retrying in %.1f s, %d queued",
                redacted(self.url),
                self._last_error,
                backoff,
                self._queue.qsize(),
            )
