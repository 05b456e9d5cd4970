"""Mergeable moments: reference-oracle tests (numpy, float64) and hypothesis merge properties."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnwatch.errors import ConfigError, ShapeError
from bnwatch.stats import MOMENT_FIELDS, ChannelMoments, LayerStats, Reservoir


def reference_moments(x: np.ndarray) -> dict[str, np.ndarray]:
    """Independent float64 computation of what ChannelMoments must hold (finite x only)."""
    x = x.reshape(x.shape[0], x.shape[1], -1).astype(np.float64)
    m = x.mean(axis=2)
    v = x.var(axis=2)
    a = m - m.mean(axis=0)
    b = v - v.mean(axis=0)
    n = x.shape[0]
    return {
        "mean": x.mean(axis=(0, 2)),
        "var": x.var(axis=(0, 2)),
        "between_var": m.var(axis=0),
        "within_var": v.mean(axis=0),
        "mu3": (a**3).mean(axis=0),
        "mu4": (a**4).mean(axis=0),
        "cvm": (a * b).mean(axis=0),
        "cvmm": (a * a * b).mean(axis=0),
        "var_v": v.var(axis=0),
        "n": np.full(x.shape[1], float(n)),
    }


def assert_close(got: np.ndarray, want: np.ndarray, atol: np.ndarray | float, what: str) -> None:
    """Elementwise |got - want| <= atol, where atol may differ per channel."""
    err = np.abs(np.asarray(got) - np.asarray(want))
    bound = np.broadcast_to(atol, err.shape)
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: got {got[bad]}, want {want[bad]}, err {err[bad]} > {bound[bad]}"


def check_against_reference(got: ChannelMoments, x: np.ndarray, rtol: float = 1e-9) -> None:
    ref = reference_moments(x)
    n = ref["n"]
    scale2 = ref["var"] + 1e-300
    np.testing.assert_array_equal(got.n, n)
    assert_close(got.mean, ref["mean"], rtol * (np.abs(ref["mean"]) + np.sqrt(scale2)), "mean")
    assert_close(got.var, ref["var"], rtol * scale2, "var")
    assert_close(got.between_var, ref["between_var"], rtol * scale2, "between_var")
    assert_close(got.within_var, ref["within_var"], rtol * scale2, "within_var")
    assert_close(got.sm3 / n, ref["mu3"], 10 * rtol * scale2**1.5, "third moment")
    assert_close(got.sm4 / n, ref["mu4"], 10 * rtol * scale2**2, "fourth moment")
    assert_close(got.cvm / n, ref["cvm"], 10 * rtol * scale2**1.5, "cov(v, m)")
    assert_close(got.cvmm / n, ref["cvmm"], 10 * rtol * scale2**2, "cov(v, m^2)")
    assert_close(got.vm2 / n, ref["var_v"], 10 * rtol * scale2**2, "var(v)")


def test_from_values_matches_float64_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5, 6, 7)) * np.array([1, 2, 0.1, 5, 3])[None, :, None, None]
    x = x + np.array([0.0, 1000.0, -3.0, 1e4, 0.5])[None, :, None, None]
    check_against_reference(ChannelMoments.from_values(x), x, rtol=1e-9)


def test_large_offset_channel_is_exact() -> None:
    """|mean|/std = 1000 (raw features into a first BatchNorm1d) loses nothing in float64."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4096, 3)) * 0.5 + np.array([500.0, -500.0, 0.0])
    got = ChannelMoments.from_values(x)
    np.testing.assert_allclose(got.var, x.var(axis=0), rtol=1e-10)
    np.testing.assert_allclose(got.between_var, x.var(axis=0), rtol=1e-10)
    np.testing.assert_allclose(got.within_var, 0.0)


def test_nonfinite_values_are_counted_and_excluded() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 3, 8))
    y = x.copy()
    y[2, 0, 3] = np.nan
    y[5, 1, :] = np.inf  # a whole (sample, channel) slice
    y[7, 2, 0] = -np.inf
    got = ChannelMoments.from_values(y)
    np.testing.assert_array_equal(got.nonfinite, [1, 8, 1])
    np.testing.assert_array_equal(got.count, [79, 72, 79])
    np.testing.assert_array_equal(got.n, [10, 9, 10])
    masked = np.ma.masked_invalid(y)
    np.testing.assert_allclose(got.mean, masked.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(got.var, masked.var(axis=(0, 2)), rtol=1e-12)
    # channel 1 without sample 5 is an ordinary complete window
    check_against_reference(
        ChannelMoments.from_values(np.delete(x[:, 1:2], 5, axis=0)),
        np.delete(x[:, 1:2], 5, axis=0),
    )
    sub = ChannelMoments.from_values(np.delete(x, 5, axis=0))
    assert got.between_var[1] == pytest.approx(sub.between_var[1], rel=1e-12)


# -- merge properties ------------------------------------------------------------------------
def _finite_floats(scale: float) -> st.SearchStrategy[float]:
    return st.floats(-scale, scale, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def activations(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(1, 12))
    c = draw(st.integers(1, 3))
    s = draw(st.integers(1, 4))
    offset = draw(st.sampled_from([0.0, 3.0, 1000.0]))
    x = draw(hnp.arrays(np.float64, (n, c, s), elements=_finite_floats(10.0)))
    return x + offset


def assert_moments_close(a: ChannelMoments, b: ChannelMoments) -> None:
    """Equal up to float64 rounding, with tolerances scaled to each field's magnitude."""
    n = np.maximum(a.n, 1)
    var = np.maximum(np.nan_to_num(a.var), 1e-12)
    tol: dict[str, Any] = {
        "count": 0,
        "n": 0,
        "nonfinite": 0,
        "mean": 1e-9 * (np.abs(a.mean) + np.sqrt(var)),
        "smean": 1e-9 * (np.abs(a.smean) + np.sqrt(var)),
        "m2": 1e-8 * var * np.maximum(a.count, 1),
        "sm2": 1e-8 * var * n,
        "sm3": 1e-7 * var**1.5 * n,
        "sm4": 1e-7 * var**2 * n,
        "vmean": 1e-8 * var,
        "vm2": 1e-7 * var**2 * n,
        "cvm": 1e-7 * var**1.5 * n,
        "cvmm": 1e-7 * var**2 * n,
    }
    for f in MOMENT_FIELDS:
        assert_close(getattr(a, f), getattr(b, f), tol[f], f)


@settings(max_examples=200, deadline=None)
@given(x=activations(), data=st.data())
def test_split_anywhere_equals_one_window(x: np.ndarray, data: st.DataObject) -> None:
    """Windows from any split of the samples merge to the one-window statistics."""
    cuts = sorted(data.draw(st.lists(st.integers(0, x.shape[0]), max_size=4)))
    bounds = [0, *cuts, x.shape[0]]
    parts = [ChannelMoments.from_values(x[a:b]) for a, b in itertools.pairwise(bounds)]
    merged = ChannelMoments.merge_all(parts)
    assert_moments_close(merged, ChannelMoments.from_values(x))


@settings(max_examples=200, deadline=None)
@given(a=activations(), b=activations(), c=activations())
def test_merge_is_associative_and_commutative(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    ch = min(a.shape[1], b.shape[1], c.shape[1])
    ma, mb, mc = (ChannelMoments.from_values(x[:, :ch]) for x in (a, b, c))
    assert_moments_close(ma.merge(mb), mb.merge(ma))
    assert_moments_close(ma.merge(mb).merge(mc), ma.merge(mb.merge(mc)))
    union = ChannelMoments.from_values(
        np.concatenate([x[:, :ch, :1] for x in (a, b, c)]),
    )
    narrow = [ChannelMoments.from_values(x[:, :ch, :1]) for x in (a, b, c)]
    assert_moments_close(ChannelMoments.merge_all(narrow), union)


@settings(max_examples=100, deadline=None)
@given(x=activations())
def test_empty_is_the_identity(x: np.ndarray) -> None:
    m = ChannelMoments.from_values(x)
    e = ChannelMoments.empty(m.channels)
    assert_moments_close(m.merge(e), m)
    assert_moments_close(e.merge(m), m)


@settings(max_examples=100, deadline=None)
@given(x=activations(), data=st.data())
def test_rows_with_unequal_element_counts(x: np.ndarray, data: st.DataObject) -> None:
    """Rows of different spatial sizes (variable-length sequences) merge like one window."""
    cut = data.draw(st.integers(1, x.shape[2]))
    a = ChannelMoments.from_values(x[:, :, :cut])
    b = ChannelMoments.from_values(x[:, :, cut - 1 :])
    merged = a.merge(b)
    flat = np.concatenate([x[:, :, :cut], x[:, :, cut - 1 :]], axis=2).transpose(1, 0, 2)
    flat = flat.reshape(x.shape[1], -1)
    np.testing.assert_allclose(merged.mean, flat.mean(axis=1), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(merged.var, flat.var(axis=1), rtol=1e-7, atol=1e-9)
    assert np.all(merged.n == 2 * x.shape[0])


def test_layer_stats_merge_adds_counters_and_histograms() -> None:
    x = np.random.default_rng(3).normal(size=(6, 2, 3))
    a = LayerStats(ChannelMoments.from_values(x[:4]), {4: 1}, 1, 2, 8, 1)
    b = LayerStats(ChannelMoments.from_values(x[4:]), {2: 1, 4: 0}, 1, 1, 2, 0)
    merged = a.merge(b)
    assert merged.batch_sizes == {2: 1, 4: 1}
    assert (merged.n_batches, merged.batches_seen, merged.samples_seen) == (2, 3, 10)
    assert merged.batch_stat_batches == 1
    assert_moments_close(merged.moments, ChannelMoments.from_values(x))


def test_shape_errors_name_what_is_wrong() -> None:
    with pytest.raises(ShapeError, match="merging ChannelMoments"):
        ChannelMoments.empty(2).merge(ChannelMoments.empty(3))
    with pytest.raises(ShapeError, match="per-sample means"):
        ChannelMoments.from_rows(np.zeros(3))
    with pytest.raises(ValueError, match="activations"):
        ChannelMoments.from_values(np.zeros(3))


# -- reservoir -------------------------------------------------------------------------------
def test_reservoir_is_uniform() -> None:
    """Every stream position ends up in the reservoir with probability capacity / stream."""
    hits = np.zeros(100)
    for seed in range(400):
        r = Reservoir(10, 1, seed=seed)
        for start in range(0, 100, 7):
            r.add(np.arange(start, min(start + 7, 100), dtype=np.float32)[:, None])
        assert r.rows.shape == (10, 1)
        assert r.seen == 100
        hits[r.rows[:, 0].astype(int)] += 1
    expected = 400 * 10 / 100
    # binomial(400, 0.1): sd 6; 6 sd is far outside chance
    assert np.all(np.abs(hits - expected) < 6 * 6)
    # first and second half equally represented (order must not matter)
    assert abs(hits[:50].sum() - hits[50:].sum()) < 0.1 * hits.sum()


def test_reservoir_merge_is_uniform_over_the_union() -> None:
    from_a = 0
    for seed in range(300):
        a = Reservoir(20, 1, seed=seed)
        a.add(np.zeros((300, 1), dtype=np.float32))
        b = Reservoir(20, 1, seed=seed + 1000)
        b.add(np.ones((100, 1), dtype=np.float32))
        m = a.merge(b)
        assert m.seen == 400
        assert m.rows.shape == (20, 1)
        from_a += int((m.rows == 0).sum())
    assert from_a / (300 * 20) == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize(("cap_a", "cap_b"), [(1, 3), (10, 1), (1, 10), (8, 2)])
def test_reservoir_merge_of_unequal_capacities_is_uniform_and_symmetric(
    cap_a: int, cap_b: int
) -> None:
    """Two streams of 100 samples: half of the merged rows come from each, whichever side is
    merged into which (with capacities 1 and 3 the first stream gave 29 %, with 10 and 1 it
    gave 83 %: the hypergeometric count was clipped to the smaller side)."""
    shares = []
    for first, second in ((cap_a, cap_b), (cap_b, cap_a)):
        from_first = rows = 0
        for seed in range(400):
            a = Reservoir(first, 1, seed=seed)
            a.add(np.zeros((100, 1), dtype=np.float32))
            b = Reservoir(second, 1, seed=seed + 1000)
            b.add(np.ones((100, 1), dtype=np.float32))
            merged = a.merge(b)
            from_first += int((merged.rows == 0).sum())
            rows += merged.rows.shape[0]
        shares.append(from_first / rows)
    assert shares[0] == pytest.approx(0.5, abs=0.04)
    assert shares[1] == pytest.approx(0.5, abs=0.04)


def test_windows_merged_one_after_another_all_count_alike() -> None:
    """A monitor's windows pooled one at a time (a long report): the last of 40 windows is in
    the pooled sample as often as the first (rounding each share the same way every time
    would leave the small newcomer out, merge after merge)."""
    hits = np.zeros(40)
    for seed in range(300):
        pooled = Reservoir(8, 1, seed=seed)
        for w in range(40):
            window = Reservoir(8, 1, seed=seed * 100 + w)
            window.add(np.full((50, 1), float(w), dtype=np.float32))
            pooled = pooled.merge(window)
        hits[pooled.rows[:, 0].astype(int)] += 1
    expected = 300 * 8 / 40  # 60 per window
    assert np.all(np.abs(hits - expected) < 5 * np.sqrt(expected))
    assert abs(hits[:20].sum() - hits[20:].sum()) < 0.1 * hits.sum()


def test_reservoirs_of_a_billion_samples_merge() -> None:
    """numpy's hypergeometric draw refuses 10**9 and more: a layer past a billion samples
    broke every report over its range."""
    big = Reservoir(64, 1, seed=0)
    big.add(np.zeros((64, 1), dtype=np.float32))
    big.seen = 3 * 10**9
    small = Reservoir(64, 1, seed=1)
    small.add(np.ones((64, 1), dtype=np.float32))
    small.seen = 10**9
    merged = big.merge(small)
    assert merged.seen == 4 * 10**9 and merged.rows.shape == (64, 1)
    assert int((merged.rows == 0).sum()) == 48  # 3/4 of 64, as systematic sampling gives


def test_reservoir_rejects_bad_capacity() -> None:
    with pytest.raises(ConfigError, match="capacity"):
        Reservoir(0, 3)


@settings(max_examples=100, deadline=None)
@given(x=activations())
def test_complete_rows_shortcut_equals_the_general_formula(x: np.ndarray) -> None:
    """moments_from_complete_rows (all rows of equal size, nothing excluded) is the same math."""
    from bnwatch.stats import moments_from_complete_rows, moments_from_rows

    m = x.mean(axis=2)
    v = x.var(axis=2)
    size = float(x.shape[2])
    general = moments_from_rows(m, v, np.full_like(m, size), np.zeros(m.shape[1]))
    short = moments_from_complete_rows(m, v, size)
    assert_moments_close(ChannelMoments.from_arrays(short), ChannelMoments.from_arrays(general))


@settings(max_examples=100, deadline=None)
@given(x=activations())
def test_values_shortcut_equals_the_general_formula(x: np.ndarray) -> None:
    """moments_from_values ([N, C] values: no spatial positions) is the same math too."""
    from bnwatch.stats import moments_from_rows, moments_from_values

    m = x[:, :, 0]
    general = moments_from_rows(m, np.zeros_like(m), np.ones_like(m), np.zeros(m.shape[1]))
    short = moments_from_values(m)
    assert_moments_close(ChannelMoments.from_arrays(short), ChannelMoments.from_arrays(general))


def _ids(start: int, n: int) -> np.ndarray:
    """``n`` rows whose first column identifies them (``start`` ... ``start + n - 1``)."""
    ids = np.arange(start, start + n, dtype=np.float32)
    return np.stack([ids, np.full(n, float(start), dtype=np.float32)], axis=1)


@settings(max_examples=150, deadline=None)
@given(
    cap_a=st.integers(1, 12),
    cap_b=st.integers(1, 12),
    n_a=st.integers(0, 40),
    n_b=st.integers(0, 40),
    seed=st.integers(0, 2**31),
)
def test_reservoir_merge_keeps_capacity_and_membership(
    cap_a: int, cap_b: int, n_a: int, n_b: int, seed: int
) -> None:
    a = Reservoir(cap_a, 2, seed=seed)
    a.add(_ids(0, n_a))
    b = Reservoir(cap_b, 2, seed=seed + 1)
    b.add(_ids(1000, n_b))
    merged = a.merge(b)
    assert merged.capacity == max(cap_a, cap_b)
    assert merged.seen == n_a + n_b
    assert merged.rows.shape[0] <= min(merged.capacity, merged.seen)
    if n_a <= cap_a and n_b <= cap_b:  # both sides kept everything: the union sample is full
        assert merged.rows.shape[0] == min(merged.capacity, n_a + n_b)
    ids = merged.rows[:, 0].tolist()
    assert len(set(ids)) == len(ids)  # no row twice
    assert set(ids) <= set(a.rows[:, 0].tolist()) | set(b.rows[:, 0].tolist())
    # whole rows travel together
    np.testing.assert_array_equal(merged.rows[:, 1], np.where(merged.rows[:, 0] >= 1000, 1000, 0))
    # merging is also how LayerStats merge their reservoirs
    sa = LayerStats(ChannelMoments.empty(2), reservoir=a)
    sb = LayerStats(ChannelMoments.empty(2), reservoir=b)
    both = sa.merge(sb).reservoir
    assert both is not None and both.seen == n_a + n_b and both.capacity == merged.capacity


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 8), st.integers(0, 30)), min_size=1, max_size=6),
    cap=st.none() | st.integers(1, 50),
    seed=st.integers(0, 2**31),
)
def test_reservoir_merge_all_keeps_membership(
    sizes: list[tuple[int, int]], cap: int | None, seed: int
) -> None:
    parts = []
    for i, (capacity, n) in enumerate(sizes):
        r = Reservoir(capacity, 2, seed=seed + i)
        r.add(_ids(1000 * i, n))
        parts.append(r)
    pooled = Reservoir.merge_all(parts, capacity=cap, seed=seed)
    assert pooled.seen == sum(n for _, n in sizes)
    kept = sum(r.rows.shape[0] for r in parts)
    assert pooled.rows.shape[0] <= min(kept, cap if cap is not None else kept)
    ids = pooled.rows[:, 0].tolist()
    assert len(set(ids)) == len(ids)
    assert set(ids) <= {x for r in parts for x in r.rows[:, 0].tolist()}
    if cap is None and len({n for _, n in sizes}) == 1 and len({c for c, _ in sizes}) == 1:
        assert pooled.rows.shape[0] == kept  # equal windows give back every row they kept


def test_reservoir_merge_all_includes_every_sample_with_the_same_chance() -> None:
    """A stream of 300 and one of 100 samples, 20 kept of each: the pool keeps
    k = min(20 * 400 // 300, 20 * 400 // 100) = 26 rows, 3/4 of them from the first stream."""
    a = Reservoir(20, 1, seed=1)
    a.add(np.zeros((300, 1), dtype=np.float32))
    b = Reservoir(20, 1, seed=2)
    b.add(np.ones((100, 1), dtype=np.float32))
    pooled = Reservoir.merge_all([a, b], seed=3)
    assert pooled.rows.shape == (26, 1)
    assert pooled.seen == 400
    assert int((pooled.rows == 0).sum()) in (19, 20)  # 26 * 3/4 = 19.5
    with pytest.raises(ValueError, match="at least one"):
        Reservoir.merge_all([])
    with pytest.raises(ShapeError, match="merging reservoirs"):
        Reservoir.merge_all([a, Reservoir(3, 2)])


def test_layer_stats_keep_the_one_reservoir_there_is() -> None:
    r = Reservoir(4, 2, seed=0)
    r.add(_ids(0, 10))
    with_one = LayerStats(ChannelMoments.empty(2), reservoir=r)
    without = LayerStats(ChannelMoments.empty(2))
    assert with_one.merge(without).reservoir is r
    assert without.merge(with_one).reservoir is r
    assert without.merge(without).reservoir is None
