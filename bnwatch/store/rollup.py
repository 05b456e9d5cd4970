"""Rollups and retention: ``bnwatch db compact``.

Compaction merges the windows of each layer and source older than a cutoff into windows of a
coarser resolution (the warm-up windows of a bucket apart from the others) -- exactly, since
the sufficient statistics merge without loss; their reservoirs of per-sample channel means
merge with :meth:`~bnwatch.stats.Reservoir.merge` into one uniform sample of the bucket, as
bounded as each window's -- and replaces them in the same transaction, so an interrupted run
loses nothing and a re-run finds nothing left to do.  Retention deletes windows older than an
age.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, undefer

from bnwatch.codec import encode_moments
from bnwatch.drift import DriftConfig
from bnwatch.errors import BnwatchError
from bnwatch.schema import as_utc, utcnow
from bnwatch.store.engine import lock_for_writing
from bnwatch.store.models import CompactedWindow, Layer, Model, Ref, Source, Window
from bnwatch.store.repository import (
    MERGE_CHUNK,
    WARMING_UP,
    Merged,
    Repository,
    _bucket,
    _collect,
    _decided,
    _Group,
    _insert_ignore,
    reservoir_columns,
    utc_from_timestamp,
)

CHUNK_BUCKETS = 24
"""Buckets compacted per transaction (24 one-hour buckets: a day); each bucket's windows are
streamed and merged as they come (:func:`_compact_bucket`), so this sets how much work one
transaction holds, not how much memory."""


@dataclass(frozen=True)
class CompactResult:
    windows_merged: int
    windows_created: int
    windows_dropped: int


def compact(
    engine: Engine,
    *,
    older_than: timedelta,
    resolution: timedelta,
    drop_older_than: timedelta | None = None,
    now: datetime | None = None,
    config: DriftConfig | None = None,
) -> CompactResult:
    """Merge windows that ended before ``now - older_than`` into ``resolution`` buckets
    (``now``: the current time; a naive one is UTC).

    Only whole buckets that end before the cutoff are compacted; windows already at (or
    coarser than) ``resolution`` are left alone.  The warm-up windows (baseline
    ``warming_up``) of a bucket are merged apart from the others: reports pool them as the
    reference (:meth:`Repository.reference_reservoir`) and leave them out of production.
    With ``drop_older_than``, windows that ended before ``now - drop_older_than`` are
    deleted first.  The merged windows' flags are
    decided at ``config``; without one, at the thresholds each model version's monitors
    reported, else the default (:meth:`Repository.judging`) -- so compaction does not
    re-judge a monitor's windows at thresholds it never used.
    """
    seconds = resolution.total_seconds()
    if not seconds > 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    now = as_utc(now) if now is not None else utcnow()
    dropped = drop_windows(engine, older_than=drop_older_than, now=now) if drop_older_than else 0
    cutoff_ts = math.floor((now - older_than).timestamp() / seconds) * seconds
    cutoff = utc_from_timestamp(cutoff_ts)
    repo = Repository(engine)
    merged = created = 0
    with Session(engine) as conn:
        spans = conn.execute(
            sa.select(Window.model_id, Model.name, Model.version, sa.func.min(Window.end))
            .join(Model, Model.id == Window.model_id)
            .where(Window.end <= cutoff, Window.resolution_seconds < seconds)
            .group_by(Window.model_id, Model.name, Model.version)
        ).all()
    for model_id, name, version, first_end in spans:
        cfg = repo.judging(name, version, config)
        chunk_start: float | None = _bucket_before(first_end, seconds)
        while chunk_start is not None and chunk_start < cutoff_ts:
            chunk_end = min(chunk_start + CHUNK_BUCKETS * seconds, cutoff_ts)
            m, c = _compact_chunk(repo, model_id, chunk_start, chunk_end, seconds, cfg)
            merged += m
            created += c
            # on to the next window: a gap (months without traffic, a window stored in year 1
            # before times were bounded) is skipped, not walked a chunk at a time
            after = _next_end(engine, model_id, chunk_end, cutoff, seconds)
            chunk_start = None if after is None else max(chunk_end, after)
    return CompactResult(merged, created, dropped)


def _bucket_before(end: datetime, seconds: float) -> float:
    """The start of the chunk whose first bucket holds a window ending at ``end`` (a window
    ending on a boundary belongs to the bucket it closes)."""
    return math.floor(as_utc(end).timestamp() / seconds) * seconds - seconds


def _next_end(
    engine: Engine, model_id: int, after_ts: float, cutoff: datetime, seconds: float
) -> float | None:
    """:func:`_bucket_before` the first window to compact that ends after ``after_ts``
    (``None``: there is none before the cutoff)."""
    with Session(engine) as conn:
        end = conn.execute(
            sa.select(sa.func.min(Window.end)).where(
                Window.model_id == model_id,
                Window.end > utc_from_timestamp(after_ts),
                Window.end <= cutoff,
                Window.resolution_seconds < seconds,
            )
        ).scalar_one_or_none()
    return None if end is None else _bucket_before(end, seconds)


def _compact_chunk(
    repo: Repository,
    model_id: int,
    start_ts: float,
    end_ts: float,
    seconds: float,
    config: DriftConfig,
) -> tuple[int, int]:
    """One transaction: merge the windows ending in ``(start, end]`` and replace them, one
    bucket at a time (:func:`_compact_bucket`).

    Compactions of one model version take turns (:func:`_serialize`, before anything is
    read): two at once (cron runs that overlap, an operator's by hand) read the same windows,
    and one's rollups then counted them again beside the other's (PostgreSQL), or one deleted
    the other's rollups (SQLite reuses freed ids).  The later one waits, then reads what the
    first committed and finds its windows merged.
    """
    merged = created = 0
    with Session(repo.engine) as conn, conn.begin():
        _serialize(conn, model_id)
        model = conn.execute(sa.select(Model).where(Model.id == model_id)).scalar_one()
        bucket_end: float | None = start_ts
        while bucket_end is not None:
            first = conn.execute(
                sa.select(sa.func.min(Window.end)).where(
                    Window.model_id == model_id,
                    Window.end > utc_from_timestamp(bucket_end),
                    Window.end <= utc_from_timestamp(end_ts),
                    Window.resolution_seconds < seconds,
                )
            ).scalar_one_or_none()
            if first is None:
                break
            bucket = _bucket(as_utc(first), seconds)
            m, c = _compact_bucket(repo, conn, model, bucket, seconds, config)
            merged += m
            created += c
            bucket_end = (bucket + 1) * seconds
    return merged, created


COMPACT_LOCK_SPACE = 0x626E63  # "bnc": the advisory-lock keys of compaction
"""The first key of compaction's PostgreSQL advisory locks (the second: the model id)."""


def _serialize(conn: Session, model_id: int) -> None:
    """Take compaction's lock of one model version for this transaction: on PostgreSQL a
    transaction-scoped advisory lock (a second run waits, no error: cron runs that overlap
    finish one after the other); on SQLite the file's write lock, up front (``BEGIN
    IMMEDIATE``) -- pysqlite would run the reads outside a transaction, so another run could
    commit between them and the deletes."""
    connection = conn.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": COMPACT_LOCK_SPACE, "key": model_id},
        )
    else:
        lock_for_writing(connection)


class CompactionRaceError(BnwatchError, RuntimeError):
    """The windows a compaction read were no longer all there to replace: another process
    deleted some in between (a compaction that did not take :func:`_serialize`'s lock -- an
    older bnwatch -- or retention).  The transaction is rolled back; run the compaction
    again."""


def _compact_bucket(
    repo: Repository,
    conn: Session,
    model: Model,
    bucket: int,
    seconds: float,
    config: DriftConfig,
) -> tuple[int, int]:
    """Merge the windows of one bucket (finer than ``seconds``) into one rollup per layer,
    source and warm-up label, and replace them.

    The windows stream in (``yield_per``, a server-side cursor on PostgreSQL), each merged
    into its group as it comes: memory holds one merged window per group and the ids read,
    not the bucket's statistics (a day of them was loaded at once: 3.8 GB to compact 1.3 GB
    of blobs).  Windows ending together keep their id order, as :func:`merge_groups` sorts
    them (stably, by end): the rollups are the ones it makes of the same windows.

    A rollup of this bucket at this resolution already there (windows that came after the
    bucket was compacted -- late, never stored before) is merged with them, not left beside a
    second one.  The uids of the raw windows merged are recorded (``compacted_windows``), so
    that ingest refuses them -- and only them -- from now on.
    """
    start = utc_from_timestamp(bucket * seconds)
    end = utc_from_timestamp((bucket + 1) * seconds)
    rows = conn.execute(
        sa.select(Window, Layer)
        .join(Layer, Layer.id == Window.layer_id)
        .where(
            Window.model_id == model.id,
            Window.end > start,
            Window.end <= end,
            Window.resolution_seconds <= seconds,
        )
        .options(undefer(Window.reservoir))
        .order_by(Window.end, Window.id)
        .execution_options(yield_per=MERGE_CHUNK)
    )
    groups: dict[tuple[str, bool], dict[int, _Group]] = defaultdict(dict)
    unmarked: set[tuple[str, bool, int]] = set()  # groups with a rollup of unrecorded uids
    ids: list[int] = []
    uids: set[str] = set()
    rolled = False  # rollups (of a finer resolution) among them
    schema_version: int | None = None  # the first window's, as before
    for w, layer in rows:
        key = (w.source, w.baseline == WARMING_UP)
        stored = repo.to_stored(model, layer, w, True)
        _collect(groups[key], stored, layer, bucket, w.running_ref_id, w.baseline_ref_id)
        ids.append(w.id)
        if w.resolution_seconds > 0:
            rolled = True
            if not w.merged_uids:
                unmarked.add((*key, layer.id))
        else:
            uids.add(w.uid)
        if schema_version is None:
            schema_version = w.schema_version
    if schema_version is None:  # nothing read: the bucket was compacted meanwhile
        return 0, 0
    ref_ids = {
        i
        for g in groups.values()
        for group in g.values()
        for i in (group.running_id, group.baseline_id)
        if i is not None
    }
    refs = (
        {r.id: r for r in conn.execute(sa.select(Ref).where(Ref.id.in_(ref_ids))).scalars()}
        if ref_ids
        else {}
    )
    new_rows = []
    for key in sorted(groups):
        source, warm = key
        other = groups.get((source, not warm))
        count = len(groups[key].keys() | other.keys()) if other is not None else None
        for m in _decided(groups[key].values(), refs, seconds, config, count):
            # every window it merged left its uid, unless it merged a rollup made before 0011
            marked = (*key, m.layer.id) not in unmarked
            new_rows.append(_rollup_row(model.id, m, seconds, schema_version, marked))
    del groups
    connection = conn.connection()  # Core from here: rowcounts, no ORM bookkeeping
    deleted = 0
    for i in range(0, len(ids), 500):
        result = connection.execute(sa.delete(Window).where(Window.id.in_(ids[i : i + 500])))
        deleted += int(result.rowcount or 0)
    if deleted != len(ids):
        raise CompactionRaceError(
            f"compacting {model.name}@{model.version}: {len(ids)} windows ending in "
            f"({start.isoformat()}, {end.isoformat()}] were read but only {deleted} were "
            "left to replace -- another process deleted some meanwhile; nothing of this run's "
            "last transaction was kept: run `bnwatch db compact` again"
        )
    if new_rows:
        connection.execute(sa.insert(Window), new_rows)
    if rolled:  # the uids they hold are held by the coarser rollups now: kept as long
        connection.execute(
            sa.update(CompactedWindow)
            .where(
                CompactedWindow.model_id == model.id,
                CompactedWindow.end > start,
                CompactedWindow.end < end,
            )
            .values(end=end)
        )
    if uids:
        table: sa.Table = CompactedWindow.__table__  # type: ignore[assignment]
        _insert_ignore(
            connection,
            table,
            [{"model_id": model.id, "uid": uid, "end": end} for uid in sorted(uids)],
        )
    return len(ids), len(new_rows)


def _rollup_row(
    model_id: int,
    m: Merged,
    seconds: float,
    schema_version: int,
    marked: bool,
) -> dict[str, Any]:
    """The ``windows`` row of one merged window."""
    w = m.window
    if w.stats is None:  # pragma: no cover - _decided always sets it
        raise ValueError("a merged window without statistics")
    row = {
        "uid": rollup_uid(seconds, m.bucket, m.layer.id, m.source_ids),
        "model_id": model_id,
        "layer_id": m.layer.id,
        "source": w.source,
        "start": w.start,
        "end": w.end,
        "resolution_seconds": seconds,
        "schema_version": schema_version,
        "running_ref_id": m.running_ref_id,
        "baseline_ref_id": m.baseline_ref_id,
        "baseline": w.baseline,
        "channels": w.channels,
        "n_samples": w.n_samples,
        "n_batches": w.n_batches,
        "batches_seen": w.batches_seen,
        "samples_seen": w.samples_seen,
        "batch_stat_batches": w.stats.batch_stat_batches,
        "nonfinite": w.nonfinite,
        "batch_sizes": {str(k): int(v) for k, v in w.batch_sizes.items()},
        "moments": encode_moments(w.stats.moments),
        "merged_uids": marked,
        **reservoir_columns(w.stats.reservoir),
    }
    row.update(w.metrics)
    return row


def rollup_uid(seconds: float, bucket: int, layer_id: int, source_ids: Sequence[int]) -> str:
    """The uid of a rolled-up window: ``r`` and 31 hex digits of a digest of what it merged
    (resolution, bucket, layer, the ids of its windows) -- the ``VARCHAR(32)`` of a uid holds it
    however large the ids grow (written out, a day of minute windows on a large store made 33
    characters, which PostgreSQL refused, failing every later compaction)."""
    what = f"{int(seconds)}-{bucket}-{layer_id}-" + ",".join(map(str, sorted(source_ids)))
    return "r" + hashlib.sha256(what.encode()).hexdigest()[:31]


def drop_windows(engine: Engine, *, older_than: timedelta, now: datetime | None = None) -> int:
    """Delete windows that ended before ``now - older_than`` (and the uids of the windows merged
    into the rollups deleted), and the monitor sources whose
    last window ended before then (none of their windows is left: a restarted replica reports
    under a new ``host:pid``, and the retired ones would otherwise be kept -- and exported --
    for good); returns how many windows."""
    cutoff = (as_utc(now) if now is not None else utcnow()) - older_than
    with engine.begin() as conn:
        result = conn.execute(sa.delete(Window).where(Window.end < cutoff))
        conn.execute(sa.delete(Source).where(Source.last_window_end < cutoff))
        # the uids merged into the rollups just deleted (each row ends with its rollup)
        conn.execute(sa.delete(CompactedWindow).where(CompactedWindow.end < cutoff))
        return int(result.rowcount or 0)
