"""Exact, mergeable per-channel moments of what a BatchNorm layer receives.

For a BN layer with ``C`` channels and input ``x`` of shape ``[N, C, *S]`` we summarise, for
every sample ``i`` and channel ``c``::

    m[i, c] = mean of x[i, c] over S          (x[i, c] itself when S is empty)
    v[i, c] = population variance over S      (0 when S is empty)
    w[i, c] = number of finite elements in x[i, c]

A window keeps, per channel and in float64, sufficient statistics at two levels:

*element level* (``count``, ``mean``, ``m2``)
    Chan et al. (1979) running count / mean / sum of squared deviations over every finite
    element.  ``var = m2 / count`` is the population variance over all elements, i.e.
    within-sample plus between-sample variance.

*sample level* (``n``, ``smean``, ``sm2..sm4``, ``vmean``, ``vm2``, ``cvm``, ``cvmm``)
    The central moment sums of the per-sample means ``m[:, c]`` up to order four (Pébay 2008),
    the mean and M2 of the per-sample variances ``v[:, c]`` and the co-moments
    ``Σ (v - v̄)(m - m̄)`` and ``Σ (v - v̄)(m - m̄)²``.  Samples, not pixels, are the unit of
    independence (spatial positions are correlated), so standard errors come from here:
    ``between_var = sm2 / n`` is the variance of per-sample means, and the higher moments give
    the sampling distribution of a batch's variance (see :func:`bnwatch.drift.batch_noise`).

Merging two windows with :func:`merge_moment_arrays` gives what one window over all the data
would have given -- exactly in arithmetic, to rounding in floating point -- whatever the
split (batches, threads, replicas, hours).  The merge uses only ``+ - * /`` and comparisons,
so the same code runs on numpy arrays on the host and on torch tensors on the device the
activations live on (``bnwatch.capture`` accumulates there and copies at flush).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from bnwatch.errors import ConfigError, ShapeError

F64 = NDArray[np.float64]
#: Anything that supports numpy-style arithmetic and ``.sum(0)``: numpy arrays, torch tensors.
ArrayT = TypeVar("ArrayT")

MOMENT_FIELDS: tuple[str, ...] = (
    "count",
    "mean",
    "m2",
    "n",
    "smean",
    "sm2",
    "sm3",
    "sm4",
    "vmean",
    "vm2",
    "cvm",
    "cvmm",
    "nonfinite",
)
"""The order of the per-channel sufficient statistics in every array tuple and on the wire."""


def _nonzero(n: Any) -> Any:
    """``n`` with zeros replaced by ones, so that ``x / _nonzero(n)`` is 0 where ``n == 0``."""
    return n + (n == 0)


def moments_from_rows(m: ArrayT, v: ArrayT, w: ArrayT, nonfinite: ArrayT) -> tuple[ArrayT, ...]:
    """Sufficient statistics of one block of per-sample rows, in :data:`MOMENT_FIELDS` order.

    Args:
        m: ``[R, C]`` per-sample channel means, float64.  Rows with ``w == 0`` must hold a
            finite value (any); they are excluded.
        v: ``[R, C]`` per-sample channel population variances over the spatial positions.
        w: ``[R, C]`` number of finite elements behind each row (0 excludes the row).
        nonfinite: ``[C]`` number of non-finite elements seen in this block.

    The element-level moments weight each row by ``w`` (``M2 = Σ w·v + Σ w·(m - mean)²``);
    the sample-level moments weight every row with ``w > 0`` equally.  Two passes over the
    block (mean first, then central powers) keep channels with ``|mean|/std = 1000`` exact.
    """
    mm: Any = m
    vv: Any = v
    ww: Any = w
    s = ww / _nonzero(ww)  # 1 where the row counts, 0 where excluded; keeps ww's dtype
    count = ww.sum(0)
    mean = (ww * mm).sum(0) / _nonzero(count)
    dev = mm - mean
    m2 = (ww * vv).sum(0) + (ww * dev * dev).sum(0)
    n = s.sum(0)
    smean = (s * mm).sum(0) / _nonzero(n)
    a = (mm - smean) * s
    a2 = a * a
    sm2 = a2.sum(0)
    sm3 = (a2 * a).sum(0)
    sm4 = (a2 * a2).sum(0)
    vmean = (s * vv).sum(0) / _nonzero(n)
    b = (vv - vmean) * s
    vm2 = (b * b).sum(0)
    cvm = (a * b).sum(0)
    cvmm = (a2 * b).sum(0)
    return (count, mean, m2, n, smean, sm2, sm3, sm4, vmean, vm2, cvm, cvmm, nonfinite)


def _sample_sums(mm: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
    """Of ``[R, C]`` per-sample means: their mean ``m̄``, ``a = m - m̄``, ``a²`` and the central
    sums ``Σa²``, ``Σa³``, ``Σa⁴`` (the sample-level moments every complete block shares)."""
    smean = mm.mean(0)
    a = mm - smean
    a2 = a * a
    return smean, a, a2, a2.sum(0), (a2 * a).sum(0), (a2 * a2).sum(0)


def moments_from_complete_rows(m: ArrayT, v: ArrayT, size: float) -> tuple[ArrayT, ...]:
    """:func:`moments_from_rows` for the common case of ``R >= 1`` rows that all have ``size``
    finite elements: element and sample levels then coincide, which halves the work.

    With ``a = m - m̄`` and ``b = v - v̄``: ``count = R·size``, ``mean = m̄`` and
    ``M2 = size·(Σv + Σa²)``.
    """
    mm: Any = m
    vv: Any = v
    rows = mm.shape[0]
    smean, a, a2, sm2, sm3, sm4 = _sample_sums(mm)
    vmean = vv.mean(0)
    b = vv - vmean
    vm2 = (b * b).sum(0)
    cvm = (a * b).sum(0)
    cvmm = (a2 * b).sum(0)
    n = smean * 0.0 + rows
    count = n * size
    m2 = (vmean * rows + sm2) * size
    zero = smean * 0.0
    return (count, smean, m2, n, smean, sm2, sm3, sm4, vmean, vm2, cvm, cvmm, zero)


def moments_from_values(m: ArrayT) -> tuple[ArrayT, ...]:
    """:func:`moments_from_complete_rows` of ``[N, C]`` values (one element per sample, no
    spatial positions): every per-sample variance is 0, and so are all the terms made of it,
    which halves the work again."""
    mm: Any = m
    smean, _, _, sm2, sm3, sm4 = _sample_sums(mm)
    zero = smean * 0.0
    n = zero + mm.shape[0]
    return (n, smean, sm2, n, smean, sm2, sm3, sm4, zero, zero, zero, zero, zero)


def merge_moment_arrays(a: Sequence[ArrayT], b: Sequence[ArrayT]) -> tuple[ArrayT, ...]:
    """Merge two sets of sufficient statistics (``MOMENT_FIELDS`` order) into one.

    With ``nA, nB`` the sample counts, ``n = nA + nB`` and ``δ = m̄B - m̄A``, the central
    moment sums combine as (Chan et al. 1979; Pébay 2008, eqs. 2.1-2.3)::

        M2 = M2A + M2B + δ² nA nB / n
        M3 = M3A + M3B + δ³ nA nB (nA - nB) / n² + 3δ (nA M2B - nB M2A) / n
        M4 = M4A + M4B + δ⁴ nA nB (nA² - nA nB + nB²) / n³
                       + 6δ² (nA² M2B + nB² M2A) / n² + 4δ (nA M3B - nB M3A) / n

    and, with ``ε = v̄B - v̄A``, the co-moments of per-sample variance and mean as::

        Cvm  = CvmA + CvmB + ε δ nA nB / n
        Cvmm = CvmmA + CvmmB + 2 δ (nA CvmB - nB CvmA) / n + ε (nA M2B - nB M2A) / n
               + ε δ² nA nB (nA - nB) / n²

    Empty sides (``n = 0``) contribute nothing; the element-level ``count/mean/m2`` merge the
    same way as ``n/smean/sm2``.
    """
    A: Any = a
    B: Any = b
    ca, ma, m2a, na, sma, s2a, s3a, s4a, vma, v2a, cva, cvva, nfa = A
    cb, mb, m2b, nb, smb, s2b, s3b, s4b, vmb, v2b, cvb, cvvb, nfb = B

    count = ca + cb
    cnz = _nonzero(count)
    dmean = mb - ma
    mean = ma + dmean * cb / cnz
    m2 = m2a + m2b + dmean * dmean * ca * cb / cnz

    n = na + nb
    nz = _nonzero(n)
    d = smb - sma
    d2 = d * d
    nab = na * nb
    smean = sma + d * nb / nz
    sm2 = s2a + s2b + d2 * nab / nz
    sm3 = s3a + s3b + d2 * d * nab * (na - nb) / (nz * nz) + 3.0 * d * (na * s2b - nb * s2a) / nz
    sm4 = (
        s4a
        + s4b
        + d2 * d2 * nab * (na * na - nab + nb * nb) / (nz * nz * nz)
        + 6.0 * d2 * (na * na * s2b + nb * nb * s2a) / (nz * nz)
        + 4.0 * d * (na * s3b - nb * s3a) / nz
    )
    e = vmb - vma
    vmean = vma + e * nb / nz
    vm2 = v2a + v2b + e * e * nab / nz
    cvm = cva + cvb + e * d * nab / nz
    cvmm = (
        cvva
        + cvvb
        + 2.0 * d * (na * cvb - nb * cva) / nz
        + e * (na * s2b - nb * s2a) / nz
        + e * d2 * nab * (na - nb) / (nz * nz)
    )
    return (count, mean, m2, n, smean, sm2, sm3, sm4, vmean, vm2, cvm, cvmm, nfa + nfb)


@dataclass(frozen=True, eq=False)
class ChannelMoments:
    """Per-channel sufficient statistics of one window of one layer (host, float64).

    Build with :meth:`from_rows` or :meth:`from_values`, combine with :meth:`merge`
    (exact; associative and commutative up to rounding), read with the properties.
    Field meanings are in the module docstring; every field is a ``[C]`` float64 array.
    """

    count: F64
    mean: F64
    m2: F64
    n: F64
    smean: F64
    sm2: F64
    sm3: F64
    sm4: F64
    vmean: F64
    vm2: F64
    cvm: F64
    cvmm: F64
    nonfinite: F64

    def __post_init__(self) -> None:
        shapes = {np.shape(getattr(self, f)) for f in MOMENT_FIELDS}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ShapeError("ChannelMoments fields", "[C] for every field", sorted(shapes))

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: Sequence[Any]) -> ChannelMoments:
        """From a sequence of ``[C]`` arrays in :data:`MOMENT_FIELDS` order."""
        if len(arrays) != len(MOMENT_FIELDS):
            raise ShapeError("moment arrays", len(MOMENT_FIELDS), len(arrays))
        return cls(*(np.asarray(x, dtype=np.float64) for x in arrays))

    @classmethod
    def empty(cls, channels: int) -> ChannelMoments:
        """Statistics of no data for ``channels`` channels (the identity of :meth:`merge`)."""
        return cls(*(np.zeros(channels) for _ in MOMENT_FIELDS))

    @classmethod
    def from_rows(
        cls,
        m: NDArray[Any],
        v: NDArray[Any] | None = None,
        w: NDArray[Any] | float | None = None,
        nonfinite: NDArray[Any] | None = None,
    ) -> ChannelMoments:
        """From per-sample rows ``m``, ``v`` (``[R, C]``) and element counts ``w``.

        ``v`` defaults to 0 (no spatial dims) and ``w`` to 1 element per row.
        """
        m64 = np.asarray(m, dtype=np.float64)
        if m64.ndim != 2:
            raise ShapeError("per-sample means", "[R, C]", m64.shape)
        v64 = np.zeros_like(m64) if v is None else np.asarray(v, dtype=np.float64)
        w64 = np.broadcast_to(np.asarray(1.0 if w is None else w, dtype=np.float64), m64.shape)
        if v64.shape != m64.shape:
            raise ShapeError("per-sample variances", m64.shape, v64.shape)
        nf = np.zeros(m64.shape[1]) if nonfinite is None else np.asarray(nonfinite, np.float64)
        keep = w64 > 0
        arrays = moments_from_rows(np.where(keep, m64, 0.0), np.where(keep, v64, 0.0), w64, nf)
        return cls.from_arrays(arrays)

    @classmethod
    def from_values(cls, x: NDArray[Any]) -> ChannelMoments:
        """From a raw activation array ``[N, C, *S]`` (numpy); non-finite values are excluded.

        This is the host-side twin of what ``bnwatch.capture`` computes on the device.
        """
        xs = np.asarray(x)
        if xs.ndim < 2:
            raise ShapeError("activations", "[N, C, *S]", xs.shape)
        spatial = int(np.prod(xs.shape[2:], dtype=np.int64))
        x64 = xs.reshape(xs.shape[0], xs.shape[1], spatial).astype(np.float64)
        finite = np.isfinite(x64)
        w = finite.sum(axis=2).astype(np.float64)
        xz = np.where(finite, x64, 0.0)
        m = xz.sum(axis=2) / np.maximum(w, 1.0)
        dev = np.where(finite, x64 - m[:, :, None], 0.0)
        v = (dev * dev).sum(axis=2) / np.maximum(w, 1.0)
        nonfinite = (~finite).sum(axis=(0, 2)).astype(np.float64)
        return cls.from_rows(m, v, w, nonfinite)

    # -- combination ----------------------------------------------------------------------
    def as_arrays(self) -> tuple[F64, ...]:
        """The fields in :data:`MOMENT_FIELDS` order."""
        return tuple(getattr(self, f) for f in MOMENT_FIELDS)

    def merge(self, other: ChannelMoments) -> ChannelMoments:
        """The statistics of the union of both windows' data."""
        if other.channels != self.channels:
            raise ShapeError("merging ChannelMoments", self.channels, other.channels)
        return ChannelMoments.from_arrays(merge_moment_arrays(self.as_arrays(), other.as_arrays()))

    @staticmethod
    def merge_all(items: Iterable[ChannelMoments]) -> ChannelMoments:
        """Merge any number of windows (at least one) by pairwise tree reduction."""
        level = list(items)
        if not level:
            raise ValueError("merge_all needs at least one ChannelMoments")
        while len(level) > 1:
            pairs = [a.merge(b) for a, b in zip(level[0::2], level[1::2], strict=False)]
            level = pairs + ([level[-1]] if len(level) % 2 else [])
        return level[0]

    @staticmethod
    def merge_present(items: Iterable[ChannelMoments | None]) -> ChannelMoments | None:
        """:meth:`merge_all` of the windows that exist (``None``: nothing seen there), in
        order; ``None`` when none does."""
        present = [m for m in items if m is not None]
        return ChannelMoments.merge_all(present) if present else None

    # -- derived quantities ---------------------------------------------------------------
    @property
    def channels(self) -> int:
        return int(self.count.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (13 float64 per channel)."""
        return sum(int(a.nbytes) for a in self.as_arrays())

    @property
    def n_samples(self) -> int:
        """Samples seen (the largest per-channel count; channels differ only by exclusions)."""
        return int(self.n.max()) if self.channels else 0

    @property
    def observed_mean(self) -> F64:
        """Population mean over all elements, NaN where no element was seen (the ``mean``
        field holds 0 there, which the merges need; a report must not show it as a mean)."""
        return np.where(self.count > 0, self.mean, np.nan)

    @property
    def var(self) -> F64:
        """Population variance over all elements (NaN where no element was seen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.m2 / self.count, np.nan)

    @property
    def between_var(self) -> F64:
        """Population variance of the per-sample means ``m[:, c]``."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, self.sm2 / self.n, np.nan)

    @property
    def within_var(self) -> F64:
        """Mean over samples of the per-sample spatial variance ``v[:, c]``."""
        return np.where(self.n > 0, self.vmean, np.nan)

    @property
    def sample_mean(self) -> F64:
        """Mean of the per-sample means (equals :attr:`mean` when all samples are complete)."""
        return np.where(self.n > 0, self.smean, np.nan)

    @property
    def sample_var(self) -> F64:
        """``within_var + between_var``: the variance a randomly drawn sample's element has
        when every sample counts equally (equals :attr:`var` for complete samples)."""
        return self.within_var + self.between_var

    @property
    def m_central4(self) -> F64:
        """Fourth central moment of the per-sample means."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, self.sm4 / self.n, np.nan)

    @property
    def second_moment_var(self) -> F64:
        """Variance across samples of ``q = v + (m - m̄)²``, the per-sample contribution to
        the variance: ``Var(q) = Var(v) + (μ4 - μ2²) + 2 Cov(v, (m - m̄)²)``.

        ``var`` is estimated by the sample mean of ``q``, so its standard error is
        ``sqrt(Var(q) / n)`` -- the basis of the log-variance test in :mod:`bnwatch.drift`.
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            n = np.where(self.n > 0, self.n, np.nan)
            mu2 = self.sm2 / n
            out = self.vm2 / n + (self.sm4 / n - mu2 * mu2) + 2.0 * self.cvmm / n
        return np.maximum(out, 0.0)


def _check_channels(name: str, expected: int, found: int) -> None:
    if expected != found:
        raise ShapeError(name, expected, found)


@dataclass(frozen=True, eq=False)
class LayerStats:
    """Everything one window knows about one layer: channel moments plus batch counters.

    Attributes:
        moments: per-channel sufficient statistics of the measured samples.
        batch_sizes: observed batch size (before any subsampling) -> number of batches.
        n_batches: batches that were measured.
        batches_seen: batches that passed through the layer, measured or not.
        samples_seen: samples that passed through the layer, measured or not.
        batch_stat_batches: measured batches during which the layer normalized with batch
            statistics (module in training mode, or no running statistics).
        reservoir: a bounded uniform sample of the measured samples' channel means
            (``[k, C]`` float32, :class:`Reservoir`), or ``None`` when none was kept
            (``watch(..., reservoir=0)``, windows stored before reservoirs existed).
    """

    moments: ChannelMoments
    batch_sizes: Mapping[int, int] = field(default_factory=dict)
    n_batches: int = 0
    batches_seen: int = 0
    samples_seen: int = 0
    batch_stat_batches: int = 0
    reservoir: Reservoir | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held: the moments and the reservoir's rows."""
        return self.moments.nbytes + (
            0 if self.reservoir is None else int(self.reservoir.rows.nbytes)
        )

    def merge(self, other: LayerStats) -> LayerStats:
        """Exact union of two windows of the same layer.

        The reservoirs merge with :meth:`Reservoir.merge` (a uniform sample of the union, as
        large as the larger capacity); when only one side kept a reservoir, the result keeps
        it -- a sample of the windows that kept one (its ``seen`` says how many samples).
        """
        _check_channels("merging LayerStats", self.moments.channels, other.moments.channels)
        sizes = Counter(self.batch_sizes)
        sizes.update(other.batch_sizes)
        reservoir = self.reservoir
        if reservoir is None:
            reservoir = other.reservoir
        elif other.reservoir is not None:
            reservoir = reservoir.merge(other.reservoir)
        return LayerStats(
            moments=self.moments.merge(other.moments),
            batch_sizes=dict(sorted(sizes.items())),
            n_batches=self.n_batches + other.n_batches,
            batches_seen=self.batches_seen + other.batches_seen,
            samples_seen=self.samples_seen + other.samples_seen,
            batch_stat_batches=self.batch_stat_batches + other.batch_stat_batches,
            reservoir=reservoir,
        )


DEFAULT_RESERVOIR = 8
"""Per-sample channel-mean rows a monitor's window keeps per layer by default
(``bnwatch.watch(reservoir=)``): a bounded uniform sample for distribution tests (Evidently
reports, ``bnwatch report``, pool them over the windows of a range: an hour of one-minute
windows gives 480 rows).  Stored as float32, 8 rows cost 32 bytes per channel and window,
a third of the window's float64 sufficient statistics (104).  Wide models keep fewer by
default: see :func:`default_reservoir_rows`."""

RESERVOIR_BUDGET = 64 * 1024
"""Floats per window that a default reservoir may take over all layers (256 KiB of float32):
a ResNet-50 window (26,560 channels) keeps 2 rows per layer, 9 % of its raw statistics.  With
32 rows everywhere a ResNet-50 window stored 2.1x its raw statistics and PostgreSQL took
20 windows/s; with 8, 35 windows/s; without reservoirs, 58."""


def default_reservoir_rows(total_channels: int) -> int:
    """Rows per layer and window that ``reservoir=None`` (the default) keeps: at most
    :data:`DEFAULT_RESERVOIR`, at least 1, within :data:`RESERVOIR_BUDGET` floats per window
    over ``total_channels`` channels (0, e.g. lazy layers not yet built: the full default)."""
    if total_channels <= 0:
        return DEFAULT_RESERVOIR
    return max(1, min(DEFAULT_RESERVOIR, RESERVOIR_BUDGET // total_channels))


class Reservoir:
    """A uniform random sample of at most ``capacity`` rows from a stream (Vitter's algorithm R).

    Used for bounded samples of per-sample channel means (reference profiles, Evidently
    reports).  Rows are kept as float32 ``[k, C]``.  :meth:`merge` combines two reservoirs
    (:meth:`merge_all` many) into a sample of the union in which every row had the same
    chance: each side gives the floor or the ceiling of its share of the rows, by systematic
    sampling.  The merged sample holds as many rows as every side's sample allows, at most the
    larger capacity -- fewer when one side kept few rows of many (8 rows of 10,000 merged with
    100 of 100 keep 8).
    """

    def __init__(self, capacity: int, channels: int, *, seed: int | None = None) -> None:
        self.capacity = check_capacity(capacity)
        self.channels = channels
        self.seen = 0
        self.rows = np.empty((0, channels), dtype=np.float32)
        self._rng = np.random.default_rng(seed)

    @classmethod
    def from_rows(
        cls, rows: NDArray[Any], seen: int, capacity: int, *, seed: int | None = None
    ) -> Reservoir:
        """Rebuild a reservoir from stored rows and the number of rows it has seen."""
        arr = np.asarray(rows, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] > capacity or seen < arr.shape[0]:
            raise ShapeError("reservoir rows", f"[<= {capacity}, C] with seen >= rows", arr.shape)
        res = cls(capacity, arr.shape[1], seed=seed)
        res.rows = arr.copy()
        res.seen = int(seen)
        return res

    def __repr__(self) -> str:
        return (
            f"Reservoir(rows={self.rows.shape[0]}, channels={self.channels}, "
            f"capacity={self.capacity}, seen={self.seen})"
        )

    def add(self, rows: NDArray[Any]) -> None:
        """Offer ``rows`` (``[k, C]``) in stream order."""
        batch = np.asarray(rows, dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != self.channels:
            raise ShapeError("reservoir rows", f"[k, {self.channels}]", batch.shape)
        k = batch.shape[0]
        if k == 0:
            return
        free = max(0, min(self.capacity - self.rows.shape[0], k))
        if free:
            self.rows = np.concatenate([self.rows, batch[:free]])
        rest = batch[free:]
        if rest.shape[0]:
            # the t-th row of the stream (0-based) replaces slot j ~ U{0..t} when j < capacity
            t = self.seen + free + np.arange(rest.shape[0])
            j = np.floor(self._rng.random(rest.shape[0]) * (t + 1)).astype(np.int64)
            hit = np.nonzero(j < self.capacity)[0]
            if hit.size:
                # sequential semantics: a later row wins a slot hit twice in this batch
                slots = j[hit]
                _, last = np.unique(slots[::-1], return_index=True)
                keep = hit[::-1][last]
                self.rows[j[keep]] = rest[keep]
        self.seen += k

    def merge(self, other: Reservoir) -> Reservoir:
        """A uniform sample of the union of both streams (neither input is modified), as
        large as the larger capacity and both samples allow: :meth:`merge_all` of the two,
        its randomness drawn from this reservoir's generator."""
        _check_channels("merging reservoirs", self.channels, other.channels)
        seed = int(self._rng.integers(2**63 - 1))
        return Reservoir.merge_all(
            [self, other], capacity=max(self.capacity, other.capacity), seed=seed
        )

    @staticmethod
    def merge_all(
        reservoirs: Iterable[Reservoir], *, capacity: int | None = None, seed: int | None = None
    ) -> Reservoir:
        """One sample of the union of many streams, as large as their reservoirs allow.

        Stream ``i`` saw ``seen_i`` rows and kept a uniform sample of ``k_i`` of them.  A
        sample of ``k`` rows of the union in which every row had the same chance
        ``k / total`` takes ``k·seen_i / total`` rows from stream ``i``, which must not exceed
        ``k_i``; so ``k = min_i(k_i · total // seen_i)`` (at most ``capacity``).  Stream ``i``
        gives the floor or the ceiling of its share ``k·seen_i / total`` -- systematic
        sampling, so that its expected count is its share exactly (rounding the same way
        every time would leave, merge after merge, a small window's rows out of a large
        pooled sample; and a random count from the whole union, as a hypergeometric draw,
        could ask a stream for more rows than it kept) -- drawn uniformly within it: every row
        of the union has the same chance.  Windows of equal size give back every row they
        kept.
        """
        items = list(reservoirs)
        if not items:
            raise ValueError("merge_all needs at least one Reservoir")
        channels = items[0].channels
        for r in items[1:]:
            _check_channels("merging reservoirs", channels, r.channels)
        full = [r for r in items if r.seen > 0 and r.rows.shape[0] > 0]
        total = sum(r.seen for r in items)
        k = merged_size([(r.rows.shape[0], r.seen) for r in items], capacity)
        out = Reservoir(max(1, capacity or k), channels, seed=seed)
        out.seen = total
        if k == 0:
            return out
        rng = out._rng
        edges = np.concatenate([[0.0], np.cumsum([r.seen for r in full], dtype=np.float64)])
        edges *= k / edges[-1]  # stream i's share is [edges[i], edges[i+1]), k in all
        edges[-1] = k
        points = rng.random() + np.arange(k)  # one random start, then every 1
        counts = np.diff(np.searchsorted(points, edges, side="left"))
        kept = np.array([r.rows.shape[0] for r in full])
        counts = np.minimum(counts, kept)  # only rounding could ask for more: never by much
        out.rows = np.concatenate(
            [
                r.rows[rng.choice(r.rows.shape[0], size=c, replace=False)]
                for r, c in zip(full, counts, strict=True)
            ]
        )
        return out


def merged_size(kept_and_seen: Iterable[tuple[int, int]], capacity: int | None = None) -> int:
    """The size of :meth:`Reservoir.merge_all`'s sample of streams that each kept ``k_i`` of
    the ``seen_i`` rows they saw: ``min_i(k_i · total // seen_i)`` over the streams that kept
    and saw rows (``total`` over all of them), at most ``capacity``; 0 when none did."""
    pairs = list(kept_and_seen)
    total = sum(seen for _, seen in pairs)
    k = min((kept * total // seen for kept, seen in pairs if kept and seen), default=0)
    return k if capacity is None else min(k, check_capacity(capacity))


def check_capacity(capacity: Any) -> int:
    """``capacity`` if it is an integer >= 1 (a reservoir's row count), else ConfigError."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError("reservoir capacity", capacity, "an integer >= 1")
    return capacity
