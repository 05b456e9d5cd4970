"""Index alerts by model version, layer, kind and id, and by the time they opened.

The alerts table had only the partial indexes of open alerts, so the alert engine's look-up of
the newest alert of each layer and kind -- at every stored batch -- read every alert the model
version ever had (a year of them, 300,000 rows: ingest 0.23 s -> 0.48 s), and ``GET
/api/v1/alerts``, now paged newest first, sorted the whole table for each page.
``ix_alerts_newest`` (model_id, layer_id, kind, id) answers the first with one descent per
layer and kind; ``ix_alerts_opened`` (opened_at, id) reads a page of the list in order.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08 00:20:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_alerts_newest", ["model_id", "layer_id", "kind", "id"], unique=False
        )
        batch_op.create_index("ix_alerts_opened", ["opened_at", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_opened")
        batch_op.drop_index("ix_alerts_newest")
