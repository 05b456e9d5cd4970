"""64-bit window counts on PostgreSQL, and one open ``no_data`` alert per model version.

* ``windows.nonfinite`` counts non-finite *elements*: a convolution fed NaN input passes 2**31
  of them within minutes, and PostgreSQL refused the window ("integer out of range") while
  SQLite, whose INTEGER holds 64 bits, stored it.  The window's counts become ``BIGINT`` on
  PostgreSQL; SQLite keeps its columns (only the version moves).
* The partial unique index on open alerts, ``(model_id, layer_id, kind)``, tells no two NULL
  layers apart, so two evaluators could both open a ``no_data`` alert (the alert without a
  layer) of one model version, and one of them then stayed open for good.  Duplicates already
  open are resolved (the oldest stays open) before ``uq_alerts_open_no_data``, ``(model_id)
  WHERE kind = 'no_data' AND state = 'open'``, is created.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 21:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COUNT_COLUMNS = (
    "n_samples",
    "n_batches",
    "batches_seen",
    "samples_seen",
    "batch_stat_batches",
    "nonfinite",
)
OPEN_NO_DATA = "kind = 'no_data' AND state = 'open'"


def _set_count_type(type_: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    alters = ", ".join(f"ALTER COLUMN {c} TYPE {type_}" for c in COUNT_COLUMNS)
    op.execute(f"ALTER TABLE windows {alters}")


def upgrade() -> None:
    _set_count_type("BIGINT")
    # keep the oldest open no_data alert of each model version open
    op.execute(
        "UPDATE alerts SET state = 'resolved', resolved_at = last_seen_at "
        f"WHERE {OPEN_NO_DATA} AND id NOT IN ("
        f"SELECT min(id) FROM alerts WHERE {OPEN_NO_DATA} GROUP BY model_id)"
    )
    op.create_index(
        "uq_alerts_open_no_data",
        "alerts",
        ["model_id"],
        unique=True,
        postgresql_where=sa.text(OPEN_NO_DATA),
        sqlite_where=sa.text(OPEN_NO_DATA),
    )


def downgrade() -> None:
    op.drop_index("uq_alerts_open_no_data", table_name="alerts")
    # counts beyond 2**31 do not fit the old columns: they are clamped, not lost with the row
    if op.get_bind().dialect.name == "postgresql":
        limit = 2**31 - 1
        op.execute(
            "UPDATE windows SET "
            + ", ".join(f"{c} = LEAST({c}, {limit})" for c in COUNT_COLUMNS)
            + " WHERE "
            + " OR ".join(f"{c} > {limit}" for c in COUNT_COLUMNS)
        )
    _set_count_type("INTEGER")
