"""Layer totals (monotonic counters, batch-size histogram) and sources (replicas) with their
last monitor account.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 08:24:02.959409
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sources",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("model_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("overhead_ratio", sa.Float(), nullable=True),
        sa.Column("windows_dropped", sa.BigInteger(), nullable=False),
        sa.Column("hook_errors", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_sources_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sources")),
        sa.UniqueConstraint("model_id", "source", name=op.f("uq_sources_model_id_source")),
    )
    op.create_table(
        "layer_totals",
        sa.Column("layer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("batches", sa.BigInteger(), nullable=False),
        sa.Column("nonfinite", sa.BigInteger(), nullable=False),
        sa.Column("measured_samples", sa.BigInteger(), nullable=False),
        sa.Column("batches_le_1", sa.BigInteger(), nullable=False),
        sa.Column("batches_le_2", sa.BigInteger(), nullable=False),
        sa.Column("batches_le_4", sa.BigInteger(), nullable=False),
        sa.Column("batches_le_8", sa.BigInteger(), nullable=False),
        sa.Column("batches_le_16", sa.BigInteger(), nullable=False),
        sa.Column("batches_le_32", sa.BigInteger(), nullable=False),
        sa.Column("batches_le_64", sa.BigInteger(), nullable=False),
        sa.Column("batches_le_128", sa.BigInteger(), nullable=False),
        sa.Column("batches_le_256", sa.BigInteger(), nullable=False),
        sa.Column("batches_le_inf", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["layer_id"],
            ["layers.id"],
            name=op.f("fk_layer_totals_layer_id_layers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("layer_id", name=op.f("pk_layer_totals")),
    )


def downgrade() -> None:
    op.drop_table("layer_totals")
    op.drop_table("sources")
