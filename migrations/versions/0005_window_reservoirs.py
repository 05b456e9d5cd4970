"""Window reservoirs: each window keeps a bounded uniform sample of per-sample channel means.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 10:05:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("windows", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reservoir", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("reservoir_seen", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("reservoir_capacity", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("windows", schema=None) as batch_op:
        batch_op.drop_column("reservoir_capacity")
        batch_op.drop_column("reservoir_seen")
        batch_op.drop_column("reservoir")
