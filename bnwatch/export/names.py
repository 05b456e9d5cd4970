"""The Prometheus metrics bnwatch exports: names, types, labels, meaning and units.

This module is the single source of truth for the exporters -- :mod:`bnwatch.export.store`
(the service's ``/metrics``, built from the store at scrape time),
:mod:`bnwatch.export.service` (the service process's own trigger queue, on the same
``/metrics``) and :mod:`bnwatch.export.monitor` (in-process, from each closed window) -- and
for the alert rules in ``deploy/prometheus/``.  Rules of the road (DESIGN §6):

- series are per model / version / layer (or per monitor ``source``; the service process's
  own trigger queue has no labels), **never per channel**: a ResNet-50 has ~26 k BatchNorm
  channels and a series each would swamp Prometheus;
- values are in base units (seconds, ratios in [0, 1], booleans as 0/1); counters end in
  ``_total`` (prometheus_client adds the suffix to a counter family's name);
- a layer gauge whose value is undefined (NaN/NULL: no baseline yet, too few samples) is
  omitted rather than exported as NaN, so ``absent()`` and comparisons behave.

Layer gauges read the newest window of each layer; the ``field`` of a :class:`MetricSpec` names
the layer-level metric it comes from (a column of the store's ``windows`` table, the same name
as the :class:`bnwatch.schema.LayerReport` attribute, except the two batch-noise values, which
come from ``LayerReport.observed_batch_noise``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bnwatch.schema import ALERT_KINDS as _ALERT_KINDS
from bnwatch.schema import BATCH_SIZE_BUCKETS, RECALIBRATION_STATUSES

__all__ = [
    "ALERTS_ACTIVE",
    "ALERT_KINDS",
    "ALERT_LABELS",
    "ALL_METRICS",
    "BATCHES_TOTAL",
    "BATCH_SIZE",
    "LAYER_GAUGES",
    "LAYER_LABELS",
    "LAYER_LAST_WINDOW_END",
    "LAYER_METRICS",
    "MONITOR_HOOK_ERRORS_TOTAL",
    "MONITOR_METRICS",
    "MONITOR_OVERHEAD_RATIO",
    "MONITOR_WINDOWS_DROPPED_TOTAL",
    "NONFINITE_VALUES_TOTAL",
    "RECALIBRATIONS",
    "RECALIBRATION_LABELS",
    "RECALIBRATION_OLDEST_PENDING",
    "RECALIBRATION_STATUSES",
    "SAMPLES_TOTAL",
    "SERVICE_ONLY",
    "SOURCE_LABELS",
    "SOURCE_LAST_WINDOW_END",
    "STORE_METRICS",
    "STORE_ONLY",
    "STORE_UP",
    "TRIGGER_QUEUE_DEPTH",
    "TRIGGER_QUEUE_DROPPED_TOTAL",
    "WINDOWS_TOTAL",
    "MetricSpec",
]

LAYER_LABELS: tuple[str, ...] = ("model", "version", "layer")
"""Labels of every per-layer metric."""

SOURCE_LABELS: tuple[str, ...] = ("model", "version", "source")
"""Labels of every per-monitor metric (``source``: the monitor's id, ``host:pid`` by default)."""

ALERT_LABELS: tuple[str, ...] = ("model", "version", "kind")
"""Labels of :data:`ALERTS_ACTIVE`."""

ALERT_KINDS = _ALERT_KINDS
"""Every alert kind bnwatch raises (the ``kind`` label of :data:`ALERTS_ACTIVE`), from
:data:`bnwatch.schema.ALERT_KINDS`.  ``bnwatch_alerts_active`` carries a 0 for each kind of
each known model version without an open alert, so a rule on ``> 0`` resolves instead of
going absent."""


MetricType = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family.

    Attributes:
        name: the sample name (counters include ``_total``; a histogram's base name).
        type: ``gauge``, ``counter`` or ``histogram``.
        labels: label names, in order.
        help: what it means and its unit (the ``# HELP`` line).
        field: for layer gauges, the layer-level metric the value comes from (``None``: derived).
        boolean: the field is a yes/no decision, exported as 1/0.
    """

    name: str
    type: MetricType
    labels: tuple[str, ...]
    help: str
    field: str | None = None
    boolean: bool = False


def _layer_gauge(name: str, field: str, help: str, *, boolean: bool = False) -> MetricSpec:
    return MetricSpec(name, "gauge", LAYER_LABELS, help, field=field, boolean=boolean)


_LATEST = "in the layer's latest window"

LAYER_GAUGES: tuple[MetricSpec, ...] = (
    _layer_gauge(
        "bnwatch_layer_kl_mean",
        "kl_mean",
        f"Mean over channels of KL(N(mean, var) || N(running_mean, running_var)) {_LATEST}, "
        "in nats (0 = matches the running statistics).",
    ),
    _layer_gauge(
        "bnwatch_layer_mean_shift_rms",
        "d_rms",
        "RMS over channels of the standardized mean shift d = (mean - running_mean) / "
        f"sqrt(running_var + eps) {_LATEST}, in running standard deviations (dimensionless).",
    ),
    _layer_gauge(
        "bnwatch_layer_log_std_ratio_rms",
        "log_r_rms",
        "RMS over channels of log r = 0.5 * ln((var + eps) / (running_var + eps)) "
        f"{_LATEST}, a natural-log std ratio (dimensionless, 0 = same spread).",
    ),
    _layer_gauge(
        "bnwatch_layer_drift_mean_shift_rms",
        "drift_d_rms",
        "RMS over channels of the standardized mean shift against the drift baseline "
        f"(reference profile or warm-up windows) {_LATEST}, in baseline standard deviations.",
    ),
    _layer_gauge(
        "bnwatch_layer_drifted_channels_ratio",
        "frac_drifted",
        "Share of channels whose shift from the drift baseline is both significant and larger "
        f"than the effect-size tolerance {_LATEST} (ratio, 0 to 1).",
    ),
    _layer_gauge(
        "bnwatch_layer_gap_channels_ratio",
        "frac_gap",
        "Share of channels whose shift from the running statistics is both significant and "
        f"larger than the effect-size tolerance {_LATEST} (ratio, 0 to 1).",
    ),
    _layer_gauge(
        "bnwatch_layer_drift_p_value",
        "p_value",
        f"Layer p-value of the drift test against the baseline {_LATEST} "
        "(probability, 0 to 1; small = significant).",
    ),
    _layer_gauge(
        "bnwatch_layer_drifted",
        "drifted",
        f"1 if the layer drifted from its baseline {_LATEST} (significant and large), else 0.",
        boolean=True,
    ),
    _layer_gauge(
        "bnwatch_layer_train_inference_gap",
        "gap",
        "1 if production differs from the layer's running statistics (significant and large) "
        f"{_LATEST}, else 0; persistent gaps call for recalibration.",
        boolean=True,
    ),
    _layer_gauge(
        "bnwatch_layer_batch_stat_mode",
        "batch_stat_mode",
        "1 if the layer normalized with batch statistics at inference (training mode or no "
        f"running statistics) {_LATEST}, else 0.",
        boolean=True,
    ),
    _layer_gauge(
        "bnwatch_layer_running_stats_mutated",
        "running_stats_mutated",
        f"1 if the layer's running_mean/running_var changed while watched {_LATEST}, else 0.",
        boolean=True,
    ),
    _layer_gauge(
        "bnwatch_layer_small_batch_mismatch",
        "small_batch_mismatch",
        "1 if the layer uses batch statistics on batches small enough for their noise to "
        f"exceed the tolerance {_LATEST}, else 0.",
        boolean=True,
    ),
    _layer_gauge(
        "bnwatch_layer_batch_noise_mean_shift_rms",
        "batch_noise_d",
        "Predicted RMS of d that batch-statistics normalization incurs at the observed batch "
        f"size {_LATEST}, in standard deviations (dimensionless).",
    ),
    _layer_gauge(
        "bnwatch_layer_batch_noise_log_std_ratio_rms",
        "batch_noise_log_r",
        "Predicted RMS of log r that batch-statistics normalization incurs at the observed "
        f"batch size {_LATEST} (natural-log std ratio, dimensionless).",
    ),
)
"""Layer gauges read from the latest window's layer-level metrics (NaN/NULL omitted)."""

LAYER_LAST_WINDOW_END = MetricSpec(
    "bnwatch_layer_last_window_end_timestamp_seconds",
    "gauge",
    LAYER_LABELS,
    "End of the layer's latest window, in seconds since the Unix epoch.",
)

SAMPLES_TOTAL = MetricSpec(
    "bnwatch_samples_total",
    "counter",
    LAYER_LABELS,
    "Samples that passed through the layer while watched, measured or not (samples).",
)
WINDOWS_TOTAL = MetricSpec(
    "bnwatch_windows_total",
    "counter",
    LAYER_LABELS,
    "Closed windows of the layer (windows).",
)
BATCHES_TOTAL = MetricSpec(
    "bnwatch_batches_total",
    "counter",
    LAYER_LABELS,
    "Batches that passed through the layer while watched, measured or not (batches).",
)
NONFINITE_VALUES_TOTAL = MetricSpec(
    "bnwatch_nonfinite_values_total",
    "counter",
    LAYER_LABELS,
    "NaN or infinite input values that reached the layer, counted and excluded from every "
    "statistic (values).",
)
BATCH_SIZE = MetricSpec(
    "bnwatch_batch_size",
    "histogram",
    LAYER_LABELS,
    "Sizes of the measured batches that reached the layer, in samples per batch "
    f"(buckets {', '.join(map(str, BATCH_SIZE_BUCKETS))}, +Inf); _count counts measured batches.",
)

LAYER_METRICS: tuple[MetricSpec, ...] = (
    *LAYER_GAUGES,
    LAYER_LAST_WINDOW_END,
    SAMPLES_TOTAL,
    WINDOWS_TOTAL,
    BATCHES_TOTAL,
    NONFINITE_VALUES_TOTAL,
    BATCH_SIZE,
)
"""Every per-layer family."""

MONITOR_OVERHEAD_RATIO = MetricSpec(
    "bnwatch_monitor_overhead_ratio",
    "gauge",
    SOURCE_LABELS,
    "Time the monitor's hooks took over the model's forward time, as of its latest window "
    "(ratio; 0.02 = 2 %).",
)
MONITOR_WINDOWS_DROPPED_TOTAL = MetricSpec(
    "bnwatch_monitor_windows_dropped_total",
    "counter",
    SOURCE_LABELS,
    "Closed windows the monitor could not deliver to its sink and dropped, as reported by the "
    "monitor: its running total, which restarts at zero with it (windows).",
)
MONITOR_HOOK_ERRORS_TOTAL = MetricSpec(
    "bnwatch_monitor_hook_errors_total",
    "counter",
    SOURCE_LABELS,
    "Exceptions caught inside the monitor's hooks (inference went on), as reported by the "
    "monitor: its running total, which restarts at zero with it (errors).",
)
SOURCE_LAST_WINDOW_END = MetricSpec(
    "bnwatch_source_last_window_end_timestamp_seconds",
    "gauge",
    SOURCE_LABELS,
    "End of the latest window the monitor delivered, in seconds since the Unix epoch.",
)

MONITOR_METRICS: tuple[MetricSpec, ...] = (
    MONITOR_OVERHEAD_RATIO,
    MONITOR_WINDOWS_DROPPED_TOTAL,
    MONITOR_HOOK_ERRORS_TOTAL,
    SOURCE_LAST_WINDOW_END,
)
"""Every per-source family."""

ALERTS_ACTIVE = MetricSpec(
    "bnwatch_alerts_active",
    "gauge",
    ALERT_LABELS,
    "Open bnwatch alerts of the kind for the model version, from the store's alert state "
    "machine (alerts; 0 = none open).",
)

RECALIBRATION_LABELS: tuple[str, ...] = ("model", "version", "status")
"""Labels of :data:`RECALIBRATIONS`."""

RECALIBRATIONS = MetricSpec(
    "bnwatch_recalibrations",
    "gauge",
    RECALIBRATION_LABELS,
    f"Recalibrations of the model version in the store with this status "
    f"({', '.join(RECALIBRATION_STATUSES)}), a dimensionless count; 0 for a status with none.",
)

RECALIBRATION_OLDEST_PENDING = MetricSpec(
    "bnwatch_recalibration_oldest_pending_timestamp_seconds",
    "gauge",
    ("model", "version"),
    "When the model version's oldest pending recalibration was recorded, in seconds since the "
    "Unix epoch (absent: none pending); old means a receiver never reported back.",
)

STORE_UP = MetricSpec(
    "bnwatch_store_up",
    "gauge",
    (),
    "1 if the last scrape read the bnwatch store, 0 if reading it failed "
    "(then no other bnwatch series are exported).",
)

STORE_ONLY: tuple[MetricSpec, ...] = (
    ALERTS_ACTIVE,
    RECALIBRATIONS,
    RECALIBRATION_OLDEST_PENDING,
    STORE_UP,
)
"""The families only the store collector exports (alerts and recalibrations live in the store;
an in-process monitor exports the rest)."""

STORE_METRICS: tuple[MetricSpec, ...] = (*LAYER_METRICS, *MONITOR_METRICS, *STORE_ONLY)
"""Every family the store collector exports."""

TRIGGER_QUEUE_DEPTH = MetricSpec(
    "bnwatch_trigger_queue_depth",
    "gauge",
    (),
    "Claimed recalibration trigger events waiting in this service process's queue for its "
    "webhook worker (events; when the queue is full -- 256 -- new ones are dropped).",
)

TRIGGER_QUEUE_DROPPED_TOTAL = MetricSpec(
    "bnwatch_trigger_queue_dropped_total",
    "counter",
    (),
    "Claimed recalibration trigger events this service process did not queue because its queue "
    "was full; each recalibration was recorded failed and its webhook never sent (events).",
)

SERVICE_ONLY: tuple[MetricSpec, ...] = (TRIGGER_QUEUE_DEPTH, TRIGGER_QUEUE_DROPPED_TOTAL)
"""The families only ``bnwatch serve`` exports, from the process that answers the scrape (its
trigger queue), and only when it has webhook triggers
(:class:`bnwatch.export.service.TriggerQueueCollector`)."""

ALL_METRICS: tuple[MetricSpec, ...] = (*STORE_METRICS, *SERVICE_ONLY)
"""Every family bnwatch exports."""
