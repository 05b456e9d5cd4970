"""Drift and small-batch metrics, tests and decisions (pure numpy/scipy; DESIGN §3).

Notation, per channel ``c`` of one layer:

``mean, var``
    the window's population mean and variance over all elements (:class:`ChannelMoments`);
``μr, σr²``
    the reference's: the layer's ``running_mean`` / ``running_var`` (for the train/inference
    *gap*) or a baseline -- a reference profile or the warm-up windows (for *drift*);
``β = between_var``
    the variance of per-sample means: samples, not pixels, are the unit of independence.

A channel is *flagged* when its mean or log-variance shift is significant after
Benjamini-Hochberg correction over the layer's channels **and** at least the effect-size
tolerance (``min_shift`` for ``|d|``, ``min_log_ratio`` for ``|log r|``).  A layer's p-value
combines all its channel tests with the Cauchy combination test (Liu & Xie 2020), which stays
valid under the strong correlation between channels; a layer is *drifted* (or has a *gap*)
when that p-value survives Bonferroni correction over the window's layers -- so the
false-alarm rate per window is at most ``alpha`` across channels and layers -- **and** it has
flagged channels.  Significance alone fires on every huge window, size alone on every tiny one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import special

from bnwatch.errors import ConfigError, ShapeError, check_positive_int, check_probability
from bnwatch.schema import BATCH_NOISE_SIZES, BatchNoise, LayerReport
from bnwatch.stats import F64, ChannelMoments, LayerStats

Bool = NDArray[np.bool_]


@dataclass(frozen=True)
class DriftConfig:
    """Thresholds of the drift, gap and small-batch decisions.

    Attributes:
        alpha: false-alarm probability per window over all channels and layers.
        channel_fdr: Benjamini-Hochberg level for flagging individual channels.
        min_shift: effect-size tolerance on ``|d|`` (mean shift in reference std units).
        min_log_ratio: effect-size tolerance on ``|log r|`` (0.1 ≈ a 10 % change of std).
        min_samples: windows with fewer samples are reported but not judged.
        warmup_samples: samples the first windows must accumulate before they become the
            drift baseline (used when no reference profile is given).
        min_drifted_fraction: a drifted layer needs more than this share of flagged channels
            (0: at least one).
    """

    alpha: float = 1e-3
    channel_fdr: float = 0.01
    min_shift: float = 0.2
    min_log_ratio: float = 0.1
    min_samples: int = 8
    warmup_samples: int = 2048
    min_drifted_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_probability("alpha", self.alpha)
        check_probability("channel_fdr", self.channel_fdr)
        for name in ("min_shift", "min_log_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(name, value, "a number > 0")
        check_positive_int("min_samples", self.min_samples, minimum=2)
        check_positive_int("warmup_samples", self.warmup_samples, minimum=2)
        check_probability("min_drifted_fraction", self.min_drifted_fraction, open_low=False)


CONFIG_ACCOUNT_PREFIX = "drift_"
"""A :class:`DriftConfig` field ``f`` is ``drift_<f>`` in a monitor's account of itself
(``WindowRecord.monitor``): ``drift_alpha``, ``drift_channel_fdr``, ``drift_min_shift``,
``drift_min_log_ratio``, ``drift_min_samples``, ``drift_warmup_samples``,
``drift_min_drifted_fraction``."""


def config_account(config: DriftConfig) -> dict[str, float]:
    """The thresholds that decided a window's flags, as entries of the monitor's account of
    itself (``WindowRecord.monitor``: str -> float, sent on the wire and stored with the
    source): ``drift_<field>`` for every field of ``config``.  :func:`config_from_account`
    reads them back."""
    return {CONFIG_ACCOUNT_PREFIX + f.name: float(getattr(config, f.name)) for f in fields(config)}


def config_from_account(account: Mapping[str, Any] | None) -> DriftConfig | None:
    """The :class:`DriftConfig` that :func:`config_account` wrote into ``account`` (other
    keys are ignored), or ``None`` when a field is missing or its value is not a valid
    threshold -- an account from a bnwatch that did not report its thresholds, or a broken
    one.  Never a guess: a partial account gives ``None``, not defaults for the rest."""
    if not account:
        return None
    values: dict[str, Any] = {}
    for f in fields(DriftConfig):
        value = account.get(CONFIG_ACCOUNT_PREFIX + f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if f.type in (int, "int"):  # integer thresholds travel as floats
            if not float(value).is_integer():
                return None
            value = int(value)
        else:
            value = float(value)
        values[f.name] = value
    try:
        return DriftConfig(**values)
    except ConfigError:
        return None


# --------------------------------------------------------------------------------------
# Effect sizes (closed forms)
# --------------------------------------------------------------------------------------
def standardized_shift(mean: F64, ref_mean: F64, ref_var: F64, eps: float) -> F64:
    """Batch Renorm's ``d = (mean - μr) / sqrt(σr² + eps)`` (±inf against a reference
    variance of 0 with ``eps`` = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray((mean - ref_mean) / np.sqrt(ref_var + eps), dtype=np.float64)


def log_std_ratio(var: F64, ref_var: F64, eps: float) -> F64:
    """Batch Renorm's ``log r = ½ log((var + eps) / (σr² + eps))``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(0.5 * np.log((var + eps) / (ref_var + eps)), dtype=np.float64)


def gaussian_kl(mean: F64, var: F64, ref_mean: F64, ref_var: F64, eps: float) -> F64:
    """``KL(N(mean, var) ‖ N(μr, σr²))`` with ``eps`` added to both variances::

    KL = ½ [ log(σr²/var) + (var + (mean - μr)²) / σr² - 1 ]

    Against a reference variance of 0 (``eps`` = 0, a channel dead in training) it is +inf,
    and 0 for a window that matches it exactly.
    """
    v1 = var + eps
    v0 = ref_var + eps
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        kl = 0.5 * (np.log(v0 / v1) + (v1 + (mean - ref_mean) ** 2) / v0 - 1.0)
        same = (v1 == 0) & (mean == ref_mean)
        return np.asarray(np.where(v0 == 0, np.where(same, 0.0, np.inf), kl), dtype=np.float64)


def gaussian_w2(mean: F64, var: F64, ref_mean: F64, ref_var: F64, eps: float) -> F64:
    """Wasserstein-2 distance between the two normals: ``sqrt((mean-μr)² + (σ - σr)²)``."""
    return np.asarray(np.hypot(mean - ref_mean, np.sqrt(var + eps) - np.sqrt(ref_var + eps)))


def rms(x: F64) -> float:
    """Root mean square over the finite entries (NaN when there are none)."""
    finite = x[np.isfinite(x)]
    return float(np.sqrt(np.mean(finite * finite))) if finite.size else math.nan


def finite_mean(x: F64) -> float:
    finite = x[np.isfinite(x)]
    return float(np.mean(finite)) if finite.size else math.nan


# --------------------------------------------------------------------------------------
# p-values and multiple testing
# --------------------------------------------------------------------------------------
def two_sided_p(z: F64, df: F64 | float | None = None) -> F64:
    """``P(|T| ≥ |z|)`` for Student's t with ``df`` degrees of freedom (normal if ``None``)."""
    az = -np.abs(np.asarray(z, dtype=np.float64))
    if df is None:
        return np.asarray(2.0 * special.ndtr(az))
    return np.asarray(2.0 * special.stdtr(np.asarray(df, dtype=np.float64), az))


def variance_ratio_p(ratio: F64, df_window: F64, df_reference: F64 | float) -> F64:
    """Two-sided p-value of a ratio of two variance estimates, ``X = var / σr²``, under the
    null of equal variances, each estimate a scaled χ² with *effective* degrees of freedom::

        X ~ F(df_window, df_reference)      (χ²(df_window) / df_window when df_reference = ∞)
        p = min(1, 2 min(P(X' ≤ X), P(X' ≥ X)))

    With kurtosis the degrees of freedom shrink (Box & Andersen 1955): an estimate whose
    log has variance ``V0 / n`` matches a χ² with ``2n / V0`` degrees of freedom (``V0 = 2``
    for normal data, ``df = n``).  For large ``df`` this is the normal test of ``log X``; for
    small ones the F law keeps the long lower tail of a variance estimated from few,
    heavy-tailed samples, which the normal law of ``log X`` cuts off by orders of magnitude.
    """
    x = np.asarray(ratio, dtype=np.float64)
    d1 = np.asarray(df_window, dtype=np.float64)
    d2 = np.broadcast_to(np.asarray(df_reference, dtype=np.float64), x.shape)
    finite = np.isfinite(d2)
    d2_safe = np.where(finite, d2, 1.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lower = np.where(finite, special.fdtr(d1, d2_safe, x), special.chdtr(d1, d1 * x))
        upper = np.where(finite, special.fdtrc(d1, d2_safe, x), special.chdtrc(d1, d1 * x))
    return np.asarray(np.minimum(1.0, 2.0 * np.minimum(lower, upper)))


def cauchy_combination(p: F64) -> float:
    """Cauchy combination test of (possibly dependent) p-values (Liu & Xie 2020, ACAT)::

        T = mean_i tan((½ - p_i) π),     p = ½ - arctan(T) / π

    Valid at small levels under arbitrary correlation, and more powerful than the
    Bonferroni minimum when evidence is spread over many channels.  NaN p-values are
    ignored; p-values of (numerically) 1 become ``1 - 1/k`` for ``k`` tests (Liu & Xie's
    remedy: a p of exactly 1 would add ``-∞`` and veto every other channel); tiny ones use
    ``tan((½ - p)π) ≈ 1/(pπ)``; for ``T > 0`` the tail is ``arctan(1/T)/π``, which avoids
    cancellation.
    """
    pv = np.asarray(p, dtype=np.float64)
    pv = pv[np.isfinite(pv)]
    if pv.size == 0:
        return math.nan
    pv = np.where(pv >= 1.0 - 1e-12, 1.0 - 1.0 / max(pv.size, 2), np.maximum(pv, 1e-300))
    terms = np.where(pv < 1e-15, 1.0 / (pv * np.pi), np.tan((0.5 - pv) * np.pi))
    t = float(np.mean(terms))
    if t > 0:
        return float(np.arctan(1.0 / t) / np.pi)
    return float(0.5 - np.arctan(t) / np.pi)


def benjamini_hochberg(p: F64, q: float) -> Bool:
    """Which hypotheses the Benjamini-Hochberg step-up procedure rejects at FDR ``q``.

    NaN p-values are never rejected and do not count towards the number of tests.
    """
    pv = np.asarray(p, dtype=np.float64)
    out = np.zeros(pv.shape, dtype=bool)
    valid = np.isfinite(pv)
    m = int(valid.sum())
    if m == 0:
        return out
    vals = pv[valid]
    order = np.argsort(vals)
    below = vals[order] <= q * np.arange(1, m + 1) / m
    if not below.any():
        return out
    k = int(np.nonzero(below)[0].max())
    rejected = np.zeros(m, dtype=bool)
    rejected[order[: k + 1]] = True
    out[valid] = rejected
    return out


# --------------------------------------------------------------------------------------
# References and the shift test
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Reference:
    """What a window is compared with.

    ``moments`` is ``None`` for the running statistics, which are fixed numbers without a
    sampling distribution; a baseline estimated from observed data (a profile or the warm-up
    windows) keeps its moments so that its own sampling error enters the standard errors
    and its dispersion describes the null.
    """

    mean: F64
    var: F64
    moments: ChannelMoments | None = None

    @classmethod
    def running(cls, running_mean: NDArray[Any], running_var: NDArray[Any]) -> Reference:
        """The layer's stored ``running_mean``/``running_var``.

        PyTorch stores the *unbiased* batch variance in ``running_var``; it is used as is
        (the difference matters only when N·|S| is tiny).
        """
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
        if mean.shape != var.shape or mean.ndim != 1:
            raise ShapeError("running statistics", "two [C] arrays", (mean.shape, var.shape))
        return cls(mean=mean, var=var)

    @classmethod
    def from_moments(cls, moments: ChannelMoments) -> Reference:
        """A baseline estimated from observed windows (a profile, or warm-up windows)."""
        return cls(mean=moments.observed_mean, var=moments.var, moments=moments)

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])


@dataclass(frozen=True, eq=False)
class ShiftTest:
    """Per-channel effect sizes, test statistics and flags of a window against a reference."""

    d: F64
    log_r: F64
    z: F64
    z_log_var: F64
    p_mean: F64
    p_log_var: F64
    flagged: Bool
    p_value: float

    @property
    def frac_flagged(self) -> float:
        return float(self.flagged.mean()) if self.flagged.size else 0.0


def skew_corrected(t: F64, skew: F64) -> F64:
    """Hall's (1992) monotone cubic transform removing the skewness of a standardized mean::

        z = t - (γ/6)(t² - 1) + (γ²/108) t³

    With ``γ`` the skewness of ``t``, ``z`` is standard normal up to O(1/n) where a plain
    normal (or t) reference over-rejects: per-sample means of real activations are skewed,
    and at n = 16 a nominal 1e-4 two-sided test rejects ~1e-3 of null windows uncorrected.
    The derivative ``(1 - γt/6)²`` is never negative, so the transform keeps the order of t.
    """
    g = np.where(np.isfinite(skew), skew, 0.0)
    return np.asarray(t - g / 6.0 * (t * t - 1.0) + g * g * t * t * t / 108.0)


MIN_NULL_VAR = 64
"""Samples the null dispersion needs (the window's pooled with an independent null sample)
before :func:`shift_test` tests variances: their law rests on a fourth moment, which fewer
samples under-estimate.  Without it, the first window after attach (no profile) declared a
train/inference gap in 15-22 % of clean windows of 16 samples, 2 % in the second and third,
against ``alpha`` = 0.1 %."""

MIN_OWN_VAR = 1024
"""Samples a window needs to test variances with no null sample but its own (the first window
after attach, merged reads): a window's own fourth moments are correlated with its variance.
Measured on 64 independent channels of gamma(4) features (skewness 1), share of clean windows
with a gap: 6.3 % at 64 samples, 2.8 % at 128, 1.3 % at 256, 0.6 % at 512, 0.1 % at 1,024."""


def shift_test(
    window: ChannelMoments,
    ref: Reference,
    eps: float,
    config: DriftConfig,
    null: ChannelMoments | None = None,
) -> ShiftTest:
    """Test whether a window's channel means and variances differ from a reference.

    The null dispersion -- how much a window's statistics vary when nothing changed -- is
    estimated from the pooled sample of the window and the null sample (the baseline itself
    when it is estimated from data, else ``null`` as given by the caller): under the null they
    are exchangeable, and pooling keeps one extreme window from looking extreme against a
    small baseline's under-estimated tails.  With ``n``
    the window's samples, ``nr`` the reference's (∞ for running statistics), ``β0``, ``μ3``
    the null's between-sample variance and third central moment of per-sample means::

        z  = (mean - μr) / SE,   SE² = β0 (1/n + 1/nr) + eps/n
        p  = 2 Φ(-|Hall(z, γ)|),  γ = μ3 (1/n² - 1/nr²) / SE³        (skewness of z)

    and for the variance, with ``q = v + (m - m̄)²`` the per-sample contribution to the
    variance and ``V0 = Var0(q) / (var0 + eps)²`` the delta-method variance of
    ``log(var̂ + eps)`` per sample::

        z_logvar = (log(var + eps) - log(σr² + eps)) / sqrt(V0 (1/n + 1/nr))

    Its p-value is the larger of the normal law's and :func:`variance_ratio_p`'s for
    ``(var + eps) / (σr² + eps)`` with ``2n/V0`` and ``2nr/V0`` effective degrees of freedom:
    the normal law of the log cuts off the long lower tail of a variance estimated from few
    heavy-tailed samples (class-selective features in a window that misses their classes),
    the F law is too light in the upper tail of skewed ones; the larger p is valid when either
    law is (measurements: ``docs/statistics.md``).

    Under the null both sides share one dispersion, which is why it is not taken from the
    window alone: a window's own variance (and fourth-moment) estimate is noisy at small ``n``
    and correlated with its mean, which makes Welch-type tests over-reject by several times
    in the tail.  When the null sample is small the p-values use
    Student's t with its ``n0 - 1`` degrees of freedom.  The ``eps/n`` floor keeps channels
    whose variance is below BatchNorm's ``eps`` -- which BatchNorm itself ignores -- from
    producing infinite statistics.  Windows with fewer than ``min_samples`` samples, and
    channels that are constant in the pooled sample, are not tested (p-values NaN, nothing
    flagged).
    """
    if ref.channels != window.channels:
        raise ShapeError("reference channels", window.channels, ref.channels)
    source = ref.moments or null
    if source is not None and source.channels != window.channels:
        raise ShapeError("null dispersion channels", window.channels, source.channels)
    # under the null every sample is exchangeable: pool the window with the null sample
    dispersion = window if source is None else source.merge(window)
    mean, var = window.observed_mean, window.var
    d = standardized_shift(mean, ref.mean, ref.var, eps)
    log_r = log_std_ratio(var, ref.var, eps)
    testable = (window.n >= config.min_samples) & np.isfinite(mean) & np.isfinite(var)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        n = np.where(testable, window.n, np.nan)
        inv_nr = (
            0.0 if ref.moments is None else 1.0 / np.where(ref.moments.n > 1, ref.moments.n, np.nan)
        )
        n0 = np.where(dispersion.n > 1, dispersion.n, np.nan)
        beta0 = dispersion.sm2 / n0
        mu3 = dispersion.sm3 / n0
        se = np.sqrt(beta0 * (1.0 / n + inv_nr) + eps / n)
        z = (window.sample_mean - ref.mean) / se
        skew = mu3 * (1.0 / (n * n) - inv_nr * inv_nr) / se**3
        v0 = dispersion.second_moment_var / (dispersion.var + eps) ** 2
        z_lv = 2.0 * log_r / np.sqrt(v0 * (1.0 / n + inv_nr))
        v0_pos = np.where(v0 > 0, v0, np.nan)
        df_window = 2.0 * n / v0_pos
        df_ref = 2.0 / (v0_pos * inv_nr)  # ∞ for the running statistics
        # a channel that never varies (dead after a ReLU, say) gives no basis for a test
        varies = dispersion.var > 0
        testable_mean = testable & varies & ~np.isnan(z)
        # the variance test's law rests on the null's fourth moments: not from a few
        # samples, nor from a window's own unless it is large (they are correlated with its
        # statistic)
        null_ok = n0 >= (MIN_NULL_VAR if source is not None else MIN_OWN_VAR)
        testable_var = testable & varies & np.isfinite(z_lv) & np.isfinite(df_window) & null_ok
    df = n0 - 1 if float(np.nanmax(n0, initial=0.0)) < 1000 else None
    p_mean = np.where(testable_mean, two_sided_p(skew_corrected(z, skew), df), np.nan)
    # neither law is right in both tails (see docs/statistics.md): take the larger p-value
    with np.errstate(divide="ignore", invalid="ignore"):  # a reference variance of 0, eps 0
        ratio = (var + eps) / (ref.var + eps)
        p_lv_f = variance_ratio_p(ratio, df_window, df_ref)
    p_lv = np.where(testable_var, np.maximum(two_sided_p(z_lv, df), p_lv_f), np.nan)
    both = np.concatenate([p_mean, p_lv])
    rejected = benjamini_hochberg(both, config.channel_fdr)
    c = window.channels
    flagged = (rejected[:c] & (np.abs(d) >= config.min_shift)) | (
        rejected[c:] & (np.abs(log_r) >= config.min_log_ratio)
    )
    return ShiftTest(
        d=d,
        log_r=log_r,
        z=np.asarray(z, dtype=np.float64),
        z_log_var=np.asarray(z_lv, dtype=np.float64),
        p_mean=p_mean,
        p_log_var=p_lv,
        flagged=flagged,
        p_value=cauchy_combination(both),
    )


# --------------------------------------------------------------------------------------
# Batch-statistics noise (small-batch mismatch)
# --------------------------------------------------------------------------------------
def batch_noise_per_channel(
    moments: ChannelMoments, batch_size: int, eps: float
) -> tuple[F64, F64]:
    """Predicted ``E[d²]`` and ``E[(log r)²]`` per channel at batch size ``B``.

    A layer that normalizes with batch statistics uses, for a batch of ``B`` samples drawn
    from the window's population (mean ``μ``, variance ``σ² = W + β`` with ``W`` the mean
    within-sample variance and ``β`` the between-sample variance)::

        μ_B  = mean of the B per-sample means        d = (μ_B - μ) / sqrt(σ² + eps)
        σ²_B = mean_i v_i + (1/B) Σ (m_i - μ_B)²     log r = ½ log((σ²_B + eps)/(σ² + eps))

    Exactly, for i.i.d. samples: ``E[d²] = β / (B (σ² + eps))``, ``E[σ²_B] = W + β (B-1)/B``
    and, with ``μ4`` the fourth central moment of ``m``::

        Var(σ²_B) = Var(v)/B + ((B-1)/B)² (μ4/B - β² (B-3)/(B(B-1)))
                    + 2 Cov(v, (m-μ)²) (B-1)/B²

    ``X = (σ²_B + eps)/(σ² + eps)`` is then moment-matched by a Gamma(k, θ) law -- exact for
    Gaussian activations, where ``B σ²_B / σ²`` is χ² -- whose log moments are
    ``E[log X] = ψ(k) + log θ`` and ``Var[log X] = ψ'(k)``, giving
    ``E[(log r)²] = ¼ (ψ'(k) + (ψ(k) + log θ)²)``.
    """
    check_positive_int("batch_size", batch_size)
    e_d2, e_lr2 = batch_noise_curve(moments, [batch_size], eps)
    return e_d2[0], e_lr2[0]


def batch_noise_curve(
    moments: ChannelMoments, batch_sizes: Sequence[int], eps: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """:func:`batch_noise_per_channel` for several batch sizes at once: ``[len(sizes), C]``
    arrays (one vectorized pass; the special functions dominate the cost)."""
    if not batch_sizes or any(isinstance(b, bool) or int(b) < 1 for b in batch_sizes):
        raise ConfigError("batch_sizes", list(batch_sizes), "batch sizes >= 1")
    B = np.asarray(batch_sizes, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        n = np.where(moments.n >= 2, moments.n, np.nan)
        mu2 = moments.sm2 / n
        mu4 = moments.sm4 / n
        within = moments.vmean
        var_v = moments.vm2 / n
        cov_v_a2 = moments.cvmm / n
        total = within + mu2 + eps
        e_d2 = mu2 / (B * total)
        mean_sb = within + mu2 * (B - 1) / B
        b_minus = np.where(B >= 2, B - 1, 1.0)  # B = 1: a single sample has no spread
        var_sb = np.where(
            B >= 2, ((B - 1) / B) ** 2 * (mu4 / B - mu2 * mu2 * (B - 3) / (B * b_minus)), 0.0
        )
        var_batch = var_v / B + var_sb + 2.0 * cov_v_a2 * (B - 1) / (B * B)
        mu_x = (mean_sb + eps) / total
        s2_x = np.maximum(var_batch, 0.0) / (total * total)
        k = mu_x * mu_x / s2_x
        finite = np.isfinite(k)
        kk = np.where(finite, k, 1.0)
        # E[log X] = log μX + (ψ(k) - log k);  k = ∞ when σ²_B is deterministic
        e_log = np.log(mu_x) + np.where(finite, special.digamma(kk) - np.log(kk), 0.0)
        var_log = np.where(finite, special.polygamma(1, kk), 0.0)
        e_lr2 = 0.25 * (var_log + e_log * e_log)
    return np.asarray(e_d2, dtype=np.float64), np.asarray(e_lr2, dtype=np.float64)


def batch_noise(moments: ChannelMoments, batch_size: int, eps: float) -> BatchNoise:
    """Layer-level predicted RMS of ``d`` and ``log r`` (RMS over channels) at ``batch_size``."""
    return batch_noise_levels(moments, [batch_size], eps)[0]


def batch_noise_levels(
    moments: ChannelMoments, batch_sizes: Sequence[int], eps: float
) -> list[BatchNoise]:
    """:func:`batch_noise` for several batch sizes in one vectorized pass."""
    e_d2, e_lr2 = batch_noise_curve(moments, batch_sizes, eps)
    return [
        BatchNoise(
            batch_size=int(b),
            rms_d=float(np.sqrt(finite_mean(d2))),
            rms_log_r=float(np.sqrt(finite_mean(lr2))),
        )
        for b, d2, lr2 in zip(batch_sizes, e_d2, e_lr2, strict=True)
    ]


def observed_batch_noise(
    moments: ChannelMoments,
    batch_sizes: Mapping[int, int],
    eps: float,
    levels: Mapping[int, BatchNoise] | None = None,
) -> BatchNoise | None:
    """Batch noise averaged over the batch sizes actually seen (weighted by batches).

    ``batch_size`` of the result is the most frequent observed size; ``levels`` may hold
    already computed noise levels by batch size.
    """
    if not batch_sizes or moments.n_samples < 2:
        return None
    known = dict(levels or {})
    missing = [b for b in batch_sizes if b not in known]
    if missing:
        known.update({n.batch_size: n for n in batch_noise_levels(moments, missing, eps)})
    total = sum(batch_sizes.values())
    d2 = sum(count / total * known[size].rms_d ** 2 for size, count in batch_sizes.items())
    lr2 = sum(count / total * known[size].rms_log_r ** 2 for size, count in batch_sizes.items())
    typical = max(batch_sizes.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    return BatchNoise(batch_size=typical, rms_d=math.sqrt(d2), rms_log_r=math.sqrt(lr2))


# --------------------------------------------------------------------------------------
# One layer, one window
# --------------------------------------------------------------------------------------
def _nan_array(c: int) -> F64:
    return np.full(c, np.nan)


def assess_layer(
    layer: str,
    kind: str,
    stats: LayerStats,
    *,
    eps: float,
    running: Reference | None,
    baseline: Reference | None,
    baseline_kind: str,
    null: ChannelMoments | None = None,
    depth: int = 0,
    running_stats_mutated: bool,
    config: DriftConfig,
) -> LayerReport:
    """Everything :class:`LayerReport` says about one layer, before the cross-layer decision.

    ``gap`` and ``drifted`` are left ``False`` here; :func:`decide` sets them once every layer
    of the window has its p-value (the Bonferroni correction needs their number).  ``null``
    is the largest sample known to describe this layer's dispersion without change (see
    :func:`shift_test`); the gap test uses it, since the running statistics carry none.
    """
    m = stats.moments
    c = m.channels
    nan = _nan_array(c)
    if running is not None:
        gap = shift_test(m, running, eps, config, null=null)
        kl = gaussian_kl(m.observed_mean, m.var, running.mean, running.var, eps)
        w2 = gaussian_w2(m.observed_mean, m.var, running.mean, running.var, eps)
        ref_mean, ref_var = running.mean, running.var
        d, log_r, z = gap.d, gap.log_r, gap.z
        gap_p, frac_gap = gap.p_value, gap.frac_flagged
    else:
        kl = w2 = ref_mean = ref_var = d = log_r = z = nan
        gap_p, frac_gap = math.nan, 0.0
    if baseline is not None:
        drift = shift_test(m, baseline, eps, config)
        drift_kl = gaussian_kl(m.observed_mean, m.var, baseline.mean, baseline.var, eps)
        drift_d, drift_log_r, drift_z = drift.d, drift.log_r, drift.z
        p_value, frac_drifted = drift.p_value, drift.frac_flagged
    else:
        drift_kl = drift_d = drift_log_r = drift_z = nan
        p_value, frac_drifted = math.nan, 0.0
    batch_stat_mode = stats.batch_stat_batches > 0
    sizes = sorted(set(BATCH_NOISE_SIZES) | set(stats.batch_sizes))
    levels = {n.batch_size: n for n in batch_noise_levels(m, sizes, eps)}
    observed = observed_batch_noise(m, stats.batch_sizes, eps, levels)
    noisy = observed is not None and (
        observed.rms_d >= config.min_shift or observed.rms_log_r >= config.min_log_ratio
    )
    return LayerReport(
        layer=layer,
        kind=kind,
        channels=c,
        stats=stats,
        depth=depth,
        eps=eps,
        baseline_moments=None if baseline is None else baseline.moments,
        mean=m.observed_mean,
        var=m.var,
        between_var=m.between_var,
        within_var=m.within_var,
        ref_mean=ref_mean,
        ref_var=ref_var,
        d=d,
        log_r=log_r,
        kl=kl,
        w2=w2,
        z=z,
        kl_mean=finite_mean(kl),
        d_rms=rms(d),
        log_r_rms=rms(log_r),
        gap_p_value=gap_p,
        frac_gap=frac_gap,
        gap=False,
        baseline=baseline_kind,
        drift_d=drift_d,
        drift_log_r=drift_log_r,
        drift_z=drift_z,
        drift_kl_mean=finite_mean(drift_kl),
        drift_d_rms=rms(drift_d),
        drift_log_r_rms=rms(drift_log_r),
        p_value=p_value,
        frac_drifted=frac_drifted,
        drifted=False,
        batch_stat_mode=batch_stat_mode,
        running_stats_mutated=running_stats_mutated,
        batch_noise=tuple(levels[b] for b in BATCH_NOISE_SIZES),
        observed_batch_noise=observed,
        small_batch_mismatch=batch_stat_mode and noisy,
    )


def report_from_metrics(
    layer: str,
    kind: str,
    stats: LayerStats,
    *,
    eps: float,
    depth: int,
    running: Reference | None,
    baseline: Reference | None,
    baseline_kind: str,
    metrics: Mapping[str, float | bool | None],
) -> LayerReport:
    """A report that carries metrics already computed (by the monitor that sent the window)
    instead of recomputing them: the layer-level fields come from ``metrics``; per-channel
    comparisons are not computed (NaN) -- the store keeps the statistics and references they
    can be recomputed from."""
    m = stats.moments
    c = m.channels
    nan = _nan_array(c)

    def number(name: str) -> float:
        value = metrics.get(name)
        return math.nan if value is None else float(value)

    noise = None
    if metrics.get("batch_noise_d") is not None and stats.batch_sizes:
        typical = max(stats.batch_sizes.items(), key=lambda kv: (kv[1], -kv[0]))[0]
        noise = BatchNoise(typical, number("batch_noise_d"), number("batch_noise_log_r"))
    return LayerReport(
        layer=layer,
        kind=kind,
        channels=c,
        stats=stats,
        depth=depth,
        eps=eps,
        baseline_moments=None if baseline is None else baseline.moments,
        mean=m.observed_mean,
        var=m.var,
        between_var=m.between_var,
        within_var=m.within_var,
        ref_mean=nan if running is None else running.mean,
        ref_var=nan if running is None else running.var,
        d=nan,
        log_r=nan,
        kl=nan,
        w2=nan,
        z=nan,
        kl_mean=number("kl_mean"),
        d_rms=number("d_rms"),
        log_r_rms=number("log_r_rms"),
        gap_p_value=number("gap_p_value"),
        frac_gap=number("frac_gap") if metrics.get("frac_gap") is not None else 0.0,
        gap=bool(metrics.get("gap")),
        baseline=baseline_kind,
        drift_d=nan,
        drift_log_r=nan,
        drift_z=nan,
        drift_kl_mean=number("drift_kl_mean"),
        drift_d_rms=number("drift_d_rms"),
        drift_log_r_rms=number("drift_log_r_rms"),
        p_value=number("p_value"),
        frac_drifted=number("frac_drifted") if metrics.get("frac_drifted") is not None else 0.0,
        drifted=bool(metrics.get("drifted")),
        batch_stat_mode=bool(metrics.get("batch_stat_mode")),
        running_stats_mutated=bool(metrics.get("running_stats_mutated")),
        batch_noise=(),
        observed_batch_noise=noise,
        small_batch_mismatch=bool(metrics.get("small_batch_mismatch")),
    )


def decide(
    reports: Mapping[str, LayerReport], config: DriftConfig, *, layers: int | None = None
) -> dict[str, LayerReport]:
    """Set ``gap`` and ``drifted`` for every layer of one window.

    With ``L`` the number of layers tested in the window, a layer is drifted when
    ``p_value · L ≤ alpha`` (Bonferroni over layers of the within-layer Cauchy combination)
    and its share of flagged channels exceeds ``min_drifted_fraction``; the gap likewise.
    ``layers``: how many layers the window has when ``reports`` holds only some of them (a
    query for one layer), so that those are judged as they would be among all of them --
    ``L`` is then the larger of ``layers`` and the number tested here.
    """

    def significant(ps: Iterable[float]) -> float:
        tested = [p for p in ps if math.isfinite(p)]
        return config.alpha / max(1, len(tested), layers or 0)

    gap_level = significant(r.gap_p_value for r in reports.values())
    drift_level = significant(r.p_value for r in reports.values())
    out: dict[str, LayerReport] = {}
    for name, r in reports.items():
        gap = _decided(r.gap_p_value, r.frac_gap, gap_level, config)
        drifted = _decided(r.p_value, r.frac_drifted, drift_level, config)
        out[name] = replace(r, gap=gap, drifted=drifted)
    return out


def _decided(p: float, frac: float, level: float, config: DriftConfig) -> bool:
    return bool(math.isfinite(p) and p <= level and frac > config.min_drifted_fraction)
