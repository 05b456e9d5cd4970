"""The database schema (SQLAlchemy 2 declarative mapping).

Tables: ``models`` (name, version), ``layers`` (a model's BatchNorm layers), ``refs``
(reference statistics: running statistics captured at attach, profiles, warm-up baselines,
recalibrated buffers -- versioned per layer, with lineage), ``windows`` (one row per layer
and window, with the full sufficient statistics as a compact blob, the layer-level
metrics as columns so that listing layers never decodes arrays, and a bounded reservoir of
per-sample channel means), ``alerts`` and
``recalibrations``.  A naming convention keeps Alembic autogenerate stable.  Migrations in
``migrations/`` must produce exactly this schema (a test diffs them).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only
Count = Id  # 64-bit counts: BIGINT, and SQLite's INTEGER holds 64 bits already
Timestamp = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: Timestamp}


class Model(Base):
    """A watched model version."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]


class Layer(Base):
    """One BatchNorm layer of a model version."""

    __tablename__ = "layers"
    __table_args__ = (UniqueConstraint("model_id", "name"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(500))
    kind: Mapped[str] = mapped_column(String(100))
    channels: Mapped[int]
    depth: Mapped[int]


class Ref(Base):
    """Reference statistics of one layer.

    ``kind`` is ``running`` (the stored buffers when a monitor attached), ``profile``,
    ``warmup`` (a baseline estimated from the first production windows) or ``recalibrated``.
    ``version`` orders references of one layer and kind, the newest highest; ``parent_id``
    and ``lineage`` record where a reference came from (which alert, which data, which
    method).  Rows are deduplicated by ``digest`` (SHA-256 of the arrays): a profile uploaded
    again after another one takes the next version (and its time and lineage) on its old row,
    so the newest profile is the one uploaded last.
    """

    __tablename__ = "refs"
    __table_args__ = (UniqueConstraint("layer_id", "kind", "digest"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))
    version: Mapped[int]
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    eps: Mapped[float] = mapped_column(Float)
    mean_var: Mapped[bytes] = mapped_column(LargeBinary)  # [2, C]: mean, var
    moments: Mapped[bytes | None] = mapped_column(LargeBinary)  # baselines: full moments
    reservoir: Mapped[bytes | None] = mapped_column(LargeBinary)  # profiles: [k, C] float32
    reservoir_seen: Mapped[int | None] = mapped_column(BigInteger)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("refs.id", ondelete="SET NULL"))
    lineage: Mapped[dict[str, Any] | None]


class Window(Base):
    """One closed window of one layer from one source (replica), raw or rolled up."""

    __tablename__ = "windows"
    __table_args__ = (
        UniqueConstraint("layer_id", "uid"),
        Index("ix_windows_layer_end", "layer_id", "end"),
        Index("ix_windows_model_end", "model_id", "end"),
        Index("ix_windows_end", "end"),  # retention and compaction scan by age alone
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    uid: Mapped[str] = mapped_column(String(32))  # the window's id: re-delivery is a no-op
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    layer_id: Mapped[int] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(200))
    start: Mapped[datetime]
    end: Mapped[datetime]
    resolution_seconds: Mapped[float] = mapped_column(Float, server_default=text("0"))
    schema_version: Mapped[int]
    running_ref_id: Mapped[int | None] = mapped_column(ForeignKey("refs.id"))
    baseline_ref_id: Mapped[int | None] = mapped_column(ForeignKey("refs.id"))
    baseline: Mapped[str] = mapped_column(String(20))
    # counts (64-bit: a window of NaN activations passes 2**31 elements within minutes;
    # SQLite's INTEGER is 64-bit already -- migration 0007)
    channels: Mapped[int]
    n_samples: Mapped[int] = mapped_column(Count)
    n_batches: Mapped[int] = mapped_column(Count)
    batches_seen: Mapped[int] = mapped_column(Count)
    samples_seen: Mapped[int] = mapped_column(Count)
    batch_stat_batches: Mapped[int] = mapped_column(Count)
    nonfinite: Mapped[int] = mapped_column(Count)
    batch_sizes: Mapped[dict[str, Any]]
    # the full sufficient statistics (bnwatch.codec)
    moments: Mapped[bytes] = mapped_column(LargeBinary)
    # a uniform sample of per-sample channel means ([k, C] float32 codec blob), NULL if none was
    # kept; loaded only when asked for (``undefer``): metric reads never pay for it
    reservoir: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    reservoir_seen: Mapped[int | None] = mapped_column(BigInteger)
    reservoir_capacity: Mapped[int | None] = mapped_column(Integer)
    # layer-level metrics (DESIGN §3), NULL where undefined
    kl_mean: Mapped[float | None] = mapped_column(Float)
    d_rms: Mapped[float | None] = mapped_column(Float)
    log_r_rms: Mapped[float | None] = mapped_column(Float)
    gap_p_value: Mapped[float | None] = mapped_column(Float)
    frac_gap: Mapped[float] = mapped_column(Float)
    gap: Mapped[bool] = mapped_column(Boolean)
    drift_kl_mean: Mapped[float | None] = mapped_column(Float)
    drift_d_rms: Mapped[float | None] = mapped_column(Float)
    drift_log_r_rms: Mapped[float | None] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float)
    frac_drifted: Mapped[float] = mapped_column(Float)
    drifted: Mapped[bool] = mapped_column(Boolean)
    batch_stat_mode: Mapped[bool] = mapped_column(Boolean)
    running_stats_mutated: Mapped[bool] = mapped_column(Boolean)
    small_batch_mismatch: Mapped[bool] = mapped_column(Boolean)
    batch_noise_d: Mapped[float | None] = mapped_column(Float)
    batch_noise_log_r: Mapped[float | None] = mapped_column(Float)
    # a rollup whose merged windows' uids are in ``compacted_windows`` (made since migration
    # 0011): a late window is refused only if its uid is there.  False for raw windows and for
    # rollups made before, whose windows left no uid: any window ending in one is refused.
    merged_uids: Mapped[bool] = mapped_column(Boolean, server_default=false())


class CompactedWindow(Base):
    """The uid of a window that compaction merged into a rollup -- one row per window (all
    its layers share the uid), written in the transaction that merged it -- so that a
    re-delivery of it is refused while a late window that was never stored is kept
    (:meth:`Repository._not_stored <bnwatch.store.repository.Repository._not_stored>`).
    ``end`` is the end of the rollup holding it (moved on when that rollup is merged into a
    coarser one): retention deletes the row with the rollup."""

    __tablename__ = "compacted_windows"
    __table_args__ = (Index("ix_compacted_windows_end", "end"),)

    model_id: Mapped[int] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    uid: Mapped[str] = mapped_column(String(32), primary_key=True)
    end: Mapped[datetime]


class LayerTotal(Base):
    """Running totals of one layer, additive and monotonic (Prometheus counters): windows,
    samples, batches, non-finite values and the batch-size histogram (batches per bucket of
    :data:`bnwatch.schema.BATCH_SIZE_BUCKETS`, not cumulative).  Compaction and retention
    leave them alone."""

    __tablename__ = "layer_totals"

    layer_id: Mapped[int] = mapped_column(
        ForeignKey("layers.id", ondelete="CASCADE"), primary_key=True
    )
    windows: Mapped[int] = mapped_column(BigInteger)
    samples: Mapped[int] = mapped_column(BigInteger)
    batches: Mapped[int] = mapped_column(BigInteger)
    nonfinite: Mapped[int] = mapped_column(BigInteger)
    measured_samples: Mapped[int] = mapped_column(BigInteger)  # Σ sizes of measured batches
    batches_le_1: Mapped[int] = mapped_column(BigInteger)
    batches_le_2: Mapped[int] = mapped_column(BigInteger)
    batches_le_4: Mapped[int] = mapped_column(BigInteger)
    batches_le_8: Mapped[int] = mapped_column(BigInteger)
    batches_le_16: Mapped[int] = mapped_column(BigInteger)
    batches_le_32: Mapped[int] = mapped_column(BigInteger)
    batches_le_64: Mapped[int] = mapped_column(BigInteger)
    batches_le_128: Mapped[int] = mapped_column(BigInteger)
    batches_le_256: Mapped[int] = mapped_column(BigInteger)
    batches_le_inf: Mapped[int] = mapped_column(BigInteger)


class Source(Base):
    """A monitor (replica) reporting for a model version, with its last account of itself."""

    __tablename__ = "sources"
    __table_args__ = (UniqueConstraint("model_id", "source"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(200))
    first_seen: Mapped[datetime]
    last_window_end: Mapped[datetime]
    windows: Mapped[int] = mapped_column(BigInteger)
    overhead_ratio: Mapped[float | None] = mapped_column(Float)
    windows_dropped: Mapped[int] = mapped_column(BigInteger)
    hook_errors: Mapped[int] = mapped_column(BigInteger)
    # the DriftConfig that decided the last window's flags, as bnwatch.drift.config_account
    # wrote it (drift_<field> -> value); NULL when it reported none (migration 0008)
    drift_config: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))


class Alert(Base):
    """An alert: opened after its condition held for K windows, resolved with hysteresis."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index(
            "uq_alerts_open",
            "model_id",
            "layer_id",
            "kind",
            unique=True,
            postgresql_where=text("state = 'open'"),
            sqlite_where=text("state = 'open'"),
        ),
        # the index above tells no two NULL layers apart: the one alert without a layer,
        # no_data, needs its own (migration 0007)
        Index(
            "uq_alerts_open_no_data",
            "model_id",
            unique=True,
            postgresql_where=text("kind = 'no_data' AND state = 'open'"),
            sqlite_where=text("kind = 'no_data' AND state = 'open'"),
        ),
        # the newest alert of each layer and kind (the alert engine, at every stored batch),
        # and the alerts of a model version; and the list of alerts, newest first, a page at
        # a time (migration 0010)
        Index("ix_alerts_newest", "model_id", "layer_id", "kind", "id"),
        Index("ix_alerts_opened", "opened_at", "id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    layer_id: Mapped[int | None] = mapped_column(ForeignKey("layers.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(40))
    state: Mapped[str] = mapped_column(String(20))
    opened_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    resolved_at: Mapped[datetime | None]
    acknowledged_at: Mapped[datetime | None]
    values: Mapped[dict[str, Any]]


class Recalibration(Base):
    """A recalibration: triggered (by an alert, a user), validated, applied or rejected."""

    __tablename__ = "recalibrations"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(20))
    method: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    outcome: Mapped[dict[str, Any] | None]
