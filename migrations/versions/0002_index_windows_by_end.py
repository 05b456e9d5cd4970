"""Index windows by end time alone: retention and compaction scan by age across models.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 08:07:11.443249
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("windows", schema=None) as batch_op:
        batch_op.create_index("ix_windows_end", ["end"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("windows", schema=None) as batch_op:
        batch_op.drop_index("ix_windows_end")
