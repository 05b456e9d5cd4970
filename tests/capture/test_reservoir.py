"""Per-window reservoirs: at most N rows per window, every sample kept with the same chance,
the rows are the samples' channel means, and nothing but ``reservoir=`` turns them on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnwatch
from bnwatch.capture import accumulator
from bnwatch.capture.accumulator import ROW_BUFFER_VALUES, LayerAccumulator
from bnwatch.errors import ConfigError
from tests.capture.helpers import full_watch


def stream(n: int, channels: int) -> torch.Tensor:
    """``[n, channels]`` rows whose every value is the row's position in the stream."""
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, channels).contiguous()


@pytest.mark.parametrize("buffer_values", [ROW_BUFFER_VALUES, 8])
def test_every_sample_is_kept_with_the_same_chance(
    buffer_values: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 samples in batches of 7 (with an 8-row buffer the window is compacted at almost
    every batch, mid-stream): each sample must land in the 10-row reservoir with probability
    10/200, whatever its position."""
    monkeypatch.setattr(accumulator, "ROW_BUFFER_VALUES", buffer_values)
    trials, n, capacity, channels = 400, 200, 10, 2
    hits = np.zeros(n)
    x = stream(n, channels)
    for seed in range(trials):
        acc = LayerAccumulator("bn", reservoir=capacity, seed=seed)
        for start in range(0, n, 7):
            acc.observe(x[start : start + 7], batch_stat_mode=False)
        stats = acc.collect()
        assert stats is not None and stats.reservoir is not None
        res = stats.reservoir
        assert (res.rows.shape, res.seen, res.capacity) == ((capacity, channels), n, capacity)
        assert np.all(res.rows == res.rows[:, :1])  # whole rows, not channels mixed up
        ids = res.rows[:, 0].astype(int)
        assert len(set(ids.tolist())) == capacity  # no sample twice
        hits[ids] += 1
    expected = trials * capacity / n  # 20 per position; binomial sd 4.4
    assert np.all(np.abs(hits - expected) < 5 * 4.4)
    # early and late samples equally represented (sd of each half's total: 31)
    assert abs(hits[:100].sum() - hits[100:].sum()) < 4 * 44
    # chi-square of the 200 counts against uniform: mean 199, sd 20
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert chi2 < 199 + 5 * 20


def test_windows_keep_at_most_n_rows_of_their_own_samples() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)).eval()
    mon = full_watch(net, reservoir=6)
    seen_means = []
    with torch.inference_mode():
        for _ in range(4):
            x = torch.randn(3, 3, 8, 8)
            net(x)
            seen_means.append(net[0](x).mean(dim=(2, 3)).numpy())
        first = mon.flush()["1"]
        x = torch.randn(2, 3, 8, 8) + 100.0  # a second window of 2 samples
        net(x)
        second = mon.flush()["1"]
        second_means = net[0](x).mean(dim=(2, 3)).numpy()
    mon.close()
    res = first.reservoir
    assert res is not None and first.stats.reservoir is res
    assert (res.rows.shape, res.seen, res.capacity) == ((6, 5), 12, 6)
    means = np.concatenate(seen_means)
    for row in res.rows:  # every kept row is one of the window's per-sample means
        assert np.abs(means - row).max(axis=1).min() < 1e-4
    assert second.reservoir is not None
    assert (second.reservoir.rows.shape, second.reservoir.seen) == ((2, 5), 2)  # a fresh window
    np.testing.assert_allclose(
        np.sort(second.reservoir.rows, axis=0), np.sort(second_means, axis=0), rtol=1e-5
    )


def test_a_channel_without_finite_values_is_nan_in_the_row() -> None:
    acc = LayerAccumulator("bn", reservoir=4, seed=0)
    x = torch.ones(3, 2, 4)
    x[1, 0] = float("nan")  # sample 1 has no finite value in channel 0
    acc.observe(x, batch_stat_mode=False)
    stats = acc.collect()
    assert stats is not None and stats.reservoir is not None
    rows = stats.reservoir.rows
    assert rows.shape == (3, 2)
    assert np.isnan(rows[1, 0]) and np.isfinite(rows[1, 1])
    assert np.isfinite(np.delete(rows, 1, axis=0)).all()


def test_default_and_disabled() -> None:
    net = nn.Sequential(nn.BatchNorm1d(3)).eval()
    with full_watch(net) as mon:
        net(torch.randn(40, 3))
        default = mon.flush()["0"].reservoir
    d = bnwatch.stats.DEFAULT_RESERVOIR  # 3 channels: far below the budget, the full default
    assert default is not None and default.capacity == d and default.rows.shape == (d, 3)
    with full_watch(net, reservoir=0) as mon:
        net(torch.randn(40, 3))
        assert mon.flush()["0"].reservoir is None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "32"])
def test_reservoir_must_be_a_non_negative_integer(bad: object) -> None:
    net = nn.Sequential(nn.BatchNorm1d(3)).eval()
    with pytest.raises(ConfigError, match="reservoir"):
        bnwatch.watch(net, reservoir=bad)  # type: ignore[arg-type]
