"""A replica for concurrency tests: ``python -m tests.store.replica URL SOURCE N``.

Writes N one-layer windows through the real background writer, as an inference replica
would, without importing torch (records are built from numpy statistics).
"""

from __future__ import annotations

import sys
from datetime import timedelta

import numpy as np

from bnwatch.drift import DriftConfig, Reference, assess_layer, decide
from bnwatch.schema import WindowRecord, utcnow
from bnwatch.stats import ChannelMoments, LayerStats
from bnwatch.store.writer import StoreSink


def window(rng: np.random.Generator, source: str, i: int) -> WindowRecord:
    x = rng.normal(size=(16, 8, 4))
    stats = LayerStats(ChannelMoments.from_values(x), {16: 1}, 1, 1, 16, 0)
    report = assess_layer(
        "bn",
        "BatchNorm2d",
        stats,
        eps=1e-5,
        running=Reference.running(np.zeros(8), np.ones(8)),
        baseline=None,
        baseline_kind="warming_up",
        running_stats_mutated=False,
        config=DriftConfig(),
    )
    start = utcnow() + timedelta(microseconds=i)
    return WindowRecord(
        model="replicated",
        version="1",
        source=source,
        start=start,
        end=start,
        reports=decide({"bn": report}, DriftConfig()),
    )


def main(argv: list[str]) -> int:
    url, source, n = argv[0], argv[1], int(argv[2])
    rng = np.random.default_rng(abs(hash(source)) % 2**32)
    sink = StoreSink(url, batch_size=16, queue_size=n)
    for i in range(n):
        sink.write(window(rng, source, i))
    sink.close(timeout=120)
    stats = sink.stats()
    print(f"{source} written={stats.written} dropped={stats.dropped} rejected={stats.rejected}")
    return 0 if stats.written == n else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
