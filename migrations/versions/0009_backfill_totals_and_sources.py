"""Layer totals and sources for the windows stored before they existed.

Revision 0004 created ``layer_totals`` (the monotonic counters Prometheus exports as
``bnwatch_*_total``) and ``sources`` empty, and only windows written later added to them: a
database upgraded from 0001-0003 counted its earlier windows nowhere, for good -- the totals
under-counted, and the sources that sent them were not listed.  This revision adds what the
writer would have added, from the windows stored:

* a ``layer_totals`` row for every layer that has windows but none: its stored windows
  (rows), their samples, batches and non-finite values summed, and their batch-size
  histogram (the sizes of ``windows.batch_sizes``, bucketed as the writer buckets them);
* a ``sources`` row for every (model, source) that sent windows but has none: its first
  and last window, and how many windows it sent -- a raw window (``resolution_seconds`` 0)
  once, whatever its layers (the writer counts a window once; its layers' rows share its
  uid), and a compacted one (``bnwatch db compact`` existed from 0001) once per bucket, i.e.
  per (start, end, resolution): compaction writes one row per layer with a uid of its own,
  and does not record how many windows it merged.  This way a source's count equals the
  ``layer_totals.windows`` of each layer that was in all its windows.  No account of itself
  (dropped windows, hook errors: 0): that came with the windows' monitors, which older
  windows lack.

A layer (a source) that already has its row is left alone: windows dropped by retention
since cannot be counted again, and adding what is stored could count twice what was added.

Both are plain ``INSERT ... SELECT`` statements, so ``alembic upgrade --sql`` (offline mode)
prints them for a DBA to apply, with the same result as running online.  Nothing to undo on
downgrade: the rows are data, as if written at the time.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 14:10:00.000000
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""The batch-size buckets of ``layer_totals`` (revision 0004's columns, fixed): a size goes
to the first bucket it is at most, else to ``batches_le_inf`` (not cumulative)."""
HISTOGRAM = ("measured_samples", *(f"batches_le_{b}" for b in BUCKETS), "batches_le_inf")
COLUMNS = ("windows", "samples", "batches", "nonfinite", *HISTOGRAM)

Time = sa.DateTime(timezone=True)
windows = sa.table(
    "windows",
    sa.column("layer_id"),
    sa.column("model_id"),
    sa.column("uid"),
    sa.column("source"),
    sa.column("start", Time),
    sa.column("end", Time),
    sa.column("resolution_seconds"),
    sa.column("samples_seen"),
    sa.column("batches_seen"),
    sa.column("nonfinite"),
    sa.column("batch_sizes"),
)
layer_totals = sa.table("layer_totals", sa.column("layer_id"), *(sa.column(c) for c in COLUMNS))
sources = sa.table(
    "sources",
    sa.column("model_id"),
    sa.column("source"),
    sa.column("first_seen", Time),
    sa.column("last_window_end", Time),
    sa.column("windows"),
    sa.column("windows_dropped"),
    sa.column("hook_errors"),
)


def upgrade() -> None:
    dialect = op.get_context().dialect.name
    op.execute(_backfill_totals(dialect))
    op.execute(_backfill_sources())


def _uncounted() -> Any:
    """Windows of the layers that have no totals row."""
    return windows.c.layer_id.not_in(sa.select(layer_totals.c.layer_id))


def _histogram(dialect: str) -> sa.Subquery:
    """Per uncounted layer, its windows' batch sizes bucketed: ``batch_sizes`` is a JSON
    object ``{"size": batches}`` (anything else holds no sizes)."""
    value = windows.c.batch_sizes
    if dialect == "postgresql":
        is_object = sa.func.json_typeof(value) == "object"
        entries = sa.func.json_each_text
    else:  # SQLite (>= 3.38, or built with JSON1)
        is_object = sa.func.json_type(value) == "object"
        entries = sa.func.json_each
    pairs = entries(sa.case((is_object, value))).table_valued("key", "value").alias("sizes")
    size = sa.cast(pairs.c.key, sa.BigInteger)
    batches = sa.cast(pairs.c.value, sa.BigInteger)
    buckets = []
    for i, bound in enumerate(BUCKETS):
        within = size <= bound if i == 0 else sa.and_(size > BUCKETS[i - 1], size <= bound)
        buckets.append(
            sa.func.sum(sa.case((within, batches), else_=0)).label(f"batches_le_{bound}")
        )
    beyond = sa.func.sum(sa.case((size > BUCKETS[-1], batches), else_=0))
    return (
        sa.select(
            windows.c.layer_id,
            sa.func.sum(size * batches).label("measured_samples"),
            *buckets,
            beyond.label("batches_le_inf"),
        )
        .select_from(windows.join(pairs, sa.true()))
        .where(_uncounted())
        .group_by(windows.c.layer_id)
        .subquery("histogram")
    )


def _backfill_totals(dialect: str) -> sa.Insert:
    counts = (
        sa.select(
            windows.c.layer_id,
            sa.func.count().label("windows"),
            sa.func.sum(windows.c.samples_seen).label("samples"),
            sa.func.sum(windows.c.batches_seen).label("batches"),
            sa.func.sum(windows.c.nonfinite).label("nonfinite"),
        )
        .where(_uncounted())
        .group_by(windows.c.layer_id)
        .subquery("counts")
    )
    histogram = _histogram(dialect)
    rows = sa.select(
        counts.c.layer_id,
        counts.c.windows,
        counts.c.samples,
        counts.c.batches,
        counts.c.nonfinite,
        *(sa.func.coalesce(histogram.c[c], 0) for c in HISTOGRAM),
    ).select_from(counts.outerjoin(histogram, histogram.c.layer_id == counts.c.layer_id))
    return layer_totals.insert().from_select(["layer_id", *COLUMNS], rows)


def _backfill_sources() -> sa.Insert:
    # one row per window the writer counted: a raw window's layers share its uid; a
    # compacted bucket has a row (and uid) per layer, and counts once
    raw = sa.select(
        windows.c.model_id,
        windows.c.source,
        sa.func.min(windows.c.start).label("start"),
        sa.func.max(windows.c.end).label("end"),
    ).where(windows.c.resolution_seconds == 0)
    raw = raw.group_by(windows.c.model_id, windows.c.source, windows.c.uid)
    compacted = sa.select(
        windows.c.model_id, windows.c.source, windows.c.start, windows.c.end
    ).where(windows.c.resolution_seconds != 0)
    compacted = compacted.group_by(
        windows.c.model_id,
        windows.c.source,
        windows.c.start,
        windows.c.end,
        windows.c.resolution_seconds,
    )
    sent = sa.union_all(raw, compacted).subquery("sent")
    listed = sa.exists().where(
        sources.c.model_id == sent.c.model_id, sources.c.source == sent.c.source
    )
    rows = (
        sa.select(
            sent.c.model_id,
            sent.c.source,
            sa.func.min(sent.c.start),
            sa.func.max(sent.c.end),
            sa.func.count(),
            sa.literal(0),
            sa.literal(0),
        )
        .where(~listed)
        .group_by(sent.c.model_id, sent.c.source)
    )
    columns = [
        "model_id",
        "source",
        "first_seen",
        "last_window_end",
        "windows",
        "windows_dropped",
        "hook_errors",
    ]
    return sources.insert().from_select(columns, rows)


def downgrade() -> None:
    pass  # the rows are data, as if written at the time: 0008 has the same tables
