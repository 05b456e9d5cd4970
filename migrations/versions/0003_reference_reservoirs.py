"""Reference reservoirs: a profile keeps a bounded sample of per-sample channel means.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 08:12:48.375100
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("refs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reservoir", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("reservoir_seen", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("refs", schema=None) as batch_op:
        batch_op.drop_column("reservoir_seen")
        batch_op.drop_column("reservoir")
