"""Layer totals and sources for the windows stored before they existed.

Revision 0004 created ``layer_totals`` (the monotonic counters Prometheus exports as
``bnwatch_*_total``) and ``sources`` empty, and only windows written later added to them: a
database upgraded from 0001-0003 counted its earlier windows nowhere, for good -- the totals
under-counted, and the sources that sent them were not listed.  This revision adds a totals
row for every layer that has windows but none, summed from its windows, and a sources row
for every (model, source) that sent windows but has none (its first and last window, how many
windows it sent; no account of itself: that came with the windows' monitors, which older
windows lack).  A layer that already has a totals row is left alone: windows dropped by
retention since cannot be counted again, and adding what is stored could count twice what
was added.  Nothing to undo on downgrade: the rows are data, as if written at the time.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 14:10:00.000000
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""The batch-size buckets of ``layer_totals`` (revision 0004's columns, fixed)."""
COLUMNS = (
    "windows",
    "samples",
    "batches",
    "nonfinite",
    "measured_samples",
    *(f"batches_le_{b}" for b in BUCKETS),
    "batches_le_inf",
)

Time = sa.DateTime(timezone=True)
windows = sa.table(
    "windows",
    sa.column("layer_id"),
    sa.column("model_id"),
    sa.column("uid"),
    sa.column("source"),
    sa.column("start", Time),
    sa.column("end", Time),
    sa.column("samples_seen"),
    sa.column("batches_seen"),
    sa.column("nonfinite"),
    sa.column("batch_sizes", sa.JSON()),
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


def _bucket(size: int) -> str:
    return next((f"batches_le_{b}" for b in BUCKETS if size <= b), "batches_le_inf")


def upgrade() -> None:
    conn = op.get_bind()
    counted = sa.select(layer_totals.c.layer_id)
    missing = conn.execute(
        sa.select(windows.c.layer_id).distinct().where(windows.c.layer_id.not_in(counted))
    ).scalars()
    for layer_id in sorted(missing):
        acc: dict[str, int] = defaultdict(int)
        rows = conn.execute(
            sa.select(
                windows.c.samples_seen,
                windows.c.batches_seen,
                windows.c.nonfinite,
                windows.c.batch_sizes,
            ).where(windows.c.layer_id == layer_id)
        )
        for samples, batches, nonfinite, sizes in rows:
            acc["windows"] += 1
            acc["samples"] += int(samples)
            acc["batches"] += int(batches)
            acc["nonfinite"] += int(nonfinite)
            for size, count in _sizes(sizes).items():
                acc[_bucket(size)] += count
                acc["measured_samples"] += size * count
        conn.execute(
            layer_totals.insert().values(layer_id=layer_id, **{c: acc[c] for c in COLUMNS})
        )
    listed = sa.select(sources.c.model_id, sources.c.source)
    senders = conn.execute(
        sa.select(
            windows.c.model_id,
            windows.c.source,
            sa.func.min(windows.c.start),
            sa.func.max(windows.c.end),
            sa.func.count(sa.distinct(windows.c.uid)),
        )
        .where(sa.tuple_(windows.c.model_id, windows.c.source).not_in(listed))
        .group_by(windows.c.model_id, windows.c.source)
    ).all()
    for model_id, source, first, last, count in senders:
        conn.execute(
            sources.insert().values(
                model_id=model_id,
                source=source,
                first_seen=first,
                last_window_end=last,
                windows=int(count),
                windows_dropped=0,
                hook_errors=0,
            )
        )


def _sizes(value: Any) -> dict[int, int]:
    """A window's ``batch_sizes`` (JSON ``{"size": count}``) as integers."""
    if isinstance(value, str):  # a driver that hands JSON back as text
        value = json.loads(value)
    return {int(k): int(v) for k, v in (value or {}).items()}


def downgrade() -> None:
    pass  # the rows are data, as if written at the time: 0008 has the same tables
