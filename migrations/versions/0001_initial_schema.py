"""Initial schema: models, layers, refs, windows, alerts, recalibrations.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 08:03:43.565884
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_models_name_version")),
    )
    op.create_table(
        "layers",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("model_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=500), nullable=False),
        sa.Column("kind", sa.String(length=100), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_layers_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_layers")),
        sa.UniqueConstraint("model_id", "name", name=op.f("uq_layers_model_id_name")),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("model_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("layer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["layer_id"], ["layers.id"], name=op.f("fk_alerts_layer_id_layers"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_alerts_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index(
            "uq_alerts_open",
            ["model_id", "layer_id", "kind"],
            unique=True,
            postgresql_where=sa.text("state = 'open'"),
            sqlite_where=sa.text("state = 'open'"),
        )

    op.create_table(
        "refs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("layer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("eps", sa.Float(), nullable=False),
        sa.Column("mean_var", sa.LargeBinary(), nullable=False),
        sa.Column("moments", sa.LargeBinary(), nullable=True),
        sa.Column("parent_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("lineage", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["layer_id"], ["layers.id"], name=op.f("fk_refs_layer_id_layers"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["refs.id"], name=op.f("fk_refs_parent_id_refs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refs")),
        sa.UniqueConstraint(
            "layer_id", "kind", "digest", name=op.f("uq_refs_layer_id_kind_digest")
        ),
    )
    op.create_table(
        "recalibrations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("model_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("alert_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("method", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["alerts.id"],
            name=op.f("fk_recalibrations_alert_id_alerts"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_recalibrations_model_id_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recalibrations")),
    )
    op.create_table(
        "windows",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("uid", sa.String(length=32), nullable=False),
        sa.Column("model_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("layer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolution_seconds", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column(
            "running_ref_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "baseline_ref_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("baseline", sa.String(length=20), nullable=False),
        sa.Column("channels", sa.Integer(), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("n_batches", sa.Integer(), nullable=False),
        sa.Column("batches_seen", sa.Integer(), nullable=False),
        sa.Column("samples_seen", sa.Integer(), nullable=False),
        sa.Column("batch_stat_batches", sa.Integer(), nullable=False),
        sa.Column("nonfinite", sa.Integer(), nullable=False),
        sa.Column("batch_sizes", sa.JSON(), nullable=False),
        sa.Column("moments", sa.LargeBinary(), nullable=False),
        sa.Column("kl_mean", sa.Float(), nullable=True),
        sa.Column("d_rms", sa.Float(), nullable=True),
        sa.Column("log_r_rms", sa.Float(), nullable=True),
        sa.Column("gap_p_value", sa.Float(), nullable=True),
        sa.Column("frac_gap", sa.Float(), nullable=False),
        sa.Column("gap", sa.Boolean(), nullable=False),
        sa.Column("drift_kl_mean", sa.Float(), nullable=True),
        sa.Column("drift_d_rms", sa.Float(), nullable=True),
        sa.Column("drift_log_r_rms", sa.Float(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("frac_drifted", sa.Float(), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("batch_stat_mode", sa.Boolean(), nullable=False),
        sa.Column("running_stats_mutated", sa.Boolean(), nullable=False),
        sa.Column("small_batch_mismatch", sa.Boolean(), nullable=False),
        sa.Column("batch_noise_d", sa.Float(), nullable=True),
        sa.Column("batch_noise_log_r", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["baseline_ref_id"], ["refs.id"], name=op.f("fk_windows_baseline_ref_id_refs")
        ),
        sa.ForeignKeyConstraint(
            ["layer_id"], ["layers.id"], name=op.f("fk_windows_layer_id_layers"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_windows_model_id_models"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["running_ref_id"], ["refs.id"], name=op.f("fk_windows_running_ref_id_refs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_windows")),
        sa.UniqueConstraint("layer_id", "uid", name=op.f("uq_windows_layer_id_uid")),
    )
    with op.batch_alter_table("windows", schema=None) as batch_op:
        batch_op.create_index("ix_windows_layer_end", ["layer_id", "end"], unique=False)
        batch_op.create_index("ix_windows_model_end", ["model_id", "end"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        # float64 statistics are noise to pglz: skip compression, keep them out of line
        op.execute("ALTER TABLE windows ALTER COLUMN moments SET STORAGE EXTERNAL")


def downgrade() -> None:
    with op.batch_alter_table("windows", schema=None) as batch_op:
        batch_op.drop_index("ix_windows_model_end")
        batch_op.drop_index("ix_windows_layer_end")

    op.drop_table("windows")
    op.drop_table("recalibrations")
    op.drop_table("refs")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_alerts_open",
            postgresql_where=sa.text("state = 'open'"),
            sqlite_where=sa.text("state = 'open'"),
        )

    op.drop_table("alerts")
    op.drop_table("layers")
    op.drop_table("models")
