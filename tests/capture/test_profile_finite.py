"""bnwatch.profile on data without finite values: refused, nothing stored."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import bnwatch
from bnwatch.errors import NonFiniteDataError
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository


def test_all_nan_data_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    """Non-finite elements are excluded: a profile of none would claim mean 0 over 0 elements."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    url = f"sqlite:///{tmp_path / 'bnwatch.db'}"
    nan = [torch.full((8, 3, 5, 5), float("nan")) for _ in range(3)]
    with pytest.raises(NonFiniteDataError, match=r"profile data: layer '1' received fewer") as e:
        bnwatch.profile(model, nan, name="m", version="1", store=url)
    assert e.value.layer == "1" and e.value.finite == 0
    if (tmp_path / "bnwatch.db").exists():
        engine = engine_for(url, create=False)
        try:
            assert Repository(engine).load_profile("m", "1") is None
        finally:
            engine.dispose()


def test_one_channel_without_finite_values_is_named() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    xs = [torch.randn(8, 3, 5, 5) for _ in range(3)]
    for x in xs:
        x[:, 2] = float("nan")
    with pytest.raises(NonFiniteDataError, match=r"in 1 channel \(2; the fewest: 0\)"):
        bnwatch.profile(model, xs)
    xs.append(torch.randn(8, 3, 5, 5))  # one finite batch is enough: it is measured
    assert bnwatch.profile(model, xs).layers["0"].stats.moments.count[2] == 200
