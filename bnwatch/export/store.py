"""Export the store's latest state to Prometheus, computed at scrape time.

:class:`StoreCollector` is a custom collector (the prometheus_client pattern for state that
lives elsewhere): each ``collect()`` reads the store through four cheap read calls -- the
latest window of every layer (layer-level metric columns only, no per-channel arrays are
decoded), the per-layer running totals, the per-monitor accounts and the open alerts -- and
builds metric families from them.  Nothing is cached between scrapes, so every process
serving ``/metrics`` shows the same numbers, and counters are the store's monotonic totals
(redelivered windows are counted once there) -- except the two a monitor reports of itself,
``bnwatch_monitor_windows_dropped_total`` and ``bnwatch_monitor_hook_errors_total``: they are
its running totals as of its latest window, and restart at zero with the monitor under the
same ``source``, as a process's own counters do (``rate()`` and ``increase()`` take the drop
for a counter reset).

A failed read does not fail the scrape: the collector then yields only
``bnwatch_store_up 0`` (1 when the reads succeeded), so the ``BnwatchStoreDown`` alert can
fire while the scrape itself, and ``up``, stay healthy.

Usage (the service's ``GET /metrics``)::

    registry = CollectorRegistry()
    registry.register(StoreCollector(repository))
    body = generate_latest(registry)
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.exc import SQLAlchemyError

from bnwatch.errors import ConfigError
from bnwatch.export import names
from bnwatch.export.names import MetricSpec

__all__ = ["STORE_ERRORS", "StoreCollector", "StoreReader", "cumulative_buckets", "family"]

logger = logging.getLogger("bnwatch.export")

SOURCE_TTL = timedelta(days=1)
"""How long a monitor source's series stay exported after its last window."""

STORE_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError)
"""Errors of a store read that mean "the store is down", not "bnwatch has a bug"."""


# --------------------------------------------------------------------------------------------
# What the collector needs from the store (bnwatch.store.repository.Repository provides it;
# declared structurally so that export, an adapter, does not import store, its sibling).
# --------------------------------------------------------------------------------------------
class LatestWindow(Protocol):
    """The latest window of one layer (``StoredWindow``)."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def layer(self) -> str: ...
    @property
    def end(self) -> datetime: ...
    @property
    def metrics(self) -> Mapping[str, Any]: ...


class Totals(Protocol):
    """Monotonic totals of one layer (``LayerTotals``)."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def layer(self) -> str: ...
    @property
    def windows(self) -> int: ...
    @property
    def samples(self) -> int: ...
    @property
    def batches(self) -> int: ...
    @property
    def nonfinite(self) -> int: ...
    @property
    def measured_samples(self) -> int: ...
    @property
    def batch_size_buckets(self) -> Sequence[tuple[int | None, int]]: ...


class SourceAccount(Protocol):
    """A monitor's last account of itself (``SourceInfo``)."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def last_window_end(self) -> datetime: ...
    @property
    def overhead_ratio(self) -> float | None: ...
    @property
    def windows_dropped(self) -> int: ...
    @property
    def hook_errors(self) -> int: ...


class OpenAlert(Protocol):
    """An alert (``AlertInfo``)."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def kind(self) -> str: ...


class RecalibrationCount(Protocol):
    """Recalibrations of a model version with one status (``RecalibrationCount``)."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def count(self) -> int: ...
    @property
    def oldest(self) -> datetime: ...


class StoreReader(Protocol):
    """The read API :class:`StoreCollector` uses (``bnwatch.store.repository.Repository``)."""

    def latest_metrics(self) -> Sequence[LatestWindow]: ...
    def totals(self) -> Sequence[Totals]: ...
    def sources(self) -> Sequence[SourceAccount]: ...
    def alerts(self, *, state: str | None = None) -> Sequence[OpenAlert]: ...
    def recalibration_counts(self) -> Sequence[RecalibrationCount]: ...


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------
def family(spec: MetricSpec) -> Metric:
    """An empty metric family for ``spec``, of its type (add samples with ``add_metric``)."""
    if spec.type == "gauge":
        return gauge_family(spec)
    if spec.type == "counter":
        return counter_family(spec)
    return histogram_family(spec)


def gauge_family(spec: MetricSpec) -> GaugeMetricFamily:
    return GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def counter_family(spec: MetricSpec) -> CounterMetricFamily:
    return CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def histogram_family(spec: MetricSpec) -> HistogramMetricFamily:
    return HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def _value(raw: Any, *, boolean: bool) -> float | None:
    """A stored metric as a sample value; ``None`` (omit the sample) when undefined."""
    if raw is None:
        return None
    value = float(bool(raw)) if boolean else float(raw)
    return value if math.isfinite(value) else None


def cumulative_buckets(
    buckets: Sequence[tuple[int | None, int]],
) -> list[tuple[str, float]]:
    """Per-bucket counts (upper bound, ``None`` = +Inf) as cumulative ``(le, count)`` pairs."""
    out: list[tuple[str, float]] = []
    acc = 0
    for bound, count in buckets:
        acc += count
        le = floatToGoString(math.inf if bound is None else bound)  # type: ignore[no-untyped-call]
        out.append((le, float(acc)))
    return out


@dataclass(frozen=True)
class _Snapshot:
    latest: Sequence[LatestWindow]
    totals: Sequence[Totals]
    sources: Sequence[SourceAccount]
    alerts: Sequence[OpenAlert]
    recalibrations: Sequence[RecalibrationCount]


class StoreCollector(Collector):
    """Builds bnwatch's metric families from the store at every scrape.

    Args:
        repository: the store's read API (a ``bnwatch.store.repository.Repository``).
        source_ttl: the per-monitor series (``bnwatch_monitor_*``,
            ``bnwatch_source_last_window_end_timestamp_seconds``) are exported for the sources
            whose last window ended within this time of the newest window of their model
            version (default: a day).

    ``describe()`` returns every family bnwatch exports (without samples and without touching
    the database), so that registering this collector next to another exporter of the same
    names fails loudly with ``DuplicateTimeseries`` and restricted registries
    (``/metrics?name[]=...``) find it.  Register one per registry.
    """

    def __init__(self, repository: StoreReader, *, source_ttl: timedelta = SOURCE_TTL) -> None:
        if not source_ttl.total_seconds() > 0:
            raise ConfigError("source_ttl", source_ttl, "a positive timedelta")
        self.repository = repository
        self.source_ttl = source_ttl
        self._lock = threading.Lock()
        self._up: bool | None = None

    def describe(self) -> list[Metric]:
        """The families :meth:`collect` yields, without samples (no store access)."""
        return [family(spec) for spec in names.STORE_METRICS]

    def collect(self) -> Iterator[Metric]:
        """Read the store and yield every family, then ``bnwatch_store_up``."""
        try:
            snapshot = self._read()
        except STORE_ERRORS as err:
            self._transition(False, err)
            yield self._store_up(False)
            return
        self._transition(True, None)
        yield from self._layer_gauges(snapshot.latest)
        yield from self._layer_totals(snapshot.totals)
        yield from self._monitors(self._current(snapshot.sources))
        yield self._alerts(snapshot)
        yield from self._recalibrations(snapshot)
        yield self._store_up(True)

    # -- reading ---------------------------------------------------------------------------
    def _read(self) -> _Snapshot:
        """Every read first, so a failure midway exports nothing stale or half."""
        repo = self.repository
        return _Snapshot(
            latest=repo.latest_metrics(),
            totals=repo.totals(),
            sources=repo.sources(),
            alerts=repo.alerts(state="open"),
            recalibrations=repo.recalibration_counts(),
        )

    def _transition(self, up: bool, err: BaseException | None) -> None:
        """Log when the store goes down or comes back (not at every scrape)."""
        with self._lock:
            changed, self._up = self._up != up, up
        if changed and not up:
            logger.warning("bnwatch metrics: reading the store failed: %s", err, exc_info=err)
        elif changed and up:
            logger.info("bnwatch metrics: reading the store")

    # -- families --------------------------------------------------------------------------
    @staticmethod
    def _layer_gauges(latest: Sequence[LatestWindow]) -> Iterator[Metric]:
        gauges = [(spec, gauge_family(spec)) for spec in names.LAYER_GAUGES]
        last_end = gauge_family(names.LAYER_LAST_WINDOW_END)
        for w in latest:
            labels = [w.model, w.version, w.layer]
            for spec, fam in gauges:
                assert spec.field is not None  # every layer gauge names its field
                value = _value(w.metrics.get(spec.field), boolean=spec.boolean)
                if value is not None:
                    fam.add_metric(labels, value)
            last_end.add_metric(labels, w.end.timestamp())
        yield from (fam for _, fam in gauges)
        yield last_end

    @staticmethod
    def _layer_totals(totals: Sequence[Totals]) -> Iterator[Metric]:
        samples = counter_family(names.SAMPLES_TOTAL)
        windows = counter_family(names.WINDOWS_TOTAL)
        batches = counter_family(names.BATCHES_TOTAL)
        nonfinite = counter_family(names.NONFINITE_VALUES_TOTAL)
        sizes = histogram_family(names.BATCH_SIZE)
        for t in totals:
            labels = [t.model, t.version, t.layer]
            samples.add_metric(labels, t.samples)
            windows.add_metric(labels, t.windows)
            batches.add_metric(labels, t.batches)
            nonfinite.add_metric(labels, t.nonfinite)
            buckets = cumulative_buckets(t.batch_size_buckets)
            # _count is the +Inf bucket (the measured batches), _sum the sum of their sizes
            sizes.add_metric(labels, buckets, float(t.measured_samples))
        yield from (samples, windows, batches, nonfinite, sizes)

    def _current(self, sources: Sequence[SourceAccount]) -> list[SourceAccount]:
        """The sources whose last window ended within ``source_ttl`` of their model version's
        newest one.  A monitor that stopped -- a restarted replica reports under a new
        ``host:pid`` -- leaves the export once its successors have reported for that long,
        instead of adding four stale series per restart for good; a version nothing reports
        for any more keeps its last sources (``BnwatchNoData`` looks at them)."""
        newest: dict[tuple[str, str], datetime] = {}
        for s in sources:
            key = (s.model, s.version)
            newest[key] = max(newest.get(key, s.last_window_end), s.last_window_end)
        return [
            s
            for s in sources
            if s.last_window_end >= newest[(s.model, s.version)] - self.source_ttl
        ]

    @staticmethod
    def _monitors(sources: Sequence[SourceAccount]) -> Iterator[Metric]:
        overhead = gauge_family(names.MONITOR_OVERHEAD_RATIO)
        dropped = counter_family(names.MONITOR_WINDOWS_DROPPED_TOTAL)
        errors = counter_family(names.MONITOR_HOOK_ERRORS_TOTAL)
        last_end = gauge_family(names.SOURCE_LAST_WINDOW_END)
        for s in sources:
            labels = [s.model, s.version, s.source]
            ratio = _value(s.overhead_ratio, boolean=False)
            if ratio is not None:
                overhead.add_metric(labels, ratio)
            dropped.add_metric(labels, s.windows_dropped)
            errors.add_metric(labels, s.hook_errors)
            last_end.add_metric(labels, s.last_window_end.timestamp())
        yield from (overhead, dropped, errors, last_end)

    @staticmethod
    def _alerts(snapshot: _Snapshot) -> Metric:
        """Open alerts per model version and kind; 0 for every kind without one."""
        counts: dict[tuple[str, str, str], int] = {}
        versions: set[tuple[str, str]] = set()
        for rows in (snapshot.latest, snapshot.totals, snapshot.sources):
            versions.update((r.model, r.version) for r in rows)
        for a in snapshot.alerts:
            versions.add((a.model, a.version))
            key = (a.model, a.version, a.kind)
            counts[key] = counts.get(key, 0) + 1
        active = gauge_family(names.ALERTS_ACTIVE)
        kinds = list(names.ALERT_KINDS)
        kinds += sorted({kind for _, _, kind in counts} - set(kinds))  # a newer store's kinds
        for model, version in sorted(versions):
            for kind in kinds:
                active.add_metric([model, version, kind], counts.get((model, version, kind), 0))
        return active

    @staticmethod
    def _recalibrations(snapshot: _Snapshot) -> Iterator[Metric]:
        """Recalibrations per model version and status (0 for every status without one, for
        every version the store knows), and when the oldest pending one was recorded."""
        counts = {(r.model, r.version, r.status): r for r in snapshot.recalibrations}
        versions: set[tuple[str, str]] = {(m, v) for m, v, _ in counts}
        for rows in (snapshot.latest, snapshot.totals, snapshot.sources):
            versions.update((r.model, r.version) for r in rows)
        statuses = list(names.RECALIBRATION_STATUSES)
        statuses += sorted({s for _, _, s in counts} - set(statuses))  # a newer store's
        total = gauge_family(names.RECALIBRATIONS)
        oldest = gauge_family(names.RECALIBRATION_OLDEST_PENDING)
        for model, version in sorted(versions):
            for status in statuses:
                row = counts.get((model, version, status))
                total.add_metric([model, version, status], row.count if row else 0)
            pending = counts.get((model, version, "pending"))
            if pending is not None:
                oldest.add_metric([model, version], pending.oldest.timestamp())
        yield from (total, oldest)

    @staticmethod
    def _store_up(up: bool) -> Metric:
        gauge = gauge_family(names.STORE_UP)
        gauge.add_metric([], 1.0 if up else 0.0)
        return gauge
