"""The inputs a monitor keeps (``watch(..., keep_inputs=N)``): the last N samples, oldest
first, and when they arrived."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import pytest
import torch
from torch import nn

import bnwatch
from bnwatch.capture.monitor import InputRing


def rows(*values: int) -> torch.Tensor:
    """A batch of [N, 2] samples whose first column is ``values``."""
    v = torch.tensor(values, dtype=torch.float32)
    return torch.stack([v, -v], dim=1)


def test_the_ring_keeps_the_last_samples_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(float(t) for t in range(100, 200))
    monkeypatch.setattr("bnwatch.capture.monitor.time.time", lambda: next(clock))
    ring = InputRing(5)
    assert ring.snapshot() is None
    ring.add(rows(0, 1))  # arrives at 100
    ring.add(rows(2, 3))  # 101
    kept = ring.snapshot()
    assert kept is not None and kept.inputs[:, 0].tolist() == [0, 1, 2, 3]
    assert kept.first_at == datetime.fromtimestamp(100, tz=timezone.utc)
    assert kept.last_at == datetime.fromtimestamp(101, tz=timezone.utc)
    ring.add(rows(4, 5, 6))  # 102: wraps around, 0 and 1 are gone
    kept = ring.snapshot()
    assert kept is not None and kept.inputs[:, 0].tolist() == [2, 3, 4, 5, 6]
    assert kept.first_at.timestamp() == 101 and kept.last_at.timestamp() == 102
    ring.add(rows(*range(10, 17)))  # 103: more than the ring holds: its last 5
    kept = ring.snapshot()
    assert kept is not None and kept.inputs[:, 0].tolist() == [12, 13, 14, 15, 16]
    assert kept.first_at.timestamp() == kept.last_at.timestamp() == 103
    assert kept.describe() == {
        "kept": 5,
        "first_at": "1970-01-01T00:01:43+00:00",
        "last_at": "1970-01-01T00:01:43+00:00",
    }
    ring.add(torch.zeros(2, 3))  # 104: another sample shape restarts the ring
    kept = ring.snapshot()
    assert kept is not None and kept.inputs.shape == (2, 3)
    assert kept.first_at.timestamp() == 104


def test_a_monitor_keeps_what_its_model_saw() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).eval()
    start = datetime.now(timezone.utc)
    with bnwatch.watch(model, keep_inputs=6, overhead_budget=None, window_seconds=None) as mon:
        assert mon.inputs() is None and mon.kept_inputs() is None
        for b in range(4):
            model(rows(*range(3 * b, 3 * b + 3)))
        kept = mon.kept_inputs()
        inputs = mon.inputs()
    assert kept is not None and inputs is not None
    assert inputs[:, 0].tolist() == [6, 7, 8, 9, 10, 11] == kept.inputs[:, 0].tolist()
    assert start <= kept.first_at <= kept.last_at <= datetime.now(timezone.utc)


class _Dict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).eval()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.net(batch["x"])
        return out


class _Keywords(_Dict):
    def forward(  # type: ignore[override]
        self, *, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0
    ) -> torch.Tensor:
        out: torch.Tensor = self.net(x * scale if mask is None else x * mask)
        return out


@pytest.mark.parametrize(
    ("model", "call", "said"),
    [
        (_Dict(), lambda m, x: m({"x": x}), "called with a dict"),
        (
            _Keywords(),
            lambda m, x: m(x=x, mask=torch.ones_like(x)),
            "called with the keyword arguments ['mask', 'x'], 2 of them tensors",
        ),
    ],
    ids=["dict", "two-tensor-keywords"],
)
def test_a_forward_without_a_batch_tensor_keeps_nothing_and_says_so_once(
    model: nn.Module,
    call: Any,
    said: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Such inputs cannot be kept; saying so at the first forward beats a triggered
    recalibration failing on "only 0 kept inputs" weeks later."""
    with (
        caplog.at_level(logging.WARNING, logger="bnwatch"),
        bnwatch.watch(
            model, name="multi", keep_inputs=8, overhead_budget=None, window_seconds=None
        ) as mon,
    ):
        for b in range(3):
            call(model, rows(b, b + 1, b + 2))
        assert mon.kept_inputs() is None
        assert mon.flush()["net.1"].n_samples == 9  # measured all the same
    warned = [r.getMessage() for r in caplog.records if "keep_inputs" in r.getMessage()]
    assert len(warned) == 1 and f"multi was {said}" in warned[0]


def test_the_only_tensor_keyword_is_kept_with_its_name() -> None:
    """``model(pixel_values=x)``, as Hugging Face models are called: kept, with the name, and
    a change of name (or to a positional input) restarts the ring."""
    model = _Keywords()
    with bnwatch.watch(model, keep_inputs=6, overhead_budget=None, window_seconds=None) as mon:
        model(x=rows(0, 1, 2), scale=1.0)  # one tensor among the keywords
        model(x=rows(3, 4))
        kept = mon.kept_inputs()
        assert kept is not None and kept.key == "x"
        assert kept.inputs[:, 0].tolist() == [0, 1, 2, 3, 4]
        assert kept.describe()["keyword"] == "x"
        model.net(rows(5))  # a submodule called directly is not a forward of the model
        kept = mon.kept_inputs()
        assert kept is not None and kept.inputs.shape[0] == 5
    positional = _Dict().net
    with bnwatch.watch(positional, keep_inputs=6, overhead_budget=None) as mon:
        positional(rows(0, 1))
        kept = mon.kept_inputs()
        assert kept is not None and kept.key is None and "keyword" not in kept.describe()
