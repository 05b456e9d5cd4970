"""The query layer: write windows, read models, layers, windows, alerts and recalibrations.

Writes take one transaction per call; validation happens before anything is written, so a
rejected batch leaves nothing behind.  Inserts of shared rows (models, layers, references)
are ``INSERT ... ON CONFLICT DO NOTHING`` followed by a select, so several replicas can
write one database concurrently; windows carry a unique id, so a retried delivery is
stored once.  Reads of a time range can be merged to a coarser resolution on the fly,
exactly (the sufficient statistics merge exactly; metrics are recomputed).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, TypeVar

import numpy as np
import sqlalchemy as sa
from numpy.typing import NDArray
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, defer, undefer
from typing_extensions import Unpack

from bnwatch.codec import (
    blob_shape,
    decode_arrays,
    decode_moments,
    encode_arrays,
    encode_moments,
)
from bnwatch.drift import (
    DriftConfig,
    Reference,
    assess_layer,
    config_account,
    config_from_account,
    decide,
)
from bnwatch.errors import (
    BnwatchError,
    ConfigError,
    RecalibrationBuffersError,
    RecalibrationNotFoundError,
    RecalibrationStateError,
    ShapeError,
    check_positive_int,
)
from bnwatch.schema import (
    BATCH_SIZE_BUCKETS,
    FLAG_METRICS,
    LAYER_METRICS,
    SCHEMA_VERSION,
    LayerProfile,
    LayerReport,
    Profile,
    WindowRecord,
    as_utc,
    utcnow,
)
from bnwatch.stats import (
    DEFAULT_RESERVOIR,
    ChannelMoments,
    LayerStats,
    Reservoir,
    check_capacity,
    merged_size,
)
from bnwatch.store.engine import lock_for_writing
from bnwatch.store.models import (
    Alert,
    CompactedWindow,
    Layer,
    LayerTotal,
    Model,
    Recalibration,
    Ref,
    Source,
    Window,
)
from bnwatch.wire import TIME_MAX, json_ready, measured_samples_problem, time_problem

logger = logging.getLogger("bnwatch")

_Query = TypeVar("_Query", bound="sa.Select[Unpack[tuple[Any, ...]]]")

METRIC_COLUMNS: tuple[str, ...] = LAYER_METRICS
"""Layer-level metrics stored as columns of ``windows`` (NULL where undefined)."""


IDENTITY_CACHE = 4096
"""Reference arrays remembered by identity (two per layer of each attached monitor)."""

POOLED_ROWS = 5000
"""Most rows a reservoir pooled from many windows keeps (:meth:`Repository.production_reservoir`):
plenty for a two-sample test, bounded memory for any range."""
POOL_CHUNK = 256
"""Windows decoded at a time while pooling reservoirs."""
MERGE_CHUNK = 64
"""Windows read at a time while merging a range to a resolution (:meth:`Repository.window_page`):
a window of a 2,048-channel layer holds 208 KiB of statistics."""
COUNT_CHUNK = 2000
"""Rows read at a time while summing over a range (:meth:`Repository.batch_size_counts`)."""
WARMING_UP = "warming_up"
"""The ``baseline`` of windows closed before the drift baseline existed (the warm-up)."""


def _recorded(lineage: object) -> str | None:
    """When the profile a ``profile`` reference was uploaded with was recorded (its lineage's
    ``created``, which every reference of one upload shares), or ``None``."""
    created = lineage.get("created") if isinstance(lineage, dict) else None
    return created if isinstance(created, str) else None


def _recorded_at(created: str | None) -> datetime | None:
    """:func:`_recorded`'s time as an aware datetime (``None`` if absent or unreadable)."""
    if created is None:
        return None
    try:
        return as_utc(datetime.fromisoformat(created))
    except ValueError:
        return None


class ChannelMismatchError(ShapeError):
    """A window's (or a profile's: ``source="profile"``) channel count disagrees with the
    layer already stored under that name."""

    def __init__(
        self,
        model: str,
        version: str,
        layer: str,
        stored: int,
        found: int,
        source: Literal["window", "profile"] = "window",
    ) -> None:
        self.model = model
        self.version = version
        self.layer = layer
        self.stored = stored
        self.found = found
        self.source = source
        ValueError.__init__(
            self,
            f"layer {layer!r} of {model}@{version} has {stored} channels in the store but the "
            f"{source} has {found}; a changed architecture needs a new model version",
        )


class UnstorableWindowError(BnwatchError, ValueError):
    """A window the store cannot hold although its record is well formed: a model name,
    version, source, uid, layer name or kind longer than its column (``VARCHAR(n)``, which
    SQLite would store and PostgreSQL refuse), a start or end
    outside the times the store's bucket arithmetic handles, a batch-size histogram whose
    batches hold more samples than a window may (it would overflow the layer's running
    totals).  The same rules as the wire format's (:func:`bnwatch.wire.time_problem`,
    :func:`bnwatch.wire.measured_samples_problem`), for windows that come from a monitor in
    the same process (the :class:`~bnwatch.store.writer.StoreSink`) rather than through the
    service.  Raised before anything is written.

    Attributes: ``index`` (which record of the batch), ``field`` (``model``, ``version``,
    ``source``, ``uid``, ``layers.<layer>``, ``start``, ``end`` or
    ``layers.<layer>.batch_sizes``), ``uid``.
    """

    def __init__(self, index: int, record: WindowRecord, field: str, problem: str) -> None:
        self.index = index
        self.field = field
        self.uid = record.uid
        ValueError.__init__(
            self, f"window {record.uid} of {record.model}@{record.version}: {problem}"
        )


_LENGTH_LIMITS: tuple[tuple[str, str, Any], ...] = (
    ("model", "model name", Model.name),
    ("version", "model version", Model.version),
    ("source", "source", Window.source),
    ("uid", "uid", Window.uid),
)
"""Text fields of a record and the columns that hold them: their lengths are the limits."""


def _too_long(what: str, value: str, column: Any) -> str | None:
    """Why ``value`` does not fit ``column`` (``VARCHAR(n)``: PostgreSQL refuses a longer one,
    SQLite stores it -- a store then holds what the other refuses), or ``None``."""
    limit = int(column.type.length)
    if len(value) <= limit:
        return None
    return (
        f"{what} is {len(value)} characters long; the store holds at most {limit}: "
        f"shorten the {what}"
    )


def check_storable(records: Sequence[WindowRecord]) -> None:
    """Raise :class:`UnstorableWindowError` for the first of ``records`` the store cannot
    hold (see there); cheap: no array is read."""
    for index, record in enumerate(records):
        for field_name, what, column in _LENGTH_LIMITS:
            problem = _too_long(what, getattr(record, field_name), column)
            if problem is not None:
                raise UnstorableWindowError(index, record, field_name, problem)
        for name, report in record.reports.items():
            problem = _too_long("layer name", name, Layer.name) or _too_long(
                "layer kind", report.kind, Layer.kind
            )
            if problem is not None:
                raise UnstorableWindowError(index, record, f"layers.{name}", problem)
        for name in ("start", "end"):
            problem = time_problem(name, getattr(record, name))
            if problem is not None:
                raise UnstorableWindowError(index, record, name, problem)
        for name, report in record.reports.items():
            problem = measured_samples_problem(report.stats.batch_sizes)
            if problem is not None:
                field = f"layers.{name}.batch_sizes"
                raise UnstorableWindowError(index, record, field, f"{field}: {problem}")


class NoReservoirError(BnwatchError, LookupError):
    """The store holds no reservoir of per-sample channel means for what was asked.

    Attributes: ``model``, ``version``, ``layer`` and ``which`` (``reference`` or
    ``production``); the message says what to do.
    """

    def __init__(self, model: str, version: str, layer: str, which: str, message: str) -> None:
        self.model = model
        self.version = version
        self.layer = layer
        self.which = which
        super().__init__(message)


_WARMING_UP_LAST = sa.case((Window.baseline == "warming_up", 1), else_=0)
"""Of windows ending together, the judged one first: compaction splits a bucket where the
warm-up ended into a warm-up and a judged window with the same end, and a layer's latest
window is the judged one."""


def _to_utc(value: datetime) -> datetime:
    """A time to store, or to compare with stored ones, aware and in UTC
    (:func:`~bnwatch.schema.as_utc`): SQLite keeps no offset, and PostgreSQL would read a
    naive one in the session's ``TimeZone`` -- a naive time is UTC, as every time bnwatch
    reads back is."""
    return as_utc(value)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _digest(*blobs: bytes) -> str:
    h = hashlib.sha256()
    for b in blobs:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _insert_ignore(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> int:
    """``INSERT ... ON CONFLICT DO NOTHING`` on PostgreSQL and SQLite; returns rows inserted."""
    if not rows:
        return 0
    dialect = conn.dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(table).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).on_conflict_do_nothing()
    else:  # pragma: no cover - parse_url only admits the two
        raise ValueError(f"unsupported dialect {dialect}")
    # no RETURNING: psycopg's executemany then runs one short statement per row instead of
    # parsing one statement with thousands of placeholders (2.6x faster on windows)
    result = conn.execute(stmt.execution_options(preserve_rowcount=True), rows)
    return max(int(result.rowcount), 0)


def _insert_claimed(
    conn: Connection, table: sa.Table, rows: Callable[[], Iterator[dict[str, Any]]]
) -> int:
    """Insert the other rows of the windows this transaction claimed (by their first row);
    ``rows`` makes them, one at a time.  Returns the rows inserted.

    No other writer inserts them, so on PostgreSQL they go in by ``COPY ... FROM STDIN (FORMAT
    BINARY)``: 1.1-1.2x the windows/s of ``INSERT`` in ``benchmarks/store.py``.  Each row is
    made (its moments encoded) just before it is sent and, by :data:`COPY_ROW_BY_ROW`, stored
    by the server as it arrives: the server stores one row while the client encodes the next
    instead of the two taking turns.  COPY runs in a savepoint: should the server refuse it (a
    row that exists after all -- COPY knows no ``ON CONFLICT`` -- or COPY itself, e.g. under
    row-level security or on a server older than PostgreSQL 12, which has no ``COPY ...
    WHERE``), the savepoint is rolled back and the rows are made again and go in as
    :func:`_insert_ignore` puts them, which raises what SQLAlchemy raises if the rows cannot
    go in either.  A connection lost mid-COPY
    fails the rollback to the savepoint, which raises SQLAlchemy's error.  Elsewhere (SQLite):
    :func:`_insert_ignore`, :data:`INSERT_CHUNK_BYTES` of rows at a time.
    """
    if conn.dialect.name != "postgresql":
        return _insert_ignore_chunked(conn, table, rows())
    made = rows()
    first = next(made, None)
    if first is None:
        return 0
    columns = list(first)
    names = ", ".join(f'"{c}"' for c in columns)
    sql = f'COPY "{table.name}" ({names}) FROM STDIN (FORMAT BINARY) {COPY_ROW_BY_ROW}'
    pending = itertools.chain([first], made)
    del first  # from here on, only the row being sent is held
    sent = 0
    try:
        with conn.begin_nested():
            cursor: Any = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            with cursor:
                oids = _column_oids(conn, cursor, table.name, columns)
                with cursor.copy(sql) as copy:
                    copy.set_types([oids[c] for c in columns])
                    for row in pending:
                        copy.write_row([row[c] for c in columns])
                        sent += 1
                        del row  # before the next is made: one encoded row held at a time
    except conn.dialect.loaded_dbapi.Error as err:
        if not isinstance(err, conn.dialect.loaded_dbapi.IntegrityError):
            _copy_refused(err)
        return _insert_ignore_chunked(conn, table, rows())
    return sent


COPY_ROW_BY_ROW = "WHERE pg_catalog.random() >= 0"
"""A ``WHERE`` clause that keeps every row but, being volatile, makes PostgreSQL insert each row
of a ``COPY`` as it arrives.  Without it a binary ``COPY`` into a table without ``BEFORE``
triggers buffers up to 1,000 rows in the server's memory before inserting any (its other
flush threshold, 64 kB, counts the bytes of text lines, which a binary ``COPY`` has none of):
a batch of windows -- 53 rows of up to 213 kB per ResNet-50 window -- waited in the server
until the client had sent its last row, and the two took turns.  With it the background
writer reached 0.80-0.86x the driver's windows/s in ``benchmarks/store.py`` instead of
0.57-0.71x."""


INSERT_CHUNK_BYTES = 1 << 20
"""Where COPY is not used, rows are made and inserted in chunks of about this many bytes of
blobs (at least one row): what bounds the memory a batch holds there."""


def _insert_ignore_chunked(
    conn: Connection, table: sa.Table, rows: Iterator[dict[str, Any]]
) -> int:
    """:func:`_insert_ignore` of ``rows``, :data:`INSERT_CHUNK_BYTES` of blobs at a time."""
    inserted = 0
    chunk: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        chunk.append(row)
        size += sum(len(v) for v in row.values() if isinstance(v, bytes))
        if size >= INSERT_CHUNK_BYTES:
            inserted += _insert_ignore(conn, table, chunk)
            chunk, size = [], 0
    return inserted + _insert_ignore(conn, table, chunk)


_COPY_REFUSED: set[str] = set()
"""Why COPY was refused so far (exception class names): each is logged once."""


def _copy_refused(err: Exception) -> None:
    """Log, once per process and reason, that COPY was refused and rows go in one by one."""
    reason = type(err).__name__
    if reason not in _COPY_REFUSED:
        _COPY_REFUSED.add(reason)
        logger.warning(
            "bnwatch: PostgreSQL refused COPY into windows (%s: %s); inserting row by row",
            reason,
            str(err).splitlines()[0] if str(err) else "",
        )


def _column_oids(
    conn: Connection, cursor: Any, table: str, columns: Sequence[str]
) -> dict[str, int]:
    """The type OID of every column of ``table``: what a binary COPY must be told.  Read once
    per database connection (kept in its ``info``, which a reconnect starts afresh), and again
    should ``columns`` name one it did not have."""
    cache: dict[str, dict[str, int]] = conn.connection.info.setdefault("bnwatch_oids", {})
    if not set(columns) <= cache.get(table, {}).keys():
        cursor.execute(
            "SELECT attname, atttypid::int FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,),
        )
        cache[table] = {str(name): int(oid) for name, oid in cursor.fetchall()}
    return cache[table]


def _insert_ignore_returning(
    conn: Connection, table: sa.Table, rows: list[dict[str, Any]]
) -> list[str]:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING uid``: the uids actually inserted."""
    if not rows:
        return []
    dialect: Any = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table).on_conflict_do_nothing().returning(table.c.uid)
    return [str(u) for u in conn.execute(stmt, rows).scalars()]


# --------------------------------------------------------------------------------------------
# What reads return
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    id: int
    name: str
    version: str
    created_at: datetime
    layers: int
    windows: int
    last_window_end: datetime | None


@dataclass(frozen=True)
class LayerInfo:
    id: int
    name: str
    kind: str
    channels: int
    depth: int


@dataclass(frozen=True, eq=False)
class StoredWindow:
    """A window of one layer as stored (or merged from stored windows).

    ``metrics`` holds the layer-level metrics of :data:`METRIC_COLUMNS`; ``stats`` the full
    sufficient statistics when they were asked for (``with_stats=True``, or a resolution
    without ``with_stats=False``).
    """

    model: str
    version: str
    layer: str
    source: str
    start: datetime
    end: datetime
    resolution_seconds: float
    channels: int
    n_samples: int
    n_batches: int
    samples_seen: int
    batches_seen: int
    nonfinite: int
    batch_sizes: Mapping[int, int]
    baseline: str
    metrics: Mapping[str, Any]
    stats: LayerStats | None = None
    id: int | None = None
    merged_from: int = 1

    def __getattr__(self, name: str) -> Any:
        metrics = self.__dict__.get("metrics", {})
        if name in metrics:
            return metrics[name]
        raise AttributeError(name)


@dataclass(frozen=True, order=True)
class WindowKey:
    """Where a window stands in the order of :meth:`Repository.windows` -- layer depth, layer
    id, end, window id -- and so the cursor of a page of windows: the next page holds the
    windows after the last window of this one.  A merged window (one per layer and bucket)
    has ``id`` 0.  :meth:`token` writes it as text (``depth.layer.end-in-µs.id``, URL-safe),
    :meth:`parse` reads it back."""

    depth: int
    layer_id: int
    end: datetime
    id: int = 0

    def token(self) -> str:
        return f"{self.depth}.{self.layer_id}.{_micros(self.end)}.{self.id}"

    @classmethod
    def parse(cls, token: str) -> WindowKey:
        """The key :meth:`token` wrote; :class:`ValueError` for any other text."""
        parts = token.split(".")
        if len(parts) != 4 or not all(_KEY_PART.fullmatch(p) for p in parts):
            raise ValueError(f"{token!r} is not a window key (depth.layer.end.id)")
        depth, layer_id, micros, window_id = (int(p) for p in parts)
        # the columns' ranges: a key outside them reached the database (SQLite: a 500)
        if not (
            -(2**31) <= depth < 2**31
            and -(2**63) <= layer_id < 2**63
            and -(2**63) <= window_id < 2**63
        ):
            raise ValueError(f"{token!r} is not a window key: a part is out of range")
        return cls(depth, layer_id, _from_micros(micros, token, "a window key"), window_id)


_KEY_PART = re.compile(r"-?[0-9]{1,19}")


def _one_page(conn: Connection | Session, query: Any, limit: int | None) -> tuple[list[Any], bool]:
    """The rows of ``query``, at most ``limit`` (``None``: all), and whether more follow (one
    row more is read to tell)."""
    if limit is None:
        return list(conn.execute(query).all()), False
    rows = list(conn.execute(query.limit(limit + 1)).all())
    return rows[:limit], len(rows) > limit


def _micros(at: datetime) -> int:
    """A cursor's time: microseconds since the epoch (exact, unlike a float)."""
    return (as_utc(at) - _EPOCH) // timedelta(microseconds=1)


def _from_micros(micros: int, token: str, what: str) -> datetime:
    """The time :func:`_micros` wrote in ``token``; :class:`ValueError` if out of range."""
    try:
        return _EPOCH + timedelta(microseconds=micros)
    except OverflowError:
        raise ValueError(f"{token!r} is not {what}: its time is out of range") from None


@dataclass(frozen=True, eq=False)
class WindowPage:
    """Windows in the order of :meth:`Repository.windows`, at most as many as asked for;
    ``next`` is the key to pass as ``after`` for the windows that follow (``None``: there are
    none)."""

    windows: list[StoredWindow]
    next: WindowKey | None = None


@dataclass(frozen=True, order=True)
class NewestKey:
    """Where an alert or a recalibration stands in its list, newest first -- its time
    (``opened_at``, ``created_at``), then its id, both descending -- and so the cursor of a
    page of them: the next page holds the rows after (older than) this one.  :meth:`token`
    writes it as text (``time-in-µs.id``, URL-safe), :meth:`parse` reads it back."""

    at: datetime
    id: int

    def token(self) -> str:
        return f"{_micros(self.at)}.{self.id}"

    @classmethod
    def parse(cls, token: str) -> NewestKey:
        """The key :meth:`token` wrote; :class:`ValueError` for any other text."""
        parts = token.split(".")
        if len(parts) != 2 or not all(_KEY_PART.fullmatch(p) for p in parts):
            raise ValueError(f"{token!r} is not a list key (time.id)")
        micros, row_id = (int(p) for p in parts)
        if not -(2**63) <= row_id < 2**63:  # the column's range (SQLite: a 500 beyond it)
            raise ValueError(f"{token!r} is not a list key: its id is out of range")
        return cls(_from_micros(micros, token, "a list key"), row_id)


@dataclass(frozen=True, eq=False)
class AlertPage:
    """Alerts in the order of :meth:`Repository.alerts` (newest first), at most as many as
    asked for; ``next`` is the key to pass as ``after`` for the alerts that follow (``None``:
    there are none)."""

    alerts: list[AlertInfo]
    next: NewestKey | None = None


@dataclass(frozen=True, eq=False)
class RecalibrationPage:
    """Recalibrations in the order of :meth:`Repository.recalibrations` (newest first), at
    most as many as asked for; ``next`` as :class:`AlertPage`'s."""

    recalibrations: list[RecalibrationInfo]
    next: NewestKey | None = None


@dataclass(frozen=True, eq=False)
class StoredReservoir:
    """A reservoir of one layer's per-sample channel means, read from the store.

    ``kind`` is ``profile`` (a reference profile's reservoir), ``warmup`` (pooled from the
    windows of the warm-up that formed the drift baseline) or ``production`` (pooled from the
    windows of a time range).  ``windows`` counts the windows pooled (0 for a profile) and
    ``start``/``end`` span them.
    """

    model: str
    version: str
    layer: str
    kind: str
    reservoir: Reservoir
    windows: int = 0
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True)
class LayerTotals:
    """Monotonic totals of one layer.  ``batch_size_buckets`` pairs an upper bound (``None``
    for +Inf) with the measured batches of that bucket (not cumulative); ``measured_samples``
    is the sum of their sizes (the histogram's ``_sum``)."""

    model: str
    version: str
    layer: str
    windows: int
    samples: int
    batches: int
    nonfinite: int
    measured_samples: int
    batch_size_buckets: tuple[tuple[int | None, int], ...]


@dataclass(frozen=True)
class SourceInfo:
    """A monitor (replica) that reported for a model version, and its last account of
    itself: ``drift_config`` is the :class:`DriftConfig` that decided its last window's flags
    (``None`` when that window did not carry one: a monitor of an earlier bnwatch, or a source
    whose last window was stored before migration 0008)."""

    model: str
    version: str
    source: str
    first_seen: datetime
    last_window_end: datetime
    windows: int
    overhead_ratio: float | None
    windows_dropped: int
    hook_errors: int
    drift_config: DriftConfig | None


def judged_at(sources: Sequence[SourceInfo]) -> DriftConfig | None:
    """The thresholds a model version's windows were judged at, from its ``sources``: the
    :class:`DriftConfig` of the source that reported one most recently (latest
    ``last_window_end``; ties go to the source name, so the answer is stable), or ``None``
    when none did.  Sources that disagree -- a replica restarted with other thresholds, an old
    bnwatch that sends none -- are not reconciled here: the newest wins, and a caller that
    shows the result compares it with each source's ``drift_config`` to say they differ."""
    reported = [s for s in sources if s.drift_config is not None]
    if not reported:
        return None
    newest = max(reported, key=lambda s: (s.last_window_end, s.source))
    return newest.drift_config


@dataclass(frozen=True)
class RecalibrationCount:
    """How many recalibrations of a model version have a status, and when the oldest of them
    was recorded."""

    model: str
    version: str
    status: str
    count: int
    oldest: datetime


@dataclass(frozen=True)
class AlertInfo:
    id: int
    model: str
    version: str
    layer: str | None
    kind: str
    state: str
    opened_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None
    acknowledged_at: datetime | None
    values: Mapping[str, Any]


@dataclass(frozen=True)
class RecalibrationInfo:
    id: int
    model: str
    version: str
    alert_id: int | None
    status: str
    method: str
    created_at: datetime
    finished_at: datetime | None
    outcome: Mapping[str, Any] | None


@dataclass(frozen=True)
class RecalibrationClaim:
    """What :meth:`Repository.claim_recalibration` decided.

    Attributes:
        recalibration_id: the ``pending`` recalibration it recorded, or ``None`` if refused.
        refused: ``None`` (claimed), ``"alert"`` (the alert already has a recalibration that
            did not fail), ``"daily_cap"`` or ``"cooldown"``.
        recent: recalibrations of the model version started in the 24 hours before ``now``
            (not counting the one just claimed).
        last_started: when the model version's latest recalibration before this claim started.
    """

    recalibration_id: int | None
    refused: str | None
    recent: int
    last_started: datetime | None


@dataclass(frozen=True)
class RecalibrationRequest:
    """What :meth:`Repository.request_recalibration` did.

    Attributes:
        recalibration: the request it recorded (``queued``), or the one that was already
            waiting for the model version (then nothing was recorded).
        queued: whether this call recorded a request.
    """

    recalibration: RecalibrationInfo
    queued: bool


@dataclass
class _Ids:
    models: dict[tuple[str, str], int] = field(default_factory=dict)
    layers: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)  # id, channels
    refs: dict[tuple[int, str, str], int] = field(default_factory=dict)
    # (layer id, kind, id(arrays)) -> (reference id, the arrays, kept alive so the id is theirs)
    by_identity: dict[tuple[int, str, int], tuple[int, object]] = field(default_factory=dict)


@dataclass(frozen=True)
class WrittenWindows:
    """What :meth:`Repository.store_windows` did: ``windows`` stored, ``duplicates`` (the
    other records: already stored or merged, repeated in the batch, or stored by a concurrent
    writer) and the layer ``rows`` inserted."""

    windows: int
    duplicates: int
    rows: int


# --------------------------------------------------------------------------------------------
# The repository
# --------------------------------------------------------------------------------------------
class Repository:
    """Reads and writes bnwatch's tables through one engine (thread-safe like the engine).

    Every time it takes (``start``, ``end``, ``since``, ``now``...) may have any offset; a
    naive ``datetime`` is taken to be UTC, whatever the database's time zone.  Every time it
    returns is aware, in UTC.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ids = _Ids()

    # -- writes --------------------------------------------------------------------------
    def write_windows(self, records: Sequence[WindowRecord]) -> int:
        """Store closed windows in one transaction; returns the layer-windows inserted.

        Raises:
            ChannelMismatchError: a layer's channel count differs from the stored layer
                (attribute ``index`` on the error: which record); nothing is written.
            UnstorableWindowError: a record the store cannot hold (:func:`check_storable`;
                ``index`` too); nothing is written.
        """
        return self.store_windows(records).rows

    def store_windows(self, records: Sequence[WindowRecord]) -> WrittenWindows:
        """:meth:`write_windows`, telling windows from rows: how many of ``records`` this
        transaction stored (claimed), the rest being duplicates -- stored before, merged by
        compaction, repeated in ``records``, or stored meanwhile by a concurrent writer.  What
        a writer that counts windows needs (rows / layers is wrong when records differ in
        their layers).  Raises what :meth:`write_windows` raises."""
        if not records:
            return WrittenWindows(0, 0, 0)
        check_storable(records)
        new = _Ids()
        with self.engine.begin() as conn:
            resolved = []
            for index, record in enumerate(records):
                model_id = self._model_id(conn, record.model, record.version, new)
                layer_ids = self._layer_ids(conn, model_id, record, new, index)
                resolved.append((record, model_id, layer_ids))
            fresh = self._not_stored(conn, resolved)
            # references first: no query can run on the connection once COPY has begun; in
            # layer-id order (see _ref_id), whatever order the records list their layers in
            todo = sorted(
                (layer_ids[name], i, name)
                for i, (record, _, layer_ids) in enumerate(fresh)
                for name in record.reports
            )
            refs: dict[tuple[int, str], tuple[int | None, int | None]] = {}
            for layer_id, i, name in todo:
                report = fresh[i][0].reports[name]
                refs[i, name] = (
                    self._running_ref(conn, layer_id, report, new),
                    self._baseline_ref(conn, layer_id, report, new),
                )
            planned: list[list[tuple[LayerReport, int, int | None, int | None]]] = [
                [
                    (report, layer_ids[name], *refs[i, name])
                    for name, report in record.reports.items()
                ]
                for i, (record, _, layer_ids) in enumerate(fresh)
            ]

            def row(i: int, k: int) -> dict[str, Any]:
                """The ``windows`` row of record ``i``'s ``k``-th layer (encoded when made)."""
                record, model_id, _ = fresh[i]
                report, layer_id, running, baseline = planned[i][k]
                return window_row(record, report, model_id, layer_id, running, baseline)

            # Claim each record with its first row (a short INSERT ... RETURNING): a concurrent
            # writer of the same window blocks on the unique index and then claims nothing,
            # so a window -- its rows, totals and source counts -- is stored exactly once.
            table: sa.Table = Window.__table__  # type: ignore[assignment]
            firsts = [row(i, 0) for i in range(len(fresh))]
            claimed = set(_insert_ignore_returning(conn, table, firsts))
            mine = [i for i, first in enumerate(firsts) if first["uid"] in claimed]

            def rest() -> Iterator[dict[str, Any]]:
                """The other rows of the claimed records, made one at a time."""
                return (row(i, k) for i in mine for k in range(1, len(planned[i])))

            inserted = len(mine) + _insert_claimed(conn, table, rest)
            _add_totals(conn, [(fresh[i][0], fresh[i][2]) for i in mine])
            _add_sources(conn, [(fresh[i][0], fresh[i][1]) for i in mine])
        self._ids.models.update(new.models)
        self._ids.layers.update(new.layers)
        self._ids.refs.update(new.refs)
        self._ids.by_identity.update(new.by_identity)
        while len(self._ids.by_identity) > IDENTITY_CACHE:  # the oldest go first
            del self._ids.by_identity[next(iter(self._ids.by_identity))]
        return WrittenWindows(len(mine), len(records) - len(mine), inserted)

    @staticmethod
    def _not_stored(
        conn: Connection, resolved: list[tuple[WindowRecord, int, dict[str, int]]]
    ) -> list[tuple[WindowRecord, int, dict[str, int]]]:
        """The records whose windows are not stored yet (a retried delivery is a no-op).

        A window is stored when its uid is, or -- once compaction merged it away -- when
        compaction recorded its uid (``compacted_windows``): a re-delivery that late (a
        spooled batch whose answer was lost, sent again after a restart) would otherwise count
        its samples twice.  A window never stored whose end falls in a rollup (spooled during
        an outage, delivered after its hour was compacted) is new: it is stored raw, and the
        next compaction merges it into that rollup.  Rollups made before migration 0011 left
        no uids (``merged_uids`` false): a window ending in one of its layer and source is
        taken for one merged into it, as it was then.
        """
        layer_ids = {i for _, _, ids in resolved for i in ids.values()}
        uids = {r.uid for r, _, _ in resolved}
        if not layer_ids:
            return []
        stored = set(
            conn.execute(
                sa.select(Window.uid)
                .where(Window.layer_id.in_(layer_ids), Window.uid.in_(uids))
                .distinct()
            ).scalars()
        )
        model_ids = {model_id for _, model_id, _ in resolved}
        merged = {
            (int(model_id), str(uid))
            for model_id, uid in conn.execute(
                sa.select(CompactedWindow.model_id, CompactedWindow.uid).where(
                    CompactedWindow.model_id.in_(model_ids), CompactedWindow.uid.in_(uids)
                )
            )
        }
        ends = [_to_utc(r.end) for r, _, _ in resolved]
        rolled: dict[tuple[int, str], list[tuple[datetime, datetime]]] = defaultdict(list)
        for layer_id, source, start, end in conn.execute(
            sa.select(Window.layer_id, Window.source, Window.start, Window.end).where(
                Window.layer_id.in_(layer_ids),
                Window.resolution_seconds > 0,
                Window.merged_uids.is_(False),  # made before 0011: no uids to tell by
                Window.end >= min(ends),
                Window.start < max(ends),
            )
        ):
            rolled[(int(layer_id), str(source))].append((as_utc(start), as_utc(end)))

        def compacted(record: WindowRecord, ids: Mapping[str, int]) -> bool:
            end = as_utc(record.end)
            return any(
                start < end <= stop
                for i in ids.values()
                for start, stop in rolled.get((i, record.source), ())
            )

        seen: set[str] = set()
        out = []
        for item in resolved:
            uid = item[0].uid
            if (
                uid not in stored
                and uid not in seen
                and (item[1], uid) not in merged
                and not compacted(item[0], item[2])
            ):
                seen.add(uid)
                out.append(item)
        return out

    def _model_id(self, conn: Connection, name: str, version: str, new: _Ids) -> int:
        key = (name, version)
        found = self._ids.models.get(key) or new.models.get(key)
        if found is not None:
            return found
        _insert_ignore(
            conn,
            Model.__table__,  # type: ignore[arg-type]
            [{"name": name, "version": version, "created_at": utcnow()}],
        )
        model_id = conn.execute(
            sa.select(Model.id).where(Model.name == name, Model.version == version)
        ).scalar_one()
        new.models[key] = int(model_id)
        return int(model_id)

    def _stored_model_id(self, conn: Connection, name: str, version: str) -> int | None:
        """The id of a model version already stored, or ``None`` (nothing is recorded: for
        reads and for checks made before a lock is taken)."""
        found = self._ids.models.get((name, version))
        if found is not None:
            return found
        model_id = conn.execute(
            sa.select(Model.id).where(Model.name == name, Model.version == version)
        ).scalar_one_or_none()
        return None if model_id is None else int(model_id)

    def _layer_ids(
        self, conn: Connection, model_id: int, record: WindowRecord, new: _Ids, index: int
    ) -> dict[str, int]:
        out: dict[str, int] = {}
        missing: list[LayerReport] = []
        for name, report in record.reports.items():
            known = self._ids.layers.get((model_id, name)) or new.layers.get((model_id, name))
            if known is None:
                missing.append(report)
            else:
                out[name] = self._checked(record, name, known, report.channels, index)
        if missing:
            _insert_ignore(
                conn,
                Layer.__table__,  # type: ignore[arg-type]
                [
                    {
                        "model_id": model_id,
                        "name": r.layer,
                        "kind": r.kind,
                        "channels": r.channels,
                        "depth": r.depth,
                    }
                    for r in missing
                ],
            )
            stored = conn.execute(
                sa.select(Layer.name, Layer.id, Layer.channels).where(
                    Layer.model_id == model_id, Layer.name.in_([r.layer for r in missing])
                )
            ).all()
            for lname, lid, channels in stored:
                new.layers[(model_id, lname)] = (int(lid), int(channels))
            for r in missing:
                known = new.layers[(model_id, r.layer)]
                out[r.layer] = self._checked(record, r.layer, known, r.channels, index)
        return out

    @staticmethod
    def _checked(
        record: WindowRecord, name: str, known: tuple[int, int], channels: int, index: int
    ) -> int:
        layer_id, stored = known
        if stored != channels:
            err = ChannelMismatchError(record.model, record.version, name, stored, channels)
            err.index = index  # type: ignore[attr-defined]
            raise err
        return layer_id

    def _ref_id(
        self,
        conn: Connection,
        layer_id: int,
        kind: str,
        eps: float,
        mean_var: bytes,
        moments: bytes | None,
        new: _Ids,
        lineage: Mapping[str, Any] | None = None,
        parent_id: int | None = None,
        reservoir: bytes | None = None,
        reservoir_seen: int | None = None,
        renew: bool = False,
    ) -> int:
        """The id of the layer's reference of ``kind`` with these arrays, stored as its newest
        version when new.  References are deduplicated by digest, so arrays stored before
        keep their row; with ``renew`` (a profile uploaded) that row becomes the newest
        version again, with this upload's time and lineage -- otherwise re-uploading an
        earlier profile (P1, P2, P1) left P2 the newest, served to every monitor."""
        digest = _digest(mean_var, moments or b"", reservoir or b"")
        key = (layer_id, kind, digest)
        found = self._ids.refs.get(key) or new.refs.get(key)
        if found is not None and not renew:
            return found
        # the next version is counted under a lock, so that two writers (a profile uploaded
        # while a monitor stores windows) cannot both take it: on PostgreSQL the layer's row
        # (FOR NO KEY UPDATE, which window inserts referencing it do not wait for), on SQLite
        # the file's write lock, taken before the versions are read.  Writers of several
        # layers' references call this in layer-id order: two profiles listing the same layers
        # in different orders, uploaded at once, each held a row the other waited for, and
        # PostgreSQL aborted one (DeadlockDetected, a 503)
        if conn.dialect.name == "postgresql":
            conn.execute(
                sa.select(Layer.id).where(Layer.id == layer_id).with_for_update(key_share=True)
            )
        else:
            lock_for_writing(conn)
        # the highest, not the count: a renewed reference skips versions
        newest = conn.execute(
            sa.select(sa.func.coalesce(sa.func.max(Ref.version), 0)).where(
                Ref.layer_id == layer_id, Ref.kind == kind
            )
        ).scalar_one()
        version = int(newest) + 1
        now = utcnow()
        _insert_ignore(
            conn,
            Ref.__table__,  # type: ignore[arg-type]
            [
                {
                    "layer_id": layer_id,
                    "kind": kind,
                    "version": version,
                    "digest": digest,
                    "created_at": now,
                    "eps": eps,
                    "mean_var": mean_var,
                    "moments": moments,
                    "parent_id": parent_id,
                    "lineage": dict(lineage) if lineage else None,
                    "reservoir": reservoir,
                    "reservoir_seen": reservoir_seen,
                }
            ],
        )
        ref_id, stored_version, stored_lineage = conn.execute(
            sa.select(Ref.id, Ref.version, Ref.lineage).where(
                Ref.layer_id == layer_id, Ref.kind == kind, Ref.digest == digest
            )
        ).one()
        uploaded = dict(lineage) if lineage else None
        # renewed when stored before and another one since -- or when already the newest but
        # of an earlier upload: a profile is served as the layers of its newest upload, so a
        # layer recorded again bit for bit (a fine-tuned head, the rest unchanged) must be
        # dated by this upload, or only the changed layers would be served
        if renew and (stored_version < newest or stored_lineage != uploaded):
            conn.execute(
                sa.update(Ref)
                .where(Ref.id == ref_id)
                .values(
                    version=version,
                    created_at=now,
                    eps=eps,
                    lineage=uploaded,
                    reservoir_seen=reservoir_seen,
                )
            )
        new.refs[key] = int(ref_id)
        return int(ref_id)

    def _known(self, new: _Ids, key: tuple[int, str, int]) -> int | None:
        """A reference id remembered for these very arrays (a monitor sends the same
        reference objects window after window: encoding and hashing them again would cost
        more than storing the window)."""
        hit = self._ids.by_identity.get(key) or new.by_identity.get(key)
        return hit[0] if hit is not None else None

    def _running_ref(
        self, conn: Connection, layer_id: int, report: LayerReport, new: _Ids
    ) -> int | None:
        if not np.isfinite(report.ref_mean).any():
            return None
        key = (layer_id, "running", id(report.ref_mean))
        known = self._known(new, key)
        if known is not None:
            return known
        blob = encode_arrays(np.stack([report.ref_mean, report.ref_var]))
        ref_id = self._ref_id(conn, layer_id, "running", report.eps, blob, None, new)
        new.by_identity[key] = (ref_id, report.ref_mean)
        return ref_id

    def _baseline_ref(
        self, conn: Connection, layer_id: int, report: LayerReport, new: _Ids
    ) -> int | None:
        base = report.baseline_moments
        if base is None:
            return None
        kind = report.baseline if report.baseline in ("profile", "warmup") else "baseline"
        key = (layer_id, kind, id(base))
        known = self._known(new, key)
        if known is not None:
            return known
        blob = encode_arrays(np.stack([base.mean, base.var]))
        moments = encode_moments(base)
        stored = self._stored_profile(conn, layer_id, blob, moments) if kind == "profile" else None
        ref_id = (
            stored
            if stored is not None
            else self._ref_id(conn, layer_id, kind, report.eps, blob, moments, new)
        )
        new.by_identity[key] = (ref_id, base)
        return ref_id

    @staticmethod
    def _stored_profile(
        conn: Connection, layer_id: int, mean_var: bytes, moments: bytes
    ) -> int | None:
        """The newest stored profile of the layer with exactly these statistics, if any.

        A window judged against a profile carries the profile's moments but not its reservoir
        (which is part of a reference's digest): without this, every such window would store
        the profile a second time, reservoir-less, as a newer ``profile`` reference.
        """
        found = conn.execute(
            sa.select(Ref.id)
            .where(
                Ref.layer_id == layer_id,
                Ref.kind == "profile",
                Ref.mean_var == mean_var,
                Ref.moments == moments,
            )
            .order_by(Ref.version.desc(), Ref.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        return None if found is None else int(found)

    def write_profile(self, profile: Profile) -> dict[str, int]:
        """Store a reference profile (kind ``profile``); returns layer name -> reference id."""
        new = _Ids()
        with self.engine.begin() as conn:
            model_id = self._model_id(conn, profile.name, profile.version, new)
            missing = [
                {
                    "model_id": model_id,
                    "name": name,
                    "kind": lp.kind,
                    "channels": lp.channels,
                    "depth": depth,
                }
                for depth, (name, lp) in enumerate(profile.layers.items())
            ]
            _insert_ignore(conn, Layer.__table__, missing)  # type: ignore[arg-type]
            stored = dict(
                (name, (int(lid), int(ch)))
                for name, lid, ch in conn.execute(
                    sa.select(Layer.name, Layer.id, Layer.channels).where(
                        Layer.model_id == model_id
                    )
                ).all()
            )
            for name, lp in profile.layers.items():
                if stored[name][1] != lp.channels:
                    raise ChannelMismatchError(
                        profile.name, profile.version, name, stored[name][1], lp.channels, "profile"
                    )
            ids: dict[str, int] = {}
            for name, lp in sorted(profile.layers.items(), key=lambda kv: stored[kv[0]][0]):
                layer_id = stored[name][0]  # in layer-id order: see _ref_id
                m = lp.stats.moments
                st = lp.stats
                ids[name] = self._ref_id(
                    conn,
                    layer_id,
                    "profile",
                    lp.eps,
                    encode_arrays(np.stack([m.mean, m.var])),
                    encode_moments(m),
                    new,
                    lineage={
                        "created": profile.created.isoformat(),
                        "n_batches": st.n_batches,
                        "batch_sizes": {str(k): v for k, v in st.batch_sizes.items()},
                        "samples_seen": st.samples_seen,
                    },
                    reservoir=encode_arrays(lp.reservoir.rows, dtype="<f4"),
                    reservoir_seen=lp.reservoir.seen,
                    renew=True,  # the profile uploaded last is the one served
                )
            out = {name: ids[name] for name in profile.layers}
        self._ids.models.update(new.models)
        self._ids.refs.update(new.refs)
        return out

    def load_profile(self, model: str, version: str) -> Profile | None:
        """The newest stored reference profile of a model version (``None`` if there is none).

        Only references a profile upload stored (:meth:`write_profile`) are profiles: they
        carry a reservoir (possibly of no rows) and the recording's lineage.  A window judged
        against a profile that was never stored keeps the moments it was judged against as a
        reservoir-less ``profile`` reference (its baseline), which is no profile to serve.

        The newest upload is the reference uploaded last (re-uploading an earlier profile
        renews its references); served are that upload's layers alone -- the references
        whose lineage holds its recording time -- each the newest of its layer, dated when
        the profile was recorded.  A layer an earlier upload recorded and the newest did not
        is not served with it.
        """
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            heads = conn.execute(
                sa.select(Ref.id, Ref.version, Ref.created_at, Ref.lineage, Layer.id)
                .join(Layer, Layer.id == Ref.layer_id)
                .where(
                    Layer.model_id == m.id,
                    Ref.kind == "profile",
                    Ref.reservoir.is_not(None),  # stored by write_profile, not a window
                )
            ).all()
            if not heads:
                return None
            newest = max(heads, key=lambda h: (as_utc(h[2]), h[1], h[0]))
            upload = _recorded(newest[3])
            chosen: dict[int, tuple[int, int]] = {}  # layer id -> (version, ref id)
            for ref_id, ref_version, _, lineage, layer_id in heads:
                if _recorded(lineage) == upload:
                    chosen[layer_id] = max(chosen.get(layer_id, (-1, -1)), (ref_version, ref_id))
            rows = conn.execute(
                sa.select(Ref, Layer)
                .join(Layer, Layer.id == Ref.layer_id)
                .where(Ref.id.in_([ref_id for _, ref_id in chosen.values()]))
                .order_by(Layer.depth, Layer.id)
            ).all()
        layers: dict[str, LayerProfile] = {}
        for ref, layer in rows:
            meta = ref.lineage if isinstance(ref.lineage, dict) else {}
            moments = decode_moments(ref.moments) if ref.moments else None
            if moments is None:
                continue
            rows_ = decode_arrays(ref.reservoir) if ref.reservoir else np.empty((0, layer.channels))
            layers[layer.name] = LayerProfile(
                layer=layer.name,
                kind=layer.kind,
                eps=ref.eps,
                stats=LayerStats(
                    moments=moments,
                    batch_sizes={int(k): int(v) for k, v in meta.get("batch_sizes", {}).items()},
                    n_batches=int(meta.get("n_batches", 0)),
                    batches_seen=int(meta.get("n_batches", 0)),
                    samples_seen=int(meta.get("samples_seen", moments.n_samples)),
                ),
                reservoir=Reservoir.from_rows(
                    rows_, int(ref.reservoir_seen or rows_.shape[0]), max(1, rows_.shape[0])
                ),
                running_mean=None,
                running_var=None,
            )
        created = _recorded_at(upload) or as_utc(newest[2])
        return Profile(name=model, version=version, created=created, layers=layers)

    # -- recalibrations ----------------------------------------------------------------------
    def start_recalibration(
        self, model: str, version: str, *, method: str, alert_id: int | None = None
    ) -> int:
        """Record a triggered recalibration (status ``pending``); returns its id.

        Unconditional: a recalibration requested by hand (the dashboard) goes through
        :meth:`request_recalibration`, which records none while another request waits."""
        new = _Ids()
        with self.engine.begin() as conn:
            model_id = self._model_id(conn, model, version, new)
            rid = _insert_pending(conn, model_id, alert_id, method, utcnow())
        self._ids.models.update(new.models)
        return rid

    def finish_recalibration(
        self,
        recalibration_id: int,
        *,
        status: str,
        outcome: Mapping[str, Any],
        buffers: Mapping[str, tuple[Any, Any, float]] | None = None,
        unknown_layers: Literal["skip", "error"] = "skip",
    ) -> RecalibrationInfo:
        """Close a pending recalibration: ``applied``, ``rejected`` or ``failed``, with its outcome.

        ``buffers`` (layer -> (running_mean, running_var, eps); only with ``applied``) are
        stored as references of kind ``recalibrated``, the newest version of their layer (also
        when the same statistics were stored before), each with its lineage: the
        recalibration, its alert, the method that ran (``outcome["method"]``, else the
        recalibration's), how it was ``requested`` (the recalibration's method: a trigger's
        action, or what a request named), ``outcome["prior_strength"]`` when there is one,
        ``outcome["samples"]`` and ``outcome["data"]``
        (what the statistics were estimated on, as the caller describes it: the monitor's
        kept inputs and when they arrived, ``bnwatch recalibrate``'s ``--data``).  The
        outcome is stored with ``references`` (layer -> reference id) added.

        Safe for remote callers: one transaction, all or nothing.  Every buffer is checked
        against the stored layers before anything is written, and the status changes only
        from ``pending`` (``UPDATE ... WHERE id = :id AND status = 'pending'``, its row count
        checked), so of two concurrent reports exactly one wins; the other raises
        :class:`RecalibrationStateError` and writes nothing.

        ``status="notified"`` is for in-process trigger actions that only tell someone (a
        callback that returns ``None``): nothing was recalibrated, and the trigger is done.

        ``status="pending"`` is for in-process actions that hand the work on (a delivered
        webhook): it records their outcome (the URL, the HTTP status) and leaves the
        recalibration pending.  When the receiver has already reported its decision -- it may
        answer before the webhook's HTTP request returns -- that decision stays as it is.

        Args:
            unknown_layers: buffers of a layer that is not stored for the model version are
                ``"skip"``-ped -- for in-process triggers: a model watched with ``include`` /
                ``exclude`` is recalibrated whole; the skipped names are listed in the stored
                outcome as ``skipped_layers`` -- or refused (``"error"``, for reports from
                elsewhere).

        Returns:
            The recalibration as stored now.

        Raises:
            RecalibrationNotFoundError: no recalibration ``recalibration_id`` is stored.
            RecalibrationStateError: it is no longer pending (the error names its status).
            RecalibrationBuffersError: a layer's buffers do not fit (nothing is written): an
                unknown layer (with ``unknown_layers="error"``), another channel count than
                the stored layer, running_mean and running_var of different lengths,
                non-finite values, a negative variance, an eps that is not finite and > 0.
            ConfigError: an unknown ``status``, or ``buffers`` with another status than
                ``applied``.
        """
        if status not in ("applied", "rejected", "failed", "notified", "pending"):
            raise ConfigError(
                "status",
                status,
                "'applied', 'rejected' or 'failed' ('pending' only to record a hand-off, "
                "'notified' for a trigger whose action only told someone)",
            )
        if buffers and status != "applied":
            raise ConfigError(
                "buffers",
                sorted(buffers),
                "None unless status is 'applied' (only statistics in use are stored)",
            )
        if unknown_layers not in ("skip", "error"):
            raise ConfigError("unknown_layers", unknown_layers, "'skip' or 'error'")
        outcome = _json_outcome(outcome)
        arrays = {
            name: self._recalibrated_arrays(name, mean, var, eps)
            for name, (mean, var, eps) in (buffers or {}).items()
        }
        new = _Ids()
        this = Recalibration.id == recalibration_id
        with self.engine.begin() as conn:
            rec = conn.execute(
                sa.select(
                    Recalibration.model_id,
                    Recalibration.alert_id,
                    Recalibration.method,
                    Recalibration.status,
                ).where(this)
            ).one_or_none()
            if rec is None:
                raise RecalibrationNotFoundError(recalibration_id)
            still_pending = sa.and_(this, Recalibration.status == "pending")
            if status == "pending":
                # a no-op when the receiver reported first: its decision stays
                conn.execute(
                    sa.update(Recalibration)
                    .where(still_pending)
                    .values(outcome={**outcome, "references": {}})
                )
                return self._recalibration_info(conn, recalibration_id)
            if rec.status != "pending":
                raise RecalibrationStateError(recalibration_id, rec.status)
            stored: dict[str, tuple[int, int]] = {}
            if arrays:
                stored = {
                    str(name): (int(lid), int(channels))
                    for name, lid, channels in conn.execute(
                        sa.select(Layer.name, Layer.id, Layer.channels).where(
                            Layer.model_id == rec.model_id
                        )
                    ).all()
                }
            skipped = [name for name in arrays if name not in stored]
            if skipped and unknown_layers == "error":
                model_name, model_version = conn.execute(
                    sa.select(Model.name, Model.version).where(Model.id == rec.model_id)
                ).one()
                raise RecalibrationBuffersError(
                    skipped[0],
                    f"layer {skipped[0]!r} is not a stored layer of {model_name}@{model_version} "
                    f"({len(stored)} stored layer(s)"
                    + (f": {', '.join(sorted(stored)[:10])}" if stored else "")
                    + ("..." if len(stored) > 10 else "")
                    + "); send buffers of the watched layers only",
                    expected=sorted(stored),
                    found=skipped[0],
                )
            for name, (mean, _var, _eps) in arrays.items():
                if name in stored and stored[name][1] != mean.shape[0]:
                    raise RecalibrationBuffersError(
                        name,
                        f"layer {name!r} has {stored[name][1]} channels in the store but its "
                        f"buffers have {mean.shape[0]}; a changed architecture needs a new "
                        "model version",
                        field="running_mean",
                        expected=stored[name][1],
                        found=mean.shape[0],
                    )
            claimed = conn.execute(
                sa.update(Recalibration)
                .where(still_pending)
                .values(status=status, finished_at=utcnow())
            ).rowcount
            if claimed != 1:  # finished concurrently since the read above
                now = conn.execute(sa.select(Recalibration.status).where(this)).scalar_one()
                raise RecalibrationStateError(recalibration_id, str(now))
            # the method that ran (a result's summary says it: a request for "precise" may be
            # answered with --method mix) and how the recalibration was asked for (the
            # trigger's action, or the method a request named)
            ran = outcome.get("method")
            lineage = {
                "recalibration_id": recalibration_id,
                "alert_id": rec.alert_id,
                "method": ran if isinstance(ran, str) and ran else rec.method,
                "requested": rec.method,
                "samples": outcome.get("samples"),
            }
            if outcome.get("prior_strength") is not None:
                lineage["prior_strength"] = outcome["prior_strength"]
            if outcome.get("data") is not None:
                lineage["data"] = outcome["data"]
            ref_ids: dict[str, int] = {}
            for name, (mean, var, eps) in sorted(  # in layer-id order: see _ref_id
                ((n, a) for n, a in arrays.items() if n in stored), key=lambda na: stored[na[0]][0]
            ):
                ref_ids[name] = self._ref_id(
                    conn,
                    stored[name][0],
                    "recalibrated",
                    eps,
                    encode_arrays(np.stack([mean, var])),
                    None,
                    new,
                    lineage=json_ready(lineage),
                    # statistics applied again (A, B, then A) are the newest version once more,
                    # with this recalibration's lineage: else B stayed the newest
                    renew=True,
                )
            # a notification recalibrated nothing: no references to list
            record = outcome if status == "notified" else {**outcome, "references": ref_ids}
            if skipped:
                record["skipped_layers"] = skipped
            conn.execute(sa.update(Recalibration).where(this).values(outcome=record))
            info = self._recalibration_info(conn, recalibration_id)
        self._ids.refs.update(new.refs)
        return info

    @staticmethod
    def _recalibrated_arrays(
        name: str, mean: Any, var: Any, eps: Any
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """One layer's reported buffers as float64 arrays, checked (see
        :meth:`finish_recalibration`)."""
        arrays = []
        for field_name, value in (("running_mean", mean), ("running_var", var)):
            try:
                array = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise RecalibrationBuffersError(
                    name,
                    f"layer {name!r}: {field_name} is not an array of numbers ({err})",
                    field=field_name,
                ) from None
            if array.ndim != 1 or array.shape[0] < 1:
                raise RecalibrationBuffersError(
                    name,
                    f"layer {name!r}: {field_name} must be one value per channel, got shape "
                    f"{array.shape}",
                    field=field_name,
                    expected="[C]",
                    found=array.shape,
                )
            if not np.isfinite(array).all():
                raise RecalibrationBuffersError(
                    name,
                    f"layer {name!r}: {field_name} holds NaN or infinite values",
                    field=field_name,
                )
            arrays.append(array)
        mean_, var_ = arrays
        if var_.shape != mean_.shape:
            raise RecalibrationBuffersError(
                name,
                f"layer {name!r}: running_var has {var_.shape[0]} channels but running_mean "
                f"has {mean_.shape[0]}",
                field="running_var",
                expected=mean_.shape[0],
                found=var_.shape[0],
            )
        if (var_ < 0).any():
            raise RecalibrationBuffersError(
                name,
                f"layer {name!r}: running_var must not be negative (channel "
                f"{int(np.argmax(var_ < 0))} is {float(var_[var_ < 0][0])!r})",
                field="running_var",
            )
        if (
            isinstance(eps, bool)
            or not isinstance(eps, (int, float, np.floating))
            or not 0 < float(eps) < math.inf
        ):
            raise RecalibrationBuffersError(
                name, f"layer {name!r}: eps={eps!r} must be a finite number > 0", field="eps"
            )
        return mean_, var_, float(eps)

    @staticmethod
    def _recalibration_info(conn: Connection, recalibration_id: int) -> RecalibrationInfo:
        """The recalibration ``recalibration_id`` (:class:`RecalibrationNotFoundError` if
        none)."""
        row = conn.execute(
            _recalibration_select().where(Recalibration.id == recalibration_id)
        ).first()
        if row is None:
            raise RecalibrationNotFoundError(recalibration_id)
        return _recalibration_of(row)

    def recent_recalibrations(
        self, model: str, version: str, *, since: datetime
    ) -> tuple[int, datetime | None]:
        """How many recalibrations were started since ``since``, and when the last one was."""
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            count = conn.execute(
                sa.select(sa.func.count())
                .select_from(Recalibration)
                .where(Recalibration.model_id == m.id, Recalibration.created_at >= _to_utc(since))
            ).scalar_one()
            latest = conn.execute(
                sa.select(sa.func.max(Recalibration.created_at)).where(
                    Recalibration.model_id == m.id
                )
            ).scalar_one_or_none()
        return int(count), as_utc(latest) if latest is not None else None

    def claim_recalibration(
        self,
        model: str,
        version: str,
        *,
        method: str,
        alert_id: int | None = None,
        cooldown_seconds: float,
        daily_cap: int,
        now: datetime | None = None,
    ) -> RecalibrationClaim:
        """Record a ``pending`` recalibration only if the limits allow one now -- atomically.

        The limits are those of ``method`` (the trigger's: its action's method, or its class
        name): triggers of different methods on one model version -- a notification callback
        next to ``watch(recalibrate=True)``'s in-process recalibration -- each act on an
        alert, each with its own cooldown and daily cap; they never use up each other's.
        Triggers that must share them (several processes running one trigger) use one method.

        The checks and the insert are one transaction that holds the model version's lock, so
        that processes sharing the database (the workers of ``bnwatch serve``, several
        writers) cannot both pass the checks and both insert: on PostgreSQL the model row is
        locked ``FOR NO KEY UPDATE`` (it serializes claims of one model version without
        blocking the window inserts that reference the row); SQLite takes its write lock up
        front (``BEGIN IMMEDIATE``, waiting up to the busy timeout), which serializes every
        writer of the file.  Refused, in this order, when:

        * ``alert_id`` already has a recalibration of ``method`` that did not fail
          (``alert``);
        * ``daily_cap`` recalibrations of ``method`` of the model version started in the 24
          hours before ``now`` (``daily_cap``);
        * its latest recalibration of ``method`` started less than ``cooldown_seconds``
          before ``now`` (``cooldown``).

        The recalibration's ``created_at`` is ``now`` (default: the current UTC time).

        A claim abandoned by its process (killed while its action ran) holds its alert until
        :meth:`fail_abandoned_claims` records it ``failed``: :meth:`Trigger.claim_open
        <bnwatch.triggers.Trigger.claim_open>` (a service's periodic job, a monitor's triggers
        after each stored batch) calls it first.

        Most claims are refused (a service's periodic job asks again every minute for every
        open alert), so the checks are first read without any lock: a refusal found there is
        returned at once, without waiting for or taking the lock.  That is a refusal the
        locked checks would have made at the moment of that read (each rule refuses on one
        query's answer, and nothing is written), so it changes no claim; only a claim that
        passes them is checked again, and recorded, under the lock.
        """
        now = _to_utc(now) if now is not None else utcnow()
        with self.engine.connect() as conn:
            known = self._stored_model_id(conn, model, version)
            if known is not None:
                refused, recent, last = _claim_refusal(
                    conn, known, alert_id, method, cooldown_seconds, daily_cap, now
                )
                if refused is not None:
                    return RecalibrationClaim(None, refused, recent, last)
        new = _Ids()
        with self.engine.connect() as conn:
            model_id = self._locked_model_id(conn, model, version, new)
            refused, recent, last = _claim_refusal(
                conn, model_id, alert_id, method, cooldown_seconds, daily_cap, now
            )
            rid: int | None = None
            if refused is None:
                # the outcome says who owns it: take_requested hands over requested ones only
                claimed = {"claimed_by": "trigger", "claimed_at": now.isoformat()}
                rid = _insert_pending(conn, model_id, alert_id, method, now, outcome=claimed)
            conn.commit()
        self._ids.models.update(new.models)
        return RecalibrationClaim(rid, refused, int(recent), last)

    def fail_abandoned_claims(
        self,
        *,
        model: str | None = None,
        version: str | None = None,
        now: datetime | None = None,
        older_than: float | None = None,
    ) -> list[int]:
        """Record ``failed`` the trigger claims whose action never recorded anything: still
        ``pending`` with nothing but the claim in their outcome, ``older_than`` seconds after
        they were claimed (:data:`ABANDONED_CLAIM_SECONDS`, 30 minutes); returns their ids.

        A claim is recorded before its action runs; the action's outcome -- or, for a webhook,
        its hand-off (the URL and the HTTP status, still ``pending``) -- replaces it.  One
        whose process was killed meanwhile (``docker compose stop`` past its grace period, a
        kill -9, the host going down) kept its alert from being triggered again, for good.
        Failed, it is retried as any failed trigger is: after the cooldown.  A hand-off that
        was recorded is never touched (its receiver reports back).  ``model``/``version``
        restrict to one model version.  The read finds nothing almost always, and then
        nothing is written (no lock taken).
        """
        now = _to_utc(now) if now is not None else utcnow()
        if older_than is None:
            older_than = ABANDONED_CLAIM_SECONDS
        abandoned = sa.and_(
            Recalibration.status == "pending",
            Recalibration.created_at < now - timedelta(seconds=older_than),
            Recalibration.outcome["claimed_by"].as_string() == "trigger",
            Recalibration.outcome["references"].as_string().is_(None),
        )
        query = sa.select(Recalibration.id).join(Model, Model.id == Recalibration.model_id)
        if model is not None:
            query = query.where(Model.name == model)
        if version is not None:
            query = query.where(Model.version == version)
        with self.engine.connect() as conn:
            ids = [int(i) for i in conn.execute(query.where(abandoned)).scalars()]
        if not ids:
            return []
        minutes = f"{older_than / 60:g} minute{'s' if older_than != 60 else ''}"
        failed: list[int] = []
        with self.engine.begin() as conn:
            for rid in ids:
                # the claim kept in the outcome, with why; only if still abandoned now
                claim = conn.execute(
                    sa.select(Recalibration.outcome).where(Recalibration.id == rid)
                ).scalar_one()
                record = {
                    **(claim or {}),
                    "error": f"abandoned: no outcome was recorded {minutes} after the claim "
                    "(the process that claimed it stopped while its action ran)",
                }
                done = conn.execute(
                    sa.update(Recalibration)
                    .where(Recalibration.id == rid, abandoned)
                    .values(status="failed", finished_at=now, outcome=record)
                ).rowcount
                if done == 1:
                    failed.append(rid)
        for rid in failed:
            logger.warning(
                "bnwatch: recalibration %d recorded failed: abandoned by the process that "
                "claimed it (no outcome %s after the claim)",
                rid,
                minutes,
            )
        return failed

    def _locked_model_id(self, conn: Connection, model: str, version: str, new: _Ids) -> int:
        """The model version's id (recorded if new), with its lock held until ``conn``
        commits: on PostgreSQL the model row ``FOR NO KEY UPDATE`` (it serializes the claims
        and requests of one model version without blocking the window inserts that reference
        the row); on SQLite the file's write lock, taken before anything is read (``BEGIN
        IMMEDIATE``, waiting up to the busy timeout)."""
        lock_for_writing(conn)  # SQLite: before the checks are read
        model_id = self._model_id(conn, model, version, new)
        if conn.dialect.name != "sqlite":
            conn.execute(
                sa.select(Model.id).where(Model.id == model_id).with_for_update(key_share=True)
            ).scalar_one()
        return model_id

    def request_recalibration(
        self, model: str, version: str, *, method: str, alert_id: int | None = None
    ) -> RecalibrationRequest:
        """Record a recalibration requested by hand (the dashboard's "Request a
        recalibration"), unless the model version already has a request waiting -- atomically.

        A request *waits* from when it is recorded until it is taken (:meth:`take_requested`:
        the service's webhook trigger, a monitor with triggers) or finished (``bnwatch
        recalibrate --recalibration ID``): ``pending`` with no outcome yet.  While one waits,
        a second request records nothing -- the waiting one will be carried out, with the
        method and alert it names -- and the waiting one is returned with ``queued=False``:
        a double click, or two operators on two dashboards, record one request.  Once taken,
        a request no longer holds back the next one (it may stay ``pending`` for good if its
        receiver never reports back).

        The check and the insert are one transaction holding the model version's lock, the
        lock :meth:`claim_recalibration` takes, so of racing requests exactly one is recorded.
        """
        new = _Ids()
        with self.engine.connect() as conn:
            model_id = self._locked_model_id(conn, model, version, new)
            waiting = _waiting_request(conn, model_id)
            queued = waiting is None
            if waiting is None:
                rid = _insert_pending(conn, model_id, alert_id, method, utcnow())
                waiting = self._recalibration_info(conn, rid)
            conn.commit()
        self._ids.models.update(new.models)
        return RecalibrationRequest(waiting, queued)

    def waiting_request(self, model: str, version: str) -> RecalibrationInfo | None:
        """The model version's oldest recalibration requested by hand and still waiting to be
        taken (see :meth:`request_recalibration`), or ``None``."""
        with self.engine.connect() as conn:
            model_id = self._stored_model_id(conn, model, version)
            return None if model_id is None else _waiting_request(conn, model_id)

    def take_requested(
        self,
        *,
        model: str | None = None,
        version: str | None = None,
        limit: int = 16,
        now: datetime | None = None,
    ) -> list[tuple[RecalibrationInfo, AlertInfo | None]]:
        """Hand over the recalibrations that were *requested* -- recorded ``pending`` by
        :meth:`request_recalibration` (the dashboard's "Request a recalibration") or
        :meth:`start_recalibration`, and not yet
        given to anyone -- with the alert each names, if any; oldest first, at most ``limit``.

        Each is taken by an atomic ``UPDATE ... WHERE status = 'pending' AND outcome IS NULL``
        that writes ``{"taken_at": ...}`` into its outcome, so of several takers (the workers
        of ``bnwatch serve``, monitors) exactly one gets it.  Trigger claims
        (:meth:`claim_recalibration`) write their outcome when they insert and are never
        taken here.  ``model``/``version`` restrict to one model version.
        """
        check_positive_int("limit", limit)
        stamp = {"taken_at": (_to_utc(now) if now is not None else utcnow()).isoformat()}
        query = _recalibration_select().where(
            Recalibration.status == "pending", Recalibration.outcome.is_(None)
        )
        if model is not None:
            query = query.where(Model.name == model)
        if version is not None:
            query = query.where(Model.version == version)
        with self.engine.connect() as conn:
            candidates = conn.execute(query.order_by(Recalibration.id).limit(limit)).all()
        taken: list[tuple[RecalibrationInfo, AlertInfo | None]] = []
        for row in candidates:
            with self.engine.begin() as conn:
                won = conn.execute(
                    sa.update(Recalibration)
                    .where(
                        Recalibration.id == row.id,
                        Recalibration.status == "pending",
                        Recalibration.outcome.is_(None),
                    )
                    .values(outcome=stamp)
                ).rowcount
            if won != 1:
                continue  # another taker was first
            info = replace(_recalibration_of(row), outcome=dict(stamp))
            found = self.alerts(alert_id=info.alert_id) if info.alert_id is not None else []
            taken.append((info, found[0] if found else None))
        return taken

    # -- reads -----------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        """Every stored model version, newest activity first."""
        with Session(self.engine) as conn:
            layers = (
                sa.select(Layer.model_id, sa.func.count().label("n"))
                .group_by(Layer.model_id)
                .subquery()
            )
            windows = (
                sa.select(
                    Window.model_id,
                    sa.func.count().label("n"),
                    sa.func.max(Window.end).label("last"),
                )
                .group_by(Window.model_id)
                .subquery()
            )
            rows = conn.execute(
                sa.select(Model, layers.c.n, windows.c.n, windows.c.last)
                .outerjoin(layers, layers.c.model_id == Model.id)
                .outerjoin(windows, windows.c.model_id == Model.id)
            ).all()
        out = [
            ModelInfo(
                id=m.id,
                name=m.name,
                version=m.version,
                created_at=as_utc(m.created_at),
                layers=int(nl or 0),
                windows=int(nw or 0),
                last_window_end=as_utc(last) if last is not None else None,
            )
            for m, nl, nw, last in ((r[0], r[1], r[2], r[3]) for r in rows)
        ]
        never = datetime.min.replace(tzinfo=timezone.utc)
        return sorted(out, key=lambda m: (m.last_window_end or never, m.id), reverse=True)

    def _model_row(self, conn: Session, name: str, version: str) -> Model:
        model = conn.execute(
            sa.select(Model).where(Model.name == name, Model.version == version)
        ).scalar_one_or_none()
        if model is None:
            raise KeyError(f"no model {name}@{version} in the store")
        return model

    def layers(self, model: str, version: str) -> list[LayerInfo]:
        """The model version's layers in depth order."""
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            rows = conn.execute(
                sa.select(Layer).where(Layer.model_id == m.id).order_by(Layer.depth, Layer.id)
            ).scalars()
            return [LayerInfo(r.id, r.name, r.kind, r.channels, r.depth) for r in rows]

    def latest_windows(
        self, model: str, version: str, *, with_stats: bool = False
    ) -> list[StoredWindow]:
        """The most recent window of every layer, in depth order."""
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            latest = (
                sa.select(Window.layer_id, sa.func.max(Window.end).label("end"))
                .where(Window.model_id == m.id)
                .group_by(Window.layer_id)
                .subquery()
            )
            query = (
                sa.select(Window, Layer)
                .join(Layer, Layer.id == Window.layer_id)
                .join(
                    latest,
                    sa.and_(latest.c.layer_id == Window.layer_id, latest.c.end == Window.end),
                )
                .order_by(Layer.depth, Layer.id, _WARMING_UP_LAST, Window.id.desc())
            )
            if with_stats:
                query = query.options(undefer(Window.reservoir))
            else:  # the answer holds no per-channel value
                query = query.options(defer(Window.moments))
            rows = conn.execute(query).all()
        seen: set[int] = set()
        out = []
        for w, layer in rows:
            if layer.id in seen:  # two sources closed a window at the same instant
                continue
            seen.add(layer.id)
            out.append(self.to_stored(m, layer, w, with_stats))
        return out

    def windows(
        self,
        model: str,
        version: str,
        *,
        layer: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        source: str | None = None,
        resolution: timedelta | float | None = None,
        with_stats: bool | None = None,
        reservoirs: bool = True,
        config: DriftConfig | None = None,
        limit: int | None = None,
        after: WindowKey | None = None,
    ) -> list[StoredWindow]:
        """Windows whose end lies in ``[start, end)`` (a naive time is UTC), ordered by layer
        depth then time.

        With ``resolution`` (a timedelta or seconds), the windows of each layer are merged
        into buckets of that length aligned to the Unix epoch -- exactly: sufficient
        statistics merge without loss, and the metrics are recomputed on the merged window
        against the stored references, and its flags decided at ``config`` (default: the
        thresholds that decided the stored windows' flags, :meth:`judging`).

        ``with_stats``: whether the windows carry their sufficient statistics (``stats``);
        by default raw windows do not and merged windows do.  Without them the per-channel
        blobs of raw windows are not read at all, and merged windows drop theirs once their
        metrics are decided.  ``reservoirs=False`` leaves the reservoirs out of ``stats``
        (they are read, and merged, only for it): nothing else needs them.  ``limit`` and
        ``after`` read one page: :meth:`window_page`.
        """
        return self.window_page(
            model,
            version,
            layer=layer,
            start=start,
            end=end,
            source=source,
            resolution=resolution,
            with_stats=with_stats,
            reservoirs=reservoirs,
            config=config,
            limit=limit,
            after=after,
        ).windows

    def window_page(
        self,
        model: str,
        version: str,
        *,
        layer: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        source: str | None = None,
        resolution: timedelta | float | None = None,
        with_stats: bool | None = None,
        reservoirs: bool = True,
        config: DriftConfig | None = None,
        limit: int | None = None,
        after: WindowKey | None = None,
    ) -> WindowPage:
        """:meth:`windows`, at most ``limit`` of them (``None``: all), from the first after
        the key ``after`` on; the page's ``next`` is the ``after`` of the next page.

        Raw windows are read a page at a time (keyset pagination on depth, layer, end, id).
        Merged windows are merged as the range streams in, ``MERGE_CHUNK`` rows at a time in
        time order, one bucket at a time -- the layers of a bucket are judged together, so
        every page merges the whole range, but memory holds one bucket's merged statistics
        and the page, not the range.
        """
        if limit is not None:
            check_positive_int("limit", limit)
        keep = with_stats if with_stats is not None else resolution is not None
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            query = self._range(
                sa.select(Window, Layer), m, layer=layer, start=start, end=end, source=source
            )
            if keep and reservoirs:
                query = query.options(undefer(Window.reservoir))
            elif not keep and resolution is None:  # the answer holds no per-channel value
                query = query.options(defer(Window.moments))
            if resolution is None:
                if after is not None:
                    query = query.where(_after(after))
                query = query.order_by(Layer.depth, Layer.id, Window.end, Window.id)
                rows, more = _one_page(conn, query, limit)
                page = [self.to_stored(m, lr, w, keep) for w, lr in rows]
                last = rows[-1] if more else None
                return WindowPage(
                    page,
                    WindowKey(last[1].depth, last[1].id, as_utc(last[0].end), last[0].id)
                    if last is not None
                    else None,
                )
            seconds = _seconds(resolution)
            judged = self.judging(model, version, config)
            count = self._layer_count(conn, m) if layer is not None else None
            rows_in_time = conn.execute(
                query.order_by(Window.end, Layer.depth, Layer.id, Window.id).execution_options(
                    yield_per=MERGE_CHUNK
                )
            )
            kept = _Page(limit, after)
            refs: dict[int, Ref] = {}
            for merged in merge_streamed(
                (
                    (self.to_stored(m, lr, w, True), lr, w.running_ref_id, w.baseline_ref_id)
                    for w, lr in rows_in_time
                ),
                lambda ids: self._refs(conn, refs, ids),
                seconds,
                judged,
                layer_count=count,
            ):
                window = merged.window if keep else replace(merged.window, stats=None)
                kept.add(WindowKey(merged.layer.depth, merged.layer.id, window.end), window)
            return kept.page()

    @staticmethod
    def _refs(conn: Session, known: dict[int, Ref], ids: Iterable[int]) -> dict[int, Ref]:
        """``known`` (a cache of reference rows by id), with the rows of ``ids`` added."""
        missing = sorted({i for i in ids if i not in known})
        for i in range(0, len(missing), 500):
            chunk = missing[i : i + 500]
            known.update(
                (r.id, r) for r in conn.execute(sa.select(Ref).where(Ref.id.in_(chunk))).scalars()
            )
        return known

    @staticmethod
    def _layer_count(conn: Session, model: Model) -> int:
        """How many layers the model version has (one layer's merged windows are judged as
        among all of them)."""
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(Layer).where(Layer.model_id == model.id)
            ).scalar_one()
        )

    @staticmethod
    def _range(
        query: _Query,
        model: Model,
        *,
        layer: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        source: str | None = None,
    ) -> _Query:
        """``query`` (selecting from ``windows``) restricted to one model version's windows
        of ``layer`` and ``source`` whose end lies in ``[start, end)``."""
        query = query.join(Layer, Layer.id == Window.layer_id).where(Window.model_id == model.id)
        if layer is not None:
            query = query.where(Layer.name == layer)
        query = query.where(*_time_bounds(start, end))
        if source is not None:
            query = query.where(Window.source == source)
        return query

    def layer_reports(
        self,
        model: str,
        version: str,
        layer: str,
        *,
        resolution: timedelta | float | None,
        start: datetime | None = None,
        end: datetime | None = None,
        config: DriftConfig | None = None,
    ) -> list[tuple[StoredWindow, LayerReport]]:
        """One layer's windows merged exactly into epoch-aligned buckets of ``resolution``,
        each with its full :class:`LayerReport` (per-channel ``d``, ``log_r``, ``z``, drift
        arrays, batch noise) -- what a per-channel view over time needs.  ``resolution=None``
        merges the whole range into one window (from its first start to its last end).

        Raises:
            KeyError: the model version or the layer is not stored (the message lists the
                layers there are).
        """
        return self.layer_reports_at(
            model, version, layer, resolutions=[resolution], start=start, end=end, config=config
        )[0]

    def layer_reports_at(
        self,
        model: str,
        version: str,
        layer: str,
        *,
        resolutions: Sequence[timedelta | float | None],
        start: datetime | None = None,
        end: datetime | None = None,
        config: DriftConfig | None = None,
    ) -> list[list[tuple[StoredWindow, LayerReport]]]:
        """:meth:`layer_reports` at several resolutions from one read of the windows (e.g.
        buckets for a time axis and ``None`` for the whole range); merged windows are judged
        at ``config`` (default: :meth:`judging`).

        The windows stream in time order, ``MERGE_CHUNK`` rows at a time, into one
        :class:`StreamedMerge` per resolution, so memory holds one bucket's merged statistics
        per resolution and the merged windows made so far, not the range: the whole range is
        one bucket, merged as its windows come.  The result is :func:`merge_groups`' of all
        the windows at once, bit for bit.
        """
        judged = self.judging(model, version, config)
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            known = conn.execute(
                sa.select(Layer.name).where(Layer.model_id == m.id, Layer.name == layer)
            ).scalar_one_or_none()
            if known is None:
                names = conn.execute(
                    sa.select(Layer.name).where(Layer.model_id == m.id).order_by(Layer.depth)
                ).scalars()
                raise KeyError(
                    f"no layer {layer!r} in {model}@{version}; layers: {', '.join(names)}"
                )
            count = self._layer_count(conn, m)
            refs: dict[int, Ref] = {}

            def refs_of(ids: Iterable[int]) -> dict[int, Ref]:
                return self._refs(conn, refs, ids)

            mergers = [
                StreamedMerge(
                    refs_of,
                    _seconds(resolution) if resolution is not None else _WHOLE_RANGE,
                    judged,
                    layer_count=count,
                )
                for resolution in resolutions
            ]
            merged: list[list[Merged]] = [[] for _ in resolutions]
            first: datetime | None = None
            last: datetime | None = None
            query = self._range(sa.select(Window, Layer), m, layer=layer, start=start, end=end)
            rows = conn.execute(
                query.order_by(Window.end, Window.id).execution_options(yield_per=MERGE_CHUNK)
            )
            for w, lr in rows:
                stored = self.to_stored(m, lr, w, True)
                for merging, out in zip(mergers, merged, strict=True):
                    out += merging.add(stored, lr, w.running_ref_id, w.baseline_ref_id)
                first = stored.start if first is None else min(first, stored.start)
                last = stored.end if last is None else max(last, stored.end)
            for merging, out in zip(mergers, merged, strict=True):
                out += merging.close()
        views = []
        for resolution, out in zip(resolutions, merged, strict=True):
            view = [(g.window, g.report) for g in out if g.report is not None]
            if resolution is None and view and first is not None and last is not None:
                view = [(replace(w, start=first, end=last), r) for w, r in view]
            views.append(view)
        return views

    def window_span(
        self,
        model: str,
        version: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        layer: str | None = None,
    ) -> tuple[datetime, datetime, int, float] | None:
        """``(first start, last end, rows, newest window's length in seconds)`` of the
        windows in ``[start, end)`` (one row per layer and window), or ``None`` when there
        are none -- what a time axis needs to choose its resolution (the newest windows are
        the finest: compaction only coarsens old ones; of windows ending together, the
        shortest)."""
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            query = self._range(
                sa.select(
                    sa.func.min(Window.start),
                    sa.func.max(Window.end),
                    sa.func.count(),
                ),
                m,
                layer=layer,
                start=start,
                end=end,
            )
            first, last, count = conn.execute(query).one()
            if not count:
                return None
            latest = conn.execute(
                self._range(sa.select(Window.start, Window.end), m, layer=layer, end=end)
                .order_by(Window.end.desc(), Window.start.desc())
                .limit(1)
            ).one()
        shortest = (as_utc(latest[1]) - as_utc(latest[0])).total_seconds()
        return as_utc(first), as_utc(last), int(count), max(shortest, 1e-3)

    def metric_buckets(
        self,
        model: str,
        version: str,
        *,
        seconds: float | None,
        columns: Sequence[str],
        start: datetime | None = None,
        end: datetime | None = None,
        layer: str | None = None,
    ) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        """Layer metrics aggregated in the database per layer and epoch-aligned time bucket
        of ``seconds`` (``None``: one bucket over the whole range) -- for heatmaps,
        sparklines and per-layer summaries over months of windows without moving every row.

        Returns ``(names, rows)``: ``layer``, ``depth``, ``bucket_start`` (UTC), ``windows``,
        ``samples``, then ``max_<c>`` and ``avg_<c>`` for every column ``c`` of ``columns``
        (flags as 0/1, so ``max`` is "any" and ``avg`` the share of windows).  A window
        belongs to the bucket its end falls in (within a millisecond: bucket boundaries are
        computed in floating point; exact merges are :meth:`windows` with a resolution).
        """
        _check_metric_columns(columns)
        width = _seconds(seconds) if seconds is not None else _WHOLE_RANGE
        bucket = _bucket_expression(self.engine, width)
        aggregates: list[Any] = []
        for c in columns:
            col: Any = getattr(Window, c)
            value = sa.cast(col, sa.Integer) if c in FLAG_METRICS else col
            aggregates += [sa.func.max(value), sa.func.avg(value)]
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            query = self._range(
                sa.select(
                    Layer.name,
                    Layer.depth,
                    bucket,
                    sa.func.count(),
                    sa.func.sum(Window.n_samples),
                    *aggregates,
                ),
                m,
                layer=layer,
                start=start,
                end=end,
            ).group_by(Layer.id, Layer.name, Layer.depth, bucket)
            rows = conn.execute(query.order_by(Layer.depth, Layer.id, bucket)).all()
        names = (
            "layer",
            "depth",
            "bucket_start",
            "windows",
            "samples",
            *(f"{agg}_{c}" for c in columns for agg in ("max", "avg")),
        )
        out = []
        for name, depth, b, n, samples, *values in rows:
            begins = utc_from_timestamp(int(b) * width) if seconds is not None else None
            floats = [None if v is None else float(v) for v in values]
            out.append((name, depth, begins, int(n), int(samples or 0), *floats))
        return names, out

    def window_spans(
        self, *, start: datetime | None = None, end: datetime | None = None
    ) -> dict[tuple[str, str], tuple[datetime, datetime, int, float]]:
        """:meth:`window_span` of every model version with windows in ``[start, end)``, by
        ``(name, version)``, in one query whatever the number of versions (a version without
        any is left out).  Of the newest windows of a version (those ending last), the
        shortest gives the length, as in :meth:`window_span`."""
        bounds = _time_bounds(start, end)
        ranges = (
            sa.select(
                Window.model_id,
                sa.func.min(Window.start).label("first"),
                sa.func.max(Window.end).label("last"),
                sa.func.count().label("rows"),
            )
            .where(*bounds)
            .group_by(Window.model_id)
            .subquery()
        )
        # the newest window before ``end``, whatever ``start`` (as window_span reads it)
        newest = (
            sa.select(Window.model_id, sa.func.max(Window.end).label("end"))
            .where(*_time_bounds(None, end))
            .group_by(Window.model_id)
            .subquery()
        )
        shortest = (
            sa.select(Window.model_id, newest.c.end, sa.func.max(Window.start).label("start"))
            .join(newest, sa.and_(newest.c.model_id == Window.model_id, newest.c.end == Window.end))
            .group_by(Window.model_id, newest.c.end)
            .subquery()
        )
        query = (
            sa.select(
                Model.name,
                Model.version,
                ranges.c.first,
                ranges.c.last,
                ranges.c.rows,
                shortest.c.start,
                shortest.c.end,
            )
            .join(ranges, ranges.c.model_id == Model.id)
            .join(shortest, shortest.c.model_id == Model.id)
        )
        with Session(self.engine) as conn:
            rows = conn.execute(query).all()
        out = {}
        for name, version, first, last, count, newest_start, newest_end in rows:
            length = (as_utc(newest_end) - as_utc(newest_start)).total_seconds()
            out[(name, version)] = (as_utc(first), as_utc(last), int(count), max(length, 1e-3))
        return out

    def metric_maxima(
        self,
        column: str,
        seconds: Mapping[tuple[str, str], float],
        *,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> dict[tuple[str, str], list[tuple[datetime, float | None]]]:
        """The largest ``column`` over all layers per epoch-aligned time bucket, in time order,
        of every model version of ``seconds`` (``(name, version)`` -> its bucket length), in
        one query whatever the number of versions -- the drift sparklines of many versions.
        A bucket is :meth:`metric_buckets`' (of the same length) and its value the largest of
        that method's ``max_<column>`` over the layers (``None`` where no window has one; a
        flag as 0/1); a version without windows in ``[start, end)`` gets an empty list."""
        _check_metric_columns([column])
        with Session(self.engine) as conn:
            ids = {
                (name, version): i
                for i, name, version in conn.execute(
                    sa.select(Model.id, Model.name, Model.version)
                ).all()
                if (name, version) in seconds
            }
            out: dict[tuple[str, str], list[tuple[datetime, float | None]]] = {
                key: [] for key in seconds
            }
            if not ids:
                return out
            widths = {i: _seconds(seconds[key]) for key, i in ids.items()}
            width: Any = sa.case(widths, value=Window.model_id)
            col: Any = getattr(Window, column)
            value = sa.cast(col, sa.Integer) if column in FLAG_METRICS else col
            bucket = _bucket_expression(self.engine, width)
            query = (
                sa.select(Window.model_id, bucket, sa.func.max(value))
                .where(Window.model_id.in_(list(widths)), *_time_bounds(start, end))
                .group_by(Window.model_id, bucket)
                .order_by(Window.model_id, bucket)
            )
            rows = conn.execute(query).all()
        keys = {i: key for key, i in ids.items()}
        for model_id, b, top in rows:
            begins = utc_from_timestamp(int(b) * widths[model_id])
            out[keys[model_id]].append((begins, None if top is None else float(top)))
        return out

    def metric_rows(
        self,
        model: str,
        version: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        layer: str | None = None,
        columns: Sequence[str] = METRIC_COLUMNS,
    ) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        """The layer-level metrics of every window in ``[start, end)`` as plain rows, decoding
        no arrays: what tables, heatmaps and sparklines over many windows read.

        Returns ``(names, rows)``: the names are ``layer``, ``depth``, ``source``, ``start``,
        ``end``, ``resolution_seconds``, ``n_samples``, ``n_batches``, ``batch_sizes`` (a
        ``{size: batches}`` mapping with string keys), then ``columns`` (a subset of
        :data:`METRIC_COLUMNS`); rows are in depth order, then by time; times are UTC.
        """
        _check_metric_columns(columns)
        fixed = (
            Layer.name.label("layer"),
            Layer.depth,
            Window.source,
            Window.start,
            Window.end,
            Window.resolution_seconds,
            Window.n_samples,
            Window.n_batches,
            Window.batch_sizes,
        )
        names = (*(c.key for c in fixed), *columns)
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            query = self._range(
                sa.select(*fixed, *(getattr(Window, c) for c in columns)),
                m,
                layer=layer,
                start=start,
                end=end,
            )
            rows = conn.execute(query.order_by(Layer.depth, Layer.id, Window.end)).all()
        at_start, at_end = names.index("start"), names.index("end")
        out = []
        for row in rows:
            values = list(row)
            values[at_start] = as_utc(values[at_start])
            values[at_end] = as_utc(values[at_end])
            out.append(tuple(values))
        return names, out

    def batch_size_counts(
        self,
        model: str,
        version: str,
        *,
        layer: str,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> dict[int, int]:
        """Batches measured per batch size in ``layer``'s windows whose end lies in ``[start,
        end)``, summed as the windows stream in (``COUNT_CHUNK`` rows at a time, no array
        read): a range of any length in the memory of one chunk."""
        counts: dict[int, int] = {}
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            query = self._range(sa.select(Window.batch_sizes), m, layer=layer, start=start, end=end)
            rows = conn.execute(query.execution_options(yield_per=COUNT_CHUNK))
            for (sizes,) in rows:
                for size, n in (sizes or {}).items():
                    counts[int(size)] = counts.get(int(size), 0) + int(n)
        return counts

    # -- reservoirs ------------------------------------------------------------------------
    @staticmethod
    def _layer_row(conn: Session, model: Model, name: str) -> Layer:
        found = conn.execute(
            sa.select(Layer).where(Layer.model_id == model.id, Layer.name == name)
        ).scalar_one_or_none()
        if found is None:
            names = conn.execute(
                sa.select(Layer.name)
                .where(Layer.model_id == model.id)
                .order_by(Layer.depth, Layer.id)
            ).scalars()
            raise KeyError(
                f"no layer {name!r} in {model.name}@{model.version}; "
                f"layers: {', '.join(names) or '(none)'}"
            )
        return found

    def production_reservoir(
        self,
        model: str,
        version: str,
        layer: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        after_warmup: bool = False,
        max_rows: int = POOLED_ROWS,
        seed: int = 0,
    ) -> StoredReservoir:
        """One layer's reservoirs of the windows whose end lies in ``[start, end)`` (a naive
        time is UTC), pooled.

        The windows' reservoirs are pooled with :meth:`Reservoir.merge_all`: every sample of
        the range had the same chance to be kept (at most ``max_rows`` rows; ``seed`` makes
        the draw reproducible).  ``after_warmup`` leaves out the warm-up windows (those that
        formed a warm-up baseline: compare with them, not with themselves).

        Raises:
            KeyError: the model version or the layer is not stored (the message lists the
                layers there are).
            NoReservoirError: no window of the range kept a reservoir.
        """
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            lr = self._layer_row(conn, m, layer)
            in_range = []
            if start is not None:
                in_range.append(Window.end >= _to_utc(start))
            if end is not None:
                in_range.append(Window.end < _to_utc(end))
            chosen = [*in_range, Window.baseline != WARMING_UP] if after_warmup else in_range
            pooled = _pool(conn, lr, chosen, max_rows, seed)
            if pooled is None:  # say why: no window, only warm-up ones, or no reservoirs
                windows = sa.select(sa.func.count()).where(Window.layer_id == lr.id, *in_range)
                total = int(conn.execute(windows).scalar_one())
                warm = int(conn.execute(windows.where(Window.baseline == WARMING_UP)).scalar_one())
        if pooled is None:
            if start is None and end is None:
                span = ""
            elif end is None:
                span = f" ending at or after {start}"
            elif start is None:
                span = f" ending before {end}"
            else:
                span = f" ending in [{start}, {end})"
            where = f"layer {layer!r} of {model}@{version}{span}"
            if total == 0:
                why = f"there is no window of {where}: none was stored (yet) in this range"
            elif after_warmup and warm == total:
                why = (
                    f"every window of {where} is a warm-up window (the baseline is still being "
                    "learned, and production is compared after it): wait for the warm-up to "
                    "end, or watch with bnwatch.watch(..., reference=profile)"
                )
            else:
                after = " after the warm-up" if after_warmup else ""
                why = (
                    f"no window of {where}{after} kept a reservoir of per-sample channel means: "
                    "watch with bnwatch.watch(..., reservoir=N), N > 0 (the default keeps up "
                    f"to {DEFAULT_RESERVOIR} rows per window; windows recorded with "
                    "reservoir=0, or stored before windows kept reservoirs, have none)"
                )
            raise NoReservoirError(model, version, layer, "production", why)
        return StoredReservoir(model, version, layer, "production", *pooled)

    def reference_reservoir(
        self, model: str, version: str, layer: str, *, max_rows: int = POOLED_ROWS, seed: int = 0
    ) -> StoredReservoir:
        """The reference reservoir of one layer: the newest reference profile's
        (``bnwatch.profile(..., store=URL)``); without a profile, the reservoirs of the
        warm-up windows that formed the drift baseline, pooled (kind ``warmup``).

        Raises:
            KeyError: the model version or the layer is not stored.
            NoReservoirError: neither exists; the message says how to record one.
        """
        with Session(self.engine) as conn:
            m = self._model_row(conn, model, version)
            lr = self._layer_row(conn, m, layer)
            ref = conn.execute(
                sa.select(Ref)
                # windows judged against a profile that was never stored store its moments as
                # a reference of kind ``profile`` without a reservoir: the newest one with it
                .where(Ref.layer_id == lr.id, Ref.kind == "profile", Ref.reservoir.is_not(None))
                .order_by(Ref.version.desc(), Ref.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            if ref is not None and ref.reservoir is not None:
                rows = decode_arrays(ref.reservoir)
                if rows.shape[0]:
                    seen = int(ref.reservoir_seen or rows.shape[0])
                    profile = Reservoir.from_rows(rows, seen, rows.shape[0])
                    created = as_utc(ref.created_at)
                    return StoredReservoir(model, version, layer, "profile", profile, 0, created)
            pooled = _pool(conn, lr, [Window.baseline == WARMING_UP], max_rows, seed)
            if pooled is None:  # a warm-up baseline whose warm-up windows are gone?
                windows = sa.select(sa.func.count()).where(Window.layer_id == lr.id)
                warm = int(conn.execute(windows.where(Window.baseline == WARMING_UP)).scalar_one())
                after = int(conn.execute(windows.where(Window.baseline == "warmup")).scalar_one())
        if pooled is None:
            gone = (
                "windows were judged against a warm-up baseline, but no warm-up window is left "
                "in the store (deleted by retention, bnwatch db compact --drop-older-than, or "
                "merged into production windows by the compaction of an earlier bnwatch): "
                if after and not warm
                else ""
            )
            raise NoReservoirError(
                model,
                version,
                layer,
                "reference",
                f"no reference reservoir for layer {layer!r} of {model}@{version}: {gone}record "
                f"a reference profile with bnwatch.profile(model, validation_data, "
                f"name={model!r}, version={version!r}, store=URL), or watch with "
                "bnwatch.watch(..., reservoir=N), N > 0 (the default), and no profile, so that "
                "the warm-up windows keep the reservoirs of the drift baseline",
            )
        return StoredReservoir(model, version, layer, "warmup", *pooled)

    def refs_for(self, conn: Session, windows: Iterable[Window]) -> dict[int, Ref]:
        ids = {i for w in windows for i in (w.running_ref_id, w.baseline_ref_id) if i is not None}
        if not ids:
            return {}
        return {r.id: r for r in conn.execute(sa.select(Ref).where(Ref.id.in_(ids))).scalars()}

    @staticmethod
    def to_stored(model: Model, layer: Layer, w: Window, with_stats: bool) -> StoredWindow:
        stats = None
        if with_stats:
            stats = LayerStats(
                moments=decode_moments(w.moments),
                batch_sizes={int(k): int(v) for k, v in w.batch_sizes.items()},
                n_batches=w.n_batches,
                batches_seen=w.batches_seen,
                samples_seen=w.samples_seen,
                batch_stat_batches=w.batch_stat_batches,
                reservoir=_loaded_reservoir(w),
            )
        return StoredWindow(
            id=w.id,
            model=model.name,
            version=model.version,
            layer=layer.name,
            source=w.source,
            start=as_utc(w.start),
            end=as_utc(w.end),
            resolution_seconds=w.resolution_seconds,
            channels=w.channels,
            n_samples=w.n_samples,
            n_batches=w.n_batches,
            samples_seen=w.samples_seen,
            batches_seen=w.batches_seen,
            nonfinite=w.nonfinite,
            batch_sizes={int(k): int(v) for k, v in w.batch_sizes.items()},
            baseline=w.baseline,
            metrics={c: getattr(w, c) for c in METRIC_COLUMNS},
            stats=stats,
        )

    def totals(self) -> list[LayerTotals]:
        """Running totals of every layer of every model version (monotonic counters)."""
        buckets = [bucket_column(b) for b in (*BATCH_SIZE_BUCKETS, None)]
        with Session(self.engine) as conn:
            rows = conn.execute(
                sa.select(LayerTotal, Layer.name, Model.name, Model.version)
                .join(Layer, Layer.id == LayerTotal.layer_id)
                .join(Model, Model.id == Layer.model_id)
                .order_by(Model.name, Model.version, Layer.depth, Layer.id)
            ).all()
        return [
            LayerTotals(
                model=model,
                version=version,
                layer=layer,
                windows=t.windows,
                samples=t.samples,
                batches=t.batches,
                nonfinite=t.nonfinite,
                measured_samples=t.measured_samples,
                batch_size_buckets=tuple(
                    (bound, int(getattr(t, col)))
                    for bound, col in zip((*BATCH_SIZE_BUCKETS, None), buckets, strict=True)
                ),
            )
            for t, layer, model, version in rows
        ]

    def sources(self, model: str | None = None, version: str | None = None) -> list[SourceInfo]:
        """Every monitor that reported (for ``model``/``version`` when given), with its last
        account of itself."""
        query = (
            sa.select(Source, Model.name, Model.version)
            .join(Model, Model.id == Source.model_id)
            .order_by(Model.name, Model.version, Source.source)
        )
        if model is not None:
            query = query.where(Model.name == model)
        if version is not None:
            query = query.where(Model.version == version)
        with Session(self.engine) as conn:
            rows = conn.execute(query).all()
        return [
            SourceInfo(
                model=model,
                version=version,
                source=src.source,
                first_seen=as_utc(src.first_seen),
                last_window_end=as_utc(src.last_window_end),
                windows=src.windows,
                overhead_ratio=src.overhead_ratio,
                windows_dropped=src.windows_dropped,
                hook_errors=src.hook_errors,
                drift_config=config_from_account(src.drift_config),
            )
            for src, model, version in rows
        ]

    def drift_config(self, model: str, version: str) -> DriftConfig | None:
        """The :class:`DriftConfig` that ``model``/``version``'s windows were judged at: that
        of the source that reported thresholds most recently (:func:`judged_at`), or ``None``
        when no source did (or the version is not stored) -- judge merged windows at the
        default then, and say so.  When sources disagree the newest wins; compare with
        :meth:`sources` to tell."""
        return judged_at(self.sources(model, version))

    def judging(self, model: str, version: str, config: DriftConfig | None = None) -> DriftConfig:
        """The thresholds to judge ``model``/``version``'s merged windows at: ``config`` when
        given, else those that decided its stored windows' flags (:meth:`drift_config`), else
        the default -- so a merged range is judged as its windows were."""
        return config or self.drift_config(model, version) or DriftConfig()

    def latest_metrics(self) -> list[StoredWindow]:
        """The latest window of every layer of every model version, without statistics."""
        with Session(self.engine) as conn:
            latest = (
                sa.select(Window.layer_id, sa.func.max(Window.end).label("end"))
                .group_by(Window.layer_id)
                .subquery()
            )
            rows = conn.execute(
                sa.select(Window, Layer, Model)
                .join(Layer, Layer.id == Window.layer_id)
                .join(Model, Model.id == Window.model_id)
                .join(
                    latest,
                    sa.and_(latest.c.layer_id == Window.layer_id, latest.c.end == Window.end),
                )
                .order_by(
                    Model.name,
                    Model.version,
                    Layer.depth,
                    Layer.id,
                    _WARMING_UP_LAST,
                    Window.id.desc(),
                )
                .options(defer(Window.moments))  # no per-channel value: the metrics only
            ).all()
        seen: set[int] = set()
        out = []
        for w, layer, model in rows:
            if layer.id not in seen:
                seen.add(layer.id)
                out.append(self.to_stored(model, layer, w, False))
        return out

    def window_count(self, *, resolution_seconds: float | None = None) -> int:
        with Session(self.engine) as conn:
            query = sa.select(sa.func.count()).select_from(Window)
            if resolution_seconds is not None:
                query = query.where(Window.resolution_seconds == resolution_seconds)
            return int(conn.execute(query).scalar_one())

    def alerts(
        self,
        *,
        model: str | None = None,
        version: str | None = None,
        state: str | None = None,
        alert_id: int | None = None,
        acknowledged: bool | None = None,
    ) -> list[AlertInfo]:
        """Alerts, newest first (by ``opened_at``, then id), optionally of one model version
        and state (or the one alert ``alert_id``); ``acknowledged``: only those whose
        ``acknowledged_at`` is set (``True``) or not (``False``).  All of them: a page at a
        time is :meth:`alert_page`."""
        return self.alert_page(
            model=model,
            version=version,
            state=state,
            alert_id=alert_id,
            acknowledged=acknowledged,
        ).alerts

    def alert_page(
        self,
        *,
        model: str | None = None,
        version: str | None = None,
        state: str | None = None,
        alert_id: int | None = None,
        acknowledged: bool | None = None,
        limit: int | None = None,
        after: NewestKey | None = None,
    ) -> AlertPage:
        """:meth:`alerts`, at most ``limit`` of them (``None``: all), from the first after
        the key ``after`` on (keyset pagination on ``opened_at`` and id, newest first); the
        page's ``next`` is the ``after`` of the next page."""
        if limit is not None:
            check_positive_int("limit", limit)
        with Session(self.engine) as conn:
            query = (
                sa.select(Alert, Model, Layer.name)
                .join(Model, Model.id == Alert.model_id)
                .outerjoin(Layer, Layer.id == Alert.layer_id)
            )
            if model is not None:
                query = query.where(Model.name == model)
            if version is not None:
                query = query.where(Model.version == version)
            if state is not None:
                query = query.where(Alert.state == state)
            if alert_id is not None:
                query = query.where(Alert.id == alert_id)
            if acknowledged is not None:
                query = query.where(
                    Alert.acknowledged_at.is_not(None)
                    if acknowledged
                    else Alert.acknowledged_at.is_(None)
                )
            if after is not None:
                query = query.where(_older(Alert.opened_at, Alert.id, after))
            query = query.order_by(Alert.opened_at.desc(), Alert.id.desc())
            rows, more = _one_page(conn, query, limit)
        alerts = [
            AlertInfo(
                id=a.id,
                model=m.name,
                version=m.version,
                layer=lname,
                kind=a.kind,
                state=a.state,
                opened_at=as_utc(a.opened_at),
                last_seen_at=as_utc(a.last_seen_at),
                resolved_at=as_utc(a.resolved_at) if a.resolved_at else None,
                acknowledged_at=as_utc(a.acknowledged_at) if a.acknowledged_at else None,
                values=a.values,
            )
            for a, m, lname in rows
        ]
        last = alerts[-1] if more else None
        return AlertPage(alerts, NewestKey(last.opened_at, last.id) if last else None)

    def acknowledge_alert(self, alert_id: int) -> bool:
        """Mark an alert as seen by a person (it stays open until its condition clears).
        Returns ``False`` when it was acknowledged already.

        Raises:
            KeyError: there is no alert ``alert_id``.
        """
        with self.engine.begin() as conn:
            found = conn.execute(
                sa.select(Alert.acknowledged_at).where(Alert.id == alert_id)
            ).one_or_none()
            if found is None:
                raise KeyError(f"no alert with id {alert_id}")
            if found[0] is not None:
                return False
            conn.execute(
                sa.update(Alert)
                .where(Alert.id == alert_id, Alert.acknowledged_at.is_(None))
                .values(acknowledged_at=utcnow())
            )
        return True

    def recalibration(self, recalibration_id: int) -> RecalibrationInfo:
        """One recalibration.

        Raises:
            RecalibrationNotFoundError: no recalibration has this id.
        """
        with self.engine.connect() as conn:
            return self._recalibration_info(conn, recalibration_id)

    def recalibration_counts(self) -> list[RecalibrationCount]:
        """Recalibrations per model version and status, with the oldest ``created_at`` (one
        aggregate query: what Prometheus scrapes)."""
        query = (
            sa.select(
                Model.name,
                Model.version,
                Recalibration.status,
                sa.func.count(),
                sa.func.min(Recalibration.created_at),
            )
            .join(Model, Model.id == Recalibration.model_id)
            .group_by(Model.name, Model.version, Recalibration.status)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            RecalibrationCount(name, version, status, int(n), as_utc(oldest))
            for name, version, status, n, oldest in rows
        ]

    def recalibrations(
        self, *, model: str | None = None, version: str | None = None
    ) -> list[RecalibrationInfo]:
        """Recalibrations, newest first (by ``created_at``, then id).  All of them: a page at
        a time is :meth:`recalibration_page`."""
        return self.recalibration_page(model=model, version=version).recalibrations

    def recalibration_page(
        self,
        *,
        model: str | None = None,
        version: str | None = None,
        limit: int | None = None,
        after: NewestKey | None = None,
    ) -> RecalibrationPage:
        """:meth:`recalibrations`, at most ``limit`` of them (``None``: all), from the first
        after the key ``after`` on (keyset pagination on ``created_at`` and id, newest first);
        the page's ``next`` is the ``after`` of the next page."""
        if limit is not None:
            check_positive_int("limit", limit)
        query = _recalibration_select()
        if model is not None:
            query = query.where(Model.name == model)
        if version is not None:
            query = query.where(Model.version == version)
        if after is not None:
            query = query.where(_older(Recalibration.created_at, Recalibration.id, after))
        query = query.order_by(Recalibration.created_at.desc(), Recalibration.id.desc())
        with self.engine.connect() as conn:
            rows, more = _one_page(conn, query, limit)
        page = [_recalibration_of(row) for row in rows]
        last = page[-1] if more else None
        return RecalibrationPage(page, NewestKey(last.created_at, last.id) if last else None)


def _json_outcome(outcome: Mapping[str, Any]) -> dict[str, Any]:
    """A recalibration's outcome as strict JSON stores it, or a ConfigError before anything is
    written (an object JSON cannot carry failed the transaction at its flush)."""
    if not isinstance(outcome, Mapping):
        raise ConfigError("outcome", type(outcome).__name__, "a mapping (JSON object)")
    ready = json_ready(outcome)
    try:
        json.dumps(ready, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            "outcome", str(err), "JSON values: strings, numbers, booleans, None, lists, mappings"
        ) from err
    return ready  # type: ignore[no-any-return]


ABANDONED_CLAIM_SECONDS = 1800.0
"""A trigger claim still without any outcome this long after it was taken was abandoned by its
process (killed while its action ran): :meth:`Repository.fail_abandoned_claims` records it
``failed``.  30 minutes: far more than an action takes (a webhook: 3 attempts of at most 10 s;
an in-process recalibration: seconds to minutes), and less than the hour after which
``BnwatchRecalibrationPending`` fires."""


def _claim_refusal(
    conn: Connection,
    model_id: int,
    alert_id: int | None,
    method: str,
    cooldown_seconds: float,
    daily_cap: int,
    now: datetime,
) -> tuple[str | None, int, datetime | None]:
    """``(refused, recent, last_started)`` of a claim by ``method`` for ``alert_id`` of the
    model version ``model_id`` at ``now``: why :meth:`Repository.claim_recalibration` refuses
    it (``None``: it may be claimed), the recalibrations of ``method`` started in the 24 hours
    before ``now``, and when the latest one started.  Only ``method``'s recalibrations count:
    another trigger's (a notification's) never hold this one back."""
    mine = sa.and_(Recalibration.model_id == model_id, Recalibration.method == method)
    recent = int(
        conn.execute(
            sa.select(sa.func.count())
            .select_from(Recalibration)
            .where(mine, Recalibration.created_at >= now - timedelta(days=1))
        ).scalar_one()
    )
    latest = conn.execute(sa.select(sa.func.max(Recalibration.created_at)).where(mine)).scalar()
    last = as_utc(latest) if latest is not None else None
    if (
        alert_id is not None
        and conn.execute(
            sa.select(Recalibration.id)
            .where(
                Recalibration.alert_id == alert_id,
                Recalibration.method == method,
                Recalibration.status != "failed",
            )
            .limit(1)
        ).first()
    ):
        return "alert", recent, last
    if recent >= daily_cap:
        return "daily_cap", recent, last
    if last is not None and (now - last).total_seconds() < cooldown_seconds:
        return "cooldown", recent, last
    return None, recent, last


def _insert_pending(
    conn: Connection,
    model_id: int,
    alert_id: int | None,
    method: str,
    created: datetime,
    *,
    outcome: dict[str, Any] | None = None,
) -> int:
    """Insert a ``pending`` recalibration; returns its id.  Without ``outcome`` (SQL NULL) it
    is a *request*: :meth:`Repository.take_requested` hands it to a trigger's action."""
    values: dict[str, Any] = {
        "model_id": model_id,
        "alert_id": alert_id,
        "status": "pending",
        "method": method,
        "created_at": created,
    }
    if outcome is not None:
        values["outcome"] = outcome
    row = conn.execute(
        sa.insert(Recalibration).values(**values).returning(Recalibration.id)
    ).scalar_one()
    return int(row)


def _waiting_request(conn: Connection, model_id: int) -> RecalibrationInfo | None:
    """The oldest request of the model version ``model_id`` nobody has taken yet: ``pending``
    without an outcome (trigger claims write theirs when they insert, takers when they take)."""
    row = conn.execute(
        _recalibration_select()
        .where(
            Recalibration.model_id == model_id,
            Recalibration.status == "pending",
            Recalibration.outcome.is_(None),
        )
        .order_by(Recalibration.id)
        .limit(1)
    ).first()
    return None if row is None else _recalibration_of(row)


def _recalibration_select() -> Any:
    """Every column :class:`RecalibrationInfo` needs, one row per recalibration."""
    return sa.select(
        Recalibration.id,
        Model.name,
        Model.version,
        Recalibration.alert_id,
        Recalibration.status,
        Recalibration.method,
        Recalibration.created_at,
        Recalibration.finished_at,
        Recalibration.outcome,
    ).join(Model, Model.id == Recalibration.model_id)


def _recalibration_of(row: Any) -> RecalibrationInfo:
    return RecalibrationInfo(
        id=int(row.id),
        model=row.name,
        version=row.version,
        alert_id=row.alert_id,
        status=row.status,
        method=row.method,
        created_at=as_utc(row.created_at),
        finished_at=as_utc(row.finished_at) if row.finished_at else None,
        outcome=row.outcome,
    )


def _check_metric_columns(columns: Sequence[str]) -> None:
    unknown = [c for c in columns if c not in METRIC_COLUMNS]
    if unknown:
        raise ValueError(f"unknown metric columns {unknown}; known: {list(METRIC_COLUMNS)}")


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_WHOLE_RANGE = (TIME_MAX - _EPOCH).total_seconds()
"""A bucket length that puts every window the store accepts in one bucket (from the epoch to
:data:`~bnwatch.wire.TIME_MAX`, which Python can represent: 2**37 seconds put windows after
year 6325 in a second bucket, ending in year 10680)."""
_FIRST_TIMESTAMP = (datetime.min.replace(tzinfo=timezone.utc) - _EPOCH).total_seconds()
_LAST_TIMESTAMP = (datetime.max.replace(tzinfo=timezone.utc) - _EPOCH).total_seconds() - 1.0


def utc_from_timestamp(seconds: float) -> datetime:
    """The UTC time ``seconds`` after the epoch, clamped to the times Python represents
    (years 1 to 9999).  Bucket boundaries are computed in seconds: a bucket of a window stored
    before the store bounded window times (year 1, year 9999), or of a coarse resolution
    asked for, may begin or end outside that range -- a read or a compaction then raised
    "year 10000 is out of range" instead of answering."""
    if seconds <= _FIRST_TIMESTAMP:
        return datetime.min.replace(tzinfo=timezone.utc)
    if seconds >= _LAST_TIMESTAMP:
        return datetime.max.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def _time_bounds(start: datetime | None, end: datetime | None) -> list[Any]:
    """The conditions on ``windows`` that its end lies in ``[start, end)``: bounds in UTC, as
    stored -- SQLite compares the wall-clock text, so an instant with another offset would
    select the wrong windows there (PostgreSQL converts)."""
    bounds = []
    if start is not None:
        bounds.append(Window.end >= _to_utc(start))
    if end is not None:
        bounds.append(Window.end < _to_utc(end))
    return bounds


def _bucket_expression(engine: Engine, width: Any) -> Any:
    """The epoch-aligned time bucket of ``width`` seconds (a number or an SQL expression) that
    a window's end falls in, computed by the database (labelled ``bucket``): within a
    millisecond, as floating point allows."""
    if engine.dialect.name == "sqlite":
        epoch: Any = (sa.func.julianday(Window.end) - 2440587.5) * 86400.0
        bucket: Any = sa.cast((epoch - 1e-3) / width, sa.Integer)
    else:
        epoch = sa.extract("epoch", Window.end)
        bucket = sa.cast(sa.func.floor((epoch - 1e-3) / width), sa.BigInteger)
    return bucket.label("bucket")


def _seconds(resolution: timedelta | float) -> float:
    seconds = resolution.total_seconds() if isinstance(resolution, timedelta) else resolution
    if not seconds > 0:
        raise ValueError(f"resolution must be > 0 seconds, got {resolution!r}")
    return float(seconds)


def bucket_column(bound: int | None) -> str:
    """The ``layer_totals`` column of a batch-size bucket (``None``: the +Inf bucket)."""
    return f"batches_le_{bound}" if bound is not None else "batches_le_inf"


def _bucket_of(size: int) -> str:
    for bound in BATCH_SIZE_BUCKETS:
        if size <= bound:
            return bucket_column(bound)
    return bucket_column(None)


def _upsert(
    conn: Connection,
    table: sa.Table,
    key: list[str],
    rows: list[dict[str, Any]],
    updates: Mapping[str, Any],
) -> None:
    """``INSERT ... ON CONFLICT (key) DO UPDATE`` for ``rows`` (one executemany); ``updates``
    map a column to a function of (the table's columns, the excluded row) giving its value."""
    if not rows:
        return
    dialect: Any = postgresql if conn.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(table)
    set_ = {name: update(table.c, insert.excluded) for name, update in updates.items()}
    conn.execute(insert.on_conflict_do_update(index_elements=key, set_=set_), rows)


def _add_totals(conn: Connection, fresh: list[tuple[WindowRecord, dict[str, int]]]) -> None:
    """Add newly stored windows to the per-layer running totals (one upsert per layer)."""
    sums: dict[int, dict[str, int]] = {}
    for record, layer_ids in fresh:
        for name, report in record.reports.items():
            st = report.stats
            acc = sums.setdefault(layer_ids[name], defaultdict(int))
            acc["windows"] += 1
            acc["samples"] += st.samples_seen
            acc["batches"] += st.batches_seen
            acc["nonfinite"] += report.nonfinite
            for size, count in st.batch_sizes.items():
                acc[_bucket_of(size)] += count
                acc["measured_samples"] += size * count
    columns = ["windows", "samples", "batches", "nonfinite", "measured_samples"] + [
        bucket_column(b) for b in (*BATCH_SIZE_BUCKETS, None)
    ]
    table: sa.Table = LayerTotal.__table__  # type: ignore[assignment]
    updates = {c: (lambda cols, exc, c=c: cols[c] + exc[c]) for c in columns}
    # one executemany, in a fixed order: no deadlocks between concurrent writers
    rows = [
        {"layer_id": layer_id, **{c: int(sums[layer_id].get(c, 0)) for c in columns}}
        for layer_id in sorted(sums)
    ]
    _upsert(conn, table, ["layer_id"], rows, updates)


def _newer(cols: Any, exc: Any, column: str) -> Any:
    """The excluded row's value if its window ended later, else the stored one."""
    return sa.case((exc.last_window_end > cols.last_window_end, exc[column]), else_=cols[column])


def _stored_config(monitor: Mapping[str, float]) -> dict[str, float] | None:
    """The ``sources.drift_config`` value of a window's account: its thresholds, validated
    and written back in :func:`~bnwatch.drift.config_account`'s form, or ``None``."""
    config = config_from_account(monitor)
    return config_account(config) if config is not None else None


def _add_sources(conn: Connection, fresh: list[tuple[WindowRecord, int]]) -> None:
    """Record each sending monitor's last window and its account of itself."""
    latest: dict[tuple[int, str], WindowRecord] = {}
    counts: dict[tuple[int, str], int] = defaultdict(int)
    for record, model_id in fresh:
        key = (model_id, record.source)
        counts[key] += 1
        if key not in latest or record.end >= latest[key].end:
            latest[key] = record
    table: sa.Table = Source.__table__  # type: ignore[assignment]
    last_fields = ("overhead_ratio", "windows_dropped", "hook_errors", "drift_config")
    updates: dict[str, Any] = {
        "windows": lambda cols, exc: cols.windows + exc.windows,
        **{f: (lambda cols, exc, f=f: _newer(cols, exc, f)) for f in last_fields},
        # SET expressions see the stored row whatever their order, so this may come last
        "last_window_end": lambda cols, exc: _newer(cols, exc, "last_window_end"),
    }
    rows = []
    for key in sorted(latest):
        record = latest[key]
        monitor = record.monitor
        rows.append(
            {
                "model_id": key[0],
                "source": key[1],
                "first_seen": utcnow(),
                "last_window_end": _to_utc(record.end),
                "windows": counts[key],
                "overhead_ratio": _finite(monitor.get("overhead_ratio")),
                "windows_dropped": int(monitor.get("windows_dropped", 0)),
                "hook_errors": int(monitor.get("hook_errors", 0)),
                "drift_config": _stored_config(monitor),
            }
        )
    _upsert(conn, table, ["model_id", "source"], rows, updates)


# --------------------------------------------------------------------------------------------
# Rows and merges (shared by writes, range queries and rollups)
# --------------------------------------------------------------------------------------------
def window_row(
    record: WindowRecord | None,
    report: LayerReport,
    model_id: int,
    layer_id: int,
    running_ref_id: int | None,
    baseline_ref_id: int | None,
    *,
    source: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    uid: str | None = None,
    resolution_seconds: float = 0.0,
) -> dict[str, Any]:
    """The ``windows`` row of one layer report."""
    st = report.stats
    row: dict[str, Any] = {
        "uid": uid or (record.uid if record else ""),
        "model_id": model_id,
        "layer_id": layer_id,
        "source": source or (record.source if record else ""),
        "start": _to_utc(start or (record.start if record else utcnow())),
        "end": _to_utc(end or (record.end if record else utcnow())),
        "resolution_seconds": resolution_seconds,
        "schema_version": record.schema_version if record else SCHEMA_VERSION,
        "running_ref_id": running_ref_id,
        "baseline_ref_id": baseline_ref_id,
        "baseline": report.baseline,
        "channels": report.channels,
        "n_samples": st.moments.n_samples,
        "n_batches": st.n_batches,
        "batches_seen": st.batches_seen,
        "samples_seen": st.samples_seen,
        "batch_stat_batches": st.batch_stat_batches,
        "nonfinite": report.nonfinite,
        "batch_sizes": {str(k): int(v) for k, v in st.batch_sizes.items()},
        "moments": encode_moments(st.moments),
        **reservoir_columns(st.reservoir),
    }
    row.update(report_metrics(report))
    return row


def reservoir_columns(reservoir: Reservoir | None) -> dict[str, Any]:
    """The ``windows`` columns of a window's reservoir (NULL when it kept none)."""
    if reservoir is None:
        return {"reservoir": None, "reservoir_seen": None, "reservoir_capacity": None}
    return {
        "reservoir": encode_arrays(reservoir.rows, dtype="<f4"),
        "reservoir_seen": reservoir.seen,
        "reservoir_capacity": reservoir.capacity,
    }


def reservoir_from(blob: bytes, seen: int | None, capacity: int | None) -> Reservoir:
    """The :class:`Reservoir` of stored columns (``seen``/``capacity`` default to the rows)."""
    rows = decode_arrays(blob)
    kept = rows.shape[0]
    return Reservoir.from_rows(
        rows, kept if seen is None else int(seen), int(capacity or max(1, kept))
    )


def _loaded_reservoir(w: Window) -> Reservoir | None:
    """A window row's reservoir if it was loaded (the column is deferred) and kept."""
    if "reservoir" in sa.inspect(w).unloaded or w.reservoir is None:
        return None
    return reservoir_from(w.reservoir, w.reservoir_seen, w.reservoir_capacity)


_ARRAY_HEADER = len(encode_arrays(np.empty((0, 0), dtype=np.float32), dtype="<f4"))
"""Bytes of an array blob's header, which holds its shape (:func:`bnwatch.codec.blob_shape`)."""


def _reservoir_query(layer: Layer, *, header: bool = False) -> Any:
    """Reservoir columns of one layer's windows, oldest first; ``header``: the first bytes of
    each reservoir only (its shape), not its rows."""
    blob: Any = Window.reservoir
    if header:  # substr reads a prefix: PostgreSQL does not fetch the rest from TOAST
        blob = sa.func.substr(Window.reservoir, 1, _ARRAY_HEADER, type_=sa.LargeBinary)
    return (
        sa.select(
            blob,
            Window.reservoir_seen,
            Window.reservoir_capacity,
            Window.start,
            Window.end,
            Window.id,
        )
        .where(Window.layer_id == layer.id, Window.reservoir.is_not(None))
        .order_by(Window.end, Window.id)
    )


def _pool(
    conn: Session, layer: Layer, where: Sequence[Any], max_rows: int, seed: int
) -> tuple[Reservoir, int, datetime, datetime] | None:
    """Pool the reservoirs of ``layer``'s windows that match ``where`` as
    :meth:`Reservoir.merge_all` merges them all at once (at most ``max_rows`` rows), drawn
    ``POOL_CHUNK`` windows at a time (:class:`_Systematic`): memory holds the pool and one
    chunk, however long the range.  A first pass reads the reservoirs' shapes and counts
    alone, which give the size of the pool.  Returns the pooled reservoir, the number of
    windows and the span of their starts and ends, or ``None`` without any window.
    """
    check_capacity(max_rows)
    sizes: list[tuple[int, int]] = []  # (rows kept, rows seen) per window: two ints each
    last_id = 0
    channels: int | None = None
    heads = _reservoir_query(layer, header=True).where(*where)
    for head, seen, _, _, _, wid in conn.execute(heads.execution_options(yield_per=4096)):
        _, rows, channels = blob_shape(head)
        sizes.append((rows, rows if seen is None else int(seen)))  # as reservoir_from reads it
        last_id = max(last_id, wid)
    if channels is None:
        return None
    draw = _Systematic(merged_size(sizes, max_rows), sum(seen for _, seen in sizes), seed)
    windows = 0
    first: datetime | None = None
    last: datetime | None = None
    # the windows of the first pass: one stored since (a higher id) waits for the next read
    query = _reservoir_query(layer).where(*where, Window.id <= last_id)
    for part in conn.execute(query.execution_options(yield_per=POOL_CHUNK)).partitions():
        draw.add([reservoir_from(blob, seen, capacity) for blob, seen, capacity, *_ in part])
        windows += len(part)
        part_first = min(as_utc(row[3]) for row in part)
        part_last = max(as_utc(row[4]) for row in part)
        first = part_first if first is None else min(first, part_first)
        last = part_last if last is None else max(last, part_last)
    if not windows or first is None or last is None:  # deleted between the passes
        return None
    return draw.reservoir(channels, max_rows), windows, first, last


class _Systematic:
    """The sample :meth:`Reservoir.merge_all` draws of many reservoirs at once, drawn a chunk
    of them at a time, in order: its ``k`` points (one random start, then every 1, over the
    ``total`` samples scaled to ``k``) fall into each chunk in proportion to the chunk's
    samples, and the chunk gives as many rows, merged with :meth:`Reservoir.merge_all`.  So
    every sample keeps the chance ``k / total`` it has in one merge of them all -- except
    where a chunk's share, rounded up, is one row more than its reservoirs allow: it gives
    one fewer.  A single chunk gives the rows of that one merge, bit for bit.

    Merging each chunk into the pool so far would not do: every merge rounds the pool's size
    down, and a pool smaller than its capacity carries the rounding on, merge after merge (a
    month of daily windows and a week of minute windows kept 212 rows where one merge of
    them all keeps 227; 40,000 windows after one of 1,000 times their samples, 8 instead of
    88).
    """

    def __init__(self, k: int, total: int, seed: int) -> None:
        self.k = k
        self.total = total
        self.seed = seed
        self.start = float(np.random.default_rng((seed, 1)).random())
        self.seen = 0
        self.chunks = 0
        self.rows: list[NDArray[np.float32]] = []

    def _points(self, before: int) -> int:
        """How many points fall before the first ``before`` samples."""
        if not self.total:
            return 0
        return min(self.k, max(0, math.ceil(before * self.k / self.total - self.start)))

    def add(self, chunk: Sequence[Reservoir]) -> None:
        """Draw from the next reservoirs (the chunk's rows are not kept)."""
        before = self.seen
        self.seen += sum(r.seen for r in chunk)
        want = self._points(self.seen) - self._points(before)
        if want:
            merged = Reservoir.merge_all(chunk, capacity=want, seed=self.seed + self.chunks)
            self.rows.append(merged.rows)
        self.chunks += 1

    def reservoir(self, channels: int, capacity: int) -> Reservoir:
        """The pool: the rows drawn, of all the samples seen."""
        rows = np.concatenate(self.rows) if self.rows else np.empty((0, channels), np.float32)
        return Reservoir.from_rows(rows, self.seen, capacity)


def report_metrics(report: LayerReport) -> dict[str, Any]:
    """The :data:`METRIC_COLUMNS` of a report (NaN stored as NULL)."""
    return dict(report.metrics())


def reference_of(ref: Ref | None, *, baseline: bool) -> Reference | None:
    """The drift.Reference a stored reference row stands for."""
    if ref is None:
        return None
    if baseline and ref.moments is not None:
        return Reference.from_moments(decode_moments(ref.moments))
    mean_var = decode_arrays(ref.mean_var)
    return Reference.running(mean_var[0], mean_var[1])


@dataclass(frozen=True, eq=False)
class Merged:
    """One merged window with what it takes to store it."""

    window: StoredWindow
    layer: Layer
    running_ref_id: int | None
    baseline_ref_id: int | None
    bucket: int
    source_ids: tuple[int, ...]
    report: LayerReport | None = None
    """The merged window's full report (per-channel arrays), once decided."""


_NEEDS_STATS = "merging windows needs their statistics (with_stats=True)"


@dataclass(eq=False)
class _Group:
    """The windows of one layer (and source) in one bucket, merged oldest first as they come
    -- one merged :class:`LayerStats`, however many windows: what a bucket holds in memory."""

    layer: Layer
    bucket: int
    first: StoredWindow
    last: StoredWindow
    stats: LayerStats
    running_id: int | None
    baseline_id: int | None
    mutated: bool
    sources: set[str] = field(default_factory=set)
    ids: list[int] = field(default_factory=list)
    count: int = 0

    @classmethod
    def of(
        cls,
        stored: StoredWindow,
        layer: Layer,
        bucket: int,
        running_id: int | None,
        baseline_id: int | None,
    ) -> _Group:
        if stored.stats is None:
            raise ValueError(_NEEDS_STATS)
        group = cls(layer, bucket, stored, stored, stored.stats, None, None, False)
        group.note(stored, running_id, baseline_id)
        return group

    def add(self, stored: StoredWindow, running_id: int | None, baseline_id: int | None) -> None:
        """Merge in the next window (its end at or after the last one's)."""
        if stored.stats is None:
            raise ValueError(_NEEDS_STATS)
        self.stats = self.stats.merge(stored.stats)
        self.last = stored
        self.note(stored, running_id, baseline_id)

    def note(self, stored: StoredWindow, running_id: int | None, baseline_id: int | None) -> None:
        # judged against the newest references of the bucket (a baseline may appear mid-way)
        if running_id is not None:
            self.running_id = running_id
        if baseline_id is not None:
            self.baseline_id = baseline_id
        self.mutated = self.mutated or bool(stored.metrics.get("running_stats_mutated"))
        self.sources.add(stored.source)
        if stored.id is not None:
            self.ids.append(stored.id)
        self.count += 1


def _bucket(end: datetime, seconds: float) -> int:
    """The bucket of a window ending at ``end``: the one its end falls in, or, ending exactly
    on a boundary, the one it closes."""
    end_ts = end.timestamp()
    b = math.floor(end_ts / seconds)
    return b - 1 if end_ts == b * seconds else b


def _collect(
    groups: dict[int, _Group],
    stored: StoredWindow,
    layer: Layer,
    bucket: int,
    running_id: int | None,
    baseline_id: int | None,
) -> None:
    group = groups.get(layer.id)
    if group is None:
        groups[layer.id] = _Group.of(stored, layer, bucket, running_id, baseline_id)
    else:
        group.add(stored, running_id, baseline_id)


def _assess(
    group: _Group, refs: Mapping[int, Ref], seconds: float, config: DriftConfig
) -> tuple[LayerReport, Merged]:
    """The report of one merged group (not yet decided) and its merged window."""
    layer, merged, b = group.layer, group.stats, group.bucket
    running_ref = refs.get(group.running_id) if group.running_id is not None else None
    baseline_ref = refs.get(group.baseline_id) if group.baseline_id is not None else None
    some_ref = running_ref or baseline_ref
    eps = some_ref.eps if some_ref is not None else 1e-5
    baseline = reference_of(baseline_ref, baseline=True)
    report = assess_layer(
        layer.name,
        layer.kind,
        merged,
        eps=eps,
        running=reference_of(running_ref, baseline=False),
        baseline=baseline,
        baseline_kind=group.last.baseline if baseline is not None else "warming_up",
        null=baseline.moments if baseline is not None else None,
        depth=layer.depth,
        running_stats_mutated=group.mutated,
        config=config,
    )
    sources = set(group.sources)
    window = StoredWindow(
        model=group.first.model,
        version=group.first.version,
        layer=layer.name,
        source=sources.pop() if len(sources) == 1 else "*",
        start=utc_from_timestamp(b * seconds),
        end=utc_from_timestamp((b + 1) * seconds),
        resolution_seconds=seconds,
        channels=report.channels,
        n_samples=report.n_samples,
        n_batches=merged.n_batches,
        samples_seen=merged.samples_seen,
        batches_seen=merged.batches_seen,
        nonfinite=report.nonfinite,
        batch_sizes=dict(merged.batch_sizes),
        baseline=report.baseline,
        metrics={},
        stats=merged,
        merged_from=group.count,
    )
    entry = Merged(window, layer, group.running_id, group.baseline_id, b, tuple(group.ids))
    return report, entry


def _decided(
    groups: Iterable[_Group],
    refs: Mapping[int, Ref],
    seconds: float,
    config: DriftConfig,
    layer_count: int | None,
) -> list[Merged]:
    """The merged windows of one bucket (and source), all its layers decided together: the
    cross-layer correction needs them all."""
    entries = {f"{g.layer.name}\0{g.layer.id}": _assess(g, refs, seconds, config) for g in groups}
    decided = decide({k: r for k, (r, _) in entries.items()}, config, layers=layer_count)
    return [
        Merged(
            _with_metrics(e.window, report_metrics(decided[k])),
            e.layer,
            e.running_ref_id,
            e.baseline_ref_id,
            e.bucket,
            e.source_ids,
            decided[k],
        )
        for k, (_, e) in entries.items()
    ]


def merge_groups(
    items: Sequence[tuple[StoredWindow, Layer, int | None, int | None]],
    refs: Mapping[int, Ref],
    seconds: float,
    config: DriftConfig,
    *,
    by_source: bool = False,
    by_warmup: bool = False,
    layer_count: int | None = None,
) -> list[Merged]:
    """Merge windows into epoch-aligned buckets of ``seconds`` per layer (and per source when
    ``by_source``), exactly, recomputing the metrics of each merged window.

    A window belongs to the bucket its ``end`` falls in (a window ending exactly on a
    boundary, to the bucket it closes).  All layers of one bucket are decided together,
    since the cross-layer correction needs them all; ``layer_count`` is how many the model version
    has when ``items`` hold only some (one layer asked for), which are then judged at the
    level they would get among all of them (:func:`bnwatch.drift.decide`).

    ``by_warmup`` keeps the warm-up windows (baseline ``warming_up``) of a bucket apart from
    the others: a bucket where the warm-up ends gives two merged windows per layer (and
    source), one of each.  Compaction needs it: reports pool the warm-up windows'
    reservoirs as the reference and leave them out of production, by that label, and a
    merged window takes the label of the last window it merged.
    """
    groups: dict[tuple[int, str, bool], dict[int, _Group]] = defaultdict(dict)
    # oldest first (a stable sort: windows ending at the same instant keep their order)
    for stored, layer, running_id, baseline_id in sorted(items, key=lambda i: i[0].end):
        b = _bucket(stored.end, seconds)
        source = stored.source if by_source else "*"
        warm = by_warmup and stored.baseline == WARMING_UP
        _collect(groups[(b, source, warm)], stored, layer, b, running_id, baseline_id)
    out: list[Merged] = []
    for key in sorted(groups):
        count = layer_count
        b, source, warm = key
        other = groups.get((b, source, not warm))
        if other is not None:  # a bucket split in two: each part judged among all its layers
            count = max(layer_count or 0, len(groups[key].keys() | other.keys()))
        out.extend(_decided(groups[key].values(), refs, seconds, config, count))
    return sorted(out, key=lambda m: (m.layer.depth, m.layer.id, m.window.end, m.window.source))


def merge_streamed(
    items: Iterable[tuple[StoredWindow, Layer, int | None, int | None]],
    refs: Callable[[Iterable[int]], Mapping[int, Ref]],
    seconds: float,
    config: DriftConfig,
    *,
    layer_count: int | None = None,
) -> Iterator[Merged]:
    """:func:`merge_groups` over all sources, of ``items`` that come in time order (by end),
    one bucket at a time: a bucket is merged, decided and yielded (its layers in no
    particular order) as soon as the first window of the next one comes, so memory holds
    one bucket's merged statistics, however long the range.  ``refs(ids)`` gives the
    reference rows of those ids (asked for once per bucket).  The merged windows are the ones
    :func:`merge_groups` makes of the same items, bit for bit.
    """
    merging = StreamedMerge(refs, seconds, config, layer_count=layer_count)
    for item in items:
        yield from merging.add(*item)
    yield from merging.close()


class StreamedMerge:
    """:func:`merge_streamed` fed one window at a time: what merges one stream of windows at
    several resolutions at once (each its own ``StreamedMerge``, all fed the same windows).

    :meth:`add` takes the next window (its end at or after the last one's) and returns the
    buckets it completed, merged and decided; :meth:`close` returns the last one.
    """

    def __init__(
        self,
        refs: Callable[[Iterable[int]], Mapping[int, Ref]],
        seconds: float,
        config: DriftConfig,
        *,
        layer_count: int | None = None,
    ) -> None:
        self.refs, self.seconds, self.config = refs, seconds, config
        self.layer_count = layer_count
        self.current: int | None = None
        self.groups: dict[int, _Group] = {}

    def add(
        self,
        stored: StoredWindow,
        layer: Layer,
        running_id: int | None,
        baseline_id: int | None,
    ) -> list[Merged]:
        """Merge in the next window; the buckets before its own, once it begins a new one."""
        b = _bucket(stored.end, self.seconds)
        done: list[Merged] = []
        if self.current is not None and b != self.current:
            if b < self.current:
                raise ValueError("merge_streamed needs the windows in time order (by end)")
            done = self.close()
        self.current = b
        _collect(self.groups, stored, layer, b, running_id, baseline_id)
        return done

    def close(self) -> list[Merged]:
        """The bucket merged so far, decided (nothing, when no window came since)."""
        if not self.groups:
            return []
        groups, self.groups = self.groups, {}
        ids = {i for g in groups.values() for i in (g.running_id, g.baseline_id) if i is not None}
        return _decided(
            groups.values(), self.refs(ids), self.seconds, self.config, self.layer_count
        )


class _Page:
    """The first ``limit`` of the windows added, in any order, whose keys are after
    ``after``: at most twice ``limit`` of them are held at a time."""

    def __init__(self, limit: int | None, after: WindowKey | None) -> None:
        self.limit, self.after = limit, after
        self.items: list[tuple[WindowKey, StoredWindow]] = []

    def add(self, key: WindowKey, window: StoredWindow) -> None:
        if self.after is not None and key <= self.after:
            return
        self.items.append((key, window))
        if self.limit is not None and len(self.items) > 2 * (self.limit + 1):
            self.items.sort(key=lambda item: item[0])
            del self.items[self.limit + 1 :]

    def page(self) -> WindowPage:
        self.items.sort(key=lambda item: item[0])
        if self.limit is None or len(self.items) <= self.limit:
            return WindowPage([w for _, w in self.items])
        shown = self.items[: self.limit]
        return WindowPage([w for _, w in shown], shown[-1][0])


def _older(at: Any, row_id: Any, key: NewestKey) -> Any:
    """The rows after ``key`` in the order newest first (time, then id, both descending) --
    spelled out, as :func:`_after`."""
    time = _to_utc(key.at)
    return sa.or_(at < time, sa.and_(at == time, row_id < key.id))


def _after(key: WindowKey) -> Any:
    """The windows after ``key`` in the order depth, layer id, end, id -- spelled out: a row
    value comparison would leave SQLAlchemy to type the time, which SQLite compares as the
    text the column writes."""
    end = _to_utc(key.end)
    return sa.or_(
        Layer.depth > key.depth,
        sa.and_(
            Layer.depth == key.depth,
            sa.or_(
                Layer.id > key.layer_id,
                sa.and_(
                    Layer.id == key.layer_id,
                    sa.or_(Window.end > end, sa.and_(Window.end == end, Window.id > key.id)),
                ),
            ),
        ),
    )


def merge_stored(
    items: Sequence[tuple[StoredWindow, Layer, int | None, int | None]],
    refs: Mapping[int, Ref],
    seconds: float,
    config: DriftConfig,
    *,
    layer_count: int | None = None,
) -> list[StoredWindow]:
    """:func:`merge_groups` over all sources, as plain windows."""
    return [m.window for m in merge_groups(items, refs, seconds, config, layer_count=layer_count)]


def _with_metrics(w: StoredWindow, metrics: Mapping[str, Any]) -> StoredWindow:
    values = dict(w.__dict__)
    values["metrics"] = dict(metrics)
    return StoredWindow(**values)


def moments_equal(a: ChannelMoments, b: ChannelMoments) -> bool:
    """Bitwise equality of two sets of sufficient statistics (for tests and dedup)."""
    return all(np.array_equal(x, y) for x, y in zip(a.as_arrays(), b.as_arrays(), strict=True))
