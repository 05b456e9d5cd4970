"""The steady path (``_Steady``): a batch of the shape a layer saw last, on the CPU, measured
with the fewest operations -- and exactly what the general path would have kept."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnwatch
from bnwatch.capture.accumulator import LayerAccumulator
from tests.capture.helpers import RTOL, assert_rel, batches_of, check, full_watch, reference, run


def _general_path(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """Record the batches that take the general path (their sizes) and the compactions (rows
    compacted) of every accumulator from now on."""
    general: list[int] = []
    compactions: list[int] = []
    reduce, compact = LayerAccumulator._reduce, LayerAccumulator._compact

    def counting_reduce(self: LayerAccumulator, xs: torch.Tensor) -> None:
        general.append(int(xs.shape[0]))
        reduce(self, xs)

    def counting_compact(self: LayerAccumulator, buf: Any) -> None:
        compactions.append(buf.used)
        compact(self, buf)

    monkeypatch.setattr(LayerAccumulator, "_reduce", counting_reduce)
    monkeypatch.setattr(LayerAccumulator, "_compact", counting_compact)
    return general, compactions


def test_batches_of_one_shape_take_the_steady_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer that sees one input shape batch after batch measures it on the steady path:
    only the first two batches of a shape (the second makes its plan) and the batch that finds
    the row buffer full (512 channels: 64 rows) take the general path, and the window is exact
    across the compactions."""
    general, compactions = _general_path(monkeypatch)
    batches = batches_of((512, 3, 3), [1] * 100 + [4] * 50)
    model = nn.Sequential(nn.BatchNorm2d(512).eval())
    mon = full_watch(model)
    try:
        with torch.inference_mode():
            for x in batches:
                model(x)
        filled = list(compactions)
        report = mon.flush()["0"]
    finally:
        mon.close()
    check(report, batches)
    assert report.n_batches == 150
    assert filled == [64] * 4  # 300 rows, 64 a buffer: 44 are left for the flush
    assert general[:2] == [1, 1] and general.count(4) >= 2
    assert len(general) == 4 + len(filled)


def test_varying_batch_sizes_keep_a_plan_each_on_one_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic batching: batch sizes 1, 3, 2, 4 in turn.  Each size takes the general path
    twice (the second time makes its plan), then its own plan; the plans share one stage,
    grown by doubling (64 -> 192 -> 384 values) for the largest batch -- the sizes whose plans
    went with the old stage take the general path once more -- and from the fourth round on
    only plans run.  Exact throughout."""
    general, compactions = _general_path(monkeypatch)
    sizes = [1, 3, 2, 4] * 10
    batches = batches_of((64, 5, 5), sizes)
    acc = LayerAccumulator("bn")
    stages: list[int] = []  # the stage's size after each batch (0: none yet)
    for x in batches:
        acc.observe(x, batch_stat_mode=False)
        stages.append(0 if acc._stage is None else acc._stage[0].numel())
    filled = list(compactions)
    stats = acc.collect()
    assert stats is not None
    check(stats.moments, batches)
    assert not filled  # 100 rows fit the 512 of a buffer
    assert general == [1, 3, 2, 4] * 2 + [1, 3, 2]
    assert len(acc._plans) == 4
    assert stages[:8] == [0, 0, 0, 0, 64, 192, 192, 384] and set(stages[8:]) == {384}


def test_a_nonfinite_value_in_a_steady_batch_is_counted_and_excluded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A NaN or inf in a batch of the steady shape sends that batch to the general path, which
    counts and excludes exactly the non-finite values; the batches after it take the steady
    path again, keeping their element counts beside the masked rows."""
    general, _ = _general_path(monkeypatch)
    dirty = batches_of((3, 4, 4), [2] * 20)
    dirty[7][1, 2, 0, 0] = float("nan")
    dirty[13][0, 0, 1, 1] = float("-inf")
    reports = run(nn.Sequential(nn.BatchNorm2d(3).eval()), dirty)
    r = reports["0"]
    assert r.nonfinite == 2  # type: ignore[attr-defined]
    np.testing.assert_array_equal(r.stats.moments.nonfinite, [1, 0, 1])  # type: ignore[attr-defined]
    finite = np.ma.masked_invalid(
        np.concatenate([d.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1) for d in dirty], 1)
    )
    assert_rel(r.mean, finite.mean(axis=1).data, 1e-6, "mean")  # type: ignore[attr-defined]
    assert_rel(r.var, finite.var(axis=1).data, 1e-6, "var")  # type: ignore[attr-defined]
    assert general == [2, 2, 2, 2]  # the first two batches and the two with a non-finite value


@pytest.mark.parametrize("steady", [True, False], ids=["steady", "general"])
def test_inf_minus_inf_in_a_channel_raises_no_warning_inside_the_forward(steady: bool) -> None:
    """+inf and -inf in one channel make that channel's total NaN on the host (inf - inf): a
    numpy warning from the hook, under ``warnings.simplefilter("error")`` (pytest's
    ``-W error``), became a hook error and lost the very batches a ``nonfinite_activations``
    alert is about."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=g) for _ in range(4)]
    for x in batches[2:]:
        x[0, 1, 0, 0], x[1, 1, 0, 0] = float("inf"), float("-inf")
    if not steady:
        batches = [x[: 4 - i % 2] for i, x in enumerate(batches)]  # no shape repeats twice
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    with bnwatch.watch(model, overhead_budget=None, window_seconds=None) as mon:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("error")
            for x in batches:
                model(x)
        r = mon.flush()["0"]
        assert dict(mon.stats().hook_errors) == {}
    assert r.n_samples == sum(len(x) for x in batches)
    np.testing.assert_array_equal(r.stats.moments.nonfinite, [0, 4, 0])


def test_a_jump_of_the_mean_within_a_window_of_steady_batches() -> None:
    """Channels' means jump by 10, 100 and 1000 standard deviations in the middle of a window
    of steady batches: the first batch after the jump is not taken on the steady path, whose
    rows would be summed in float32 around the stale shift (losing up to half the within-sample
    variance at 1000), but renews the shift; the within-sample variance stays within the
    contract of itself, not only of the total the jump inflates."""
    offsets = torch.tensor([0.0, 10.0, 100.0, 1000.0]).view(1, 4, 1, 1)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(4, 4, 8, 8, generator=g) for _ in range(10)]
    batches += [torch.randn(4, 4, 8, 8, generator=g) + offsets for _ in range(10)]
    reports = run(nn.Sequential(nn.BatchNorm2d(4).eval()), batches)
    r = reports["0"]
    want = reference(batches)
    assert_rel(r.within_var, want["within_var"], RTOL, "within_var")  # type: ignore[attr-defined]
    check(r, batches)


def _general_only(acc: LayerAccumulator) -> LayerAccumulator:
    acc._settle = lambda x: None  # type: ignore[method-assign]  # no steady path, ever
    return acc


@st.composite
def _stream(draw: st.DrawFn) -> list[torch.Tensor]:
    """Batches as production sends them: runs of one shape, drawn from a few (batch sizes
    1-3: dynamic batching), now and then a non-finite value, a jump of the mean by up to
    10,000 standard deviations, or a float64 batch."""
    channels = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shape = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))
    shapes = draw(st.lists(shape, min_size=1, max_size=3))
    batches: list[torch.Tensor] = []
    offset = torch.zeros(1, channels, 1, 1, dtype=torch.float64)
    for _ in range(draw(st.integers(1, 8))):  # runs
        n, h, w = draw(st.sampled_from(shapes))
        if draw(st.booleans()):
            jump = draw(st.sampled_from([1.0, 100.0, 1e4]))
            step = torch.randn(1, channels, 1, 1, generator=g, dtype=torch.float64)
            offset = offset + jump * step
        dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
        for _ in range(draw(st.integers(1, 12))):
            x = torch.randn(n, channels, h, w, generator=g, dtype=torch.float64) + offset
            x = x.to(dtype)
            if draw(st.integers(0, 9)) == 0:
                x[draw(st.integers(0, n - 1)), draw(st.integers(0, channels - 1)), 0, 0] = draw(
                    st.sampled_from([float("nan"), float("inf"), float("-inf")])
                )
            batches.append(x)
    return batches


@settings(max_examples=60, deadline=None)
@given(_stream())
def test_the_steady_path_keeps_exactly_what_the_general_path_keeps(
    batches: list[torch.Tensor],
) -> None:
    """Bit for bit: the same rows, the same shifts renewed at the same batches, the same
    compactions, the same non-finite counts -- over runs of shapes, jumps, NaN and inf."""
    results = []
    for acc in (LayerAccumulator("steady"), _general_only(LayerAccumulator("general"))):
        for x in batches:
            acc.observe(x, batch_stat_mode=False)
        stats = acc.collect()
        assert stats is not None
        results.append((stats.moments.as_arrays(), stats.batch_sizes, stats.n_batches))
    (steady, sizes, n), (general, sizes_g, n_g) = results
    assert (sizes, n) == (sizes_g, n_g)
    for a, b in zip(steady, general, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_window_shift_update_takes_the_lock() -> None:
    """The monitor updates a layer's shift from the window thread while hooks may measure in
    others: it must hold the accumulator's lock, under which the hooks read the shift and the
    steady plans (which it clears: their bounds came from the old variance)."""
    acc = LayerAccumulator("bn")
    for x in batches_of((3, 4, 4), [2, 2]):
        acc.observe(x, batch_stat_mode=False)
    assert acc._plans
    held: list[bool] = []

    class Recording:
        def __init__(self, lock: Any) -> None:
            self.lock = lock

        def __enter__(self) -> None:
            self.lock.acquire()
            held.append(True)

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    acc._lock = Recording(acc._lock)  # type: ignore[assignment]
    acc.update_shift(np.full(3, 1e4), np.ones(3))
    assert held == [True]
    assert not acc._plans and acc._shift is not None


def test_a_plan_made_in_inference_mode_serves_other_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans (views of the stage) made while the model ran under ``torch.inference_mode()``
    measure batches under ``no_grad`` and with autograd on as well: no "inference tensor"
    error, no general path, the same statistics."""
    general, _ = _general_path(monkeypatch)
    batches = batches_of((3, 4, 4), [2] * 6)
    acc = LayerAccumulator("bn")
    modes = [torch.inference_mode, torch.inference_mode, torch.no_grad, torch.enable_grad]
    for x, mode in zip(batches, modes + modes[:2], strict=True):
        with mode():
            acc.observe(
                x.requires_grad_() if mode is torch.enable_grad else x, batch_stat_mode=False
            )
    stats = acc.collect()
    assert stats is not None
    check(stats.moments, [b.detach() for b in batches])
    assert general == [2, 2]  # the first two: the second made the plan


def test_sequences_of_ever_new_lengths_make_no_plans() -> None:
    """BatchNorm1d over sequences whose length changes at every batch: no shape comes twice,
    so no plan (nor stage) is made for one -- each would have served no other batch."""
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(2, 3, length, generator=g) for length in range(5, 45)]
    acc = LayerAccumulator("bn")
    for x in batches:
        acc.observe(x, batch_stat_mode=False)
    assert not acc._plans and acc._stage is None
    stats = acc.collect()
    assert stats is not None
    check(stats.moments, batches)
