"""Prometheus exporters (prometheus_client): metrics are named in :mod:`bnwatch.export.names`.

- :class:`bnwatch.export.store.StoreCollector` -- the service's ``/metrics``: the store's
  latest state, read at scrape time;
- :class:`bnwatch.export.service.TriggerQueueCollector` -- on the same ``/metrics``: the
  service process's trigger queue (depth and drops), read at scrape time;
- :class:`bnwatch.export.monitor.MonitorExporter` -- in-process, from each closed window
  (``bnwatch.watch(..., metrics_port=...)``), multi-process aware.

Never imports torch (the service and the dashboard run without it).
"""

from __future__ import annotations

from bnwatch.export.monitor import MonitorExporter
from bnwatch.export.names import ALERT_KINDS
from bnwatch.export.service import TriggerQueueCollector
from bnwatch.export.store import StoreCollector

__all__ = ["ALERT_KINDS", "MonitorExporter", "StoreCollector", "TriggerQueueCollector"]
