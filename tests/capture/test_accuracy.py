"""What a hook measures, against a float64 numpy reference (DESIGN §2: within 1e-4 relative)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.capture.helpers import RTOL, assert_rel, batches_of, check, full_watch, reference, run

CASES = {
    "BatchNorm1d [N,C]": (nn.BatchNorm1d(6), (6,)),
    "BatchNorm1d [N,C,L]": (nn.BatchNorm1d(6), (6, 17)),
    "BatchNorm2d": (nn.BatchNorm2d(5), (5, 9, 7)),
    "BatchNorm3d": (nn.BatchNorm3d(3), (3, 4, 5, 6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_contiguous_float32(case: str) -> None:
    bn, shape = CASES[case]
    batches = batches_of(shape, [8, 1, 3, 32])
    reports = run(nn.Sequential(bn.eval()), batches)
    check(reports["0"], batches)


@pytest.mark.parametrize("dims", [4, 5])
def test_channels_last(dims: int) -> None:
    bn = nn.BatchNorm2d(5) if dims == 4 else nn.BatchNorm3d(5)
    shape = (5, 9, 7) if dims == 4 else (5, 3, 4, 6)
    batches = batches_of(shape, [4, 7], channels_last=True)
    assert not batches[0].is_contiguous()
    reports = run(nn.Sequential(bn.eval()), batches)
    check(reports["0"], batches)


def test_bfloat16_inputs() -> None:
    batches = batches_of((4, 6, 6), [8, 8], dtype=torch.bfloat16)
    reports = run(nn.Sequential(nn.BatchNorm2d(4).to(torch.bfloat16).eval()), batches)
    check(reports["0"], batches)  # the reference is float64 of the same bf16 values


def test_float64_inputs() -> None:
    batches = batches_of((4, 6, 6), [8, 3], dtype=torch.float64, offset=1e5)
    reports = run(nn.Sequential(nn.BatchNorm2d(4).double().eval()), batches)
    check(reports["0"], batches, rtol=1e-10)


@pytest.mark.parametrize("shape", [(6,), (6, 40), (6, 12, 12)])
@pytest.mark.parametrize("running_matches", [True, False])
def test_mean_over_std_of_1000(shape: tuple[int, ...], running_matches: bool) -> None:
    """Raw features into a first BatchNorm: |mean|/std = 1000, with or without running stats
    that know it (the first batch picks the summation shift either way)."""
    bn = nn.BatchNorm1d(6) if len(shape) < 3 else nn.BatchNorm2d(6)
    batches = batches_of(shape, [16, 16, 5], offset=1000.0, std=0.5)
    if running_matches:
        allx = torch.cat(batches).double()
        dims = [0, *range(2, allx.dim())]
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.copy_(allx.mean(dims).float())
        bn.running_var.copy_(allx.var(dims).float())
    reports = run(nn.Sequential(bn.eval()), batches)
    check(reports["0"], batches)
    mean = np.asarray(reports["0"].mean)  # type: ignore[attr-defined]
    var = np.asarray(reports["0"].var)  # type: ignore[attr-defined]
    assert np.all(np.abs(mean) / np.sqrt(var) > 300)


@pytest.mark.parametrize("masked", [False, True])
def test_nonfinite_values_are_counted_and_excluded(masked: bool) -> None:
    from bnwatch.capture import monitor as monitor_module  # noqa: F401 - documents the path

    batches = batches_of((3, 4, 4), [6, 6])
    dirty = [b.clone() for b in batches]
    dirty[0][1, 0, 2, 3] = float("nan")
    dirty[1][4, 2, :, :] = float("inf")
    dirty[1][0, 1, 0, 0] = float("-inf")
    model = nn.Sequential(nn.BatchNorm2d(3).eval())
    mon = full_watch(model)
    for acc in mon._accs:  # force the masked (CUDA) path on the CPU when asked
        acc.masked = masked
    with torch.inference_mode():
        for x in dirty:
            model(x)
    report = mon.flush()["0"]
    mon.close()
    assert report.nonfinite == 1 + 16 + 1
    np.testing.assert_array_equal(report.stats.moments.nonfinite, [1, 1, 16])
    finite = np.ma.masked_invalid(
        np.concatenate([d.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1) for d in dirty], 1)
    )
    assert_rel(report.mean, finite.mean(axis=1).data, 1e-6, "mean")
    assert_rel(report.var, finite.var(axis=1).data, 1e-6, "var")
    np.testing.assert_array_equal(report.stats.moments.n, [12, 12, 11])


@pytest.mark.parametrize("length", [64, 256, 4096])
def test_rows_holding_a_nan_keep_the_mean_over_std_of_1000_exact(length: int) -> None:
    """Raw sensor features (|mean|/std = 1000) with one dropped reading per sample: a chunk
    holding a NaN skipped the shift's renewal and was summed around K = 0 in float32, so the
    channel's variance was off by up to 2e-2 relative (the contract is 1e-4)."""
    g = np.random.default_rng(0)
    model = nn.Sequential(nn.BatchNorm1d(2).eval())
    mon = full_watch(model)
    xs = []
    with torch.inference_mode():
        for _ in range(20):
            x = (1000.0 + g.normal(size=(8, 2, length))).astype(np.float32)
            x[np.arange(8), 0, g.integers(0, length, 8)] = np.nan
            xs.append(x)
            model(torch.from_numpy(x))
    report = mon.flush()["0"]
    mon.close()
    values = np.concatenate(xs).astype(np.float64).transpose(1, 0, 2).reshape(2, -1)
    finite = np.ma.masked_invalid(values)
    assert report.nonfinite == 160
    assert_rel(report.mean, finite.mean(axis=1).data, 1e-6, "mean")
    assert_rel(report.var, finite.var(axis=1).data, 1e-4, "var")


def test_a_first_batch_with_a_channel_of_no_finite_value_does_not_warn() -> None:
    """The first batch chooses the shift from its finite rows; a channel with none (every
    value NaN) gets no shift, without numpy's "Mean of empty slice" warning out of the
    model's forward, and the later batches are measured as usual."""
    from bnwatch.capture.accumulator import LayerAccumulator

    first = torch.randn(2, 3, 4, 4)
    first[:, 1] = float("nan")
    later = batches_of((3, 4, 4), [2, 2])
    acc = LayerAccumulator("bn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in [first, *later]:
            acc.observe(x, batch_stat_mode=False)
    stats = acc.collect()
    assert stats is not None
    np.testing.assert_array_equal(stats.moments.nonfinite, [0, 32, 0])
    finite = np.ma.masked_invalid(
        np.concatenate(
            [d.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1) for d in [first, *later]], 1
        )
    )
    assert_rel(stats.moments.mean, finite.mean(axis=1).data, 1e-6, "mean")
    assert_rel(stats.moments.var, finite.var(axis=1).data, 1e-6, "var")


def test_masked_path_equals_fast_path() -> None:
    batches = batches_of((4, 5, 5), [8, 3], offset=50.0)
    results = []
    for masked in (False, True):
        model = nn.Sequential(nn.BatchNorm2d(4).eval())
        mon = full_watch(model)
        mon._accs[0].masked = masked
        with torch.inference_mode():
            for x in batches:
                model(x)
        results.append(mon.flush()["0"].stats.moments)
        mon.close()
    for a, b in zip(results[0].as_arrays(), results[1].as_arrays(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_spatial_stride_measures_the_strided_positions() -> None:
    batches = batches_of((3, 10, 9), [4, 4])
    reports = run(nn.Sequential(nn.BatchNorm2d(3).eval()), batches, spatial_stride=3)
    check(reports["0"], [b[:, :, ::3, ::3] for b in batches])


def test_max_samples_per_batch_counts_real_batch_sizes() -> None:
    batches = batches_of((3, 4, 4), [32, 5, 32])
    reports = run(nn.Sequential(nn.BatchNorm2d(3).eval()), batches, max_samples_per_batch=8)
    r = reports["0"]
    assert r.n_samples == 8 + 5 + 8  # type: ignore[attr-defined]
    assert dict(r.batch_sizes) == {5: 1, 32: 2}  # type: ignore[attr-defined]
    assert r.stats.samples_seen == 69  # type: ignore[attr-defined]


def test_many_batches_compact_on_the_way() -> None:
    """More batches than the compaction threshold: the merged result is still exact."""
    batches = batches_of((8, 3, 3), [3] * 150)
    reports = run(nn.Sequential(nn.BatchNorm2d(8).eval()), batches)
    check(reports["0"], batches)
    assert reports["0"].n_batches == 150  # type: ignore[attr-defined]


def test_sequences_of_varying_length_and_a_late_nan() -> None:
    """BatchNorm1d on [N, C, L] with L changing per batch, then a NaN: rows of unequal size."""
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(4, 3, length, generator=g) * 2 + 5 for length in (10, 10, 7, 13, 10)]
    dirty = [b.clone() for b in batches]
    dirty[3][1, 2, 4] = float("nan")
    reports = run(nn.Sequential(nn.BatchNorm1d(3).eval()), dirty)
    r = reports["0"]
    flat = np.ma.masked_invalid(
        np.concatenate([d.double().numpy().transpose(1, 0, 2).reshape(3, -1) for d in dirty], 1)
    )
    assert_rel(r.mean, flat.mean(axis=1).data, 1e-6, "mean")  # type: ignore[attr-defined]
    assert_rel(r.var, flat.var(axis=1).data, 1e-6, "var")  # type: ignore[attr-defined]
    assert r.nonfinite == 1  # type: ignore[attr-defined]
    m = [d.double().nanmean(dim=2).numpy() for d in dirty]
    between = np.concatenate(m).var(axis=0)
    assert_rel(r.between_var, between, 1e-6, "between_var")  # type: ignore[attr-defined]


@pytest.mark.parametrize("jump", ["up", "down"])
def test_a_window_after_a_jump_of_the_mean(jump: str) -> None:
    """A channel's mean jumps between windows by 10, 100 and 1000 standard deviations (the
    drift the monitor is for): the window after the jump is exact too, not summed in float32
    around the previous window's shift."""
    offsets = torch.tensor([0.0, 10.0, 100.0, 1000.0]).view(1, 4, 1, 1)
    before, after = (0 * offsets, offsets) if jump == "up" else (offsets, 0 * offsets)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(4).eval())
    mon = full_watch(model)
    try:
        for offset in (before, after, after):
            batches = [torch.randn(8, 4, 16, 16, generator=g) + offset for _ in range(3)]
            with torch.inference_mode():
                for x in batches:
                    model(x)
            check(mon.flush()["0"], batches)
    finally:
        mon.close()


def test_a_channel_whose_first_batch_variance_cancels_to_zero() -> None:
    """Raw pressure in hPa into a first BatchNorm1d (|mean|/std = 1e4): in float32 the first
    batch's variance estimate cancels to 0 or below, which must mean "shift", not "no shift"."""
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 0.1]).view(1, 2, 1)
    offset = torch.tensor([0.0, 1013.25]).view(1, 2, 1)
    batches = [torch.randn(32, 2, 256, generator=g) * scale + offset for _ in range(4)]
    reports = run(nn.Sequential(nn.BatchNorm1d(2).eval()), batches)
    check(reports["0"], batches)


def test_a_batch_that_fails_midway_leaves_nothing_behind() -> None:
    """An error inside the hook after rows were reserved (here: a tensor type the reduction
    does not take) is caught and counted -- and its unwritten rows are not compacted as data."""
    from bnwatch.capture.accumulator import LayerAccumulator

    g = torch.Generator().manual_seed(2)
    good = [torch.randn(4, 3, 5, 5, generator=g) + 2 for _ in range(3)]
    acc = LayerAccumulator("bn")
    acc.observe(good[0], batch_stat_mode=False)
    acc.observe(good[1], batch_stat_mode=False)
    with pytest.raises(RuntimeError):
        acc.observe(torch.randn(4, 3, 5, 5).to_sparse(), batch_stat_mode=False)
    acc.observe(good[2], batch_stat_mode=False)
    stats = acc.collect()
    assert stats is not None and stats.moments.n_samples == 12
    want = reference(good)
    assert_rel(stats.moments.var, want["var"], RTOL, "var")
    assert_rel(stats.moments.mean, want["mean"], RTOL, "mean")


def test_one_image_at_a_time_does_not_renew_the_shift_image_after_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Channels nearly constant within an image but far apart between images (means spread
    over 300 within-image standard deviations): each image's mean is far from the shift, but
    not because the shift is stale -- it is renewed a few times, not once per image, and the
    window stays exact."""
    from bnwatch.capture.accumulator import LayerAccumulator

    renewals: list[int] = []
    original = LayerAccumulator._set_shift

    def counting(self: LayerAccumulator, k: np.ndarray, device: torch.device) -> None:
        renewals.append(1)
        original(self, k, device)

    monkeypatch.setattr(LayerAccumulator, "_set_shift", counting)
    g = torch.Generator().manual_seed(3)
    images = [
        torch.randn(1, 3, 7, 7, generator=g) * 0.01 + 5 + 3 * torch.randn(1, 3, 1, 1, generator=g)
        for _ in range(200)
    ]
    reports = run(nn.Sequential(nn.BatchNorm2d(3).eval()), images)
    check(reports["0"], images)
    assert len(renewals) <= 4


def test_wide_values_are_compacted_in_blocks_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction costs about a hundred passes over the channels whatever its rows: a wide
    BatchNorm1d on [N, C] (32,768 channels) is compacted every 32 samples, not every sample,
    and stays exact."""
    from bnwatch.capture.accumulator import LayerAccumulator

    compactions: list[int] = []
    original = LayerAccumulator._compact

    def counting(self: LayerAccumulator, buf: Any) -> None:
        compactions.append(buf.used)
        original(self, buf)

    monkeypatch.setattr(LayerAccumulator, "_compact", counting)
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(64, 32768, generator=g) * 3 + 1]
    reports = run(nn.Sequential(nn.BatchNorm1d(32768).eval()), batches)
    check(reports["0"], batches)
    assert [c for c in compactions if c] == [32, 32]


@pytest.mark.parametrize(
    "spatial",
    [(7, 7), (56, 56), (112, 112), (224, 224), (16, 112, 112)],
    ids=["7x7", "56x56", "112x112", "224x224", "16x112x112"],
)
def test_channels_just_below_the_shift_ratio_stay_within_the_contract(
    spatial: tuple[int, ...],
) -> None:
    """A channel whose ``mean²/var`` is just below :func:`shift_ratio` of its rows is summed in
    float32 without a shift, one image at a time: its variance stays within the contract at
    every row size, 3-D BatchNorm included (where longer rows lose more)."""
    from bnwatch.capture.accumulator import shift_ratio

    size = int(np.prod(spatial))
    ratio = 0.95 * shift_ratio(size)
    g = torch.Generator().manual_seed(5)
    images = [torch.randn(1, 4, *spatial, generator=g) + ratio**0.5 for _ in range(3)]
    bn = nn.BatchNorm3d(4) if len(spatial) == 3 else nn.BatchNorm2d(4)
    reports = run(nn.Sequential(bn.eval()), images)
    check(reports["0"], images)
