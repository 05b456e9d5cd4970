"""Per-layer accumulation of channel moments on the device the activations live on.

A forward pre-hook hands each measured batch to :meth:`LayerAccumulator.observe`, which
reduces it to two ``[N, C]`` row sums -- ``Σ (x - K)`` and ``Σ (x - K)²`` over the spatial
positions, in the input's precision with torch's reductions -- and queues them.  Every few
dozen batches the queue is *compacted* into float64 sufficient statistics on the same device
(:func:`bnwatch.stats.moments_from_rows` / :func:`~bnwatch.stats.merge_moment_arrays`, the
same code the host uses).  Nothing is copied to the host until :meth:`collect` at flush, so a
CUDA model sees no per-batch host/device synchronization.

Precision.  ``Σx² - (Σx)²/S`` loses ``(mean/std)²`` of float32's 24 bits, so for channels whose
``|mean|/std`` is large the rows are summed around a per-channel shift ``K`` close to the
mean.  ``K`` is chosen from the first batch (one host synchronization per layer, ever) and
refreshed at every flush from the window's mean; channels stay within ``1e-5`` relative of a
float64 reference up to ``|mean|/std`` of several thousands.

Non-finite values.  A NaN or inf in ``x[i, c]`` makes that row's sums non-finite.  On the CPU
(where checking is free) such a batch is re-reduced with a mask so that exactly the non-finite
elements are counted and excluded; on other devices the masked reduction is always used,
because checking would synchronize.
"""

from __future__ import annotations

import math
import random
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bnwatch.errors import ShapeError
from bnwatch.stats import (
    MOMENT_FIELDS,
    ChannelMoments,
    LayerStats,
    Reservoir,
    merge_moment_arrays,
    moments_from_rows,
)

COMPACT_VALUES = 1 << 18
"""Compact the queue once it holds this many row values (``N·C`` summed over batches)."""
COMPACT_ENTRIES = 64
"""... or this many batches, whichever comes first."""
SHIFT_RATIO = 16.0
"""Sum around a shift when some channel's ``mean²/var`` exceeds this (``|mean|/std > 4``)."""

_FLOAT_TYPES = (torch.float32, torch.float64)


@dataclass
class _Entry:
    """One measured batch, reduced to rows."""

    s1: Tensor  # [N, C]: Σ (x - K) over spatial positions, or x itself for [N, C] inputs
    s2: Tensor | None  # [N, C]: Σ (x - K)²; None for [N, C] inputs
    count: int | Tensor  # finite elements per row: S, or [N, C] after masking
    shift: Tensor | None  # K, [C] in the input's dtype, or None
    nonfinite: Tensor | None  # [C] non-finite elements counted by the masked reduction


class LayerAccumulator:
    """Thread-safe accumulator of one layer's window.

    Args:
        name: the layer's qualified name (for messages).
        spatial_stride: keep every k-th position along each spatial dimension.
        max_samples_per_batch: measure at most this many samples of a batch (a random
            contiguous slice, so no copy is made).
        masked: force (True) or forbid (False) the masked reduction; ``None`` picks it per
            device as described in the module docstring.
        reservoir: keep a uniform sample of at most this many per-sample channel-mean rows.
    """

    def __init__(
        self,
        name: str,
        *,
        spatial_stride: int = 1,
        max_samples_per_batch: int | None = None,
        masked: bool | None = None,
        reservoir: int = 0,
        seed: int | None = None,
    ) -> None:
        self.name = name
        self.spatial_stride = spatial_stride
        self.max_samples_per_batch = max_samples_per_batch
        self.masked = masked
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._channels: int | None = None
        self._shift: Tensor | None = None
        self._shift_cast: Tensor | None = None
        self._shift_decided = False
        self._reservoir_capacity = reservoir
        self._reservoir: Reservoir | None = None
        self._seed = seed
        self._reset_window()

    def _reset_window(self) -> None:
        self._pending: list[_Entry] = []
        self._pending_values = 0
        self._state: tuple[Tensor, ...] | None = None
        self._batch_sizes: Counter[int] = Counter()
        self._n_batches = 0
        self._batches_seen = 0
        self._samples_seen = 0
        self._batch_stat_batches = 0

    @property
    def channels(self) -> int | None:
        """Channel count, known once the first batch was seen (lazy layers) or set."""
        return self._channels

    @channels.setter
    def channels(self, value: int) -> None:
        self._channels = value

    # -- the hot path --------------------------------------------------------------------
    def observe(self, x: Tensor, *, measure: bool, batch_stat_mode: bool) -> None:
        """Count a batch and, if ``measure``, reduce it and queue the rows."""
        if x.dim() < 2:
            raise ShapeError(
                f"input of BatchNorm layer {self.name!r}", "[N, C, *S]", tuple(x.shape)
            )
        n = int(x.shape[0])
        with self._lock:
            self._batches_seen += 1
            self._samples_seen += n
        if not measure or n == 0:
            return
        entry = self._reduce(x)
        with self._lock:
            self._pending.append(entry)
            self._pending_values += entry.s1.numel()
            self._n_batches += 1
            self._batch_sizes[n] += 1
            self._batch_stat_batches += int(batch_stat_mode)
            if len(self._pending) >= COMPACT_ENTRIES or self._pending_values >= COMPACT_VALUES:
                self._state = self._compact(self._pending, self._state)
                self._pending = []
                self._pending_values = 0

    def _reduce(self, x: Tensor) -> _Entry:
        xs = x.detach()
        channels = int(xs.shape[1])
        if self._channels is None:
            self._channels = channels
        elif channels != self._channels:
            raise ShapeError(f"channels of BatchNorm layer {self.name!r}", self._channels, channels)
        limit = self.max_samples_per_batch
        if limit is not None and xs.shape[0] > limit:
            xs = xs.narrow(0, self._rng.randrange(int(xs.shape[0]) - limit + 1), limit)
        if xs.dtype not in _FLOAT_TYPES:
            xs = xs.float()
        if xs.dim() == 2:
            # one element per (sample, channel): the row *is* the mean; copy, the caller may
            # reuse its buffer before we compact
            return _Entry(xs.to(torch.float64, copy=True), None, 1, None, None)
        if self.spatial_stride > 1:
            xs = xs[
                (slice(None), slice(None))
                + (slice(None, None, self.spatial_stride),) * (xs.dim() - 2)
            ]
        dims = tuple(range(2, xs.dim()))
        size = math.prod(xs.shape[2:])
        if not self._shift_decided:
            self._decide_shift(xs, dims, size)
        shift = self._shift_for(xs.dtype)
        y = xs - shift.view((channels,) + (1,) * len(dims)) if shift is not None else xs
        masked = self.masked if self.masked is not None else y.device.type != "cpu"
        if not masked:
            s1 = y.sum(dims)
            s2 = torch.linalg.vector_norm(y, 2, dims).square()
            if bool(torch.isfinite(s2).all()):  # free on the CPU: no device to wait for
                return _Entry(s1, s2, size, shift, None)
        finite = torch.isfinite(y)
        count = finite.sum(dims)
        yz = torch.where(finite, y, torch.zeros((), dtype=y.dtype, device=y.device))
        s1 = yz.sum(dims)
        s2 = torch.linalg.vector_norm(yz, 2, dims).square()
        return _Entry(s1, s2, count, shift, (size - count).sum(0))

    def _shift_for(self, dtype: torch.dtype) -> Tensor | None:
        """``K`` in the input's dtype (cached), or ``None`` when no shift is needed."""
        shift = self._shift
        if shift is None or shift.dtype == dtype:
            return shift
        cached = self._shift_cast
        if cached is None or cached.dtype != dtype or cached.device != shift.device:
            cached = shift.to(dtype)
            self._shift_cast = cached
        return cached

    def _decide_shift(self, xs: Tensor, dims: tuple[int, ...], size: int) -> None:
        """Pick the shift ``K`` from the first batch (a one-time host synchronization)."""
        s1 = xs.sum(dims).double().cpu().numpy()
        s2 = torch.linalg.vector_norm(xs, 2, dims).double().square().cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            m = s1 / size
            v = s2 / size - m * m
            rows_ok = np.isfinite(m) & np.isfinite(v)
            m = np.where(rows_ok, m, np.nan)
            mean = np.nanmean(m, axis=0)
            var = np.nanmean(np.where(rows_ok, v, np.nan), axis=0) + np.nanvar(m, axis=0)
        self.update_shift(mean, var, device=xs.device)

    def update_shift(self, mean: Any, var: Any, *, device: torch.device | None = None) -> None:
        """Sum around ``mean`` from now on if some channel needs it (see the module docstring)."""
        mean = np.asarray(mean, dtype=np.float64)
        var = np.asarray(var, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            ratio = mean * mean / np.maximum(var, np.finfo(np.float64).tiny)
        finite = np.isfinite(ratio)
        if finite.any() and float(ratio[finite].max()) > SHIFT_RATIO:
            if device is None:
                device = self._shift.device if self._shift is not None else torch.device("cpu")
            # float32 K is exact in float64 too, so one K serves both input precisions
            k = np.where(np.isfinite(mean), mean, 0.0).astype(np.float32)
            self._shift = torch.as_tensor(k, dtype=torch.float32, device=device)
            self._shift_cast = None
        else:
            self._shift = None
        self._shift_decided = True

    # -- compaction (device, float64) ------------------------------------------------------
    def _compact(
        self, pending: list[_Entry], state: tuple[Tensor, ...] | None
    ) -> tuple[Tensor, ...] | None:
        if not pending:
            return state
        groups: dict[tuple[Any, ...], list[_Entry]] = {}
        for e in pending:
            key = (e.s2 is None, id(e.shift), e.count if isinstance(e.count, int) else -1)
            groups.setdefault(key, []).append(e)
        ms: list[Tensor] = []
        vs: list[Tensor] = []
        ws: list[Tensor] = []
        first = pending[0].s1
        nonfinite = torch.zeros(first.shape[1], dtype=torch.float64, device=first.device)
        for (plain, _, count), entries in groups.items():
            s1 = torch.cat([e.s1 for e in entries]).double()
            if plain:
                finite = torch.isfinite(s1)
                w = finite.double()
                m = torch.where(finite, s1, 0.0)
                v = torch.zeros_like(m)
                nf = (~finite).sum(0).double()
            else:
                s2 = torch.cat([e.s2 for e in entries if e.s2 is not None]).double()
                if count >= 0:
                    w = torch.full_like(s1, float(count))
                else:
                    w = torch.cat([torch.as_tensor(e.count) for e in entries]).double()
                wz = w.clamp_min(1.0)
                mu = s1 / wz
                v = (s2 / wz - mu * mu).clamp_min(0.0)
                shift = entries[0].shift
                m = mu + shift.double() if shift is not None else mu
                has = w > 0
                m = torch.where(has, m, 0.0)
                v = torch.where(has, v, 0.0)
                nf = sum(
                    (e.nonfinite.double() for e in entries if e.nonfinite is not None),
                    torch.zeros_like(nonfinite),
                )
            ms.append(m)
            vs.append(v)
            ws.append(w)
            nonfinite = nonfinite + nf
        m_all = torch.cat(ms)
        w_all = torch.cat(ws)
        block = moments_from_rows(m_all, torch.cat(vs), w_all, nonfinite)
        if self._reservoir_capacity:
            self._keep_rows(m_all, w_all)
        return block if state is None else merge_moment_arrays(state, block)

    def _keep_rows(self, m: Tensor, w: Tensor) -> None:
        rows = torch.where(w > 0, m, float("nan")).cpu().numpy()
        if self._reservoir is None:
            self._reservoir = Reservoir(self._reservoir_capacity, rows.shape[1], seed=self._seed)
        self._reservoir.add(rows)

    # -- flush -------------------------------------------------------------------------------
    def collect(self) -> LayerStats | None:
        """Close the window: return its statistics (host, float64) and start a new one.

        Returns ``None`` when no batch passed through the layer in this window.
        """
        with self._lock:
            pending, state = self._pending, self._state
            sizes = dict(sorted(self._batch_sizes.items()))
            n_batches, seen, samples = self._n_batches, self._batches_seen, self._samples_seen
            batch_stat = self._batch_stat_batches
            self._reset_window()
            channels = self._channels
        if seen == 0 or channels is None:
            return None
        state = self._compact(pending, state)
        if state is None:
            moments = ChannelMoments.empty(channels)
        else:
            host = torch.stack([t.to(torch.float64) for t in state]).cpu().numpy()
            moments = ChannelMoments.from_arrays(list(host))
            if len(host) != len(MOMENT_FIELDS):  # pragma: no cover - guarded by the stats module
                raise ShapeError("collected moments", len(MOMENT_FIELDS), len(host))
        return LayerStats(
            moments=moments,
            batch_sizes=sizes,
            n_batches=n_batches,
            batches_seen=seen,
            samples_seen=samples,
            batch_stat_batches=batch_stat,
        )

    def take_reservoir(self) -> Reservoir | None:
        """The reservoir kept so far (profile mode), or ``None``."""
        return self._reservoir
