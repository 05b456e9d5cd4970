"""The HTTP sink: a :class:`~bnwatch.sink.Sink` that sends windows to a bnwatch service.

:class:`HttpSink` posts closed windows to ``POST {url}/api/v1/windows`` as
:class:`~bnwatch.wire.WindowBatch` JSON (uncompressed) from a background thread, with the
semantics of the database writer (:class:`bnwatch.store.writer.StoreSink`): ``write()``
never blocks -- a full in-memory queue drops the window and counts it -- and failed
deliveries are retried with exponential backoff and logged.

What it adds is a **spool**: while the service is unreachable, batches are written to a
local directory (one file per batch, written atomically: temporary file, fsync, rename) and
delivered oldest first when the service is back; a spool file is deleted only once the
service answered (2xx, or a rejection).  The spool is bounded in bytes: beyond
``spool_max_bytes`` the oldest spooled batches are deleted and their windows counted as
``dropped`` (and logged), as are the windows of spool files that vanish (a tmp cleaner
deleting them, or the whole directory, which is then made again).  A process that starts
with the same spool directory delivers what an earlier process left.

Delivery is at least once -- a batch whose answer was lost is sent again -- and the service
stores a window once per ``uid``, so a window is never stored twice; windows still in memory
or in flight when the process is killed are lost (see below).

Answers of the service:

* 2xx: delivered; ``stored`` windows count as ``written``, the rest as ``duplicates``.
* 400, 409, 422: the batch is invalid and retrying cannot help.  A batch of several windows
  is bisected to find the invalid windows; those are counted as ``rejected`` and the others
  delivered.  413 (too large) splits the batch the same way; a single window that is still
  too large is rejected.
* 401, 403 (bad token), 404, 405 and other unexpected answers: a configuration error.  The
  sink logs an ERROR (first time, then every 10th attempt), keeps spooling (bounded, drops
  counted) and probes the service with the oldest batch once every ``retry_max`` seconds, so
  a fixed token or service resumes delivery without a restart, at a cost of one request per
  ``retry_max``.
* 408, 429, 5xx (logged with what the service said), connection errors, answers that cannot
  be read and timeouts: retried with exponential backoff (with ±20 % jitter, so replicas do
  not retry in lockstep after an outage; ``Retry-After`` is honoured up to ``retry_max``).
  An attempt takes at most ``timeout`` in all, however slowly the answer trickles in.

The spool survives restarts and service outages, not the loss of the sending process: the
windows in the in-memory queue (and a batch in flight) die with a killed process.
``close(timeout)`` tries to deliver everything until ``timeout`` expires, then moves what is
left to the spool, counted as ``spooled`` (not dropped) -- the next process with the same
spool directory delivers it.

:func:`send_profile` uploads a reference profile (``bnwatch.profile(..., store=URL)``) to
``POST {url}/api/v1/profiles`` in one synchronous request: a one-off upload, so no queue and no
spool -- a failure raises :class:`ServiceError` with the status and the service's message.
:func:`send_recalibration_outcome` reports how a pending recalibration ended
(``POST {url}/api/v1/recalibrations/{id}/outcome``, ``bnwatch.report_recalibration``) the same
way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from pydantic import ValidationError

from bnwatch.errors import BnwatchError, ConfigError, check_positive_int
from bnwatch.schema import (
    REPORTED_STATUSES,
    SCHEMA_VERSION,
    Profile,
    WindowRecord,
    storable_text,
)
from bnwatch.sink import QUEUE_BYTES, WindowQueue
from bnwatch.wire import (
    IngestResult,
    ProfileResult,
    WireProfile,
    from_record,
    outcome_body,
    profile_body,
    to_profile,
)

if sys.platform != "win32":
    import fcntl

__all__ = [
    "ENDPOINT",
    "PROFILES_ENDPOINT",
    "TOKEN_ENV",
    "HttpSink",
    "HttpSinkStats",
    "ServiceError",
    "default_spool_base",
    "fetch_profile",
    "fetch_recalibration",
    "outcome_endpoint",
    "profiles_endpoint",
    "recalibration_endpoint",
    "send_profile",
    "send_recalibration_outcome",
]

logger = logging.getLogger("bnwatch")

ENDPOINT = "/api/v1/windows"
PROFILES_ENDPOINT = "/api/v1/profiles"
RECALIBRATIONS_ENDPOINT = "/api/v1/recalibrations"
TOKEN_ENV = "BNWATCH_API_TOKEN"
SPOOL_ENV = "BNWATCH_SPOOL_DIR"
"""Overrides the base directory of default spool directories."""

_MiB = 1 << 20
_MAX_SLOTS = 256
_LOG_EVERY = 10  # failed attempts between repeated warnings
_DROP_LOG_EVERY = 100  # dropped windows between repeated warnings
_SPOOL_NAME = re.compile(r"^(?P<key>\d{20}-\d+(?:\.\d+)*)_(?P<count>\d+)w\.json$")
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class HttpSinkStats:
    """What the sink has done.

    Attributes:
        written: windows the service answered it stored.
        duplicates: windows the service answered it already had -- a re-delivery after a
            lost answer, or a window written twice.  ``written + duplicates`` counts every
            window delivered (a window whose first answer was lost counts as a duplicate).
        dropped: windows lost, never silently: the in-memory queue was full, the spool bound
            evicted them, or they could be neither delivered nor spooled.
        rejected: windows the service refused as invalid (400/409/422, or 413 alone).
        spooled: windows waiting in the spool directory now (after ``close()``: what the
            next process with this spool directory will deliver).
        queued: windows waiting in the in-memory queue now.
        failures: failed delivery attempts so far (all of them; they do not reset when the
            service comes back).
        last_error: the last failure or rejection, for humans.
    """

    written: int
    duplicates: int
    dropped: int
    rejected: int
    spooled: int
    queued: int
    failures: int
    last_error: str | None


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------
def _endpoint(url: object) -> str:
    """The ingest URL for a service URL; raises :class:`ConfigError` naming ``store``."""
    allowed = "an http:// or https:// URL of a bnwatch service, e.g. http://bnwatch:8000"
    if not isinstance(url, str):
        raise ConfigError("store", url, allowed)
    try:
        parts = urlsplit(url.strip())
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        raise ConfigError("store", url, allowed) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("store", url, allowed)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            "store",
            "<url with credentials>",  # never echo a secret
            f"a URL without user:password@ (pass the token as token= or {TOKEN_ENV})",
        )
    if parts.query or parts.fragment:
        raise ConfigError("store", url, allowed + " (without ?query or #fragment)")
    path = parts.path.rstrip("/")
    if not path.endswith(ENDPOINT):
        path += ENDPOINT
    return f"{parts.scheme}://{parts.netloc}{path}"


def _user_agent() -> str:
    try:
        return f"bnwatch/{metadata.version('bnwatch')}"
    except metadata.PackageNotFoundError:  # running from a source tree
        return "bnwatch"


def _seconds(argument: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(argument, value, "a finite number of seconds > 0")
    return float(value)


def resolve_token(token: str | None) -> str | None:
    """The bearer token: ``token``, else ``$BNWATCH_API_TOKEN`` (blank counts as unset), with
    surrounding whitespace stripped -- as the service strips its own -- since a secret read
    from a file ends in a newline; a token still invalid names where it came from."""
    argument = "token"
    if token is None:
        argument = f"${TOKEN_ENV}"
        token = os.environ.get(TOKEN_ENV, "").strip() or None
        if token is None:
            return None
    elif isinstance(token, str):
        token = token.strip()
    if (
        not isinstance(token, str)
        or not token
        or not token.isprintable()
        or any(c.isspace() for c in token)
    ):
        raise ConfigError(argument, "<hidden>", "a non-empty printable string without spaces")
    return token


def default_spool_base() -> Path:
    """Where default spool directories live: ``$BNWATCH_SPOOL_DIR``, else the user's cache
    directory (``$XDG_CACHE_HOME`` or ``~/.cache``, ``~/Library/Caches``, ``%LOCALAPPDATA%``)
    under ``bnwatch/spool``."""
    env = os.environ.get(SPOOL_ENV)
    if env:
        return Path(env).expanduser()
    try:
        home = Path.home()
    except RuntimeError:  # no home directory (some containers)
        return _temp_spool_base()
    if sys.platform == "win32":
        root = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        root = home / "Library" / "Caches"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")
    return root / "bnwatch" / "spool"


def _temp_spool_base() -> Path:
    try:
        user = str(os.getuid()) if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    except Exception:  # pragma: no cover - exotic platforms
        user = "user"
    return Path(tempfile.gettempdir()) / f"bnwatch-{user}" / "spool"


def _spool_key(endpoint: str, source: str) -> str:
    netloc = urlsplit(endpoint).netloc
    readable = re.sub(r"[^A-Za-z0-9.-]", "_", netloc)[:64]
    digest = hashlib.sha256(f"{endpoint}\n{source}".encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


# ------------------------------------------------------------------------------------------
# The spool
# ------------------------------------------------------------------------------------------
class _DirLock:
    """An exclusive ``flock`` on ``directory/.lock`` (no locking on Windows)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def acquire(cls, directory: Path) -> _DirLock | None:
        """The lock, or ``None`` if another open sink holds it."""
        if sys.platform == "win32":  # pragma: no cover
            return cls(None)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor releases the flock


@dataclass(frozen=True)
class _Entry:
    key: str
    count: int
    size: int
    path: Path

    @property
    def order(self) -> tuple[int, ...]:
        return tuple(int(part) for part in re.split(r"[-.]", self.key))


@dataclass(frozen=True)
class _Part:
    """A request body of ``count`` windows."""

    body: bytes
    count: int


def _fsync_dir(directory: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Spool:
    """The batches waiting for the service, one file per batch, oldest first.

    File names are ``<ns-time>-<pid>[.<split>...]_<windows>w.json``: they sort in delivery
    order, and carry the window count, so a restart rebuilds the index without reading them.
    Only the sink's thread changes it (and ``close()`` once that thread is gone or stuck),
    under ``lock``.

    The spool holds ``dir_lock``, the directory's lock.  Batches whose files vanish (a tmp
    cleaner deleted them, or the whole directory) are reported to ``on_lost`` (windows, why)
    and forgotten; a directory that vanished is made -- and locked -- again.
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        dir_lock: _DirLock,
        on_lost: Callable[[int, str], None],
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.lock = threading.RLock()
        self._dir_lock = dir_lock
        self._on_lost = on_lost
        self._entries: list[_Entry] = []
        self._bytes = 0
        self._windows = 0
        self._last_ns = 0
        self.rescan()

    def release(self) -> None:
        """Release the directory's lock (the sink is done)."""
        self._dir_lock.release()

    def rescan(self) -> None:
        """Index the files in the directory (and remove partial writes of a crash); batches
        whose files vanished are lost.  A directory that vanished is made again."""
        with self.lock:
            try:
                paths = list(self.directory.iterdir())
            except FileNotFoundError:
                if self.directory.exists():
                    raise
                self._restore()
                return
            entries = []
            for path in paths:
                if path.name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        path.unlink()
                    continue
                match = _SPOOL_NAME.match(path.name)
                if match is None:
                    continue
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                entries.append(_Entry(match["key"], int(match["count"]), size, path))
            entries.sort(key=lambda e: e.order)
            found = {e.path for e in entries}
            gone = [e for e in self._entries if e.path not in found]
            self._entries = entries
            self._bytes = sum(e.size for e in entries)
            self._windows = sum(e.count for e in entries)
            self._last_ns = max([self._last_ns, *(e.order[0] for e in entries)])
            if gone:
                why = f"{len(gone)} spool file(s) vanished from {self.directory}"
                self._on_lost(sum(e.count for e in gone), why)

    def forget_vanished(self) -> None:
        """Forget the batches whose files vanished (lost), without making anything again:
        what is left indexed is what the next run finds."""
        with self.lock:
            gone = [e for e in self._entries if not e.path.exists()]
            if not gone:
                return
            for entry in gone:
                self._forget(entry)
            why = (
                f"{len(gone)} spool file(s) vanished from {self.directory}"
                if self.directory.is_dir()
                else f"the spool directory {self.directory} vanished (deleted by a cleaner?)"
            )
            self._on_lost(sum(e.count for e in gone), why)

    def _restore(self, keep: _Entry | None = None) -> None:
        """The directory vanished (a tmp cleaner deleted it): make it again and lock it; the
        batches indexed in it are lost -- but ``keep``, whose windows the caller holds.

        Raises:
            OSError: it cannot be made again.
        """
        lost = sum(e.count for e in self._entries if e is not keep)
        self._entries, self._bytes, self._windows = [], 0, 0
        why = f"the spool directory {self.directory} vanished (deleted by a cleaner?)"
        try:
            lock = _claim(self.directory)
        except OSError as err:
            self._on_lost(lost, f"{why} and cannot be made again ({err})")
            raise
        self._dir_lock.release()
        if lock is None:  # made again, and claimed, by another sink in between
            logger.warning(
                "bnwatch: another HttpSink spools in %s too since it was made again",
                self.directory,
            )
            lock = _DirLock(None)
        self._dir_lock = lock
        self._on_lost(lost, f"{why}; it was made again")

    @property
    def windows(self) -> int:
        return self._windows

    @property
    def size(self) -> int:
        """Bytes spooled."""
        return self._bytes

    def oldest(self) -> _Entry | None:
        with self.lock:
            return self._entries[0] if self._entries else None

    def read(self, entry: _Entry) -> bytes:
        return entry.path.read_bytes()

    def _new_key(self) -> str:
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        return f"{self._last_ns:020d}-{os.getpid()}"

    def _write(self, key: str, part: _Part, keep: _Entry | None = None) -> _Entry:
        """Write a batch file (making a vanished directory again, see :meth:`_restore`)."""
        try:
            return self._write_file(key, part)
        except FileNotFoundError:
            if self.directory.is_dir():
                raise
        self._restore(keep)
        return self._write_file(key, part)

    def _write_file(self, key: str, part: _Part) -> _Entry:
        name = f"{key}_{part.count}w.json"
        final = self.directory / name
        tmp = self.directory / f"{_TMP_PREFIX}{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(part.body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        return _Entry(key, part.count, len(part.body), final)

    def _insert(self, entry: _Entry) -> None:
        order = entry.order
        index = len(self._entries)
        while index and self._entries[index - 1].order > order:
            index -= 1
        self._entries.insert(index, entry)
        self._bytes += entry.size
        self._windows += entry.count

    def _forget(self, entry: _Entry) -> None:
        with contextlib.suppress(ValueError):
            self._entries.remove(entry)
            self._bytes -= entry.size
            self._windows -= entry.count

    def add(self, part: _Part) -> int:
        """Spool a new batch (the newest); returns the windows evicted to stay within the
        bound -- the oldest ones, or this batch if it alone exceeds the bound.

        Raises:
            OSError: the batch could not be written (nothing was evicted).
        """
        with self.lock:
            if len(part.body) > self.max_bytes:
                return part.count
            entry = self._write(self._new_key(), part)
            evicted = 0
            while self._entries and self._bytes + entry.size > self.max_bytes:
                evicted += self._entries[0].count
                self.remove(self._entries[0])
            self._insert(entry)
            return evicted

    def remove(self, entry: _Entry) -> None:
        """Delete a delivered (or evicted) batch.  A file that cannot be deleted (a disk
        remounted read-only) is forgotten all the same and logged: a later run may deliver it
        again, which the service's unique window ids make harmless."""
        with self.lock:
            self._forget(entry)
            try:
                entry.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                logger.error("bnwatch: cannot delete spool file %s: %s", entry.path, err)

    def replace(self, entry: _Entry, parts: list[_Part]) -> None:
        """Replace a batch by the parts of it still to deliver, in its place in the order
        (the parts first, then the original is deleted: a crash in between re-delivers)."""
        with self.lock:
            for i, part in enumerate(parts):
                self._insert(self._write(f"{entry.key}.{i}", part, keep=entry))
            self.remove(entry)


def _claim(directory: Path) -> _DirLock | None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return _DirLock.acquire(directory)


def _adopt(mine: Path, siblings: Path) -> None:
    """Move the spool files of slots no running sink holds (processes that are gone) into
    ``mine``: with fewer replicas than before, nothing stays behind."""
    for other in sorted(siblings.iterdir()):
        if other == mine or not other.is_dir() or not other.name.isdigit():
            continue
        try:
            lock = _DirLock.acquire(other)
        except OSError:
            continue
        if lock is None:
            continue
        try:
            for path in other.iterdir():
                if _SPOOL_NAME.match(path.name) and not (mine / path.name).exists():
                    with contextlib.suppress(OSError):
                        os.replace(path, mine / path.name)
        except OSError:
            pass
        finally:
            lock.release()


# ------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------
class _Outcome(Enum):
    DELIVERED = "delivered"
    INVALID = "invalid"  # 400/409/422: bisect, then reject
    TOO_LARGE = "too large"  # 413: split, then reject
    RETRY = "retry"  # 408/429/5xx/network: back off
    BLOCKED = "blocked"  # 401/403/404/...: misconfigured; probe slowly


@dataclass(frozen=True)
class _Reply:
    outcome: _Outcome
    message: str
    result: IngestResult | None = None
    retry_after: float | None = None


_INVALID = frozenset({400, 409, 422})
_RETRY = frozenset({408, 425, 429})


def _detail(response: httpx.Response, limit: int = 300) -> str:
    try:
        text = response.text
    except Exception:  # pragma: no cover - undecodable body
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: use our own backoff
    return seconds if 0 <= seconds < math.inf else None


def _classify(response: httpx.Response) -> _Reply:
    status = response.status_code
    what = f"HTTP {status} {response.reason_phrase}".rstrip()
    if 200 <= status < 300:
        try:
            result: IngestResult | None = IngestResult.model_validate_json(response.content)
        except ValidationError:
            result = None
        return _Reply(_Outcome.DELIVERED, what, result)
    if status == 413:
        return _Reply(_Outcome.TOO_LARGE, what)
    if status in _INVALID:
        return _Reply(_Outcome.INVALID, f"{what}: {_detail(response)}")
    if status in _RETRY or status >= 500:
        detail = _detail(response)  # e.g. why the service cannot take windows now
        message = f"{what}: {detail}" if detail else what
        return _Reply(_Outcome.RETRY, message, retry_after=_retry_after(response))
    if status in (401, 403):
        hint = f"the service refused the token: check token= or {TOKEN_ENV}"
        return _Reply(_Outcome.BLOCKED, f"{what}: {hint}")
    if 300 <= status < 400:
        where = response.headers.get("location", "?")
        return _Reply(_Outcome.BLOCKED, f"{what}: redirected to {where}; use that URL")
    return _Reply(
        _Outcome.BLOCKED, f"{what}: is this the URL of a bnwatch service? {_detail(response)}"
    )


def _halves(part: _Part) -> list[_Part] | None:
    """Split a batch body in two (``None``: it cannot be split)."""
    if part.count < 2:
        return None
    try:
        windows = json.loads(part.body)["windows"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(windows, list) or len(windows) < 2:
        return None
    middle = len(windows) // 2
    return [_body_of(windows[:middle]), _body_of(windows[middle:])]


def _encode_window(record: WindowRecord) -> bytes:
    return json.dumps(from_record(record), separators=(",", ":"), allow_nan=False).encode()


def _body_of(windows: list[object]) -> _Part:
    encoded = [json.dumps(w, separators=(",", ":"), allow_nan=False).encode() for w in windows]
    return _join(encoded)


def _join(encoded: list[bytes]) -> _Part:
    head = b'{"schema_version":%d,"windows":[' % SCHEMA_VERSION
    return _Part(head + b",".join(encoded) + b"]}", len(encoded))


class RequestWatchdog:
    """Bounds a request's whole time: when it is up, the client's sockets are shut down.

    httpx's ``timeout`` bounds each read, not the request: a service, a webhook receiver or a
    proxy trickling its answer a byte every few seconds held the sending thread for good.
    Passed as httpcore's ``trace`` extension (``extensions={"trace": watchdog.trace}``), it
    learns the sockets of the client's connections -- kept-alive ones too, across requests --
    and once :meth:`limit`'s ``seconds`` have passed shuts them all down (``shutdown`` wakes a
    thread blocked in ``recv``; ``close`` would not), so the request fails at once and
    :attr:`expired` says why.  For a client that sends one request at a time: the sockets cut
    are the request's, or idle ones the pool replaces.  The sink and the webhook trigger
    (:mod:`bnwatch.triggers.core`) use it.
    """

    def __init__(self) -> None:
        self.expired = False  # the last attempt's time ran out
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        """Cut the request made inside once ``seconds`` have passed."""
        with self._lock:
            self.expired = False
        timer = threading.Timer(seconds, self._expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            timer.join()  # never cuts a later attempt

    def trace(self, name: str, info: Mapping[str, Any]) -> None:
        if name not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is None:
            return
        with self._lock:
            self._sockets = [s for s in self._sockets if s.fileno() != -1]  # open ones
            self._sockets.append(sock)
            expired = self.expired
        if expired:  # connected only after the time was up
            self._cut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._cut(sock)

    @staticmethod
    def _cut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed: nothing left to stop
            sock.shutdown(socket.SHUT_RDWR)


# ------------------------------------------------------------------------------------------
# The sink
# ------------------------------------------------------------------------------------------
class HttpSink:
    """Sends closed windows to a bnwatch service from a background thread, spooling them
    to disk while the service is unreachable.  See the module docstring for the semantics.

    Args:
        url: the service, ``http://host:port`` (a path prefix is kept; ``/api/v1/windows``
            is appended).  Validated now: anything else raises ``ConfigError`` naming
            ``store``.
        token: sent as ``Authorization: Bearer <token>``; default ``$BNWATCH_API_TOKEN``.
            Never logged.
        source: identifies this sender in the default spool directory's name, through a digest
            (default: the host name, made storable as in the monitor's default source by
            :func:`bnwatch.schema.storable_text`, so a restarted process finds its
            predecessor's spool).
        spool_dir: the spool directory (created; one open sink per directory).  Default:
            ``<cache>/bnwatch/spool/<host_port>-<hash of url and source>/<slot>``, where the
            slot is the first one no other running sink holds; a sink also takes over the
            spool of slots whose process is gone.  Falls back to the temp directory when the
            cache directory is not writable.
        spool_max_bytes: bound of the spool; beyond it the oldest batches are dropped and
            counted.
        queue_size: windows held in memory between ``write()`` and the thread; more are
            dropped and counted.
        queue_bytes: bound of the bytes those windows' arrays hold
            (:attr:`~bnwatch.schema.WindowRecord.nbytes`; default 256 MiB, about 46 ResNet-50
            windows); more are dropped and counted.
        batch_size: windows per request (at most).
        max_batch_bytes: a batch is closed once its body reaches this size (so it may exceed
            it by one window); larger bodies answered with 413 are split.
        timeout: HTTP timeout of each attempt, seconds: of each connect, read and write,
            and of the whole request (a watchdog cuts an answer that trickles in).
        retry_initial, retry_max: exponential backoff between failed attempts, seconds;
            ``retry_max`` is also the probe interval while the token is refused.
    """

    _CLOSE_GRACE = 5.0
    """Seconds close() waits for the thread beyond ``timeout`` + HTTP ``timeout``."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        source: str | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = 256 * _MiB,
        queue_size: int = 1000,
        queue_bytes: int = QUEUE_BYTES,
        batch_size: int = 32,
        max_batch_bytes: int = 4 * _MiB,
        timeout: float = 10.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        self.endpoint = _endpoint(url)
        self.url = self.endpoint[: -len(ENDPOINT)] or self.endpoint
        check_positive_int("spool_max_bytes", spool_max_bytes)
        check_positive_int("queue_size", queue_size)
        check_positive_int("queue_bytes", queue_bytes)
        check_positive_int("batch_size", batch_size)
        check_positive_int("max_batch_bytes", max_batch_bytes)
        self._timeout = _seconds("timeout", timeout)
        self._retry_initial = _seconds("retry_initial", retry_initial)
        self._retry_max = _seconds("retry_max", retry_max)
        if self._retry_max < self._retry_initial:
            raise ConfigError("retry_max", retry_max, f">= retry_initial ({retry_initial})")
        if source is not None and (not isinstance(source, str) or not source):
            raise ConfigError("source", source, "a non-empty string or None")
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": _user_agent(),
        }
        token = resolve_token(token)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        else:  # said now, not at the first 401 a window later
            logger.warning(
                "bnwatch: no token for %s (token= or $%s): the service refuses windows "
                "without one; they are spooled and retried until one is set",
                self.endpoint,
                TOKEN_ENV,
            )
        self._batch_size = batch_size
        self._max_batch_bytes = max_batch_bytes

        self._lock = threading.Lock()
        self._dropped = 0
        self._drops_by_kind: dict[str, int] = {}
        dir_lock, directory = self._open_spool(
            spool_dir, self.endpoint, source or storable_text(socket.gethostname())
        )
        self.spool_dir: Path = directory
        """The spool directory in use."""
        try:
            self._spool = _Spool(directory, spool_max_bytes, dir_lock, self._spool_lost)
        except OSError as err:
            dir_lock.release()
            raise ConfigError("spool_dir", str(directory), f"a readable directory ({err})") from err

        self._queue = WindowQueue(queue_size, queue_bytes)
        self._client = httpx.Client(headers=headers, timeout=self._timeout)
        self._watchdog = RequestWatchdog()
        self._written = 0
        self._duplicates = 0
        self._rejected = 0
        self._failures = 0
        self._failures_in_a_row = 0
        self._last_error: str | None = None
        self._backoff = self._retry_initial
        self._next_attempt = 0.0  # monotonic time of the next attempt after a failure
        self._in_hand = 0  # windows taken from the queue, neither delivered nor spooled
        self._stop = threading.Event()
        self._closed = False
        self._abandoned = False  # close() gave up waiting for the thread
        self._deadline = math.inf
        if self._spool.windows:
            logger.info(
                "bnwatch: %d window(s) spooled in %s by an earlier run will be sent to %s",
                self._spool.windows,
                directory,
                self.url,
            )
        self._thread = threading.Thread(
            target=self._run, name=f"bnwatch-http-{self.url}", daemon=True
        )
        self._thread.start()

    @staticmethod
    def _open_spool(
        spool_dir: str | os.PathLike[str] | None, endpoint: str, source: str
    ) -> tuple[_DirLock, Path]:
        """Claim the spool directory (see ``spool_dir``)."""
        if spool_dir is not None:
            directory = Path(spool_dir).expanduser()
            try:
                lock = _claim(directory)
            except OSError as err:
                raise ConfigError(
                    "spool_dir", str(directory), f"a writable directory ({err})"
                ) from err
            if lock is None:
                raise ConfigError(
                    "spool_dir",
                    str(directory),
                    "a directory no other open HttpSink uses (one is spooling there)",
                )
            return lock, directory
        key = _spool_key(endpoint, source)
        tried = []
        for base in (default_spool_base(), _temp_spool_base()):
            root = base / key
            tried.append(str(root))
            try:
                root.mkdir(parents=True, exist_ok=True, mode=0o700)
                for slot in range(_MAX_SLOTS):
                    directory = root / str(slot)
                    claimed = _claim(directory)
                    if claimed is not None:
                        _adopt(directory, root)
                        return claimed, directory
            except OSError as err:
                logger.warning("bnwatch: cannot spool in %s (%s)", root, err)
        raise ConfigError(
            "spool_dir", None, f"a writable directory (none of {tried} has a free slot)"
        )

    def __repr__(self) -> str:
        return f"HttpSink({self.url!r}, spool_dir={str(self.spool_dir)!r})"

    # -- the Sink protocol ---------------------------------------------------------------
    def write(self, window: WindowRecord) -> None:
        """Queue a window for delivery; never blocks (a full queue drops and counts it)."""
        if self._closed:
            self._drop(1, "the sink is closed", "closed")
            return
        try:
            self._queue.put_nowait(window)
        except queue.Full as full:
            self._drop(1, f"the queue is full ({full})", "queue")

    @property
    def dropped(self) -> int:
        """Windows lost (queue full, evicted from the spool bound, or unspoolable)."""
        with self._lock:
            return self._dropped

    def close(self, timeout: float | None = 30.0) -> None:
        """Deliver what is queued and spooled, waiting at most ``timeout`` seconds, then stop.

        Windows not delivered by then are left in the spool -- counted as ``spooled``, not
        dropped -- for the next sink with this spool directory.  A sink that is backing off
        (service down, token refused) makes one more attempt at once, retries while the next
        attempt falls before the deadline, and otherwise spools and returns at once: it never
        sleeps past the deadline.  A request in flight is not interrupted, but no request
        takes more than the HTTP ``timeout`` in all, so it returns within about ``timeout``
        plus one HTTP ``timeout``.  Only a thread stuck where no timeout reaches (a hung
        disk, a host name that takes long to resolve) is given up after ``timeout`` + HTTP
        ``timeout`` + 5 s: the queued windows are then spooled from here, and those of the
        request in flight counted as dropped.  Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._deadline = time.monotonic() + (timeout if timeout is not None else math.inf)
        with self._lock:
            self._next_attempt = 0.0  # one more attempt at once
        self._stop.set()
        grace = self._timeout + self._CLOSE_GRACE
        self._thread.join(None if timeout is None else max(timeout, 0.0) + grace)
        if self._thread.is_alive():  # stuck (a hung request or disk): save what we can
            self._abandoned = True
            with self._lock:  # before _spool_queue, which counts its own windows in hand
                in_hand, self._in_hand = self._in_hand, 0
            with self._spool.lock:
                self._spool_queue()
            if in_hand:
                self._drop(in_hand, "a request in flight did not finish before close()", "close")
        elif self._queue.unfinished_tasks:  # a thread that ended early left windows queued
            with contextlib.suppress(Exception), self._spool.lock:
                self._spool_queue()
        stats = self.stats()
        if stats.spooled:
            logger.warning(
                "bnwatch: %d window(s) not yet delivered to %s stay spooled in %s for the next run",
                stats.spooled,
                self.url,
                self.spool_dir,
            )

    def __enter__(self) -> HttpSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def stats(self) -> HttpSinkStats:
        """Counts of what was delivered, duplicated, dropped, rejected and is waiting."""
        with self._lock:
            return HttpSinkStats(
                written=self._written,
                duplicates=self._duplicates,
                dropped=self._dropped,
                rejected=self._rejected,
                spooled=self._spool.windows,
                queued=self._queue.qsize(),
                failures=self._failures,
                last_error=self._last_error,
            )

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything written so far is delivered (or rejected/dropped), and the
        spool is empty; ``False`` if that did not happen within ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while True:
            if self._queue.unfinished_tasks == 0 and self._spool.windows == 0:
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.01)

    # -- accounting ----------------------------------------------------------------------
    def _drop(self, windows: int, why: str, kind: str) -> None:
        """Count lost windows; log the first loss of each ``kind`` and every 100th after."""
        if windows <= 0:
            return
        before, dropped = self._count_dropped(windows, kind)
        if before == 0 or before // _DROP_LOG_EVERY != (before + windows) // _DROP_LOG_EVERY:
            logger.warning(
                "bnwatch: %d window(s) for %s dropped (%s); %d dropped so far",
                windows,
                self.url,
                why,
                dropped,
            )

    def _count_dropped(self, windows: int, kind: str) -> tuple[int, int]:
        """Count ``windows`` lost as ``kind``: the kind's count before, and all dropped since
        the start."""
        with self._lock:
            before = self._drops_by_kind.get(kind, 0)
            self._drops_by_kind[kind] = before + windows
            self._dropped += windows
            return before, self._dropped

    def _spool_lost(self, windows: int, why: str) -> None:
        """Spooled batches vanished (see :class:`_Spool`): their windows are dropped."""
        if windows <= 0:  # an empty spool directory deleted: nothing lost
            logger.warning("bnwatch: %s", why)
            return
        _, dropped = self._count_dropped(windows, "vanished")
        logger.error(
            "bnwatch: %s: %d spooled window(s) for %s lost, counted as dropped; %d dropped so far",
            why,
            windows,
            self.url,
            dropped,
        )

    def _reject(self, part: _Part, reply: _Reply) -> None:
        with self._lock:
            self._rejected += part.count
            self._last_error = reply.message
        logger.error(
            "bnwatch: %s rejected %d window(s) (%s); they are not retried",
            self.url,
            part.count,
            reply.message,
        )

    def _delivered(self, part: _Part, reply: _Reply) -> None:
        result = reply.result
        stored, duplicates = (
            (part.count, 0) if result is None else (result.stored, result.duplicates)
        )
        missing = part.count - stored - duplicates
        with self._lock:
            self._written += stored
            self._duplicates += duplicates
            if missing > 0:
                self._rejected += missing
            recovered, self._failures_in_a_row = self._failures_in_a_row, 0
            self._backoff = self._retry_initial
            self._next_attempt = 0.0
        if result is None:
            logger.warning(
                "bnwatch: %s answered %s without an IngestResult", self.url, reply.message
            )
        elif missing > 0:
            logger.warning(
                "bnwatch: %s accounted for %d of %d windows (received=%d); %d counted as rejected",
                self.url,
                stored + duplicates,
                part.count,
                result.received,
                missing,
            )
        if recovered:
            logger.info(
                "bnwatch: %s is back after %d failed attempt(s); %d spooled window(s) to send",
                self.url,
                recovered,
                self._spool.windows,
            )

    def _failed(self, reply: _Reply) -> None:
        now = time.monotonic()
        with self._lock:
            self._failures += 1
            self._failures_in_a_row += 1
            in_a_row = self._failures_in_a_row
            self._last_error = reply.message
            if reply.outcome is _Outcome.BLOCKED:
                delay = self._retry_max
            else:
                delay = self._backoff * random.uniform(0.8, 1.2)
                if reply.retry_after is not None:
                    delay = max(delay, min(reply.retry_after, self._retry_max))
                self._backoff = min(self._backoff * 2, self._retry_max)
            self._next_attempt = now + delay
        if in_a_row == 1 or in_a_row % _LOG_EVERY == 0:
            level = logging.ERROR if reply.outcome is _Outcome.BLOCKED else logging.WARNING
            logger.log(
                level,
                "bnwatch: cannot send windows to %s (%s); retrying in %.2g s, %d window(s) "
                "spooled in %s",
                self.url,
                reply.message,
                delay,
                self._spool.windows + self._in_hand,
                self.spool_dir,
            )

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        pause = 1.0
        try:
            while True:
                try:
                    self._loop()
                    return
                except Exception:  # a bug, or an error of the disk: say so, and go on
                    logger.exception("bnwatch: the HTTP sink's thread failed; it carries on")
                    if self._stop.is_set():  # closing: keep what is queued
                        with contextlib.suppress(Exception), self._spool.lock:
                            if not self._abandoned:
                                self._spool_queue()
                        return
                    self._stop.wait(pause)  # not a busy loop, if it fails again at once
                    pause = min(pause * 2, 60.0)
        finally:
            with contextlib.suppress(Exception):  # not promised to the next run:
                self._spool.forget_vanished()
            self._client.close()
            self._spool.release()

    def _loop(self) -> None:
        while True:
            if self._abandoned:
                return
            if self._stop.is_set():
                if self._queue.unfinished_tasks == 0 and self._spool.windows == 0:
                    return
                with self._lock:
                    next_attempt = self._next_attempt
                if max(next_attempt, time.monotonic()) >= self._deadline:  # no time left
                    with self._spool.lock:
                        if not self._abandoned:
                            self._spool_queue()
                    return
            entry = self._spool.oldest()
            due = self._due()
            if entry is not None and due:
                self._send_spooled(entry)
                wait = 0.0
            elif entry is None:
                wait = 0.2
            else:
                with self._lock:
                    wait = min(max(self._next_attempt - time.monotonic(), 0.0), 0.2)
            parts = self._take(wait)
            if parts is not None:
                self._send_new(parts)

    def _due(self) -> bool:
        with self._lock:
            return time.monotonic() >= self._next_attempt

    def _take(self, wait: float) -> tuple[_Part, int] | None:
        """Up to ``batch_size`` queued windows (about ``max_batch_bytes``), encoded; and
        how many windows were taken (including unencodable ones, rejected here)."""
        try:
            first = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        records = [first]
        encoded: list[bytes] = []
        size = 0
        taken = 0
        while True:
            for record in records:
                taken += 1
                try:
                    blob = _encode_window(record)
                except (ValueError, TypeError) as err:
                    with self._lock:
                        self._rejected += 1
                        self._last_error = f"window {record.uid} cannot be encoded: {err}"
                    logger.error("bnwatch: %s", self._last_error)
                    continue
                encoded.append(blob)
                size += len(blob)
            records = []
            if taken >= self._batch_size or size >= self._max_batch_bytes:
                break
            try:
                records.append(self._queue.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            self._in_hand = len(encoded)
        return _join(encoded), taken

    def _send_new(self, taken: tuple[_Part, int]) -> None:
        part, count = taken
        try:
            if part.count == 0:
                return
            rest = [part]  # unless sent now: keep the order, behind what is spooled
            if self._spool.oldest() is None and self._due() and not self._stop_now():
                try:
                    rest = self._deliver([part])
                except Exception as err:  # a bug: keep the windows (spooled, or counted dropped)
                    logger.exception(
                        "bnwatch: sending %d window(s) to %s failed unexpectedly (%s: %s); "
                        "they are spooled",
                        part.count,
                        self.url,
                        type(err).__name__,
                        err,
                    )
            if rest:
                with self._spool.lock:
                    if not self._abandoned:
                        self._spool_parts(rest)
        finally:
            with self._lock:
                self._in_hand = 0
            for _ in range(count):
                self._queue.task_done()

    def _stop_now(self) -> bool:
        return self._stop.is_set() and time.monotonic() >= self._deadline

    def _send_spooled(self, entry: _Entry) -> None:
        try:
            body = self._spool.read(entry)
        except OSError as err:
            with self._spool.lock:
                if entry.path.exists():
                    self._spool.remove(entry)
                    self._drop(entry.count, f"spool file unreadable: {err}", "unreadable")
                else:
                    self._spool.rescan()  # someone removed it
            return
        original = _Part(body, entry.count)
        rest = self._deliver([original])
        with self._spool.lock:
            if not rest:
                self._spool.remove(entry)
            elif rest != [original]:
                try:
                    self._spool.replace(entry, rest)
                except OSError as err:  # keep the original: re-delivery is harmless
                    logger.error("bnwatch: cannot rewrite spool file %s: %s", entry.path, err)

    def _spool_parts(self, parts: list[_Part]) -> None:
        for part in parts:
            try:
                evicted = self._spool.add(part)
            except OSError as err:
                self._drop(part.count, f"cannot spool to {self.spool_dir}: {err}", "unspoolable")
                continue
            with self._lock:
                self._in_hand = max(self._in_hand - part.count, 0)
            self._drop(
                evicted,
                f"the spool in {self.spool_dir} is full ({self._spool.max_bytes} bytes): "
                "oldest windows dropped",
                "spool",
            )

    def _spool_queue(self) -> None:
        """Move every queued window to the spool (close: no time left)."""
        while True:
            taken = self._take(0.0)
            if taken is None:
                return
            part, count = taken
            try:
                if part.count:
                    self._spool_parts([part])
            finally:
                with self._lock:
                    self._in_hand = 0
                for _ in range(count):
                    self._queue.task_done()

    def _request_timeout(self) -> float:
        if self._stop.is_set():
            return max(min(self._timeout, self._deadline - time.monotonic()), 0.05)
        return self._timeout

    def _post(self, part: _Part) -> _Reply:
        """One attempt, of at most the HTTP timeout in all (see :class:`RequestWatchdog`)."""
        seconds = self._request_timeout()
        try:
            with self._watchdog.limit(seconds):
                response = self._client.post(
                    self.endpoint,
                    content=part.body,
                    timeout=seconds,
                    extensions={"trace": self._watchdog.trace},
                )
        except httpx.HTTPError as err:  # any: no answer, a broken one, an undecodable one
            if self._watchdog.expired or isinstance(err, httpx.TimeoutException):
                return _Reply(
                    _Outcome.RETRY,
                    f"timed out: no complete answer within {seconds:.3g} s ({type(err).__name__})",
                )
            return _Reply(_Outcome.RETRY, f"{type(err).__name__}: {err}")
        return _classify(response)

    def _deliver(self, parts: list[_Part]) -> list[_Part]:
        """Send ``parts`` in order, splitting invalid or too large batches; returns what is
        left to send after a failed attempt (``[]``: all delivered or rejected)."""
        pending = deque(parts)
        while pending:
            part = pending.popleft()
            reply = self._post(part)
            if reply.outcome is _Outcome.DELIVERED:
                self._delivered(part, reply)
                continue
            if reply.outcome in (_Outcome.INVALID, _Outcome.TOO_LARGE):
                with self._lock:
                    self._failures_in_a_row = 0
                    self._backoff = self._retry_initial
                halves = _halves(part)
                if halves is None:
                    if reply.outcome is _Outcome.TOO_LARGE:
                        reply = _Reply(reply.outcome, f"{reply.message}: {len(part.body)} bytes")
                    self._reject(part, reply)
                else:
                    pending.extendleft(reversed(halves))
                continue
            self._failed(reply)
            pending.appendleft(part)
            return list(pending)
        return []


# ------------------------------------------------------------------------------------------
# Profiles
# ------------------------------------------------------------------------------------------
class ServiceError(BnwatchError, RuntimeError):
    """The bnwatch service could not be reached, or refused a request.

    Attributes:
        url: the endpoint the request went to.
        status: the HTTP status of the answer (``None``: no answer -- connection refused, a
            timeout, ...).
        detail: what the service said (its error message), or what went wrong.
    """

    def __init__(self, url: str, status: int | None, detail: str, message: str) -> None:
        self.url = url
        self.status = status
        self.detail = detail
        super().__init__(message)


def profiles_endpoint(url: object) -> str:
    """The profile upload URL (``.../api/v1/profiles``) of a bnwatch service URL.

    Raises:
        ConfigError: ``url`` is not an ``http(s)://`` URL of a service (naming ``store``).
    """
    base = _endpoint(url)[: -len(ENDPOINT)]
    if base.endswith(PROFILES_ENDPOINT):  # the user gave the endpoint itself
        base = base[: -len(PROFILES_ENDPOINT)]
    return base + PROFILES_ENDPOINT


def _service_message(response: httpx.Response) -> str:
    """The ``error.message`` of a bnwatch error answer, else the start of the body."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        message = None
    return message if isinstance(message, str) and message else _detail(response)


def _post_json(
    endpoint: str,
    body: bytes | None,
    secret: str | None,
    seconds: float,
    *,
    what: str,
    undone: str,
    method: str = "POST",
) -> httpx.Response:
    """POST a JSON ``body`` once (or, with ``method="GET"`` and no body, read); the 2xx
    answer, else :class:`ServiceError` saying that ``what`` ``undone`` (e.g. "the profile of
    m@v" "was not stored") and why."""
    headers = {"Accept": "application/json", "User-Agent": _user_agent()}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    try:
        response = httpx.request(method, endpoint, content=body, headers=headers, timeout=seconds)
    except httpx.TimeoutException as err:
        detail = f"no answer within {seconds:g} s ({type(err).__name__})"
        raise ServiceError(
            endpoint, None, detail, f"{what} {undone}: {endpoint}: {detail}"
        ) from err
    except httpx.TransportError as err:
        detail = f"{type(err).__name__}: {err}"
        raise ServiceError(
            endpoint, None, detail, f"{what} {undone}: cannot reach {endpoint} ({detail})"
        ) from err
    status = response.status_code
    if not 200 <= status < 300:
        detail = _service_message(response)
        hint = ""
        if status in (401, 403):
            hint = f" (check token= or ${TOKEN_ENV})"
        elif 300 <= status < 400:
            hint = f" (redirected to {response.headers.get('location', '?')}; use that URL)"
        raise ServiceError(
            endpoint,
            status,
            detail,
            f"{what} {undone}: {endpoint} answered HTTP {status} {response.reason_phrase}: "
            f"{detail}{hint}",
        )
    return response


def send_profile(
    url: str, profile: Profile, *, token: str | None = None, timeout: float = 60.0
) -> dict[str, int]:
    """Store a reference profile in a bnwatch service (``POST {url}/api/v1/profiles``).

    One request, one transaction in the service.  Sending a profile the service already has
    stores nothing and answers the same references, so a failed upload can simply be
    repeated.

    Args:
        url: the service, ``http://host:port`` (a path prefix is kept).
        profile: what :func:`bnwatch.profile` recorded.
        token: sent as ``Authorization: Bearer <token>``; default ``$BNWATCH_API_TOKEN``.
        timeout: HTTP timeout (connect, read, write), seconds.

    Returns:
        layer name -> the id of the layer's stored reference (as
        :meth:`bnwatch.store.repository.Repository.write_profile` returns).

    Raises:
        ConfigError: ``url``, ``token``, ``timeout`` or ``profile`` is invalid.
        ServiceError: the service was unreachable or refused the profile (its status and
            message are in the error: e.g. 401 for a wrong token, 409 when a layer's channel
            count differs from the layer stored for this model version, 413 when the body
            exceeds the service's limit).
    """
    endpoint = profiles_endpoint(url)
    seconds = _seconds("timeout", timeout)
    secret = resolve_token(token)
    if not isinstance(profile, Profile):
        raise ConfigError("profile", type(profile).__name__, "a Profile from bnwatch.profile()")
    if not profile.layers:
        raise ConfigError(
            "profile",
            f"a profile of {profile.name}@{profile.version} without layers",
            "a profile with at least one layer (did the data reach the BatchNorm layers?)",
        )
    body = json.dumps(profile_body(profile), separators=(",", ":"), allow_nan=False).encode()
    what = f"the profile of {profile.name}@{profile.version}"
    response = _post_json(endpoint, body, secret, seconds, what=what, undone="was not stored")
    status = response.status_code
    try:
        result = ProfileResult.model_validate_json(response.content)
    except ValidationError:
        detail = f"HTTP {status} without a ProfileResult: {_detail(response)}"
        raise ServiceError(
            endpoint, status, detail, f"{endpoint}: {detail} (is this a bnwatch service?)"
        ) from None
    return dict(result.references)


def check_service(url: str, *, what: str, undone: str, timeout: float = 10.0) -> None:
    """That the bnwatch service at ``url`` answers ``GET /healthz`` with its database up --
    checked before work whose result only it can take (a profiling pass).

    Raises:
        ConfigError: ``url`` is not a service URL.
        ServiceError: unreachable, or unhealthy (saying that ``what`` ``undone``).
    """
    base = _endpoint(url)[: -len(ENDPOINT)]
    _post_json(f"{base}/healthz", None, None, timeout, what=what, undone=undone, method="GET")


def fetch_profile(url: str, model: str, version: str, *, timeout: float = 60.0) -> Profile:
    """The reference profile a bnwatch service stores for a model version (``GET
    {url}/api/v1/models/{model}/versions/{version}/profile``; reads need no token), as
    :func:`bnwatch.load_profile` describes it.

    Raises:
        ConfigError: ``url`` or ``timeout`` is invalid.
        ServiceError: the service was unreachable, or answered 404 (no such model version, or
            no profile stored for it: its message says which).
    """
    base = _endpoint(url)[: -len(ENDPOINT)]
    endpoint = (
        f"{base}/api/v1/models/{quote(model, safe='')}/versions/{quote(version, safe='')}/profile"
    )
    seconds = _seconds("timeout", timeout)
    what = f"the profile of {model}@{version}"
    response = _post_json(
        endpoint, None, None, seconds, what=what, undone="was not read", method="GET"
    )
    try:
        wire = WireProfile.model_validate(response.json())
    except (ValueError, ValidationError) as err:
        detail = f"HTTP {response.status_code} without a profile: {_detail(response)}"
        raise ServiceError(
            endpoint,
            response.status_code,
            detail,
            f"{endpoint}: {detail} (is this a bnwatch service?)",
        ) from err
    return to_profile(wire)


def recalibration_endpoint(url: object, recalibration_id: int) -> str:
    """The URL of one recalibration (``.../api/v1/recalibrations/{id}``) of a service URL.

    Raises:
        ConfigError: ``url`` is not an ``http(s)://`` URL of a service (naming ``store``), or
            ``recalibration_id`` is not an integer >= 1.
    """
    check_positive_int("recalibration_id", recalibration_id)
    base = _endpoint(url)[: -len(ENDPOINT)]
    return f"{base}{RECALIBRATIONS_ENDPOINT}/{recalibration_id}"


def outcome_endpoint(url: object, recalibration_id: int) -> str:
    """The report URL (``.../api/v1/recalibrations/{id}/outcome``) of a bnwatch service URL
    (raises like :func:`recalibration_endpoint`)."""
    return recalibration_endpoint(url, recalibration_id) + "/outcome"


def fetch_recalibration(
    url: str, recalibration_id: int, *, timeout: float = 30.0
) -> dict[str, Any]:
    """One recalibration as a bnwatch service stores it (``GET
    {url}/api/v1/recalibrations/{id}``; reads need no token): e.g. to check that a requested
    recalibration is still ``pending`` before carrying it out.

    Returns:
        ``RecalibrationPublic`` as a dict (see :func:`send_recalibration_outcome`).

    Raises:
        ConfigError: ``url``, ``recalibration_id`` or ``timeout`` is invalid.
        ServiceError: the service was unreachable, or answered 404 (no such recalibration).
    """
    endpoint = recalibration_endpoint(url, recalibration_id)
    seconds = _seconds("timeout", timeout)
    what = f"recalibration {recalibration_id}"
    response = _post_json(
        endpoint, None, None, seconds, what=what, undone="was not read", method="GET"
    )
    return _recalibration_answer(endpoint, response, recalibration_id)


def _recalibration_answer(
    endpoint: str, response: httpx.Response, recalibration_id: int
) -> dict[str, Any]:
    """The recalibration a 2xx answer carries, else :class:`ServiceError`."""
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or answer.get("id") != recalibration_id:
        detail = f"HTTP {response.status_code} without the recalibration: {_detail(response)}"
        raise ServiceError(
            endpoint,
            response.status_code,
            detail,
            f"{endpoint}: {detail} (is this a bnwatch service?)",
        )
    return answer


def send_recalibration_outcome(
    url: str,
    recalibration_id: int,
    *,
    status: str,
    outcome: Mapping[str, Any] | None = None,
    buffers: Mapping[str, tuple[Any, Any, float]] | None = None,
    token: str | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Report how a pending recalibration ended to a bnwatch service
    (``POST {url}/api/v1/recalibrations/{id}/outcome``): the way back of a webhook trigger's
    receiver, and of ``bnwatch recalibrate --recalibration ID``.

    One request, one transaction in the service, and -- like :func:`send_profile` -- no
    retries: a recalibration is finished once, so a report whose answer was lost is refused
    when repeated (HTTP 409 naming the status it got; ``GET /api/v1/recalibrations`` shows it).

    Args:
        url: the service, ``http://host:port`` (a path prefix is kept).
        recalibration_id: the trigger event's ``recalibration_id`` (or a requested one's id).
        status: ``applied``, ``rejected`` or ``failed``.
        outcome: what happened (a JSON-ready mapping of at most 64 KiB as JSON; NaN and
            infinities are sent as null), e.g. ``RecalibrationResult.summary()`` or
            ``{"error": "..."}``.
        buffers: with ``applied`` only: layer -> ``(running_mean, running_var, eps)``, the new
            statistics (array-likes of the layer's channel count), stored as references of
            kind ``recalibrated``.
        token: sent as ``Authorization: Bearer <token>``; default ``$BNWATCH_API_TOKEN``.
        timeout: HTTP timeout (connect, read, write), seconds.

    Returns:
        The recalibration as the service stored it (``RecalibrationPublic`` as a dict: ``id``,
        ``model``, ``version``, ``alert_id``, ``status``, ``method``, ``created_at``,
        ``finished_at``, ``outcome`` -- with ``references``, layer -> reference id).

    Raises:
        ConfigError: an argument is invalid (checked before anything is sent).
        ServiceError: the service was unreachable or refused the report (its status and
            message are in the error: 401 a wrong token, 404 an unknown recalibration, 409 it
            is no longer pending, 422 a bad field or a layer that does not fit the stored one).
    """
    endpoint = outcome_endpoint(url, recalibration_id)
    seconds = _seconds("timeout", timeout)
    secret = resolve_token(token)
    if status not in REPORTED_STATUSES:
        raise ConfigError("status", status, f"one of {list(REPORTED_STATUSES)}")
    if outcome is not None and not isinstance(outcome, Mapping):
        raise ConfigError("outcome", type(outcome).__name__, "a mapping (a JSON object) or None")
    if buffers is not None and not isinstance(buffers, Mapping):
        raise ConfigError("buffers", type(buffers).__name__, "a mapping layer -> (mean, var, eps)")
    body = json.dumps(
        outcome_body(status, outcome or {}, buffers), separators=(",", ":"), allow_nan=False
    ).encode()
    what = f"the {status} outcome of recalibration {recalibration_id}"
    response = _post_json(endpoint, body, secret, seconds, what=what, undone="was not reported")
    return _recalibration_answer(endpoint, response, recalibration_id)
