"""What the read endpoints answer: one pydantic model per resource, public direction only.

(The request body of ``POST /api/v1/windows`` is :class:`bnwatch.wire.WindowBatch`, its answer
:class:`bnwatch.wire.IngestResult`: the wire format is defined once, in :mod:`bnwatch.wire`.)
Values the store keeps as NaN or NULL -- metrics undefined for a window -- are ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from bnwatch.store.repository import (
    METRIC_COLUMNS,
    AlertInfo,
    LayerInfo,
    ModelInfo,
    RecalibrationInfo,
    StoredWindow,
)

AlertState = Literal["open", "resolved", "acknowledged"]
"""The ``?state=`` filter of ``GET /api/v1/alerts``.  An alert's stored state is ``open`` or
``resolved``; acknowledging one sets its ``acknowledged_at`` and leaves it open, so
``acknowledged`` selects the open alerts a person has acknowledged (``open`` lists them too)."""
BOOLEAN_METRICS = frozenset(
    {"gap", "drifted", "batch_stat_mode", "running_stats_mutated", "small_batch_mismatch"}
)


def _float(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _floats(values: np.ndarray) -> list[float | None]:
    return [x if math.isfinite(x) else None for x in np.asarray(values, dtype=float).tolist()]


class ModelPublic(BaseModel):
    """A stored model version."""

    name: str
    version: str
    created_at: datetime
    layers: int = Field(description="BatchNorm layers stored for this version")
    windows: int = Field(description="stored layer-windows (one row per layer and window)")
    last_window_end: datetime | None

    @classmethod
    def of(cls, info: ModelInfo) -> ModelPublic:
        return cls(
            name=info.name,
            version=info.version,
            created_at=info.created_at,
            layers=info.layers,
            windows=info.windows,
            last_window_end=info.last_window_end,
        )


class LayerPublic(BaseModel):
    """A BatchNorm layer of a model version, in depth order."""

    name: str
    kind: str
    channels: int
    depth: int

    @classmethod
    def of(cls, info: LayerInfo) -> LayerPublic:
        return cls(name=info.name, kind=info.kind, channels=info.channels, depth=info.depth)


class WindowMetrics(BaseModel):
    """The layer-level metrics of a window (DESIGN §3); ``null`` where undefined.

    Against the running statistics (train/inference gap): ``kl_mean``, ``d_rms``,
    ``log_r_rms``, ``gap_p_value``, ``frac_gap``, ``gap``.  Against the drift baseline:
    ``drift_*``, ``p_value``, ``frac_drifted``, ``drifted``.  Small-batch mismatch:
    ``batch_stat_mode``, ``running_stats_mutated``, ``small_batch_mismatch``,
    ``batch_noise_d`` / ``batch_noise_log_r`` (at the observed batch sizes).
    """

    kl_mean: float | None = None
    d_rms: float | None = None
    log_r_rms: float | None = None
    gap_p_value: float | None = None
    frac_gap: float | None = None
    gap: bool | None = None
    drift_kl_mean: float | None = None
    drift_d_rms: float | None = None
    drift_log_r_rms: float | None = None
    p_value: float | None = None
    frac_drifted: float | None = None
    drifted: bool | None = None
    batch_stat_mode: bool | None = None
    running_stats_mutated: bool | None = None
    small_batch_mismatch: bool | None = None
    batch_noise_d: float | None = None
    batch_noise_log_r: float | None = None

    @classmethod
    def of(cls, metrics: Mapping[str, Any]) -> WindowMetrics:
        values: dict[str, Any] = {}
        for name in METRIC_COLUMNS:
            raw = metrics.get(name)
            boolean = name in BOOLEAN_METRICS
            values[name] = None if raw is None else bool(raw) if boolean else _float(raw)
        return cls(**values)


class ChannelStats(BaseModel):
    """Per-channel statistics of a window (``?stats=true``): population mean and variance over
    all elements, and the variance of the per-sample means."""

    mean: list[float | None]
    var: list[float | None]
    between_var: list[float | None]


class WindowPublic(BaseModel):
    """One window of one layer, as stored or merged to a coarser ``resolution``."""

    layer: str
    source: str = Field(description='the sending monitor ("*" for windows merged across them)')
    start: datetime
    end: datetime
    resolution_seconds: float = Field(description="0 for raw windows")
    merged_from: int = Field(description="stored windows merged into this one")
    channels: int
    n_samples: int
    n_batches: int
    samples_seen: int
    batches_seen: int
    nonfinite: int
    batch_sizes: dict[int, int]
    baseline: str
    metrics: WindowMetrics
    stats: ChannelStats | None = None

    @classmethod
    def of(cls, w: StoredWindow, *, with_stats: bool = False) -> WindowPublic:
        stats = None
        if with_stats and w.stats is not None:
            m = w.stats.moments
            stats = ChannelStats(
                mean=_floats(m.mean), var=_floats(m.var), between_var=_floats(m.between_var)
            )
        return cls(
            layer=w.layer,
            source=w.source,
            start=w.start,
            end=w.end,
            resolution_seconds=w.resolution_seconds,
            merged_from=w.merged_from,
            channels=w.channels,
            n_samples=w.n_samples,
            n_batches=w.n_batches,
            samples_seen=w.samples_seen,
            batches_seen=w.batches_seen,
            nonfinite=w.nonfinite,
            batch_sizes=dict(w.batch_sizes),
            baseline=w.baseline,
            metrics=WindowMetrics.of(w.metrics),
            stats=stats,
        )


class AlertPublic(BaseModel):
    """An alert about one layer (or, for ``no_data``, a whole model version)."""

    id: int
    model: str
    version: str
    layer: str | None
    kind: str
    state: str
    opened_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None
    acknowledged_at: datetime | None
    values: dict[str, Any]

    @classmethod
    def of(cls, info: AlertInfo) -> AlertPublic:
        return cls(
            id=info.id,
            model=info.model,
            version=info.version,
            layer=info.layer,
            kind=info.kind,
            state=info.state,
            opened_at=info.opened_at,
            last_seen_at=info.last_seen_at,
            resolved_at=info.resolved_at,
            acknowledged_at=info.acknowledged_at,
            values=dict(info.values or {}),
        )


class RecalibrationPublic(BaseModel):
    """A recalibration: triggered, then applied, rejected or failed, with its outcome."""

    id: int
    model: str
    version: str
    alert_id: int | None
    status: str
    method: str
    created_at: datetime
    finished_at: datetime | None
    outcome: dict[str, Any] | None

    @classmethod
    def of(cls, info: RecalibrationInfo) -> RecalibrationPublic:
        return cls(
            id=info.id,
            model=info.model,
            version=info.version,
            alert_id=info.alert_id,
            status=info.status,
            method=info.method,
            created_at=info.created_at,
            finished_at=info.finished_at,
            outcome=dict(info.outcome) if info.outcome is not None else None,
        )


class HealthPublic(BaseModel):
    """``GET /healthz``: the service and its database."""

    status: Literal["ok", "error"]
    database: Literal["ok", "unreachable", "outdated", "newer"] = Field(
        description="ok; unreachable; outdated: behind this service's schema (run `bnwatch db "
        "upgrade`); newer: at a revision this service does not know, which a newer bnwatch "
        "migrated (upgrade this service)"
    )
    schema_revision: str | None = Field(description="the database's Alembic revision")
