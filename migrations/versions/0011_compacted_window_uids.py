"""Record the uids of the windows compaction merges: ``compacted_windows`` and
``windows.merged_uids``.

A window whose end fell in a rollup of its layer and source was taken for a re-delivery of
one merged into it and refused -- also a window that was never stored (spooled during an
outage, delivered after its hour was compacted), which was dropped while the writer counted
it written.  Compaction now records the uid of every window it merges (one row per window,
with the end of the rollup holding it, which retention deletes with the rollup) and marks
the rollups it makes (``merged_uids``): ingest refuses exactly the uids recorded.  Rollups
made before this revision have no uid rows and stay unmarked (``false``): any window ending
in one is still refused, as before -- re-deliveries of the windows merged into them stay
refused, at the price of late new ones.

Both changes are additive (a new table, a column with a constant default: no table is
rewritten on PostgreSQL); downgrade drops them, and the older rule then applies to all
rollups.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08 00:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "compacted_windows",
        sa.Column("model_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("uid", sa.String(length=32), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_compacted_windows_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("model_id", "uid", name=op.f("pk_compacted_windows")),
    )
    op.create_index("ix_compacted_windows_end", "compacted_windows", ["end"], unique=False)
    # a plain ADD COLUMN on both (SQLite takes one with a constant default): no batch copy
    # of the windows table, and ``alembic upgrade --sql`` can print it without reflecting
    op.add_column(
        "windows",
        sa.Column("merged_uids", sa.Boolean(), server_default=sa.false(), nullable=False),
    )


def downgrade() -> None:
    with op.batch_alter_table("windows") as batch:
        batch.drop_column("merged_uids")
    op.drop_index("ix_compacted_windows_end", table_name="compacted_windows")
    op.drop_table("compacted_windows")
