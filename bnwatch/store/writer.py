"""The background writer: a :class:`~bnwatch.sink.Sink` that stores windows in a database.

``write()`` never blocks and never touches the database: it puts the window on a bounded
queue, or -- when the queue is full -- drops it and counts it (``dropped``), never silently.
A daemon thread takes up to ``batch_size`` windows at a time and stores them in one
transaction.  A database that is down at start or goes away mid-run is retried with
exponential backoff and logged; inference is unaffected.  A window the database refuses for
good -- a value that does not fit its column (an integer out of range), a constraint it
breaks, a channel count that differs from the stored layer's, what the repository refuses
before writing (:class:`UnstorableWindowError`: a name longer than its column, a time out of
range, more measured samples than a window may hold) -- is not retried: a batch it is in is
split in halves, each stored in a transaction of its own, down to the windows refused, which
are counted as ``rejected`` and logged one by one; every other window of the batch is
stored.  ``close()`` drains the queue (waiting at most ``timeout`` seconds), so a clean
shutdown loses nothing; whatever is still undelivered when the timeout expires is counted as
dropped and logged, and so is a window written after ``close()``.  A window the store had
already (written twice, delivered again) is counted as a duplicate, not as written.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError

from bnwatch.errors import BnwatchError, check_positive_int
from bnwatch.schema import WindowRecord
from bnwatch.sink import QUEUE_BYTES, WindowQueue
from bnwatch.store.engine import SchemaError, parse_url, redacted
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import ChannelMismatchError, Repository, UnstorableWindowError

logger = logging.getLogger("bnwatch")

_DROP_LOG_EVERY = 100  # dropped windows between repeated warnings (of one kind)

_REFUSED_SQLSTATE_CLASSES = ("22", "23", "54")
"""SQLSTATE classes of errors about the rows sent, not about the database: data exception
(22: a value too long or out of range), integrity constraint violation (23) and program limit
exceeded (54: a row or index entry too large, too many parameters -- which a smaller batch
avoids).  Class 53 (insufficient resources: disk full, out of memory, too many connections),
08 (connection), 40 (serialization failure, deadlock), 42 (a missing table or column, a missing
privilege: an outdated schema or a misconfigured role) and the rest are the database's state,
which an operator or time fixes: those are retried."""


def _refused(err: BaseException) -> bool:
    """Whether storing the same windows again would fail the same way: the database (or the
    driver, binding a value) refused the data itself, so retrying it blocks every later window
    for nothing.  True for SQLAlchemy's ``DataError`` and ``IntegrityError``, for an error whose
    SQLSTATE is in :data:`_REFUSED_SQLSTATE_CLASSES`, for a value the driver could not bind
    (sqlite3's ``OverflowError`` for an integer beyond 64 bits, wrapped in a ``StatementError``)
    and for anything that is no database error at all (the repository refusing a window).
    False for the database being away, locked, full, outdated or misconfigured: SQLAlchemy's
    ``OperationalError`` (connection lost, ``database is locked``, a deadlock),
    ``InterfaceError``, ``ProgrammingError``, ``InternalError``, a connection invalidated
    whatever its error, pool timeouts, and :class:`SchemaError` -- those are retried."""
    if isinstance(err, SchemaError):
        return False
    if isinstance(err, SQLAlchemyError):
        return refused_by_database(err)
    return True


def refused_by_database(err: SQLAlchemyError) -> bool:
    """Whether a database error is the database (or the driver) refusing the data itself --
    the part of :func:`_refused` about database errors, shared with the service, which
    answers such an error with a 422 (the HTTP sink then rejects the window instead of
    retrying it) where this writer rejects the window."""
    if isinstance(err, DBAPIError):
        if err.connection_invalidated:
            return False
        if isinstance(err, (DataError, IntegrityError)):
            return True
        sqlstate = getattr(err.orig, "sqlstate", None)
        return isinstance(sqlstate, str) and sqlstate[:2] in _REFUSED_SQLSTATE_CLASSES
    if isinstance(err, StatementError):  # raised before the database saw the statement
        return isinstance(err.orig, (ValueError, TypeError, OverflowError))
    return False


_NEEDS_A_FIX: tuple[tuple[tuple[str, ...], str], ...] = (
    (('database "', "does not exist"), "create that database, or fix the URL's database name"),
    (('role "', "does not exist"), "create that role, or fix the URL's user"),
    (("password authentication failed",), "fix the URL's user or password"),
    (("no password supplied",), "put the password in the URL or in ~/.pgpass"),
    (("unable to open database file",), "the path must be a file this process can write"),
    (("file is not a database",), "the URL names a file that is not a SQLite database"),
    (("attempt to write a readonly database",), "the file and its folder must be writable"),
)
"""Database errors that no retry will cure until someone changes something: the retried
window waits for that fix, so the log says what it is, at ERROR (others, a server restarting,
a lock, are expected to pass)."""


def _fix_for(message: str) -> str | None:
    """What to change for a database error that waits on a fix (:data:`_NEEDS_A_FIX`)."""
    lowered = message.lower()
    return next((fix for texts, fix in _NEEDS_A_FIX if all(t in lowered for t in texts)), None)


def _reason(err: BaseException) -> str:
    """What the database said, in one line: the driver's error and the first line of its
    message, without SQLAlchemy's statement and parameters (a window's arrays)."""
    orig = err.orig if isinstance(err, StatementError) and err.orig is not None else err
    lines = str(orig).splitlines()
    message = lines[0] if lines else ""
    if isinstance(err, BnwatchError):
        return message or repr(err)
    return f"{type(orig).__name__}: {message}" if message else repr(orig)


@dataclass(frozen=True)
class WriterStats:
    """What the writer has done: windows written (stored by it), duplicates (delivered but
    stored already: a window written twice, a re-delivery of one stored or compacted, one a
    concurrent writer stored first -- ``written + duplicates`` counts every window
    delivered, as the HTTP sink's do), queued, dropped (queue full, not delivered by close,
    or written after it), rejected (refused for good: a channel-count mismatch, a value the
    database cannot hold), failed attempts (the database away; 0 once it is back)."""

    written: int
    queued: int
    dropped: int
    rejected: int
    failures: int
    last_error: str | None
    duplicates: int = 0


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
        self._duplicates = 0
        self._dropped = 0
        self._rejected = 0
        self._failures = 0
        self._last_error: str | None = None
        self._drops_by_kind: dict[str, int] = {}
        self._closed = False
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._thread = threading.Thread(
            target=self._run, name=f"bnwatch-writer-{redacted(self.url)}", daemon=True
        )
        self._thread.start()

    # -- the Sink protocol ---------------------------------------------------------------
    def write(self, window: WindowRecord) -> None:
        """Queue a window; never blocks (a full queue, or a closed sink, drops and counts it).

        The check for ``close()`` and the put are one step under the lock ``close()`` takes to
        mark the sink closed: a window is either queued before -- then the thread stores it or
        ``close()`` counts it -- or dropped, never queued for a thread that has gone.
        """
        with self._lock:
            if self._closed:
                why, kind = "the sink is closed", "closed"
            else:
                try:
                    self._queue.put_nowait(window)
                    return
                except queue.Full as full:
                    why = f"the queue is full ({full}) -- the database is too slow or unreachable"
                    kind = "queue"
        self._drop(why, kind)

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    def close(self, timeout: float | None = 30.0) -> None:
        """Deliver what is queued, waiting at most ``timeout`` seconds, then stop.  Windows
        written afterwards are dropped and counted.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        self._stop.set()
        self._thread.join(None if timeout is None else timeout + 5.0)
        lost = 0
        while True:  # left by a thread that gave up (or is stuck in a database call)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            lost += 1
        if lost:
            with self._lock:
                self._dropped += lost
            logger.error(
                "bnwatch: %d window(s) could not be stored in %s before close() timed out",
                lost,
                redacted(self.url),
            )

    def stats(self) -> WriterStats:
        with self._lock:
            return WriterStats(
                written=self._written,
                queued=self._queue.qsize(),
                dropped=self._dropped,
                rejected=self._rejected,
                failures=self._failures,
                last_error=self._last_error,
                duplicates=self._duplicates,
            )

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is stored, rejected or dropped (tests,
        benchmarks); ``False`` if that did not happen within ``timeout`` seconds.  After
        ``close()`` it is so at once (unless a database call outlived it): the thread has
        stored what it could, and ``close()`` counted the rest as dropped."""
        end = time.monotonic() + timeout
        while True:
            if self._queue.unfinished_tasks == 0:
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.01)

    # -- accounting ----------------------------------------------------------------------
    def _drop(self, why: str, kind: str) -> None:
        """Count a window lost; log the first loss of each ``kind`` and every 100th after."""
        with self._lock:
            before = self._drops_by_kind.get(kind, 0)
            self._drops_by_kind[kind] = before + 1
            self._dropped += 1
            dropped = self._dropped
        if before % _DROP_LOG_EVERY == 0:
            logger.warning(
                "bnwatch: a window for %s dropped (%s); %d window(s) dropped so far",
                redacted(self.url),
                why,
                dropped,
            )

    def _reject(self, window: WindowRecord, reason: str, err: BaseException) -> None:
        """Count a window refused for good and say which, and why: it is never retried."""
        with self._lock:
            self._rejected += 1
            self._last_error = reason
        logger.error(
            "bnwatch: %s refused window %s of %s@%s (%s); it is not retried",
            redacted(self.url),
            window.uid,
            window.model,
            window.version,
            reason,
            # a traceback only for what is neither the database's answer nor bnwatch's check
            exc_info=err if not isinstance(err, (SQLAlchemyError, BnwatchError)) else None,
        )

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
        parts: deque[list[WindowRecord]] = deque()  # the batch in hand, as left to store
        while True:
            if not parts:
                if self._stop.is_set() and self._queue.empty():
                    return
                batch = self._take()
                if not batch:
                    continue
                parts.append(batch)
            try:
                self._store(parts)
            except (SQLAlchemyError, SchemaError) as err:  # away, locked or outdated: retried
                self._failed(err, backoff)
                if self._wait(backoff):
                    in_hand = sum(len(part) for part in parts)
                    with self._lock:  # close() gave up: count the batch in hand as dropped
                        self._dropped += in_hand
                    self._done(in_hand)
                    logger.error(
                        "bnwatch: %d window(s) could not be stored in %s before close() timed "
                        "out (%s)",
                        in_hand,
                        redacted(self.url),
                        self._last_error,
                    )
                    return
                backoff = min(backoff * 2, self._retry_max)
                continue
            except Exception as err:  # pragma: no cover - a bug: never kill the thread
                logger.exception("bnwatch: storing windows failed unexpectedly")
                in_hand = sum(len(part) for part in parts)
                parts.clear()
                with self._lock:
                    self._rejected += in_hand
                    self._last_error = repr(err)
                self._done(in_hand)
            backoff = self._retry_initial

    def _done(self, windows: int) -> None:
        """Tell the queue that ``windows`` taken from it are stored, rejected or dropped."""
        for _ in range(windows):
            self._queue.task_done()

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

    def _store(self, parts: deque[list[WindowRecord]]) -> None:
        """Store the windows of ``parts``, each part in one transaction, taking each part out
        once it is stored; raises what the database raised while it is away (``parts`` then
        holds what is left, retried later -- never what is stored already, which would count
        it twice).

        A part the database refuses for good (:func:`_refused`) is split in halves, each stored
        on its own, down to single windows: one refused window costs about ``2 log2(n)``
        transactions of an ``n``-window batch, and every other window is stored, with no row
        of the refused one (each attempt is one transaction, rolled back whole).  A channel-count
        mismatch, or a window the store cannot hold (:class:`UnstorableWindowError`: a time
        out of range, more measured samples than a window may hold), says which window it is
        (``index``): that one alone is taken out at once.
        """
        if self._repo is None:
            engine = self._engine or engine_for(self.url, create=self._create)
            self._repo = Repository(engine)
            logger.info("bnwatch: storing windows in %s", redacted(self.url))
        while parts:
            part = parts[0]
            try:
                done = self._repo.store_windows(part)
            except (ChannelMismatchError, UnstorableWindowError) as err:
                index = getattr(err, "index", 0)
                parts[0] = part[:index] + part[index + 1 :]
                if not parts[0]:
                    parts.popleft()
                self._reject(part[index], str(err), err)
                self._done(1)
                continue
            except Exception as err:
                if not _refused(err):
                    raise
                parts.popleft()
                if len(part) > 1:
                    half = len(part) // 2
                    parts.extendleft([part[half:], part[:half]])  # the first half first
                else:
                    self._reject(part[0], _reason(err), err)
                    self._done(1)
                continue
            parts.popleft()
            with self._lock:  # what the store claimed: a duplicate was not written
                self._written += done.windows
                self._duplicates += done.duplicates
                if self._failures:
                    logger.info("bnwatch: the store at %s is back", redacted(self.url))
                    self._failures = 0
            if self._on_stored is not None:
                try:
                    self._on_stored(self._repo, part)
                except Exception:  # e.g. alert evaluation: never lose the writer over it
                    logger.exception("bnwatch: the after-store hook failed")
            self._done(len(part))

    def _failed(self, err: Exception, backoff: float) -> None:
        with self._lock:
            self._failures += 1
            failures = self._failures
            self._last_error = str(err).splitlines()[0] if str(err) else repr(err)
        if failures == 1 or failures % 10 == 0:
            fix = _fix_for(self._last_error)
            logger.log(
                logging.WARNING if fix is None else logging.ERROR,
                "bnwatch: cannot store windows in %s (%s%s); retrying in %.1f s, %d queued",
                redacted(self.url),
                self._last_error,
                "" if fix is None else f": {fix}",
                backoff,
                self._queue.qsize(),
            )
