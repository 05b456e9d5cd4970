"""The thresholds each source judged its windows at: ``sources.drift_config``.

A monitor's :class:`~bnwatch.drift.DriftConfig` decides the ``drifted`` and ``gap`` flags of
its windows, but was not stored, so views that merge a range of windows and judge it again
(the dashboard's Layer page) judged it at the default thresholds and could disagree with the
stored flags.  Monitors now send the thresholds in their account of themselves
(``drift_<field>`` keys); the store keeps the last ones of each source in one nullable JSON
column, as ``bnwatch.drift.config_account`` wrote them.  Existing sources get NULL (they
never reported thresholds) until their next window.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 01:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sources") as batch:
        batch.add_column(sa.Column("drift_config", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sources") as batch:
        batch.drop_column("drift_config")
