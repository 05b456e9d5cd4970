"""A seeded database for the dashboard tests: a real model watched through a real story.

A small CNN with three BatchNorm layers is profiled on clean data, then watched for
``WINDOWS`` one-minute windows: clean traffic, then inputs shifted by ``SHIFT`` (drift), and in
the last windows its second layer left in ``train()`` with batches of 2 (batch-stat mode,
small-batch mismatch).  The alert engine runs after every window as the service would, so
alerts open on the story's schedule; one recalibration is recorded as applied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import torch
from torch import nn

import bnwatch
from bnwatch.alerts import AlertConfig, AlertEngine
from bnwatch.schema import WindowRecord
from bnwatch.sink import MemorySink
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository

MODEL = "digits-cnn"
VERSION = "v1"
LAYERS = ("1", "4", "7")
CLEAN_WINDOWS = 6
DRIFT_WINDOWS = 6
TRAIN_MODE_WINDOWS = 3
WINDOWS = CLEAN_WINDOWS + DRIFT_WINDOWS
SHIFT = 1.5


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.BatchNorm1d(6 * 36),
    ).eval()


def image_batch(g: torch.Generator, size: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(size, 3, 6, 6, generator=g) + shift


@dataclass(frozen=True)
class Seeded:
    url: str
    model: str
    version: str
    first_end: datetime
    last_end: datetime
    alerts_opened: int


def seed(url: str, *, now: datetime | None = None) -> Seeded:
    """Fill the (empty) database at ``url`` with the story of the module docstring."""
    now = now or datetime.now(timezone.utc)
    g = torch.Generator().manual_seed(0)
    net = cnn()
    with torch.inference_mode():
        profile = bnwatch.profile(
            net, [image_batch(g, 32) for _ in range(16)], name=MODEL, version=VERSION, store=url
        )
    sink = MemorySink()
    mon = bnwatch.watch(
        net,
        name=MODEL,
        version=VERSION,
        reference=profile,
        store=sink,
        window_seconds=None,
        overhead_budget=None,
        source="seed:1",
    )
    train_mode = net[4]
    with torch.inference_mode():
        for w in range(WINDOWS):
            drifted = w >= CLEAN_WINDOWS
            small = w >= WINDOWS - TRAIN_MODE_WINDOWS
            if small:
                train_mode.train()
                for _ in range(24):
                    net(image_batch(g, 2, SHIFT))
                train_mode.eval()
            else:
                for size in (1, 8, 32, 16):
                    net(image_batch(g, size, SHIFT if drifted else 0.0))
            mon.flush()
    mon.close()

    repo = Repository(engine_for(url))
    engine = AlertEngine(AlertConfig.from_mapping({"drift": {"open_after": 2}}))
    first = now - timedelta(minutes=WINDOWS)
    opened = 0
    for i, record in enumerate(sink.windows):
        end = first + timedelta(minutes=i + 1)
        timed: WindowRecord = dataclasses.replace(record, start=end - timedelta(minutes=1), end=end)
        repo.write_windows([timed])
        opened += sum(c.action == "opened" for c in engine.evaluate(repo, MODEL, VERSION, now=end))
    rid = repo.start_recalibration(MODEL, VERSION, method="precise")
    repo.finish_recalibration(
        rid,
        status="applied",
        outcome={"samples": 512, "drift_before": 1.2, "drift_after": 0.1},
    )
    repo.engine.dispose()
    return Seeded(url, MODEL, VERSION, first + timedelta(minutes=1), now, opened)
