"""Export a monitor's closed windows to Prometheus from inside the watched process.

:class:`MonitorExporter` is a :class:`bnwatch.sink.Sink` that updates the metrics of
:mod:`bnwatch.export.names` from every closed window and hands the window on to another sink
(the store's writer, the HTTP client or memory), then :meth:`MonitorExporter.serve` exposes
them on ``http://addr:port/metrics``::

    sink = MonitorExporter(inner_sink)
    sink.serve(9464)
    mon = Monitor(..., sink=sink)

Same names, same meaning as the store's :class:`bnwatch.export.store.StoreCollector`: layer
gauges are the newest window of the layer, counters add up what every window saw.

**Multi-process servers** (gunicorn, uvicorn ``--workers``): each worker watches its own copy
of the model.  When ``PROMETHEUS_MULTIPROC_DIR`` is set in the environment *before the process
starts* (prometheus_client picks its value class at import time), every worker writes its
values to files in that directory and :meth:`serve` exposes the aggregate through
prometheus_client's ``MultiProcessCollector``; whichever worker binds the port first serves
everyone's metrics and the others skip serving.  Wipe the directory when the server starts and
call ``prometheus_client.multiprocess.mark_process_dead(pid)`` when a worker exits (gunicorn's
``child_exit`` hook).  How each metric aggregates across workers:

- counters and the batch-size histogram: **summed** over all workers, dead ones included, so
  totals stay monotonic when a worker is recycled;
- layer gauges (the metrics of the latest window): ``livemostrecent`` -- the value from the
  window that closed last in any live worker, which is what the store exports (the latest
  window of the layer whatever its source); ``max`` or ``sum`` would mix windows (a p-value's
  "worst" is its minimum, a drift distance's its maximum), and ``liveall`` would add a ``pid``
  label that breaks every rule and dashboard keyed on model/version/layer;
- ``bnwatch_layer_last_window_end_timestamp_seconds``: ``max`` over all workers, dead ones
  included -- the last time the layer was seen at all, so staleness shows when every worker
  stops;
- per-source gauges (``bnwatch_monitor_overhead_ratio``,
  ``bnwatch_source_last_window_end_timestamp_seconds``): one worker writes each ``source``;
  ``livemostrecent`` / ``livemax`` drop a dead worker's series instead of leaving a frozen
  timestamp that would look like a silent monitor.

prometheus_client cannot remove a label set in multi-process mode, so an undefined layer value
(NaN/``None``) is exported as NaN there; in a single process the sample is removed, as the
store collector omits it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector

from bnwatch.errors import ConfigError
from bnwatch.export import names
from bnwatch.export.names import MetricSpec
from bnwatch.schema import BATCH_SIZE_BUCKETS, LayerReport, WindowRecord
from bnwatch.sink import Sink, acquire, release

__all__ = ["MULTIPROCESS_MODES", "MonitorExporter", "layer_values", "multiprocess_dir"]

logger = logging.getLogger("bnwatch.export")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

GaugeMode = Literal["livemostrecent", "max", "livemax"]

MULTIPROCESS_MODES: Mapping[str, GaugeMode] = {
    **{spec.name: "livemostrecent" for spec in names.LAYER_GAUGES},
    names.LAYER_LAST_WINDOW_END.name: "max",
    names.MONITOR_OVERHEAD_RATIO.name: "livemostrecent",
    names.SOURCE_LAST_WINDOW_END.name: "livemax",
}
"""How each gauge aggregates across processes in multi-process mode (see the module doc)."""

_NOISE_FIELDS = {"batch_noise_d": "rms_d", "batch_noise_log_r": "rms_log_r"}

_METRIC_ATTRIBUTES = (
    "_layer",
    "_layer_end",
    "_samples",
    "_windows",
    "_batches",
    "_nonfinite",
    "_batch_size",
    "_overhead",
    "_dropped",
    "_hook_errors",
    "_source_end",
)
"""What :meth:`MonitorExporter._register` creates: the metrics a successor shares."""

_open: weakref.WeakSet[MonitorExporter] = weakref.WeakSet()
"""This process's exporters, to tell whose port a failed bind collided with."""


def multiprocess_dir() -> str | None:
    """The multi-process directory in effect for prometheus_client (``None``: one process).

    Raises:
        ConfigError: ``PROMETHEUS_MULTIPROC_DIR`` was set after prometheus_client was imported
            (its values would stay in this process and the aggregate would miss them), or is
            not a directory.
    """
    path = os.environ.get(MULTIPROC_ENV)
    multiprocess = prometheus_values.ValueClass is not prometheus_values.MutexValue
    if path and not multiprocess:
        raise ConfigError(
            MULTIPROC_ENV,
            path,
            "to be set before prometheus_client is first imported (in the environment the "
            "server starts with), so that every process writes its metrics to the directory",
        )
    if not multiprocess:
        return None
    if not path or not os.path.isdir(path):
        raise ConfigError(MULTIPROC_ENV, path, "an existing directory, writable by every worker")
    return path


def layer_values(report: LayerReport) -> dict[str, float | None]:
    """The layer gauges' values of a report, by metric name (``None``: undefined)."""
    out: dict[str, float | None] = {}
    noise = report.observed_batch_noise
    for spec in names.LAYER_GAUGES:
        field = spec.field or ""
        if field in _NOISE_FIELDS:
            raw = None if noise is None else getattr(noise, _NOISE_FIELDS[field])
        else:
            raw = getattr(report, field)
        value = None if raw is None else float(bool(raw)) if spec.boolean else float(raw)
        out[spec.name] = value if value is not None and math.isfinite(value) else None
    return out


def _gauge(spec: MetricSpec, registry: CollectorRegistry) -> Gauge:
    return Gauge(
        spec.name,
        spec.help,
        spec.labels,
        registry=registry,
        multiprocess_mode=MULTIPROCESS_MODES[spec.name],
    )


def _counter(spec: MetricSpec, registry: CollectorRegistry) -> Counter:
    return Counter(spec.name, spec.help, spec.labels, registry=registry)


class MonitorExporter:
    """A sink that exports each closed window to Prometheus and forwards it to ``inner``.

    Args:
        inner: the sink that delivers windows (``None``: export only).
        registry: where the metrics are registered (default: a registry of this exporter's
            own, so several exporters never clash); :meth:`serve` exposes it -- or, in
            multi-process mode, the aggregate of every process.

    Raises:
        ConfigError: the multi-process environment is inconsistent (:func:`multiprocess_dir`).
    """

    def __init__(
        self,
        inner: Sink | None = None,
        *,
        registry: CollectorRegistry | None = None,
        succeeding: MonitorExporter | None = None,
    ):
        self.inner = inner
        self._released = False
        self._lock = threading.Lock()
        self._servers: list[tuple[WSGIServer, threading.Thread, str]] = []
        self._failed = False
        if succeeding is not None:
            if registry is not None:
                raise ValueError(
                    "registry and succeeding are exclusive: a successor shares its metrics"
                )
            self._share(succeeding)
        else:
            self.registry = registry if registry is not None else CollectorRegistry()
            self.multiprocess_dir = multiprocess_dir()
            self._reported: dict[tuple[str, str, str], tuple[float, float]] = {}
            self._register()
        if inner is not None:
            acquire(inner)  # released by close(): a sink other monitors share stays open
        _open.add(self)

    def _share(self, other: MonitorExporter) -> None:
        """The metrics of ``other``, the exporter of the monitor this one's replaces (watch()
        run again): counters go on from its totals instead of restarting at zero."""
        self.registry = other.registry
        self.multiprocess_dir = other.multiprocess_dir
        self._reported = other._reported
        for attr in _METRIC_ATTRIBUTES:
            setattr(self, attr, getattr(other, attr))

    def _register(self) -> None:
        reg = self.registry
        self._layer = {spec.name: _gauge(spec, reg) for spec in names.LAYER_GAUGES}
        self._layer_end = _gauge(names.LAYER_LAST_WINDOW_END, reg)
        self._samples = _counter(names.SAMPLES_TOTAL, reg)
        self._windows = _counter(names.WINDOWS_TOTAL, reg)
        self._batches = _counter(names.BATCHES_TOTAL, reg)
        self._nonfinite = _counter(names.NONFINITE_VALUES_TOTAL, reg)
        self._batch_size = Histogram(
            names.BATCH_SIZE.name,
            names.BATCH_SIZE.help,
            names.BATCH_SIZE.labels,
            registry=reg,
            buckets=(*BATCH_SIZE_BUCKETS, math.inf),
        )
        self._overhead = _gauge(names.MONITOR_OVERHEAD_RATIO, reg)
        self._dropped = _counter(names.MONITOR_WINDOWS_DROPPED_TOTAL, reg)
        self._hook_errors = _counter(names.MONITOR_HOOK_ERRORS_TOTAL, reg)
        self._source_end = _gauge(names.SOURCE_LAST_WINDOW_END, reg)

    # -- the Sink protocol -----------------------------------------------------------------
    def write(self, window: WindowRecord) -> None:
        """Update the metrics from ``window``, then hand it to the inner sink.

        A failure to export is logged once and never keeps the window from its sink.
        """
        try:
            self.observe(window)
        except Exception:
            if not self._failed:
                self._failed = True
                logger.exception("bnwatch: exporting a window to Prometheus failed")
        if self.inner is not None:
            self.inner.write(window)

    def close(self, timeout: float | None = None) -> None:
        """Close the inner sink (waiting at most ``timeout`` seconds) unless other monitors
        still write to it (:func:`bnwatch.sink.release`), then stop serving."""
        try:
            if self.inner is not None and not self._released:
                self._released = True  # once, however often close() runs
                release(self.inner, timeout)
        finally:
            self.shutdown()

    @property
    def dropped(self) -> int:
        """Windows the inner sink dropped (exporting drops nothing)."""
        return self.inner.dropped if self.inner is not None else 0

    # -- metrics ---------------------------------------------------------------------------
    def observe(self, window: WindowRecord) -> None:
        """Update every metric from one closed window."""
        end = window.end.timestamp()
        for layer, report in window.reports.items():
            labels = (window.model, window.version, layer)
            for name, value in layer_values(report).items():
                self._set(self._layer[name], labels, value)
            self._layer_end.labels(*labels).set(end)
            stats = report.stats
            self._samples.labels(*labels).inc(stats.samples_seen)
            self._windows.labels(*labels).inc()
            self._batches.labels(*labels).inc(stats.batches_seen)
            self._nonfinite.labels(*labels).inc(report.nonfinite)
            sizes = self._batch_size.labels(*labels)
            for size, count in stats.batch_sizes.items():
                _observe_many(sizes, size, count)
        self._observe_monitor(window, end)

    def _set(self, gauge: Gauge, labels: tuple[str, str, str], value: float | None) -> None:
        """Set a gauge; an undefined value removes the sample (NaN in multi-process mode)."""
        if value is not None:
            gauge.labels(*labels).set(value)
        elif self.multiprocess_dir is not None:
            gauge.labels(*labels).set(math.nan)  # label sets cannot be removed there
        else:
            gauge.remove(*labels)

    def _observe_monitor(self, window: WindowRecord, end: float) -> None:
        labels = (window.model, window.version, window.source)
        monitor = window.monitor
        ratio = monitor.get("overhead_ratio")
        if ratio is not None and not math.isfinite(ratio):
            ratio = None
        self._set(self._overhead, labels, ratio)
        dropped = float(monitor.get("windows_dropped", 0.0))
        errors = float(monitor.get("hook_errors", 0.0))
        with self._lock:
            # the monitor reports running totals: add what is new since its last window
            # (a smaller total means a restarted monitor under the same source: count it all)
            last_dropped, last_errors = self._reported.get(labels, (0.0, 0.0))
            self._reported[labels] = (dropped, errors)
        new_dropped = dropped - last_dropped if dropped >= last_dropped else dropped
        new_errors = errors - last_errors if errors >= last_errors else errors
        self._dropped.labels(*labels).inc(new_dropped)
        self._hook_errors.labels(*labels).inc(new_errors)
        self._source_end.labels(*labels).set(end)

    # -- serving ---------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        """Where this exporter serves its metrics (``http://addr:port/metrics``)."""
        out = []
        for server, _, _ in self._servers:
            host = server.server_address[0]
            name = host.decode() if isinstance(host, bytes) else str(host)
            out.append(f"http://{name}:{server.server_port}/metrics")
        return out

    def serve(self, port: int, addr: str = "127.0.0.1") -> WSGIServer | None:
        """Serve the metrics on ``http://addr:port/metrics`` from a daemon thread.

        ``port=0`` picks a free port (read it from the returned server's ``server_port``).
        In multi-process mode the endpoint shows every process's metrics; if a sibling process
        already serves the port, this returns ``None`` instead of failing.

        Raises:
            OSError: the port cannot be bound (in one-process mode).
        """
        registry: CollectorRegistry = self.registry
        if self.multiprocess_dir is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        try:
            server, thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as err:
            if self.multiprocess_dir is not None and err.errno == errno.EADDRINUSE:
                logger.info(
                    "bnwatch: %s:%s is taken; in multi-process mode the process listening "
                    "there serves this process's metrics too",
                    addr,
                    port,
                )
                return None
            if err.errno == errno.EADDRINUSE and any(e.serving(port) for e in list(_open)):
                raise OSError(
                    err.errno,
                    f"bnwatch: cannot serve metrics on {addr}:{port}: the port is in use by an "
                    "open monitor of this process, which serves its metrics there; close it "
                    "first, choose another metrics_port (0: any free one), or -- the same "
                    "model, version and source watched again -- pass the same metrics_addr, "
                    "and the new monitor takes "
                    "the port over",
                ) from err
            if err.errno == errno.EADDRINUSE:
                raise OSError(
                    err.errno,
                    f"bnwatch: cannot serve metrics on {addr}:{port}: the port is in use (by "
                    f"another program, or another worker process of this server: set "
                    f"{MULTIPROC_ENV} before the workers start, and they share one endpoint); "
                    "choose another metrics_port, or 0 for any free one",
                ) from err
            raise
        with self._lock:
            self._servers.append((server, thread, addr))
        return server

    def serving(self, port: int, addr: str | None = None) -> bool:
        """Whether this exporter serves on ``port`` (as asked for: ``addr`` as passed to
        :meth:`serve`; ``None``: any)."""
        with self._lock:
            return any(
                server.server_port == port and addr in (None, asked)
                for server, _, asked in self._servers
            )

    def take_over(self, predecessors: Sequence[MonitorExporter]) -> None:
        """Serve what ``predecessors`` serve, which then serve nothing: the hand-over when
        ``watch()`` runs again and the new monitor's exporter succeeds the old one's (the two
        share their metrics, so the endpoint's counters go on)."""
        for other in predecessors:
            with other._lock:
                servers, other._servers = other._servers, []
            with self._lock:
                self._servers.extend(servers)

    def shutdown(self) -> None:
        """Stop every server :meth:`serve` started (the metrics stay readable)."""
        with self._lock:
            servers, self._servers = self._servers, []
        for server, thread, _ in servers:
            server.shutdown()
            server.server_close()
            thread.join()


def _observe_many(child: Histogram, value: float, count: int) -> None:
    """``child.observe(value)`` ``count`` times, in O(buckets).

    A window carries its batch-size histogram as {size: batches}; observing each batch
    separately would cost one call per batch of the window (thousands per layer a minute).
    Uses the histogram's value objects (stable since prometheus_client 0.4; a test checks the
    result equals ``count`` calls of ``observe``), falling back to the loop.
    """
    buckets = getattr(child, "_buckets", None)
    bounds = getattr(child, "_upper_bounds", None)
    total = getattr(child, "_sum", None)
    if buckets is None or bounds is None or total is None:  # pragma: no cover - other versions
        for _ in range(count):
            child.observe(value)
        return
    total.inc(value * count)
    for bucket, bound in zip(buckets, bounds, strict=True):
        if value <= bound:
            bucket.inc(count)
            break
