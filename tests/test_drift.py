"""Drift metrics and tests against scipy/statsmodels references and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special, stats
from statsmodels.stats.multitest import multipletests

from bnwatch.drift import (
    DriftConfig,
    Reference,
    assess_layer,
    batch_noise,
    batch_noise_per_channel,
    benjamini_hochberg,
    cauchy_combination,
    decide,
    gaussian_kl,
    gaussian_w2,
    log_std_ratio,
    shift_test,
    skew_corrected,
    standardized_shift,
    two_sided_p,
    variance_ratio_p,
)
from bnwatch.errors import ConfigError
from bnwatch.stats import ChannelMoments, LayerStats

EPS = 1e-5


# -- closed forms ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mean", "var", "ref_mean", "ref_var"),
    [(0.3, 2.0, -0.1, 0.5), (5, 1e-3, 5.01, 2e-3), (0, 1, 0, 1)],
)
def test_kl_matches_numerical_integration(
    mean: float, var: float, ref_mean: float, ref_var: float
) -> None:
    p = stats.norm(mean, math.sqrt(var + EPS))
    q = stats.norm(ref_mean, math.sqrt(ref_var + EPS))
    lo, hi = p.ppf(1e-12), p.isf(1e-12)
    want, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, limit=200)
    got = gaussian_kl(
        np.array([mean]), np.array([var]), np.array([ref_mean]), np.array([ref_var]), EPS
    )
    assert got[0] == pytest.approx(want, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    ("mean", "var", "ref_mean", "ref_var"), [(0.3, 2.0, -0.1, 0.5), (5, 1e-3, 5.01, 2e-3)]
)
def test_w2_matches_quantile_integral(
    mean: float, var: float, ref_mean: float, ref_var: float
) -> None:
    p = stats.norm(mean, math.sqrt(var + EPS))
    q = stats.norm(ref_mean, math.sqrt(ref_var + EPS))
    want2, _ = integrate.quad(lambda u: (p.ppf(u) - q.ppf(u)) ** 2, 0, 1, limit=200)
    got = gaussian_w2(
        np.array([mean]), np.array([var]), np.array([ref_mean]), np.array([ref_var]), EPS
    )
    assert got[0] == pytest.approx(math.sqrt(want2), rel=1e-6)


def test_batch_renorm_d_and_log_r() -> None:
    d = standardized_shift(np.array([1.0]), np.array([0.5]), np.array([4.0]), 0.0)
    r = log_std_ratio(np.array([9.0]), np.array([4.0]), 0.0)
    assert d[0] == pytest.approx(0.25)
    assert r[0] == pytest.approx(math.log(3 / 2))


# -- p-values and multiple testing --------------------------------------------------------------
def test_two_sided_p_matches_scipy() -> None:
    z = np.array([-3.0, -0.5, 0.0, 1.7, 8.0])
    np.testing.assert_allclose(two_sided_p(z), 2 * stats.norm.sf(np.abs(z)), rtol=1e-12)
    np.testing.assert_allclose(two_sided_p(z, 7.5), 2 * stats.t.sf(np.abs(z), 7.5), rtol=1e-10)


def test_cauchy_combination_matches_cauchy_tail() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=50)
    t = np.mean(np.tan((0.5 - p) * np.pi))
    assert cauchy_combination(p) == pytest.approx(stats.cauchy.sf(t), rel=1e-10)
    # tiny p-values keep full precision (no 1 - 1e-20 cancellation)
    assert cauchy_combination(np.full(10, 1e-20)) == pytest.approx(1e-20, rel=1e-6)
    assert cauchy_combination(np.array([1e-30, 0.5, 0.9])) == pytest.approx(3e-30, rel=1e-3)
    assert math.isnan(cauchy_combination(np.array([np.nan])))


def test_cauchy_combination_is_valid_under_correlation() -> None:
    """Equicorrelated z (rho = 0.9) over 64 channels: the level-1% test rejects ~1%."""
    rng = np.random.default_rng(1)
    shared = rng.normal(size=(20000, 1))
    z = math.sqrt(0.9) * shared + math.sqrt(0.1) * rng.normal(size=(20000, 64))
    p = 2 * stats.norm.sf(np.abs(z))
    rejected = np.mean([cauchy_combination(row) <= 0.01 for row in p])
    assert 0.005 < rejected < 0.015


def test_benjamini_hochberg_matches_statsmodels() -> None:
    rng = np.random.default_rng(2)
    p = np.concatenate([rng.uniform(size=80), rng.uniform(0, 1e-3, size=20)])
    p[[3, 50]] = np.nan
    got = benjamini_hochberg(p, 0.05)
    valid = np.isfinite(p)
    want = multipletests(p[valid], alpha=0.05, method="fdr_bh")[0]
    np.testing.assert_array_equal(got[valid], want)
    assert not got[~valid].any()


# -- the shift test is calibrated ----------------------------------------------------------------
def _windows(rng: np.random.Generator, n: int, c: int, s: int, shift: float = 0.0) -> np.ndarray:
    """Samples whose pixels share a per-sample offset (spatial correlation), total var 1."""
    offset = rng.normal(size=(n, c, 1)) * math.sqrt(0.7)
    noise = rng.normal(size=(n, c, s)) * math.sqrt(0.3)
    return offset + noise + shift


def _skewed_windows(rng: np.random.Generator, n: int, c: int, s: int) -> np.ndarray:
    """Per-sample offsets with skewness 2 (exponential), total var 1."""
    offset = (rng.exponential(size=(n, c, 1)) - 1.0) * math.sqrt(0.7)
    return offset + rng.normal(size=(n, c, s)) * math.sqrt(0.3)


@pytest.mark.parametrize("n", [8, 16])  # 8: the smallest window judged by default
@pytest.mark.parametrize("against", ["running", "baseline"])
@pytest.mark.parametrize("shape", ["normal", "skewed"])
def test_null_p_values_are_calibrated(against: str, shape: str, n: int) -> None:
    """Under no change, p-values are uniform and their small tail is not inflated."""
    rng = np.random.default_rng(3)
    gen = _windows if shape == "normal" else _skewed_windows
    cfg = DriftConfig(min_samples=8)
    base = ChannelMoments.from_values(gen(rng, 20_000, 4, 16))
    if against == "running":
        ref, null = Reference.running(np.zeros(4), np.ones(4)), base
    else:
        ref, null = Reference.from_moments(base), None
    p_mean, p_var = [], []
    for _ in range(2500):
        t = shift_test(ChannelMoments.from_values(gen(rng, n, 4, 16)), ref, EPS, cfg, null=null)
        p_mean.append(t.p_mean)
        p_var.append(t.p_log_var)
    pm = np.concatenate(p_mean)
    pv = np.concatenate(p_var)
    if shape == "normal":
        assert stats.kstest(pm, "uniform").pvalue > 1e-3
    for p in (pm, pv):  # 10,000 tests each: 1 % is 100 +- 10, 0.1 % is 10 +- 3
        assert np.mean(p < 0.01) < 0.014
        assert np.mean(p < 0.001) < 0.0022


def test_variance_ratio_p_matches_scipy() -> None:
    x = np.array([0.05, 0.3, 0.9, 1.0, 1.7, 6.0])
    d1 = np.array([3.0, 4.5, 16.0, 16.0, 40.0, 7.0])
    got = variance_ratio_p(x, d1, 120.0)
    want = np.minimum(1.0, 2 * np.minimum(stats.f.cdf(x, d1, 120.0), stats.f.sf(x, d1, 120.0)))
    np.testing.assert_allclose(got, want, rtol=1e-9)
    got = variance_ratio_p(x, d1, math.inf)  # against fixed (running) statistics
    chi = stats.chi2(d1)
    want = np.minimum(1.0, 2 * np.minimum(chi.cdf(d1 * x), chi.sf(d1 * x)))
    np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize("n", [8, 16])
def test_variance_test_is_calibrated_in_the_lower_tail_of_few_skewed_samples(n: int) -> None:
    """[N, C] features with gamma(0.5) per-sample values (kurtosis 15), as class-selective
    pooled features are: the sample variance of 16 has a long lower tail, where the normal law
    of log var rejected 0.33 % at nominal 0.1 % (1.6 % at 1 %)."""
    rng = np.random.default_rng(6)
    cfg = DriftConfig(min_samples=8)
    ref = Reference.from_moments(ChannelMoments.from_values(rng.gamma(0.5, size=(2000, 4, 1))))
    p_var = [
        shift_test(
            ChannelMoments.from_values(rng.gamma(0.5, size=(n, 4, 1))), ref, EPS, cfg
        ).p_log_var
        for _ in range(2500)
    ]
    p = np.concatenate(p_var)  # 10,000 tests
    assert np.mean(p < 0.01) < 0.014
    assert np.mean(p < 0.001) < 0.0022


def test_skew_correction_is_monotone_and_neutral_without_skew() -> None:
    t = np.linspace(-40, 40, 2001)
    for g in (-1.5, -0.3, 0.3, 1.5):
        assert np.all(np.diff(skew_corrected(t, np.full_like(t, g))) >= 0)
    np.testing.assert_array_equal(skew_corrected(t, np.zeros_like(t)), t)


def test_standard_errors_use_samples_not_pixels() -> None:
    """With strongly correlated pixels, a pixel-count SE would make every window 'significant'."""
    rng = np.random.default_rng(4)
    cfg = DriftConfig()
    ref = Reference.running(np.zeros(8), np.ones(8))
    x = _windows(rng, 64, 8, 1024)
    t = shift_test(ChannelMoments.from_values(x), ref, EPS, cfg)
    m = x.mean(axis=2)
    want_z = m.mean(axis=0) / np.sqrt(m.var(axis=0) / 64 + EPS / 64)
    np.testing.assert_allclose(t.z, want_z, rtol=1e-9)


def test_significant_but_tiny_shift_is_not_flagged() -> None:
    """Huge windows make 0.05-std shifts significant; the effect-size tolerance keeps them quiet."""
    rng = np.random.default_rng(5)
    cfg = DriftConfig()
    ref = Reference.running(np.zeros(8), np.ones(8))
    x = _windows(rng, 200_000, 8, 2, shift=0.05)
    t = shift_test(ChannelMoments.from_values(x), ref, EPS, cfg)
    assert t.p_value < 1e-10
    assert not t.flagged.any()


def test_large_shift_in_some_channels_is_flagged() -> None:
    rng = np.random.default_rng(6)
    cfg = DriftConfig()
    base = ChannelMoments.from_values(_windows(rng, 4000, 20, 16))
    x = _windows(rng, 512, 20, 16)
    x[:, :2] += 0.25
    t = shift_test(ChannelMoments.from_values(x), Reference.from_moments(base), EPS, cfg)
    assert t.p_value < 1e-6
    assert t.flagged[:2].all()
    assert not t.flagged[2:].any()


def test_too_few_samples_are_not_judged() -> None:
    rng = np.random.default_rng(7)
    t = shift_test(
        ChannelMoments.from_values(_windows(rng, 5, 3, 4, shift=10.0)),
        Reference.running(np.zeros(3), np.ones(3)),
        EPS,
        DriftConfig(min_samples=16),
    )
    assert math.isnan(t.p_value)
    assert not t.flagged.any()


# -- batch noise ---------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [2, 3, 4, 8, 32, 256])
def test_batch_noise_is_exact_for_gaussian_features(B: int) -> None:
    """[N, C] Gaussian input: B·σ²_B/σ² ~ χ²(B-1), so E[(log r)²] has a closed form."""
    rng = np.random.default_rng(8)
    m = ChannelMoments.from_values(rng.normal(size=(400_000, 2)) * 3.0)
    e_d2, e_lr2 = batch_noise_per_channel(m, B, 0.0)
    np.testing.assert_allclose(e_d2, 1 / B, rtol=0.01)
    k = (B - 1) / 2
    want = 0.25 * (special.polygamma(1, k) + (special.digamma(k) + math.log(2 / B)) ** 2)
    np.testing.assert_allclose(e_lr2, want, rtol=0.02)


@pytest.mark.parametrize("B", [2, 4, 16])
def test_batch_noise_matches_simulation_with_spatial_structure(B: int) -> None:
    """Skewed per-sample offsets, heteroscedastic pixels: prediction vs Monte Carlo within 10%."""
    rng = np.random.default_rng(9)
    n, s = 60_000, 16
    offset = rng.gamma(2.0, 0.5, size=(n, 1, 1))
    scale = rng.uniform(0.2, 1.5, size=(n, 1, 1))
    x = offset + scale * rng.normal(size=(n, 1, s))
    m = ChannelMoments.from_values(x)
    pred = batch_noise(m, B, EPS)
    mu, var = m.mean[0], m.var[0]
    xb = x[: (n // B) * B].reshape(n // B, B * s)
    bm, bv = xb.mean(axis=1), xb.var(axis=1)
    d = (bm - mu) / math.sqrt(var + EPS)
    lr = 0.5 * np.log((bv + EPS) / (var + EPS))
    assert pred.rms_d == pytest.approx(math.sqrt(np.mean(d * d)), rel=0.05)
    assert pred.rms_log_r == pytest.approx(math.sqrt(np.mean(lr * lr)), rel=0.10)


# -- the layer decision --------------------------------------------------------------------------
def _stats(x: np.ndarray) -> LayerStats:
    return LayerStats(ChannelMoments.from_values(x), {x.shape[0]: 1}, 1, 1, x.shape[0], 0)


def test_decide_applies_bonferroni_over_layers() -> None:
    rng = np.random.default_rng(10)
    cfg = DriftConfig()
    ref = Reference.running(np.zeros(10), np.ones(10))
    shifted = _windows(rng, 256, 10, 4)
    shifted[:, :3] += 0.5
    reports = {
        name: assess_layer(
            name,
            "BatchNorm2d",
            _stats(x),
            eps=EPS,
            running=ref,
            baseline=ref,
            baseline_kind="profile",
            running_stats_mutated=False,
            config=cfg,
        )
        for name, x in [("a", shifted), ("b", _windows(rng, 256, 10, 4))]
    }
    decided = decide(reports, cfg)
    assert decided["a"].drifted and decided["a"].gap
    assert not decided["b"].drifted and not decided["b"].gap
    # a p-value just under alpha is not enough when two layers share the budget
    borderline = {k: r for k, r in reports.items()}
    from dataclasses import replace

    borderline["b"] = replace(reports["b"], p_value=0.8 * cfg.alpha, frac_drifted=0.1)
    assert decide(borderline, cfg)["b"].drifted is False
    alone = {"b": borderline["b"]}
    assert decide(alone, cfg)["b"].drifted is True


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha", 0.0),
        ("alpha", 1.5),
        ("channel_fdr", -1),
        ("min_shift", 0),
        ("min_samples", 1),
        ("warmup_samples", 2.5),
        ("min_drifted_fraction", 1.0),
    ],
)
def test_config_errors_name_the_argument(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        DriftConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.argument == field
    assert isinstance(info.value, ValueError)


def test_a_dead_channel_does_not_veto_the_layer() -> None:
    """A channel that is always 0 (dead after ReLU) is untestable, not p = 1."""
    rng = np.random.default_rng(11)
    base = rng.normal(size=(4000, 8, 1))
    base[:, 3] = 0.0
    x = rng.normal(size=(512, 8, 1))
    x[:, 3] = 0.0
    x[:, :2] += 0.4
    t = shift_test(
        ChannelMoments.from_values(x),
        Reference.from_moments(ChannelMoments.from_values(base)),
        EPS,
        DriftConfig(),
    )
    assert np.isnan(t.p_mean[3])
    assert t.p_value < 1e-10
    assert cauchy_combination(np.array([1e-12, 1.0, 1.0])) < 1e-10
