"""Real windows for store tests: a small CNN watched with an in-memory sink."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import sqlalchemy as sa
import torch
from sqlalchemy.engine import Engine
from torch import nn

import bnwatch
from bnwatch.codec import decode_arrays
from bnwatch.recalibration import RecalibrationResult
from bnwatch.schema import WindowRecord
from bnwatch.sink import MemorySink


def small_cnn(seed: int = 0, width: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 36, 5),
        nn.BatchNorm1d(5),
    ).eval()


def wide_cnn() -> nn.Module:
    """Two BN layers: a narrow one (a window's first row, claimed before the COPY) and one of
    4,096 channels (425 kB of moments per row, sent by the COPY)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4096, 1),
        nn.BatchNorm2d(4096),
    ).eval()


def batches(n: int, seed: int = 0, batch: int = 4, shift: float = 0.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 3, 6, 6, generator=g) + torch.randn(batch, 3, 1, 1, generator=g) + shift
        for _ in range(n)
    ]


def feed(model: nn.Module, mon: bnwatch.Monitor, xs: list[torch.Tensor], *, every: int) -> None:
    """Run ``xs`` through ``model`` without gradients, closing ``mon``'s window after every
    ``every`` batches."""
    with torch.no_grad():
        for i, x in enumerate(xs):
            model(x)
            if i % every == every - 1:
                mon.flush()


def record_windows(
    windows: int,
    *,
    per_window: int = 4,
    seed: int = 0,
    model: nn.Module | None = None,
    name: str = "cnn",
    version: str = "1",
    source: str = "test:1",
    warmup_samples: int = 16,
    config: bnwatch.DriftConfig | None = None,
) -> list[WindowRecord]:
    """``windows`` closed windows of ``per_window`` batches each (all data differs), judged at
    ``config`` (default: ``DriftConfig(warmup_samples=warmup_samples, min_samples=4)``)."""
    net = model or small_cnn()
    sink = MemorySink()
    mon = bnwatch.watch(
        net,
        name=name,
        version=version,
        store=sink,
        window_seconds=None,
        overhead_budget=None,
        source=source,
        config=config or bnwatch.DriftConfig(warmup_samples=warmup_samples, min_samples=4),
    )
    data = batches(windows * per_window, seed=seed)
    with torch.inference_mode():
        for w in range(windows):
            for x in data[w * per_window : (w + 1) * per_window]:
                net(x)
            mon.flush()
    mon.close()
    return sink.windows


def renamed(record: WindowRecord, **changes: object) -> WindowRecord:
    """A copy with a fresh uid (and other changes)."""
    values: dict[str, object] = {"uid": uuid.uuid4().hex}
    values.update(changes)
    return dataclasses.replace(record, **values)  # type: ignore[arg-type]


def recalibrated_references(
    engine: Engine, references: Mapping[str, int], result: RecalibrationResult
) -> tuple[dict[str, dict[str, Any]], set[int]]:
    """Assert that the ``recalibrated`` references a stored outcome names (``references``:
    layer -> reference id) hold the result's new statistics, bit for bit.  Returns their
    lineages by layer, and the ids of every ``recalibrated`` reference stored."""
    assert sorted(references) == sorted(u.name for u in result.updates)
    with engine.connect() as conn:
        rows = {
            int(r.id): r
            for r in conn.execute(
                sa.text("SELECT id, mean_var, lineage FROM refs WHERE kind = 'recalibrated'")
            ).all()
        }
    lineages = {}
    for update in result.updates:
        row = rows[references[update.name]]
        arrays = decode_arrays(row.mean_var)
        assert np.array_equal(arrays[0], update.new_mean.double().numpy())
        assert np.array_equal(arrays[1], update.new_var.double().numpy())
        lineage = row.lineage if isinstance(row.lineage, dict) else json.loads(row.lineage)
        lineages[update.name] = lineage
    return lineages, set(rows)
