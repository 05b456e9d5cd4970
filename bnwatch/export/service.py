"""Export the state of a ``bnwatch serve`` process itself, read at scrape time: its trigger queue.

:class:`TriggerQueueCollector` reads the depth and the drop count of the queue that feeds the
service's webhook worker (:class:`bnwatch.service.triggers.TriggerRunner`; declared
structurally, as the store collector declares the store's reads: export, an adapter, does not
import the service above it) and exports them under the names of
:data:`bnwatch.export.names.SERVICE_ONLY`.  The service registers it next to the
:class:`~bnwatch.export.store.StoreCollector` when it has webhook triggers.

Unlike the store's numbers these are one process's: with ``bnwatch serve --workers N`` every
worker has a queue of its own, and a scrape reads the worker that answers it.

Usage (the service's ``GET /metrics``)::

    registry.register(TriggerQueueCollector(runner))
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from bnwatch.export import names
from bnwatch.export.store import counter_family, family, gauge_family

__all__ = ["TriggerQueue", "TriggerQueueCollector"]


class TriggerQueue(Protocol):
    """What :class:`TriggerQueueCollector` reads (``bnwatch.service.triggers.TriggerRunner``)."""

    @property
    def depth(self) -> int:
        """Claimed events waiting for the worker now."""
        ...

    @property
    def dropped(self) -> int:
        """Events not queued because the queue was full, since the process started."""
        ...


class TriggerQueueCollector(Collector):
    """``bnwatch_trigger_queue_depth`` and ``bnwatch_trigger_queue_dropped_total`` of one
    service process, read from ``queue`` at every scrape.

    ``describe()`` names both families without reading anything, so registering a second
    exporter of these names in the same registry fails with ``DuplicateTimeseries``.
    """

    def __init__(self, queue: TriggerQueue) -> None:
        self.queue = queue

    def describe(self) -> list[Metric]:
        """The families :meth:`collect` yields, without samples."""
        return [family(spec) for spec in names.SERVICE_ONLY]

    def collect(self) -> Iterator[Metric]:
        depth = gauge_family(names.TRIGGER_QUEUE_DEPTH)
        depth.add_metric([], float(self.queue.depth))
        dropped = counter_family(names.TRIGGER_QUEUE_DROPPED_TOTAL)
        dropped.add_metric([], float(self.queue.dropped))
        yield from (depth, dropped)
