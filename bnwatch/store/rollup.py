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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, undefer

from bnwatch.codec import encode_moments
from bnwatch.drift import DriftConfig
from bnwatch.schema import as_utc, utcnow
from bnwatch.store.models import Layer, Model, Source, Window
from bnwatch.store.repository import (
    Repository,
    merge_groups,
    reservoir_columns,
    utc_from_timestamp,
)

CHUNK_BUCKETS = 24
"""Buckets compacted per transaction (24 one-hour buckets: a day)."""


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
    """One transaction: merge the windows ending in ``(start, end]`` and replace them."""
    start = utc_from_timestamp(start_ts)
    end = utc_from_timestamp(end_ts)
    with Session(repo.engine) as conn, conn.begin():
        model = conn.execute(sa.select(Model).where(Model.id == model_id)).scalar_one()
        rows = conn.execute(
            sa.select(Window, Layer)
            .join(Layer, Layer.id == Window.layer_id)
            .where(
                Window.model_id == model_id,
                Window.end > start,
                Window.end <= end,
                Window.resolution_seconds < seconds,
            )
            .options(undefer(Window.reservoir))
            .order_by(Window.id)
        ).all()
        if not rows:
            return 0, 0
        items = [
            (repo.to_stored(model, layer, w, True), layer, w.running_ref_id, w.baseline_ref_id)
            for w, layer in rows
        ]
        refs = repo.refs_for(conn, [w for w, _ in rows])
        merged = merge_groups(items, refs, seconds, config, by_source=True, by_warmup=True)
        new_rows = []
        for m in merged:
            w = m.window
            if w.stats is None:  # pragma: no cover - merge_groups always sets it
                continue
            row = {
                "uid": rollup_uid(seconds, m.bucket, m.layer.id, m.source_ids),
                "model_id": model_id,
                "layer_id": m.layer.id,
                "source": w.source,
                "start": w.start,
                "end": w.end,
                "resolution_seconds": seconds,
                "schema_version": rows[0][0].schema_version,
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
                **reservoir_columns(w.stats.reservoir),
            }
            row.update(w.metrics)
            new_rows.append(row)
        ids = [w.id for w, _ in rows]
        for i in range(0, len(ids), 500):
            conn.execute(sa.delete(Window).where(Window.id.in_(ids[i : i + 500])))
        conn.execute(sa.insert(Window), new_rows)
    return len(rows), len(new_rows)


def rollup_uid(seconds: float, bucket: int, layer_id: int, source_ids: Sequence[int]) -> str:
    """The uid of a rolled-up window: ``r`` and 31 hex digits of a digest of what it merged
    (resolution, bucket, layer, the ids of its windows) -- the ``VARCHAR(32)`` of a uid holds it
    however large the ids grow (written out, a day of minute windows on a large store made 33
    characters, which PostgreSQL refused, failing every later compaction)."""
    what = f"{int(seconds)}-{bucket}-{layer_id}-" + ",".join(map(str, sorted(source_ids)))
    return "r" + hashlib.sha256(what.encode()).hexdigest()[:31]


def drop_windows(engine: Engine, *, older_than: timedelta, now: datetime | None = None) -> int:
    """Delete windows that ended before ``now - older_than``, and the monitor sources whose
    last window ended before then (none of their windows is left: a restarted replica reports
    under a new ``host:pid``, and the retired ones would otherwise be kept -- and exported --
    for good); returns how many windows."""
    cutoff = (as_utc(now) if now is not None else utcnow()) - older_than
    with engine.begin() as conn:
        result = conn.execute(sa.delete(Window).where(Window.end < cutoff))
        conn.execute(sa.delete(Source).where(Source.last_window_end < cutoff))
        return int(result.rowcount or 0)
