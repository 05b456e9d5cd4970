"""Per-layer accumulation of channel moments on the device the activations live on.

A forward pre-hook hands each measured batch to :meth:`LayerAccumulator.observe`, which
reduces it to two ``[N, C]`` row sums -- ``Σ (x - K)`` and ``‖x - K‖²`` over the spatial
positions, in the input's precision, with reductions that run at memory bandwidth -- written
with ``out=`` into a preallocated row buffer (on the CPU, a batch of the shape the layer saw
last goes through a fixed pair of ``[N, C]`` tensors and numpy views instead: see
:class:`_Steady`).  When the buffer is full it is *compacted* into float64 sufficient
statistics on the same device (:func:`bnwatch.stats.moments_from_rows` /
:func:`~bnwatch.stats.merge_moment_arrays`, the same code the host uses).  Nothing is copied
to the host until :meth:`collect` at flush, so a CUDA model sees no per-batch host/device
synchronization, and nothing is allocated in steady state (see :class:`_RowBuffer`).

Precision.  ``Σx² - (Σx)²/S`` loses ``(mean/std)²`` of float32's 24 bits, so for channels whose
``|mean|/std`` is large the rows are summed around a per-channel shift ``K`` close to the
mean: those channels alone are copied into a per-thread scratch buffer, shifted and summed
again, so the cost scales with the number of channels that need it.  Which channels need it is
:func:`shift_ratio` of the row's elements: ``|mean - K|/std > 8`` for rows of up to 2¹⁴
elements, less beyond, which keeps float32's error within about 5e-5 of the variance, half the
1e-4 contract.  ``K`` is chosen from the first batch (one host synchronization per layer, ever)
and refreshed at every flush from the window's mean; channels stay within ``1e-6`` relative of
a float64 reference at ``|mean|/std = 1000``.  A channel whose mean jumps within a window --
the drift bnwatch is there to see -- would be summed around a stale ``K``: on the CPU, where
looking is free, each chunk's mean is compared with ``K`` (the same ratio) and the chunk is
summed again around a renewed one; other devices renew ``K`` at the next flush (a window that
starts right after a jump of ``Δ`` standard deviations loses about ``Δ² · 5e-7`` of its
variance there).

Reservoirs.  With ``reservoir=k`` a window also keeps a uniform sample of at most ``k`` of the
per-sample channel means that compaction computes anyway (:class:`_WindowSample`): which rows
are kept depends only on how many came before, so the choice is made on the host without
looking at the data, and the chosen rows are copied on the device into a preallocated
``[k, C]`` buffer -- no host/device synchronization, no allocation in steady state.

Non-finite values.  A NaN or inf in ``x[i, c]`` makes that row's sums non-finite.  On the CPU
(where checking is free) such a chunk is re-reduced with a mask so that exactly the
non-finite elements are counted and excluded; on other devices the masked reduction is
always used, because checking would synchronize.  ``[N, C]`` inputs are copied as they are
and their non-finite values excluded at compaction.
"""

from __future__ import annotations

import math
import random
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bnwatch.errors import ShapeError, check_positive_int
from bnwatch.stats import (
    MOMENT_FIELDS,
    ChannelMoments,
    LayerStats,
    Reservoir,
    merge_moment_arrays,
    moments_from_complete_rows,
    moments_from_rows,
    moments_from_values,
)

ROW_BUFFER_VALUES = 1 << 15
"""Rows times channels a layer's row buffer holds before it is compacted (128 KiB of float32)."""
PLAIN_MIN_ROWS = 64
"""Rows a buffer of ``[N, C]`` inputs holds at least (within :data:`PLAIN_MAX_VALUES`): a
compaction costs about a hundred passes over ``C`` channels whatever its rows, so a wide
BatchNorm1d compacted row by row cost 50x its forward (32,768 channels, batch 64)."""
PLAIN_MAX_VALUES = 1 << 20
"""At most this many values (4 MiB of float32) in a buffer of ``[N, C]`` inputs."""
SCRATCH_VALUES = 1 << 21
"""Per-thread scratch for the shifted copy of a chunk of samples (8 MiB of float32): one chunk
holds a whole batch of 8 ResNet-50 images at the largest BN input; it grows to hold one
sample when a single sample is larger."""
STEADY_SHAPES = 16
"""Input shapes a layer keeps a steady plan for (:class:`_Steady`): a server that batches
requests dynamically sends a few batch sizes, each a shape of its own."""
RECURRING_SHAPES = 64
"""Shapes a layer remembers having seen once, to plan for the second batch of one."""
SHIFT_RATIO = 64.0
"""Sum a channel around a shift ``K`` when ``(mean - K)²/var`` exceeds this (``|mean - K|/std >
8``) in rows of up to :data:`SHIFT_ROW_ELEMENTS` elements (:func:`shift_ratio`)."""
SHIFT_ROW_ELEMENTS = 1 << 14
"""Rows up to this size (128x128) lose about ``(1 + ratio) · 5e-7`` of a channel's variance to
float32: the rounding of the two stored sums.  Longer rows lose more, in proportion to the
square root of their elements (torch's CPU sum)."""


def shift_ratio(size: int) -> float:
    """The largest ``(mean - K)²/var`` a channel's rows of ``size`` elements are summed at in
    float32 around ``K`` (``K = 0``: no shift).

    Measured against float64 on torch's CPU sum, the worst relative error of the variance at a
    ratio of 64 is 3.5e-5 for rows of 7x7 to 56x56 elements, 4.7e-5 at 112x112, 7.8e-5 at 224x224
    and 1.4e-4 at 16x112x112 (a BatchNorm3d): the ratio is 64 up to :data:`SHIFT_ROW_ELEMENTS`
    and falls as ``1/√size`` beyond, which keeps the error within about 5e-5 (at this ratio:
    4.3e-5 at 7x7, 4.9e-5 at 112x112, 4.2e-5 at 224x224, 3.9e-5 at 16x112x112 and 6.8e-5 at
    32x224x224 -- 1.6 million elements a row).
    """
    return SHIFT_RATIO * min(1.0, math.sqrt(SHIFT_ROW_ELEMENTS / max(1, size)))


_FLOAT_TYPES = (torch.float32, torch.float64)
_scratch = threading.local()


def _persistent(factory: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    """Create a long-lived buffer as a normal tensor even inside ``torch.inference_mode()``:
    an inference tensor could not be updated in place later, outside inference mode."""
    with torch.inference_mode(False):
        return factory(*args, **kwargs)


def _scratch_for(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """This thread's reusable buffer, viewed as ``shape`` (allocates only to grow; the views
    are cached, since a layer asks for the same shape batch after batch)."""
    views: dict[tuple[object, ...], Tensor] | None = getattr(_scratch, "views", None)
    key = (shape, dtype, device)
    if views is not None:
        view = views.get(key)
        if view is not None:
            return view
    numel = math.prod(shape)
    buf: Tensor | None = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        buf = _persistent(torch.empty, max(numel, SCRATCH_VALUES), dtype=dtype, device=device)
        _scratch.buf = buf
        views = _scratch.views = {}
    elif views is None or len(views) > 256:
        views = _scratch.views = {}
    view = views[key] = buf[:numel].view(shape)
    return view


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _float32(values: np.ndarray) -> np.ndarray:
    """``values`` as float32, those beyond its range (a diverged model's variance, 1e40) at
    its largest: the cast would overflow to inf -- and warn, from the window's close (with
    warnings as errors, the window was lost)."""
    with np.errstate(invalid="ignore"):
        clipped: np.ndarray = np.clip(values, -_FLOAT32_MAX, _FLOAT32_MAX).astype(np.float32)
    return clipped


class _Shift:
    """Per-channel shift ``K``: ``full`` is ``[C]`` (0 where no shift is needed); ``idx`` lists
    the channels that need it and ``sel`` their ``K``.  Only those channels are copied and
    shifted, so the cost scales with how many channels need it, not with the layer."""

    def __init__(self, full: Tensor, idx: Tensor) -> None:
        self.full = full
        self.idx = idx
        self.sel = full.index_select(0, idx)

    def to(self, dtype: torch.dtype, device: torch.device) -> _Shift:
        if self.full.dtype == dtype and self.full.device == device:
            return self
        return _Shift(self.full.to(device=device, dtype=dtype), self.idx.to(device))


class _RowBuffer:
    """Preallocated rows of one layer: the hot path writes into it with ``out=``.

    A monitor must not allocate in steady state: large short-lived temporaries interleaved
    with small long-lived ones fragment the heap, and the page faults land in the *model's*
    own allocations -- a cost the hook timers never see (measured: +40 % on a ResNet-50).
    All rows of a buffer share one kind (``[N, C]`` values or spatial sums), dtype, device
    and shift ``K``; a change of any of them compacts the buffer first.
    """

    def __init__(self, channels: int, dtype: torch.dtype, device: torch.device, plain: bool):
        rows = ROW_BUFFER_VALUES // channels
        if plain:
            rows = max(rows, min(PLAIN_MIN_ROWS, PLAIN_MAX_VALUES // channels))
        self.capacity = max(1, rows)
        self.channels = channels
        self.dtype = dtype
        self.device = device
        self.plain = plain
        self.s1 = _persistent(torch.empty, self.capacity, channels, dtype=dtype, device=device)
        # [N, C] rows are the values themselves: only s1 is written (and compacted)
        shape = (0, channels) if plain else (self.capacity, channels)
        self.s2 = _persistent(torch.empty, shape, dtype=dtype, device=device)
        self.w = _persistent(torch.empty, shape, dtype=dtype, device=device)
        self.nonfinite = _persistent(torch.zeros, channels, dtype=torch.float64, device=device)
        # on the CPU the rows are checked as numpy views of the same memory: slicing one
        # costs a tenth of slicing the tensor, on a path that runs for every layer
        cpu = device.type == "cpu"
        self.host_s1: np.ndarray | None = self.s1.numpy() if cpu else None
        self.host_s2: np.ndarray | None = self.s2.numpy() if cpu else None
        self.host_w: np.ndarray | None = self.w.numpy() if cpu else None
        self.shift: _Shift | None = None
        self.used = 0
        self.size: float | None = None  # elements of every row, while all rows are complete
        self.complete = True

    def note_size(self, rows: slice, size: int) -> None:
        """Record that ``rows`` hold ``size`` elements each (complete, finite rows).

        While every row has the same size, ``w`` is implied by :attr:`size` and never
        written; the first row that differs materializes it for the rows before.
        """
        if self.complete:
            if self.size is None:
                self.size = float(size)
                return
            if self.size == size:
                return
            self.mark_incomplete(rows.start)
        if self.host_w is not None:
            self.host_w[rows] = size
        else:
            self.w[rows].fill_(float(size))

    def mark_incomplete(self, upto: int) -> None:
        """Rows may now differ in element counts: write ``w`` for the rows before ``upto``."""
        if self.complete:
            if self.size is not None and upto:
                self.w[:upto].fill_(self.size)
            self.complete = False

    def fits(self, channels: int, dtype: torch.dtype, device: torch.device, plain: bool) -> bool:
        return (channels, dtype, device, plain) == (
            self.channels,
            self.dtype,
            self.device,
            self.plain,
        )


def _put(dest: Tensor, rows: Tensor, counts: Tensor | None) -> None:
    """Copy kept rows into the sample buffer; channels with no finite element hold NaN."""
    dest.copy_(rows)
    if counts is not None:
        dest.masked_fill_(counts == 0, math.nan)


class _WindowSample:
    """A uniform sample of at most ``capacity`` per-sample channel-mean rows of one window.

    Rows arrive in blocks (one per compaction) as the float64 ``[R, C]`` means compaction
    computed.  Which rows are kept is decided from their positions alone by Li's
    Algorithm L (ACM TOMS 20(4), 1994), which draws the *gaps* between kept rows: with the
    sample full at ``k`` rows, ``W ← W·U^(1/k)`` and the next kept row comes
    ``⌊log U' / log(1 - W)⌋ + 1`` rows later, replacing a uniformly chosen slot -- the same
    distribution as Vitter's Algorithm R, but a block that holds no kept row costs one
    comparison, and no random number is drawn per row.  Kept rows are copied on the device
    (``copy_`` into a preallocated float32 buffer): no synchronization, no allocation.  Rows
    with no finite element in a channel (``w == 0``) hold NaN there.
    """

    def __init__(self, capacity: int, rng: random.Random) -> None:
        self.capacity = capacity
        self._rng = rng
        self._rows: Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.seen = 0
        self.filled = 0
        self._w = 1.0
        self._next = -1  # stream position of the next row to keep once full (-1: filling)

    def _uniform(self) -> float:
        """A uniform number in (0, 1)."""
        u = self._rng.random()
        while u <= 0.0:
            u = self._rng.random()
        return u

    def _gap(self) -> int:
        """Rows skipped before the next kept one (Algorithm L)."""
        w = self._w
        if w >= 1.0:
            return 0
        if w <= 0.0:
            return 1 << 62
        return math.floor(math.log(self._uniform()) / math.log1p(-w))

    def _advance(self, position: int) -> None:
        """Draw the position of the next kept row after ``position``."""
        self._w *= math.exp(math.log(self._uniform()) / self.capacity)
        self._next = position + self._gap() + 1

    def _buffer(self, m: Tensor) -> Tensor:
        rows = self._rows
        channels = int(m.shape[1])
        if rows is None or rows.shape[1] != channels or rows.device != m.device:
            fresh = _persistent(
                torch.empty, self.capacity, channels, dtype=torch.float32, device=m.device
            )
            if rows is not None and self.filled and rows.shape[1] == channels:
                fresh[: self.filled].copy_(rows[: self.filled])
            rows = self._rows = fresh
        return rows

    def offer(self, m: Tensor, w: Tensor | None) -> None:
        """Offer the rows of one compacted block (``[R, C]``; ``w`` element counts or None)."""
        count = int(m.shape[0])
        if count == 0:
            return
        rows = self._buffer(m)
        start = self.seen
        free = min(self.capacity - self.filled, count)
        if free:
            _put(rows[self.filled : self.filled + free], m[:free], None if w is None else w[:free])
            self.filled += free
            if self.filled == self.capacity:
                self._w = 1.0
                self._advance(start + free - 1)
        end = start + count
        while 0 <= self._next < end:
            i = self._next - start
            _put(rows[self._rng.randrange(self.capacity)], m[i], None if w is None else w[i])
            self._advance(self._next)
        self.seen = end

    def take(self, seed: int) -> Reservoir | None:
        """The window's sample as a host :class:`Reservoir` (``None`` if no row came); resets."""
        if self.seen == 0 or self._rows is None:
            self.reset()
            return None
        rows = self._rows[: self.filled].to("cpu", copy=True).numpy()
        out = Reservoir.from_rows(rows, self.seen, self.capacity, seed=seed)
        self.reset()
        return out


class _Steady:
    """A plan for measuring batches of one input shape (:meth:`LayerAccumulator.observe`):
    production sends a layer one shape batch after batch, or a few (dynamic batching).

    At batch 1 the Python around the two reductions cost more than the reductions: each
    operation of a hook runs with its code and data evicted by the layer before it.  On a
    ResNet-50 forward (one thread) ``observe`` took 165 us a layer, of which the two reductions
    took 65; 20 further operations (each 2-40 us there, 0.1-4 us in a loop) made the rest.  A
    batch of this shape and dtype on the CPU is reduced into two fixed ``[N, C]`` tensors and
    copied into the row buffer through numpy views -- squared on the way -- and one test on
    its channel totals gives the usual answer (finite, near ``K``); only when it fails do the
    rows get the general path's full look (:meth:`LayerAccumulator._check_rows`); their
    element counts are the general path's too (:meth:`_RowBuffer.note_size`).  A
    non-finite value, a renewed ``K``, a full buffer or another shape leave the rows unkept
    and the batch to the general path, which prepares the plan for a shape the second time it
    sees it (:meth:`LayerAccumulator._settle`; sequences of varying length would otherwise
    make a plan at every batch) -- only for CPU layers without a shift and without
    subsampling or striding, for batches that fit a buffer.  A layer keeps plans for up to
    :data:`STEADY_SHAPES` shapes; their ``[N, C]`` pairs are views of one stage, grown (by
    doubling, to at most a buffer's rows) for the largest batch, so varying batch sizes
    allocate a few times, not per batch.
    """

    __slots__ = (
        "buffer",
        "dims",
        "dtype",
        "host_norms",
        "host_sums",
        "magnitude",
        "near",
        "norms",
        "root_limit",
        "shape",
        "size",
        "sums",
        "total",
    )

    def __init__(
        self, xs: Tensor, buffer: _RowBuffer, limit: np.ndarray, stage: tuple[Tensor, Tensor]
    ) -> None:
        self.shape = xs.shape
        self.dtype = xs.dtype
        self.dims = tuple(range(2, xs.dim()))
        self.size = math.prod(xs.shape[2:])
        rows = (int(xs.shape[0]), int(xs.shape[1]))
        # views of the layer's stage, which every shape shares: one batch at a time uses it
        self.sums = stage[0][: rows[0] * rows[1]].view(rows)
        self.norms = stage[1][: rows[0] * rows[1]].view(rows)
        self.host_sums = self.sums.numpy()
        self.host_norms = self.norms.numpy()
        self.root_limit = np.sqrt(limit)  # |Σ (x - K)| beyond it: perhaps far from K
        self.total = np.empty(rows[1], dtype=self.host_sums.dtype)  # scratch: no allocation
        self.magnitude = np.empty(rows[1], dtype=self.host_sums.dtype)
        self.near = np.empty(rows[1], dtype=bool)
        self.buffer = buffer


class LayerAccumulator:
    """Thread-safe accumulator of one layer's window.

    Args:
        name: the layer's qualified name (for messages).
        spatial_stride: keep every k-th position along each spatial dimension.
        max_samples_per_batch: measure at most this many samples of a batch (a random
            contiguous slice, so no copy is made).
        masked: force (True) or forbid (False) the masked reduction; ``None`` picks it per
            device as described in the module docstring.
        reservoir: keep, per window, a uniform sample of at most this many per-sample
            channel-mean rows (0: none); :meth:`collect` returns it in ``LayerStats.reservoir``.
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
        self._shift: _Shift | None = None
        self._shift_decided = False
        self._scale: np.ndarray | None = None  # per-channel variance when K was chosen
        self._limits: tuple[float, int, float, np.ndarray] | None = None  # see _limit
        self._row_size = 1  # elements per row of the last batch (see shift_ratio)
        self._compactions = 0  # during the current batch (see observe)
        self._buffer: _RowBuffer | None = None
        self._plans: dict[torch.Size, _Steady] = {}  # by input shape, see _Steady
        self._stage: tuple[Tensor, Tensor] | None = None  # their [N * C] memory
        self._recurring: set[torch.Size] = set()  # shapes seen: a second batch makes a plan
        check_positive_int("reservoir", reservoir, minimum=0)
        self._sample = _WindowSample(reservoir, self._rng) if reservoir else None
        self._reset_window()

    def _reset_window(self) -> None:
        self._state: Tensor | None = None  # [len(MOMENT_FIELDS), C] float64 on the device
        self._batch_sizes: Counter[int] = Counter()
        self._n_batches = 0
        self._batch_stat_batches = 0

    @property
    def channels(self) -> int | None:
        """Channel count, known once the first batch was seen (lazy layers) or set."""
        return self._channels

    @channels.setter
    def channels(self, value: int) -> None:
        self._channels = value

    # -- the hot path --------------------------------------------------------------------
    def observe(self, x: Tensor, *, batch_stat_mode: bool) -> None:
        """Measure a batch: reduce it into the row buffer.  A batch is counted
        (``n_batches``, ``batch_sizes``) if and only if this returns: one that raises is not,
        and neither is an empty batch."""
        if x.dim() < 2:
            raise ShapeError(
                f"input of BatchNorm layer {self.name!r}", "[N, C, *S]", tuple(x.shape)
            )
        steady = self._plans.get(x.shape)
        # the host-side checks meet inf - inf and overflow in what they are checking for; a
        # warning raised from a hook (warnings as errors) would lose the very batch it is about
        if steady is not None and x.dtype == steady.dtype and x.is_cpu:
            with self._lock, np.errstate(all="ignore"):
                if self._plans.get(x.shape) is steady and self._steady_batch(x.detach(), steady):
                    self._count(steady.shape[0], batch_stat_mode)
                    return
        n = int(x.shape[0])
        if n == 0:
            return
        with self._lock, np.errstate(all="ignore"):
            before = self._buffer
            used = 0 if before is None else before.used
            self._compactions = 0
            try:
                self._reduce(self._prepare(x))
                self._settle(x)
            except BaseException:
                # rows reserved for this batch but never (fully) written must not be compacted
                # as data: drop them -- unless a compaction already took some of them in
                buf = self._buffer
                if buf is not None and self._compactions == 0:
                    buf.used = used if buf is before else 0
                raise
            # last: a batch is counted as measured only if observe() returns (the monitor
            # counts a batch whose observe() raised as seen and not measured)
            self._count(n, batch_stat_mode)

    def _count(self, n: int, batch_stat_mode: bool) -> None:
        self._n_batches += 1
        self._batch_sizes[n] += 1
        self._batch_stat_batches += int(batch_stat_mode)

    def _steady_batch(self, xs: Tensor, steady: _Steady) -> bool:
        """Measure a batch of the steady shape (:class:`_Steady`); ``False``: nothing was
        kept, measure it on the general path."""
        buf = steady.buffer
        n = steady.shape[0]
        r = buf.used
        if buf is not self._buffer or r + n > buf.capacity or buf.shift is not None:
            return False
        torch.sum(xs, steady.dims, out=steady.sums)
        torch.linalg.vector_norm(xs, 2, steady.dims, out=steady.norms)
        rows = slice(r, r + n)
        sums = steady.host_sums
        buf.host_s1[rows] = sums  # type: ignore[index]
        np.square(steady.host_norms, out=buf.host_s2[rows])  # type: ignore[index]
        total = sums[0] if n == 1 else np.add.reduce(sums, axis=0, out=steady.total)
        # one test for the usual answer: a non-finite value makes its channel's total
        # non-finite, which fails it, as does a mean perhaps far from K
        magnitude = np.abs(total, out=steady.magnitude)
        if not np.less_equal(magnitude, steady.root_limit, out=steady.near).all():
            finite, renewed = self._check_rows(buf, rows, steady.size)
            if renewed is not None:
                self._set_shift(renewed, xs.device)
            if not finite or renewed is not None:
                return False  # rows past buf.used are not data
        buf.note_size(rows, steady.size)
        buf.used = r + n
        return True

    def _settle(self, x: Tensor) -> None:
        """After a batch took the general path: if batches of its shape can take the steady
        one (:class:`_Steady`), prepare its plan."""
        buf = self._buffer
        if (
            buf is None
            or buf.host_s1 is None  # not on the CPU
            or buf.plain
            or x.dtype != buf.dtype  # converted
            or self._shift is not None
            or self.masked
            or self.spatial_stride != 1
        ):
            self._plans.clear()
            return
        n = int(x.shape[0])
        limit = self.max_samples_per_batch
        if (limit is not None and n > limit) or n > buf.capacity:
            return  # this shape is measured in pieces: the general path's
        plan = self._plans.get(x.shape)
        if plan is not None and plan.buffer is buf and plan.dtype == x.dtype:
            return
        if x.shape not in self._recurring:
            # a plan for a shape seen once would be made at every batch of sequences whose
            # length varies: wait for the shape to come again
            if len(self._recurring) >= RECURRING_SHAPES:
                self._recurring.clear()
            self._recurring.add(x.shape)
            return
        values = n * buf.channels
        stage = self._stage
        if stage is None or stage[0].dtype != x.dtype or stage[0].numel() < values:
            # grown for the largest batch yet (at most a buffer's rows); the plans on the old
            # stage would keep it alive, so they go
            grown = values
            if stage is not None and stage[0].dtype == x.dtype:
                grown = min(max(values, 2 * stage[0].numel()), buf.capacity * buf.channels)
            self._stage = stage = (
                _persistent(torch.empty, grown, dtype=x.dtype),
                _persistent(torch.empty, grown, dtype=x.dtype),
            )
            self._plans.clear()
        if len(self._plans) >= STEADY_SHAPES:
            self._plans.clear()
        size = math.prod(x.shape[2:])
        _, bound = self._limit(self._known_scale(buf.channels), float(n * size), size)
        self._plans[x.shape] = _Steady(x.detach(), buf, bound, stage)

    def _prepare(self, x: Tensor) -> Tensor:
        """Detach, check channels, subsample and make floating point (views where possible)."""
        xs = x.detach()
        channels = int(xs.shape[1])
        if self._channels is None:
            self._channels = channels
        elif channels != self._channels:
            raise ShapeError(f"channels of BatchNorm layer {self.name!r}", self._channels, channels)
        limit = self.max_samples_per_batch
        if limit is not None and xs.shape[0] > limit:
            xs = xs.narrow(0, self._rng.randrange(int(xs.shape[0]) - limit + 1), limit)
        if xs.dim() > 2 and self.spatial_stride > 1:
            xs = xs[
                (slice(None), slice(None))
                + (slice(None, None, self.spatial_stride),) * (xs.dim() - 2)
            ]
        if xs.dtype not in _FLOAT_TYPES:
            xs = xs.float()
        return xs

    def _buffer_for(self, xs: Tensor) -> _RowBuffer:
        """The row buffer for this input, compacting and replacing it if the input changed."""
        plain = xs.dim() == 2
        buf = self._buffer
        if buf is None or not buf.fits(int(xs.shape[1]), xs.dtype, xs.device, plain):
            if buf is not None:
                self._compact(buf)
            buf = self._buffer = _RowBuffer(int(xs.shape[1]), xs.dtype, xs.device, plain)
        if not plain:
            if not self._shift_decided:
                self._decide_shift(xs)
            shift = self._shift
            if shift is not buf.shift:
                if shift is not None:
                    shift = self._shift = shift.to(xs.dtype, xs.device)
                if shift is not buf.shift:
                    self._compact(buf)  # rows summed around another K must be compacted first
                    buf.shift = shift
        return buf

    def _reduce(self, xs: Tensor) -> None:
        buf = self._buffer_for(xs)
        n = int(xs.shape[0])
        if buf.plain:
            for start in range(0, n, buf.capacity):
                chunk = xs.narrow(0, start, min(buf.capacity, n - start))
                r = self._reserve(buf, int(chunk.shape[0]))
                rows = slice(r, r + int(chunk.shape[0]))
                buf.s1[rows].copy_(chunk)  # non-finite values are excluded at compaction
            return
        dims = tuple(range(2, xs.dim()))
        spatial = tuple(xs.shape[2:])
        size = self._row_size = math.prod(spatial)
        shift = buf.shift
        step = buf.capacity
        if shift is not None:
            selected = int(shift.idx.numel())
            step = min(step, max(1, SCRATCH_VALUES // max(1, selected * size)))
            k_view = shift.sel.view((-1,) + (1,) * len(dims))
        masked = self.masked if self.masked is not None else xs.device.type != "cpu"
        for start in range(0, n, step):
            chunk = xs if step >= n else xs.narrow(0, start, min(step, n - start))
            k = int(chunk.shape[0])
            r = self._reserve(buf, k)
            rows = slice(r, r + k)
            if masked:
                self._reduce_masked(chunk, dims, size, buf, rows)
                continue
            s1 = buf.s1[rows]
            s2 = buf.s2[rows]
            torch.sum(chunk, dims, out=s1)
            torch.linalg.vector_norm(chunk, 2, dims, out=s2)
            if shift is not None:
                # the channels whose |mean|/std is large: copy, shift and sum them again
                sel = _scratch_for((k, selected, *spatial), chunk.dtype, chunk.device)
                torch.index_select(chunk, 1, shift.idx, out=sel)
                sel.sub_(k_view)
                s1.index_copy_(1, shift.idx, sel.sum(dims))
                s2.index_copy_(1, shift.idx, torch.linalg.vector_norm(sel, 2, dims))
            s2.square_()
            finite, renewed = self._check_rows(buf, rows, size)
            if renewed is not None:  # summed around a stale K: again, around the new one
                buf.used = r
                self._set_shift(renewed, chunk.device)
                self._reduce(xs.narrow(0, start, n - start))
                return
            buf.note_size(rows, size)
            if not finite:
                self._reduce_masked(chunk, dims, size, buf, rows)
                renewed = self._check_masked(buf, rows, size)
                if renewed is not None:  # as above, for the finite elements
                    buf.nonfinite -= (size - buf.w[rows].double()).sum(0)  # counted again
                    buf.used = r
                    self._set_shift(renewed, chunk.device)
                    self._reduce(xs.narrow(0, start, n - start))
                    return

    def _reduce_masked(
        self, chunk: Tensor, dims: tuple[int, ...], size: int, buf: _RowBuffer, rows: slice
    ) -> None:
        """Exclude (and count) exactly the non-finite elements of ``chunk`` (allocates: rare
        on the CPU, where it runs only for chunks that hold a NaN or inf)."""
        buf.mark_incomplete(rows.start)
        y = chunk
        if buf.shift is not None:
            y = chunk - buf.shift.full.view((-1,) + (1,) * len(dims))
        finite = torch.isfinite(y)
        torch.sum(finite, dims, dtype=buf.dtype, out=buf.w[rows])
        yz = torch.where(finite, y, torch.zeros((), dtype=y.dtype, device=y.device))
        torch.sum(yz, dims, out=buf.s1[rows])
        s2 = buf.s2[rows]
        torch.linalg.vector_norm(yz, 2, dims, out=s2)
        s2.square_()
        buf.nonfinite += (size - buf.w[rows].double()).sum(0)

    def _reserve(self, buf: _RowBuffer, k: int) -> int:
        """Index of ``k`` free rows in ``buf`` (compacting it when full)."""
        if buf.used + k > buf.capacity:
            self._compact(buf)
        r = buf.used
        buf.used += k
        return r

    def _decide_shift(self, xs: Tensor) -> None:
        """Pick the shift ``K`` from the first batch (a one-time host synchronization)."""
        dims = tuple(range(2, xs.dim()))
        size = max(1, math.prod(xs.shape[2:]))
        s1 = xs.sum(dims).double().cpu().numpy()
        s2 = torch.linalg.vector_norm(xs, 2, dims).double().square().cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            m = s1 / size
            v = s2 / size - m * m
            rows_ok = np.isfinite(m) & np.isfinite(v)
            # nanmean and nanvar, written out: theirs warn (through the warnings module, from
            # the model's forward) on a channel with no finite row, where this gives NaN
            count = rows_ok.sum(axis=0)
            known = count > 0
            per = np.maximum(count, 1)
            mean = np.where(known, np.where(rows_ok, m, 0.0).sum(axis=0) / per, np.nan)
            dev = np.where(rows_ok, m - mean, 0.0)
            within = np.where(rows_ok, v, 0.0).sum(axis=0) / per
            var = np.where(known, within + (dev * dev).sum(axis=0) / per, np.nan)
        self._row_size = size
        self._update_shift(mean, var, device=xs.device)

    def update_shift(self, mean: Any, var: Any) -> None:
        """Sum the channels whose ``mean²/var`` exceeds :func:`shift_ratio` (of the rows the
        layer's last batch gave) around ``mean`` from now on: a window's mean and variance,
        when it closes (from the window thread, while hooks may be measuring)."""
        with self._lock:
            self._update_shift(mean, var)

    def _update_shift(self, mean: Any, var: Any, *, device: torch.device | None = None) -> None:
        """:meth:`update_shift`, with the lock held.

        A variance of 0 (or one that float32 cancellation made negative) with a mean that is
        not 0 needs the shift most of all.
        """
        mean = np.asarray(mean, dtype=np.float64)
        var = np.asarray(var, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            ratio = mean * mean / np.maximum(var, np.finfo(np.float64).tiny)
        limit = shift_ratio(self._row_size)
        need = np.isfinite(mean) & (mean != 0) & ~(ratio <= limit)  # NaN/inf ratio: need
        self._set_scale(np.where(np.isfinite(var) & (var > 0), var, 0.0))
        if device is None:
            device = self._shift.full.device if self._shift is not None else torch.device("cpu")
        self._set_shift(np.where(need, mean, 0.0), device)

    def _set_shift(self, k: np.ndarray, device: torch.device) -> None:
        """Sum every channel whose ``k`` is not 0 around it from now on."""
        need = k != 0
        if not need.any():
            self._shift = None
        else:
            # float32 K is exact in float64 too, so one K serves both input precisions
            full = _persistent(torch.as_tensor, _float32(k), device=device)
            idx = _persistent(torch.as_tensor, np.nonzero(need)[0], dtype=torch.long, device=device)
            self._shift = _Shift(full, idx)
        self._shift_decided = True
        self._plans.clear()

    def _check_rows(
        self, buf: _RowBuffer, rows: slice, size: int
    ) -> tuple[bool, np.ndarray | None]:
        """Whether these rows are finite, and -- on the CPU, where looking is free -- the shift
        to sum them around instead when their mean is too far from the current ``K``
        (:func:`shift_ratio`, against the larger of the variance known when ``K`` was chosen
        and the chunk's own; ``None`` when ``K`` serves).

        Against the known variance alone first (four vector operations, the usual answer);
        only then with the chunk's own variance, which comes from its sums around ``K`` -- the
        very cancellation in question: when ``K`` is stale it comes out near 0 (or below),
        which only makes the mean look farther, as it is.  Off the CPU only finiteness is
        checked (it synchronizes).
        """
        host_s2 = buf.host_s2
        if host_s2 is None:
            # s2 >= 0, so its total is finite iff every row is
            return math.isfinite(float(buf.s2[rows].sum())), None
        squares = host_s2[rows]
        if not math.isfinite(squares.sum()):
            return False, None
        count = float((rows.stop - rows.start) * size)
        sums = buf.host_s1[rows]  # type: ignore[index]
        # around K, in the rows' precision
        total = sums[0] if rows.stop - rows.start == 1 else np.add.reduce(sums, axis=0)
        return True, self._renewal(buf, total, np.add.reduce(squares, axis=0), count, size)

    def _check_masked(self, buf: _RowBuffer, rows: slice, size: int) -> np.ndarray | None:
        """:meth:`_check_rows`'s shift renewal for rows summed without their non-finite
        elements (:meth:`_reduce_masked`, on the CPU): each channel counts its finite elements.
        A chunk holding a NaN skipped the check, and was summed around a stale ``K`` in float32
        (2e-2 relative error of ``var`` at mean 1000, std 1)."""
        if buf.host_s1 is None or buf.host_s2 is None or buf.host_w is None:
            return None
        count = np.add.reduce(buf.host_w[rows].astype(np.float64), axis=0)
        total = np.add.reduce(buf.host_s1[rows], axis=0)
        squares = np.add.reduce(buf.host_s2[rows], axis=0)
        return self._renewal(buf, total, squares, count, size)

    def _renewal(
        self,
        buf: _RowBuffer,
        total: np.ndarray,
        squares: np.ndarray,
        count: float | np.ndarray,
        size: int,
    ) -> np.ndarray | None:
        """The shift to sum rows around instead of the current ``K`` -- given their sums
        around it (``total``), their sums of squares and their element count, per channel or
        for all -- or ``None`` when ``K`` serves (:meth:`_check_rows`)."""
        far = total * total  # offset² · count²: a factor of 64 needs no more precision
        scale = self._known_scale(buf.channels)
        if isinstance(count, float):
            ratio, limit = self._limit(scale, count, size)
        else:
            ratio = shift_ratio(size)
            limit = scale * (ratio * count * count)
        if not (far > limit).any():
            return None
        spread = squares * count - far  # spread · count²
        stale = far > ratio * np.maximum(spread, scale * (count * count))
        if not stale.any():
            return None
        k = np.zeros(buf.channels) if buf.shift is None else buf.shift.full.double().numpy()
        offset = total.astype(np.float64) / np.maximum(count, 1.0)
        renewed = np.where(stale, k + offset, k)
        if np.array_equal(renewed.astype(np.float32), k.astype(np.float32)):
            return None  # as close as a float32 K gets
        # the distance just seen counts as spread from now on: samples whose means differ by
        # more than their own spread (one image at a time) must not renew K sample after
        # sample
        self._set_scale(np.where(stale, np.maximum(scale, offset * offset), scale))
        return renewed

    def _known_scale(self, channels: int) -> np.ndarray:
        """The variance ``K`` was chosen with (set with every shift; 0 before any)."""
        return self._scale if self._scale is not None else self._set_scale(np.zeros(channels))

    def _set_scale(self, scale: np.ndarray) -> np.ndarray:
        """Set (and return) the per-channel variance ``K`` is judged against (float32)."""
        self._scale = _float32(scale)
        self._limits = None
        self._plans.clear()  # their bounds came from the old scale
        return self._scale

    def _limit(self, scale: np.ndarray, count: float, size: int) -> tuple[float, np.ndarray]:
        """:func:`shift_ratio` of rows of ``size`` elements and ``ratio · scale · count²``,
        kept for the last ``count`` and ``size`` (batches repeat)."""
        cached = self._limits
        if cached is None or cached[0] != count or cached[1] != size:
            ratio = shift_ratio(size)
            limit = scale * np.float32(ratio * count * count)
            cached = self._limits = (count, size, ratio, limit)
        return cached[2], cached[3]

    # -- compaction (device, float64) ------------------------------------------------------
    def _compact(self, buf: _RowBuffer) -> None:
        """Merge the buffer's rows into the window state (float64, on the device) and empty it."""
        rows = buf.used
        if rows == 0:
            return
        self._compactions += 1
        s1 = buf.s1[:rows].double()
        w: Tensor | None = None
        v: Tensor | None = None  # None: [N, C] values, no per-sample variance
        if buf.plain:
            finite = torch.isfinite(s1)
            size = 1.0
            # checking synchronizes, so only the CPU (where it is free) takes the shortcut
            if s1.device.type == "cpu" and bool(finite.all()):
                m = s1
            else:
                w = finite.double()
                m = torch.where(finite, s1, 0.0)
                buf.nonfinite += (~finite).sum(0)
        else:
            size = buf.size or 0.0
            s2 = buf.s2[:rows].double()
            if not (buf.complete and buf.size is not None):
                w = buf.w[:rows].double()
            wz = size if w is None else w.clamp_min(1.0)
            mu = s1 / wz
            v = (s2 / wz - mu * mu).clamp_min(0.0)
            m = mu + buf.shift.full.double() if buf.shift is not None else mu
            if w is not None:
                has = w > 0
                m = torch.where(has, m, 0.0)
                v = torch.where(has, v, 0.0)
        if w is None:
            block = moments_from_values(m) if v is None else moments_from_complete_rows(m, v, size)
        else:
            zero = torch.zeros_like(m) if v is None else v
            block = moments_from_rows(m, zero, w, buf.nonfinite.clone())
        state = self._state
        if state is None or state.device != m.device:
            fresh = _persistent(
                torch.empty, len(MOMENT_FIELDS), m.shape[1], dtype=torch.float64, device=m.device
            )
            if state is None:
                fresh.copy_(torch.stack(block))
            else:
                previous = state.to(m.device).unbind(0)
                fresh.copy_(torch.stack(merge_moment_arrays(previous, block)))
            self._state = fresh
        else:
            state.copy_(torch.stack(merge_moment_arrays(state.unbind(0), block)))
        if self._sample is not None:
            self._sample.offer(m, w)
        buf.nonfinite.zero_()
        buf.used = 0
        buf.size = None
        buf.complete = True

    # -- flush -------------------------------------------------------------------------------
    def collect(
        self, batches_seen: int | None = None, samples_seen: int | None = None
    ) -> LayerStats | None:
        """Close the window: return its statistics (host, float64) and start a new one.

        ``batches_seen``/``samples_seen`` count what passed through the layer, measured or
        not (the monitor counts them); they default to the measured batches.  Returns
        ``None`` when no batch was measured or seen in this window.
        """
        with self._lock:
            if self._buffer is not None:
                self._compact(self._buffer)
            state = self._state
            sizes = dict(sorted(self._batch_sizes.items()))
            n_batches, batch_stat = self._n_batches, self._batch_stat_batches
            channels = self._channels
            sample = self._sample
            reservoir = sample.take(self._rng.getrandbits(63)) if sample is not None else None
            self._reset_window()
        seen = n_batches if batches_seen is None else batches_seen
        samples = sum(k * v for k, v in sizes.items()) if samples_seen is None else samples_seen
        if (seen == 0 and n_batches == 0) or channels is None:
            return None
        if state is None:
            moments = ChannelMoments.empty(channels)
        else:
            moments = ChannelMoments.from_arrays(list(state.cpu().numpy()))
        return LayerStats(
            moments=moments,
            batch_sizes=sizes,
            n_batches=n_batches,
            batches_seen=seen,
            samples_seen=samples,
            batch_stat_batches=batch_stat,
            reservoir=reservoir,
        )

    def peek(self) -> ChannelMoments | None:
        """The statistics of the window so far, without closing it (host, float64)."""
        with self._lock:
            if self._buffer is not None:
                self._compact(self._buffer)
            state = self._state
            return None if state is None else ChannelMoments.from_arrays(list(state.cpu().numpy()))
