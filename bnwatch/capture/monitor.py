"""The monitor: hooks on every watched BatchNorm layer, windows, references, decisions.

Hooks.  A forward pre-hook on each BN layer measures what the layer receives; a pre-hook and
an always-called post-hook on the model root time each forward pass and decide, once per
forward, whether it is measured, so all layers of a forward agree.  Hooks never modify
anything the model sees, so outputs are bit-identical with and without the monitor; every
hook body is wrapped in ``try/except`` -- an exception is counted, logged once per layer and
swallowed -- and in :func:`torch.compiler.disable`, so a model compiled after ``watch()``
runs the hooks eagerly (a graph break per BN layer) instead of tracing them -- except in a
graph that must be whole (``fullgraph=True``), which leaves them out: that compiled model runs
unmeasured, with a warning; ``torch.export`` and ``torch.jit.trace`` skip them (the program
they make is not watched).  A copy of the model (``copy.deepcopy``, ``torch.save`` of the
whole model) is not watched: its hooks do nothing (:class:`Detached`).

Forks.  A monitor's threads, its sink's writer and its database connections do not survive
``fork()`` (gunicorn ``--preload``, uWSGI without ``--lazy-apps``, ``multiprocessing`` with the
fork start method).  In a forked child the first forward of the model logs one warning saying
to call ``watch()`` in the process that runs the model, and removes the inherited monitor's
hooks there: it never measures, reports or blocks in the child, and the parent's data is not
reported twice.

Cost.  The monitor times its own hooks against the forward passes that contain them.  With
``overhead_budget=b`` it measures a forward only while it has credit: every forward earns
``b`` times its own model time and every measured forward spends its hook time, so the
measured share adapts until hook time / model time ≈ ``b``.  ``sample_every=k`` additionally
measures at most one forward in ``k``.

Windows.  A window closes every ``window_seconds`` (a background thread), on :meth:`flush` and
on :meth:`close`.  Each closed window becomes a :class:`~bnwatch.schema.WindowRecord` with one
:class:`~bnwatch.schema.LayerReport` per layer that saw data, handed to the sink.  With
``reservoir=k`` (default ``None``: :func:`~bnwatch.stats.default_reservoir_rows` of the
model's channels) each layer's window also carries a uniform sample of at most ``k``
per-sample channel means (``LayerReport.reservoir``).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import functools
import logging
import math
import os
import socket
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import CodeType, FrameType, TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedBuffer

from bnwatch.capture.accumulator import LayerAccumulator
from bnwatch.capture.discovery import (
    BatchNormLayer,
    batchnorm_modules,
    check_layer_paths,
    check_materialized,
)
from bnwatch.drift import DriftConfig, Reference, assess_layer, config_account, decide
from bnwatch.errors import (
    ConfigError,
    ReferenceMismatchError,
    check_positive_int,
    python_number,
)
from bnwatch.inputs import Forward, ModelCall, map_tensors, replay
from bnwatch.schema import (
    MAX_NAME_LENGTH,
    LayerReport,
    Profile,
    WindowRecord,
    check_name,
    check_text,
    storable_text,
    utcnow,
)
from bnwatch.sink import Sink, acquire, release
from bnwatch.stats import ChannelMoments, LayerStats, default_reservoir_rows

logger = logging.getLogger("bnwatch")

_LIVE: weakref.WeakSet[Monitor] = weakref.WeakSet()
"""Every monitor not yet garbage-collected (see :func:`watching`)."""
_PAUSED = threading.local()
"""``monitors``: the monitors this thread's forwards are hidden from (see :func:`paused`)."""


def watching(modules: Iterable[nn.Module]) -> list[Monitor]:
    """The open monitors that watch any of ``modules`` (BatchNorm layers)."""
    wanted = {id(m) for m in modules}
    return [
        mon
        for mon in list(_LIVE)
        if not mon.closed and any(id(layer.module) in wanted for layer in mon._layers)
    ]


def watching_model(model: nn.Module) -> list[Monitor]:
    """The open monitors whose model is ``model`` (their layers may have been replaced since)."""
    return [mon for mon in list(_LIVE) if not mon.closed and mon._model() is model]


@contextlib.contextmanager
def paused(monitors: Iterable[Monitor]) -> Iterator[None]:
    """Hide this thread's forwards from ``monitors`` (a recalibration's passes over a watched
    model are not production traffic); other threads are watched as before."""
    before: frozenset[Monitor] = getattr(_PAUSED, "monitors", frozenset())
    _PAUSED.monitors = before | frozenset(monitors)
    try:
        yield
    finally:
        _PAUSED.monitors = before


def unwatched(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """:func:`paused` for every open monitor of ``model``'s BatchNorm layers: this thread's
    forwards of it (a recalibration's passes) are not production traffic."""
    return paused(watching(model.modules()))


def _paused(monitor: Monitor) -> bool:
    return monitor in getattr(_PAUSED, "monitors", ())


def _window_loop(monitor: weakref.ref[Monitor], stop: threading.Event) -> None:
    """The window thread: closes a monitor's windows on time, holding it only while it does
    (so that a monitor nobody refers to any more is collected, and this thread ends)."""
    wait = 0.0
    while not stop.wait(timeout=wait):
        mon = monitor()
        if mon is None:
            return
        wait = min(mon._tick(), 1.0)  # wakes at least every second to see if it is gone
        del mon


def _let_go(sink: Sink, stop: threading.Event, pid: int) -> None:
    """A monitor collected without close(): stop its thread, release its sink (draining it)
    in a thread of its own -- in the process that made it only: a forked child's copy of the
    sink holds the parent's connections and queue, not its own."""
    if os.getpid() != pid:
        return
    stop.set()
    threading.Thread(target=release, args=(sink, 30.0), name="bnwatch-release", daemon=True).start()


_EXIT_SECONDS = 10.0
"""How long, at most, an exiting interpreter waits for the open monitors to store their last
windows."""


@atexit.register
def _close_at_exit() -> None:
    """An interpreter that exits with monitors open: close them, so their last windows (and
    the windows their sinks still hold) are stored -- the threads that would have done it are
    daemons, killed at exit -- within :data:`_EXIT_SECONDS` in all."""
    deadline = time.monotonic() + _EXIT_SECONDS
    for mon in list(_LIVE):
        if not mon.closed:
            with contextlib.suppress(Exception):
                mon.close(timeout=max(0.0, deadline - time.monotonic()))
    for mon in list(_LIVE):  # windows closing in threads of their own (Monitor._close_apart)
        mon._join_apart(deadline)


ROOT_HOOKS = "(model)"
"""Key of :attr:`MonitorStats.hook_errors` for errors in the model-level timing hooks."""


def default_source() -> str:
    """``host:pid`` -- distinguishes the replicas that report for one model.

    Always storable (:data:`~bnwatch.schema.MAX_NAME_LENGTH` characters with the pid): a host
    name too long for the rest (or with characters the store refuses) is shortened by
    :func:`~bnwatch.schema.storable_text` to a prefix and a digest of the whole name: a
    PostgreSQL store (and a service) would refuse every window of a longer source."""
    pid = str(os.getpid())
    host = storable_text(socket.gethostname(), MAX_NAME_LENGTH - len(pid) - 1)
    return f"{host}:{pid}"


@dataclass(frozen=True)
class MonitorStats:
    """The monitor's account of itself.

    Attributes:
        forwards: forward passes of the model while watched.
        forwards_measured: of those, the ones whose BN inputs were measured: chosen to be
            (``sample_every``, ``overhead_budget``) and reaching a watched layer's hook -- a
            forward of a graph compiled without the hooks (``torch.compile(fullgraph=True)``)
            measures nothing and is not counted.
        hook_seconds: time spent inside bnwatch's hooks.
        model_seconds: time of the watched forward passes excluding ``hook_seconds``.
        overhead_ratio: ``hook_seconds / model_seconds`` (NaN when hooks ran but no model
            forward was timed: layers called outside the watched model's forward).
        hook_errors: layer (or ``"(model)"`` for the timing hooks) -> exceptions caught.
        windows_closed: windows handed to the sink.
        windows_dropped: windows the sink could not deliver (counted, never silent).
        window_errors: windows that failed to close (logged).
    """

    forwards: int
    forwards_measured: int
    hook_seconds: float
    model_seconds: float
    overhead_ratio: float
    hook_errors: Mapping[str, int]
    windows_closed: int
    windows_dropped: int
    window_errors: int


class _Sampler:
    """Decides which forwards are measured: ``sample_every`` and the overhead budget."""

    def __init__(self, sample_every: int, budget: float | None) -> None:
        self._lock = threading.Lock()
        self.every = sample_every
        self.budget = budget
        self._count = 0
        self._credit = 0.0
        self.forwards = 0
        self.measured = 0
        self.hook_seconds = 0.0
        self.model_seconds = 0.0

    def decide(self) -> bool:
        with self._lock:
            self._count += 1
            if (self._count - 1) % self.every:
                return False
            return self.budget is None or self._credit >= 0.0

    def record(self, forward_seconds: float, hook_seconds: float, measured: bool) -> None:
        model = max(forward_seconds - hook_seconds, 0.0)
        with self._lock:
            self.forwards += 1
            self.measured += int(measured)
            self.hook_seconds += hook_seconds
            self.model_seconds += model
            if self.budget is not None:
                earned = self.budget * model
                # credit is capped at a few forwards' worth so an idle spell cannot buy a burst
                self._credit = min(self._credit + earned - hook_seconds, 8.0 * earned)

    def add_hook_time(self, seconds: float) -> None:
        with self._lock:
            self.hook_seconds += seconds


class InputRing:
    """The last ``capacity`` input samples of the model's forwards, on the input's device.

    A forward called with one tensor -- its only positional argument, or its only keyword
    argument (``model(pixel_values=x)``, as Hugging Face models are called, whose name is
    kept with it: :attr:`KeptInputs.key`) -- goes to a preallocated ring written with
    ``index_copy_``: no per-batch allocation and no host/device synchronization.  Its samples
    are copied before the forward runs (the forward may change its input in place) into a
    spare buffer of the batch's size, reused (:class:`PendingSamples`), and enter the ring
    when it has run (:meth:`commit`): a forward that raises -- a malformed request, a NaN input
    a model refuses -- is not kept, and does not restart the ring with its shape.  Any other
    forward (a dict, a list of images, several tensors, a tensor and options) is kept as a
    whole call (:class:`~bnwatch.inputs.ModelCall`): :meth:`add_call` copies its arguments
    before the forward runs (:class:`PendingCall`), the forward's first BatchNorm input says
    how many samples it held, and :meth:`commit` keeps it -- the most recent calls whose
    samples add up to at most ``capacity``, replayed as the model was called.  A tensor
    passed as the same object, unchanged, call after call (a table, prototypes) is copied
    once and shared.  A call of more samples than the ring holds (or one that reached no
    BatchNorm layer) is skipped, and the first one says why in a warning: nothing to
    recalibrate on would otherwise surface only when a triggered recalibration failed.
    Inputs of another kind, shape, dtype, device or keyword restart the ring.  The time each
    sample arrived is kept on the host beside it (a recalibration's lineage says which
    production data it was estimated on).
    """

    def __init__(self, capacity: int, model_name: str = "the model") -> None:
        self.capacity = capacity
        self.model_name = model_name
        self._warned = False
        self._lock = threading.Lock()
        self._buffer: torch.Tensor | None = None
        self._key: str | None = None  # the keyword the kept inputs were passed as
        self._arrived = np.zeros(capacity)  # time.time() of each slot's sample
        self._next = 0
        self._filled = 0
        self._calls: collections.deque[tuple[ModelCall, float]] = collections.deque()
        self._call_samples = 0
        self._spares: list[torch.Tensor] = []  # for PendingSamples, reused
        # the tensors of the last call copied: (the caller's, its version, our copy)
        self._sources: list[tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = []

    def add_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> PendingCall | PendingSamples | None:
        """Copy the inputs of a forward called with ``args`` and ``kwargs``, before it runs:
        :meth:`commit` keeps the copy once the forward has run (and, for a whole call, said how
        many samples it held); :meth:`discard` forgets it when the forward raised."""
        if len(args) == 1 and not kwargs and _batch_tensor(args[0]):
            return self._stage(args[0])
        if not args and len(kwargs) == 1 and _batch_tensor(x := next(iter(kwargs.values()))):
            return self._stage(x, key=next(iter(kwargs)))
        if args or kwargs:
            return PendingCall(self._copy(args, kwargs), time.time())
        self._warn("no arguments")
        return None

    def add(self, x: torch.Tensor, key: str | None = None) -> None:
        """Keep the samples of ``x``, the forward's only argument (with ``key``: its only,
        keyword argument of that name): :meth:`add_call` and :meth:`commit` in one."""
        staged = self._stage(x, key)
        if staged is not None:
            self.commit(staged)

    def _stage(self, x: torch.Tensor, key: str | None = None) -> PendingSamples | None:
        """A copy of the samples of ``x`` (its last ``capacity``), in a spare buffer."""
        if x.shape[0] == 0:
            return None
        now = time.time()
        x = x.detach()
        if x.shape[0] > self.capacity:
            x = x[-self.capacity :]
        n = int(x.shape[0])
        with self._lock:
            spare = self._spares.pop() if self._spares else None
        if (
            spare is None
            or spare.shape[0] < n
            or spare.shape[1:] != x.shape[1:]
            or spare.dtype != x.dtype
            or spare.device != x.device
        ):
            with torch.inference_mode(False):
                spare = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        spare.narrow(0, 0, n).copy_(x)
        return PendingSamples(spare, n, key, now)

    def discard(self, pending: PendingCall | PendingSamples) -> None:
        """Forget the copy of a call whose forward raised."""
        if isinstance(pending, PendingSamples):
            self._reuse(pending.rows)

    def _reuse(self, spare: torch.Tensor) -> None:
        with self._lock:
            if len(self._spares) < _SPARE_BUFFERS:
                self._spares.append(spare)

    def _keep_samples(self, staged: PendingSamples) -> None:
        """Put the samples :meth:`_stage` copied into the ring (restarted for another kind of
        input)."""
        n, key, now = staged.samples, staged.key, staged.arrived
        x = staged.rows.narrow(0, 0, n)
        with self._lock:
            buf = self._buffer
            if (
                buf is None
                or buf.shape[1:] != x.shape[1:]
                or buf.dtype != x.dtype
                or buf.device != x.device
                or key != self._key
            ):
                with torch.inference_mode(False):
                    buf = self._buffer = torch.empty(
                        (self.capacity, *x.shape[1:]), dtype=x.dtype, device=x.device
                    )
                self._key = key
                self._next = self._filled = 0
                self._calls.clear()
                self._call_samples = 0
            idx = (torch.arange(n, device=x.device) + self._next) % self.capacity
            buf.index_copy_(0, idx, x)
            end = self._next + n
            self._arrived[self._next : min(end, self.capacity)] = now
            self._arrived[: max(end - self.capacity, 0)] = now
            self._next = (self._next + n) % self.capacity
            self._filled = min(self.capacity, self._filled + n)
        self._reuse(staged.rows)

    def _copy(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ModelCall:
        """A copy of a call's arguments: tensors cloned (usable outside inference mode, as
        the ring is) -- or shared with the last call's copy when passed as the same tensor,
        unchanged -- and numpy arrays copied; options as they are."""
        previous, sources = self._sources, []

        def copy(t: torch.Tensor) -> torch.Tensor:
            version = -1 if t.is_inference() else t._version  # inference tensors have none
            shared = (c for r, v, c in previous if version >= 0 and v == version and r() is t)
            kept = next(shared, None)
            if kept is None:
                with torch.inference_mode(False):
                    kept = t.detach().clone()
            if version >= 0:
                sources.append((weakref.ref(t), version, kept))
            return kept

        call: ModelCall = map_tensors(ModelCall(args, kwargs), copy, other=_copy_array)
        self._sources = sources
        return call

    def commit(self, pending: PendingCall | PendingSamples) -> None:
        """Keep what :meth:`add_call` copied, now that its forward has run."""
        if isinstance(pending, PendingSamples):
            self._keep_samples(pending)
            return
        n = pending.samples
        if n is None:
            self._warn("arguments that reached no BatchNorm layer")
            return
        if n == 0:
            return
        if n > self.capacity:
            self._warn(f"{n} samples in one call, more than keep_inputs={self.capacity}")
            return
        call = dataclasses.replace(pending.call, samples=n)
        with self._lock:
            if self._buffer is not None:  # the ring held single tensors: restart it
                self._buffer = None
                self._key = None
                self._next = self._filled = 0
            self._calls.append((call, pending.arrived))
            self._call_samples += n
            while self._call_samples > self.capacity:
                old, _ = self._calls.popleft()
                self._call_samples -= old.samples

    def _warn(self, called_with: str) -> None:
        if self._warned:
            return
        self._warned = True
        logger.warning(
            "bnwatch: keep_inputs keeps the tensors a model's forward is called with, or whole "
            "calls of at most keep_inputs samples; %s was called with %s, which is not kept "
            "(a recalibration from the kept inputs has nothing to run on): raise keep_inputs, "
            "or recalibrate it with bnwatch.recalibrate on data of your own",
            self.model_name,
            called_with,
        )

    def snapshot(self) -> KeptInputs | None:
        with self._lock:
            if self._calls:
                times = [t for _, t in self._calls]
                calls = [call for call, _ in self._calls]
            elif self._buffer is None or self._filled == 0:
                return None
            else:
                if self._filled < self.capacity:
                    inputs = self._buffer[: self._filled].clone()
                    arrived = self._arrived[: self._filled]
                else:
                    inputs = torch.cat([self._buffer[self._next :], self._buffer[: self._next]])
                    arrived = self._arrived
                return KeptInputs(
                    inputs=inputs,
                    first_at=_utc(float(arrived.min())),
                    last_at=_utc(float(arrived.max())),
                    key=self._key,
                )
        # copies, outside the lock: what a recalibration does to them (a model that changes
        # its input in place) must not reach what is kept; a shared tensor stays shared
        memo: dict[int, torch.Tensor] = {}

        def clone(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in memo:
                memo[id(t)] = t.clone()
            return memo[id(t)]

        return KeptInputs(
            inputs=None,
            first_at=_utc(min(times)),
            last_at=_utc(max(times)),
            calls=tuple(map_tensors(call, clone, other=_copy_array) for call in calls),
        )


_SPARE_BUFFERS = 8
"""Spare buffers an :class:`InputRing` keeps for the copies of forwards in flight (one per
thread running the model at once; more are allocated, and dropped)."""


@dataclass
class PendingSamples:
    """The samples of a forward called with one tensor, copied before it runs into the first
    ``samples`` rows of ``rows`` (a spare buffer, reused), waiting for it to succeed."""

    rows: torch.Tensor
    samples: int
    key: str | None
    arrived: float


@dataclass
class PendingCall:
    """A call's copied arguments, waiting for its forward to say how many samples it held
    (the batch size of the first BatchNorm input it reached)."""

    call: ModelCall
    arrived: float
    samples: int | None = None


def _copy_array(value: Any) -> Any:
    return value.copy() if isinstance(value, np.ndarray) else value


class _Fixed:
    """A tensor argument that is not a batch (a mask, a table): equal by value."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __eq__(self, other: object) -> bool:
        a = self.tensor
        b = other.tensor if isinstance(other, _Fixed) else None
        return b is not None and (
            a is b
            or ((a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device) and torch.equal(a, b))
        )

    __hash__ = None  # type: ignore[assignment]


def _form(x: Any, n: int) -> Any:
    """What must match for ``x``, an argument of a call of ``n`` samples, to be joined with
    another call's: tensors of the batch (first dimension ``n``) their sample shape, lists
    of the samples (``n`` long) nothing, containers their items, anything else (other tensors
    too) its type and value."""
    if isinstance(x, torch.Tensor):
        if x.dim() and x.shape[0] == n:
            return ("batch", tuple(x.shape[1:]), x.dtype, x.device)
        return _Fixed(x)
    if isinstance(x, list) and len(x) == n:
        return ("samples",)
    if isinstance(x, Mapping):
        return (type(x), tuple((k, _form(v, n)) for k, v in x.items()))
    if isinstance(x, (tuple, list)):
        return (type(x), tuple(_form(v, n) for v in x))
    return ("value", type(x), x)


def _join(items: list[Any], counts: list[int]) -> Any:
    """One argument from the same argument of calls of the same :func:`_form`: batches
    concatenated -- unless the calls passed the very same tensor (shared when kept), which
    is not a batch whose size happens to match -- lists of samples joined, the rest as the
    first call's."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        batch = first.dim() and first.shape[0] == counts[0]
        return torch.cat(items) if batch and any(x is not first for x in items) else first
    if isinstance(first, list) and len(first) == counts[0]:
        return [sample for x in items for sample in x]
    if isinstance(first, Mapping):
        return {k: _join([x[k] for x in items], counts) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_join(list(v), counts) for v in zip(*items, strict=True)))
    if isinstance(first, (tuple, list)):
        return type(first)(_join(list(v), counts) for v in zip(*items, strict=True))
    return first


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a value whose == is not a truth value (an array, say)
        return False


def _join_calls(calls: Sequence[ModelCall], batch_size: int) -> list[ModelCall]:
    """``calls`` grouped by :func:`_form` (in the order each form first comes), each group
    joined into as few calls of at most ``batch_size`` samples as it takes, of about equal
    size: 65 calls of one sample give 33 and 32, not 64 and a lone one that BatchNorm cannot
    train on (one is left only where nothing else fits)."""
    runs: list[tuple[Any, list[ModelCall], list[set[int]]]] = []
    for call in calls:
        form = (_form(call.args, call.samples), _form(call.kwargs, call.samples))
        for f, run, shared in runs:
            if not _same(form, f):
                continue
            # the same tensor object in the same place as the run's first call (a table
            # passed again, kept once) -- in the same places as the run's other calls
            same = _shared(run[0], call)
            if len(run) == 1:
                shared.append(same)
            if same == shared[0]:
                run.append(call)
                break
        else:
            runs.append((form, [call], []))
    out: list[ModelCall] = []
    for _, run, _ in runs:
        size = (total := sum(c.samples for c in run)) / math.ceil(total / batch_size)
        groups: list[list[ModelCall]] = [[]]
        taken = 0
        for call in run:
            after = taken + call.samples
            if groups[-1] and (after > batch_size or abs(after - size) > abs(taken - size)):
                groups.append([])
                taken, after = 0, call.samples
            groups[-1].append(call)
            taken = after
        last, before = groups[-1], groups[-2] if len(groups) > 1 else []
        if sum(c.samples for c in last) == 1 and before:  # a lone sample: join it, or
            held = sum(c.samples for c in before)  # take a call over to it
            if held + 1 <= batch_size:
                before.extend(groups.pop())
            elif held - before[-1].samples > 1 and before[-1].samples + 1 <= batch_size:
                last.insert(0, before.pop())
        out.extend(_joined(group) for group in groups)
    return out


def _shared(a: ModelCall, b: ModelCall) -> set[int]:
    """Where (in traversal order) two calls of one form hold the very same tensor."""
    found: list[list[torch.Tensor]] = [[], []]
    for call, tensors in zip((a, b), found, strict=True):
        map_tensors(call, tensors.append)
    return {i for i, (x, y) in enumerate(zip(*found, strict=True)) if x is y}


def _joined(group: list[ModelCall]) -> ModelCall:
    if len(group) == 1:
        return group[0]
    counts = [c.samples for c in group]
    args = _join([c.args for c in group], counts)
    kwargs = _join([c.kwargs for c in group], counts)
    return ModelCall(args, kwargs, sum(counts))


def _batch_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() >= 1


def _call_with_keyword(model: nn.Module, batch: dict[str, Any]) -> Any:
    return model(**batch)


@dataclass(frozen=True, eq=False)
class KeptInputs:
    """The inputs a monitor kept (``keep_inputs``), oldest first, and when they arrived.

    Either ``inputs``, the samples of a model called with one tensor, or ``calls``, the whole
    calls of a model called otherwise.  :meth:`batches` and :attr:`forward` recalibrate on
    either as the model was called: ``bnwatch.recalibrate(model, kept.batches(),
    forward=kept.forward)``.
    """

    inputs: torch.Tensor | None
    first_at: datetime
    last_at: datetime
    key: str | None = None
    """The keyword the model was called with ``inputs`` as (``model(pixel_values=x)``), or
    ``None`` when they were its positional argument."""
    calls: tuple[ModelCall, ...] = ()
    """The kept calls (``inputs`` is ``None``), oldest first."""

    @property
    def samples(self) -> int:
        """How many samples were kept."""
        if self.inputs is not None:
            return int(self.inputs.shape[0])
        return sum(call.samples for call in self.calls)

    @property
    def forward(self) -> Forward | None:
        """The ``forward=`` that calls the model on :meth:`batches` as it was called."""
        if self.calls:
            return replay
        return None if self.key is None else _call_with_keyword

    def batches(self, batch_size: int = 64) -> list[Any]:
        """The kept inputs as data for ``recalibrate``: ``inputs`` in batches of
        ``batch_size`` (as ``{key: batch}`` when kept from a keyword), or the calls --
        consecutive calls of the same form joined into one of at most ``batch_size`` samples
        (tensors of the batch concatenated, lists of samples joined, everything else equal),
        so that a model served one sample at a time is recalibrated on batches.  Batches are
        of about equal size: 65 samples give 33 and 32, not 64 and a lone one that a
        BatchNorm layer cannot normalize in training mode."""
        if self.inputs is None:
            return _join_calls(self.calls, batch_size)
        check_positive_int("batch_size", batch_size)
        parts = max(1, -(-self.samples // batch_size))
        batches = list(torch.tensor_split(self.inputs, parts))
        key = self.key
        return batches if key is None else [{key: x} for x in batches]

    def split(self, fraction: float, generator: torch.Generator) -> tuple[KeptInputs, KeptInputs]:
        """The kept inputs shuffled by ``generator`` into two parts, the second holding about
        ``fraction`` of the samples (samples of ``inputs``; whole calls of ``calls``: the
        second part is empty with fewer than two calls)."""
        if self.inputs is not None:
            perm = torch.randperm(self.samples, generator=generator)
            cut = int(self.samples * (1 - fraction))
            return (
                dataclasses.replace(self, inputs=self.inputs[perm[:cut]]),
                dataclasses.replace(self, inputs=self.inputs[perm[cut:]]),
            )
        order: list[int] = torch.randperm(len(self.calls), generator=generator).tolist()
        target, cut, taken = self.samples * (1 - fraction), 0, 0
        while cut < len(order) and (cut == 0 or (taken < target and cut < len(order) - 1)):
            taken += self.calls[order[cut]].samples
            cut += 1
        return (  # each part in the order the calls came
            dataclasses.replace(self, calls=tuple(self.calls[i] for i in sorted(order[:cut]))),
            dataclasses.replace(self, calls=tuple(self.calls[i] for i in sorted(order[cut:]))),
        )

    def describe(self) -> dict[str, Any]:
        """JSON-ready: how many samples were kept (in how many whole calls, if so), and from
        when to when (ISO 8601, UTC); the keyword they were passed as, if any."""
        out: dict[str, Any] = {
            "kept": self.samples,
            "first_at": self.first_at.isoformat(),
            "last_at": self.last_at.isoformat(),
        }
        if self.key is not None:
            out["keyword"] = self.key
        if self.calls:
            out["calls"] = len(self.calls)
        return out


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


class _SeenCounters:
    """Batches and samples that passed through each layer and were not measured, counted
    without a lock: every thread increments its own cumulative counters, and a window takes
    the difference of the totals (the window thread never writes to them).  A measured batch
    is counted by its layer's accumulator instead, which a window collects: each batch is
    counted once, in one place, so it is seen in the window that measured it, whatever the
    window thread and the serving threads interleave (see :meth:`Monitor._close_window`).
    The counters of threads that ended are folded into one total, so a server with a thread
    per request does not keep one pair per request it ever served."""

    def __init__(self, layers: int) -> None:
        self._layers = layers
        self._local = threading.local()
        self._lock = threading.Lock()
        self._threads: list[tuple[threading.Thread, list[int], list[int]]] = []
        self._ended = ([0] * layers, [0] * layers)
        self._last = ([0] * layers, [0] * layers)

    def add(self, idx: int, samples: int) -> None:
        counts = getattr(self._local, "counts", None)
        if counts is None:
            counts = ([0] * self._layers, [0] * self._layers)
            self._local.counts = counts
            with self._lock:
                self._threads.append((threading.current_thread(), *counts))
        counts[0][idx] += 1
        counts[1][idx] += samples

    def take(self) -> list[tuple[int, int]]:
        """Per layer, (batches, samples) since the previous call."""
        with self._lock:
            alive = []
            for entry in self._threads:
                if entry[0].is_alive():
                    alive.append(entry)
                else:  # it will not count again: fold it in
                    for total, counts in zip(self._ended, entry[1:], strict=True):
                        for i, c in enumerate(counts):
                            total[i] += c
            self._threads = alive
            ended_b, ended_s = list(self._ended[0]), list(self._ended[1])
        batches = [ended_b[i] + sum(t[1][i] for t in alive) for i in range(self._layers)]
        samples = [ended_s[i] + sum(t[2][i] for t in alive) for i in range(self._layers)]
        last_b, last_s = self._last
        self._last = (batches, samples)
        return [
            (b - lb, s - ls) for b, lb, s, ls in zip(batches, last_b, samples, last_s, strict=True)
        ]


class Monitor:
    """Watches the BatchNorm layers of one model.  Create it with :func:`bnwatch.watch`."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[BatchNormLayer],
        *,
        name: str,
        version: str,
        sink: Sink,
        window_seconds: float | None = 60.0,
        reference: Profile | None = None,
        sample_every: int = 1,
        max_samples_per_batch: int | None = None,
        spatial_stride: int = 1,
        overhead_budget: float | None = 0.02,
        config: DriftConfig | None = None,
        source: str | None = None,
        keep_inputs: int = 0,
        reservoir: int | None = None,
        replacing: Sequence[Monitor] = (),
    ) -> None:
        # watch() checks these before it discovers layers or builds a sink; a Monitor built
        # directly must not accept what every write would then fail on
        check_name("name", name)
        check_name("version", version)
        if source is not None:
            check_text("source", source)
        check_layer_paths(model, layers)
        check_materialized(model, layers)
        if window_seconds is not None and (
            isinstance(window_seconds, bool)
            or not isinstance(window_seconds, (int, float))
            or not 0 < window_seconds < math.inf
        ):
            raise ConfigError(
                "window_seconds",
                window_seconds,
                f"a number of seconds > 0, or None{python_number(window_seconds)}",
            )
        check_positive_int("sample_every", sample_every)
        check_positive_int("spatial_stride", spatial_stride)
        if reservoir is None:
            reservoir = default_reservoir_rows(
                sum(_channels(layer.module) or 0 for layer in layers)
            )
        check_positive_int("reservoir", reservoir, minimum=0)
        if max_samples_per_batch is not None:
            check_positive_int("max_samples_per_batch", max_samples_per_batch)
        if overhead_budget is not None and (
            isinstance(overhead_budget, bool)
            or not isinstance(overhead_budget, (int, float))
            or not 0 < overhead_budget <= 1
        ):
            raise ConfigError("overhead_budget", overhead_budget, "a fraction in (0, 1], or None")
        if config is not None and not isinstance(config, DriftConfig):
            raise ConfigError("config", type(config).__name__, "a bnwatch.DriftConfig")
        if reference is not None and not isinstance(reference, Profile):
            raise ConfigError("reference", type(reference).__name__, "a bnwatch Profile or None")
        self.model_name = name
        self.version = version
        self.source = source or default_source()
        self.config = config or DriftConfig()
        self.window_seconds = None if window_seconds is None else float(window_seconds)
        self._layers = layers
        self._sink = sink
        self._accs = [
            LayerAccumulator(
                layer.name,
                spatial_stride=spatial_stride,
                max_samples_per_batch=max_samples_per_batch,
                reservoir=reservoir,
            )
            for layer in layers
        ]
        self._sampler = _Sampler(sample_every, overhead_budget)
        check_positive_int("keep_inputs", keep_inputs, minimum=0)
        self._inputs = InputRing(keep_inputs, name) if keep_inputs else None
        self._standalone = [0] * len(layers)
        # a frozen BatchNorm normalizes with its stored statistics in train() too
        self._frozen = [layer.frozen for layer in layers]
        self._seen = _SeenCounters(len(layers))
        self._unreported = [(0, 0)] * len(layers)  # seen in windows that measured nothing
        self._tls = threading.local()
        self._errors: Counter[str] = Counter()
        self._error_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._apart: list[threading.Thread] = []  # closing windows for a thread that cannot
        self._windows_closed = 0
        self._window_errors = 0
        self._latest: dict[str, LayerReport] = {}
        self._closed = False
        self._warned_standalone = False
        self._reached = False  # a layer's hook has run, or we said none did (_check_reached)
        # whole graphs compiled after watch() leave the hooks out, and say so (_whole_graph)
        self._whole_graphs_at_watch = _whole_graphs
        self._whole_graph_warned_at_watch = _whole_graph_warned
        self._model_class = type(model).__name__
        # to tell when the model's BatchNorm layers change after watch() (_check_layers)
        self._model = weakref.ref(model)
        self._names_at_watch = frozenset(batchnorm_modules(model))
        self._layers_checked_at = 0  # forwards counted when the layers were last compared
        self._layer_change: tuple[str, ...] = ()  # the change last warned about

        self._running: dict[str, Reference] = {}
        self._buffers: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._lazy: set[str] = set()  # lazy layers not materialized when last snapshotted
        for layer in layers:
            self._snapshot_running(layer)
        self._baseline: dict[str, Reference] = {}
        self._warmup: dict[str, LayerStats] = {}
        self._baseline_kinds: dict[str, str] = {}  # layer -> "profile" or "warmup"
        if reference is not None:
            self._use_profile(reference)

        drop_detached(model)
        # read by the hooks (a fork is a new process id: os.register_at_fork would miss
        # uWSGI's workers, forked in C): set before the first one is added
        self._pid = os.getpid()
        # a monitor of this model inherited from the process this one was forked from is
        # detached quietly: watching again in the child (gunicorn's post_fork hook) is what
        # its warning at the first forward would ask for
        ours = {id(layer.module) for layer in layers}
        for other in list(_LIVE):
            if other._pid != self._pid and (
                other._model() is model or any(id(lay.module) in ours for lay in other._layers)
            ):
                other._detach()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # the monitors this one replaces (watch() run again) stop measuring as this one
        # starts -- both measuring the same forwards in between counted them twice -- and are
        # closed by the caller once it is running (their last window goes to their sink)
        for twin in replacing:
            twin._remove_hooks()
        for idx, layer in enumerate(layers):
            hook = _Hook(_eager(self._bn_hook), idx)
            self._handles.append(layer.module.register_forward_pre_hook(hook))
        # first among the model's pre-hooks: a model that is itself a BatchNorm layer gets its
        # forward decided before its own layer hook runs
        pre, post = _Hook(_eager(self._root_pre)), _Hook(_eager(self._root_post))
        self._handles.append(model.register_forward_pre_hook(pre, prepend=True, with_kwargs=True))
        self._handles.append(model.register_forward_hook(post, always_call=True))

        _LIVE.add(self)
        self._window_start = utcnow()
        self._deadline = time.monotonic() + self.window_seconds if self.window_seconds else math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.window_seconds is not None:
            # the thread holds the monitor weakly: a monitor whose model was dropped without
            # close() is collected, and its thread ends (it kept both alive for ever)
            self._thread = threading.Thread(
                target=_window_loop,
                args=(weakref.ref(self), self._stop),
                name=f"bnwatch-windows-{name}",
                daemon=True,
            )
            self._thread.start()
        acquire(sink)  # shared by several monitors, the sink is closed with the last of them
        # collected without close(): let the sink go (in a thread of its own: a finalizer
        # may run in a thread serving the model, which must not wait for a sink to drain)
        self._finalizer = weakref.finalize(self, _let_go, sink, self._stop, self._pid)
        self._finalizer.atexit = False  # at exit, _close_at_exit closes it properly
        self._warn_training(layers)
        if (url := self.metrics_url) is not None:  # metrics_port=0: the port it picked
            logger.info("bnwatch: metrics of %s@%s are served on %s", name, version, url)

    def _warn_training(self, layers: Sequence[BatchNormLayer]) -> None:
        """Warn once, at attach, if watched layers are in training mode: a model left in
        ``train()`` is a mistake every report flags (``batch_stat_mode``), but only a user who
        reads the reports learns it.  Frozen layers are left out (they ignore the mode), and so
        are layers without running statistics (``track_running_stats=False``): they normalize
        by batch statistics in ``eval()`` too, by design, and ``eval()`` would not change it."""
        training = [
            layer.name
            for layer in layers
            if layer.module.training
            and not layer.frozen
            and getattr(layer.module, "running_mean", None) is not None
        ]
        if not training:
            return
        shown = ", ".join(training[:5]) + (
            f" and {len(training) - 5} more" if len(training) > 5 else ""
        )
        logger.warning(
            "bnwatch: %d of the %d watched BatchNorm layers of %s are in training mode (%s): "
            "they normalize each batch by its own statistics, so an output depends on the "
            "rest of its batch, and every forward updates their running statistics with "
            "production data. For inference call model.eval() (before or after watch()); if "
            "the model is meant to train while watched, this is expected (reports flag "
            "batch_stat_mode)",
            len(training),
            len(layers),
            self.model_name,
            shown,
        )

    # -- references ----------------------------------------------------------------------
    def _snapshot_running(self, layer: BatchNormLayer) -> None:
        """Remember the running statistics as they are now (the gap's reference)."""
        module = layer.module
        rm, rv = module.running_mean, module.running_var
        if rm is None or rv is None:
            return
        if isinstance(rm, UninitializedBuffer):
            self._lazy.add(layer.name)
            return
        self._buffers[layer.name] = (rm.detach().clone(), rv.detach().clone(), _tracked(module))
        if layer.name not in self._running:
            self._running[layer.name] = Reference.running(
                rm.detach().double().cpu().numpy(), rv.detach().double().cpu().numpy()
            )

    def _running_stats_mutated(self, layer: BatchNormLayer) -> bool:
        """Did the stored buffers change since the last window closed?"""
        module = layer.module
        before = self._buffers.get(layer.name)
        rm, rv = module.running_mean, module.running_var
        if before is None and layer.name in self._lazy and not isinstance(rm, UninitializedBuffer):
            # a lazy layer materialized since: its buffers started from the reset values, and a
            # first forward in train() has already moved them
            self._lazy.discard(layer.name)
            assert rm is not None and rv is not None
            before = (torch.zeros_like(rm), torch.ones_like(rv), 0)
            self._buffers[layer.name] = before
            self._running.setdefault(
                layer.name, Reference.running(np.zeros(rm.numel()), np.ones(rv.numel()))
            )
        if before is None or rm is None or rv is None:
            self._snapshot_running(layer)
            return False
        if (rm.dtype, rm.device) != (before[0].dtype, before[0].device):
            # model.half(), .to(torch.bfloat16), .to("cuda") after watch(): the buffers were
            # cast or moved, not updated -- compared as cast, nothing changed
            before = (
                before[0].to(rm.device, rm.dtype),
                before[1].to(rv.device, rv.dtype),
                before[2],
            )
            self._buffers[layer.name] = before
        changed = (
            _tracked(module) != before[2]
            or not torch.equal(rm.detach(), before[0])
            or not torch.equal(rv.detach(), before[1])
        )
        if changed:
            self._buffers[layer.name] = (rm.detach().clone(), rv.detach().clone(), _tracked(module))
        return changed

    def _use_profile(self, profile: Profile) -> None:
        """Take the profile's statistics as the drift baseline of the layers it has.  A
        watched layer the profile lacks -- its data never reached it, such as a branch that
        runs only in training -- warms up instead (with a warning); a profile that shares no
        layer with the model, or gives a layer another channel count, is the wrong one."""
        missing = []
        for layer, acc in zip(self._layers, self._accs, strict=True):
            lp = profile.layers.get(layer.name)
            channels = _channels(layer.module)
            if lp is None:
                missing.append(layer)
                continue
            if channels is not None and channels != lp.channels:
                raise ReferenceMismatchError(layer.name, channels, lp.channels)
            self._baseline[layer.name] = Reference.from_moments(lp.stats.moments)
            self._baseline_kinds[layer.name] = "profile"
            if channels is None:
                acc.channels = lp.channels
        if len(missing) == len(self._layers):
            first = missing[0]
            raise ReferenceMismatchError(first.name, _channels(first.module), None)
        if missing:
            logger.warning(
                "bnwatch: the reference profile %s@%s has no statistics of %s (its data did "
                "not reach them): their drift baseline is the first %d samples after attach",
                profile.name,
                profile.version,
                ", ".join(layer.name for layer in missing),
                self.config.warmup_samples,
            )

    # -- hooks ---------------------------------------------------------------------------
    def _root_pre(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if self._inherited() or _paused(self):  # in a forked child: detach here, once
            return
        start = time.perf_counter()
        tl = self._tls
        try:
            depth = getattr(tl, "depth", 0)
            if depth and not _forward_running(module):
                # left by a forward that a BaseException ended (KeyboardInterrupt, SystemExit,
                # gevent.Timeout): torch runs _root_post only on an Exception
                depth = 0
            if depth == 0:
                tl.t0 = start
                tl.hook_time = 0.0
                tl.measure = (not self._closed) and self._sampler.decide()
                if self._inputs is not None:  # (a call whose forward raised is not kept)
                    tl.pending = self._inputs.add_call(args, kwargs) if tl.measure else None
            tl.depth = depth + 1
            tl.hook_time += time.perf_counter() - start
            if depth == 0:  # every layer hook adds to it: unchanged at the end, none ran
                tl.before_layers = tl.hook_time
        except Exception as err:  # never let monitoring break inference
            self._hook_failed(None, err)

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if _paused(self):
            return
        end = time.perf_counter()
        tl = self._tls
        try:
            depth = getattr(tl, "depth", 0) - 1
            tl.depth = max(depth, 0)
            if depth == 0:
                ring = self._inputs
                pending = getattr(tl, "pending", None) if ring is not None else None
                if ring is not None and pending is not None:
                    tl.pending = None
                    # called on the way out of a forward that raised too (always_call): such
                    # a call is not kept
                    if output is not None or sys.exc_info()[1] is None:
                        ring.commit(pending)
                    else:
                        ring.discard(pending)
                # measured if a layer's hook ran: a graph compiled without them (fullgraph=True)
                # runs the root's hooks alone, and measures nothing
                measured = tl.measure and tl.hook_time != tl.before_layers
                hook_time = tl.hook_time + (time.perf_counter() - end)
                self._sampler.record(end - tl.t0, hook_time, measured)
        except Exception as err:
            self._hook_failed(None, err)

    def _bn_hook(self, idx: int, module: _BatchNorm, args: Any) -> None:
        if _paused(self):
            return
        start = time.perf_counter()
        tl = self._tls
        inside = getattr(tl, "depth", 0) > 0
        try:
            x = args[0]
            n = int(x.shape[0])
            if inside and self._inputs is not None:
                pending = getattr(tl, "pending", None)
                if pending is not None and pending.samples is None:  # the call's samples
                    pending.samples = n
            if inside:
                measure = tl.measure and not self._closed
            else:  # a submodule called directly: no root forward to decide for us
                if self._inherited():
                    return
                if getattr(tl, "depth", None) is None:  # no watched forward in this thread yet
                    model = self._model()
                    if model is not None and _forward_running(model, _CALL_IMPL):
                        return  # one that began before watch() (run again while serving)
                    tl.depth = 0  # not one: this thread calls layers on their own
                if not self._warned_standalone:
                    self._warned_standalone = True
                    logger.warning(
                        "bnwatch: BatchNorm layer %s of %s ran outside a forward of the watched "
                        "model (a submodule called directly, or model.forward(...)): such calls "
                        "are measured every sample_every=%d calls, without the overhead budget, "
                        "and their model time is unknown; watch the module you call",
                        self._layers[idx].name,
                        self.model_name,
                        self._sampler.every,
                    )
                self._standalone[idx] += 1
                measure = not (self._standalone[idx] - 1) % self._sampler.every
                measure = measure and not self._closed
            if measure and n:
                batch_stat = not self._frozen[idx] and (
                    module.training or module.running_mean is None
                )
                try:  # counted as measured by the accumulator, as seen if it fails
                    self._accs[idx].observe(x, batch_stat_mode=batch_stat)
                except Exception:
                    self._seen.add(idx, n)
                    raise
            else:
                self._seen.add(idx, n)
        except Exception as err:  # never let monitoring break inference
            self._hook_failed(idx, err)
        finally:
            elapsed = time.perf_counter() - start
            if inside:
                tl.hook_time += elapsed
            else:
                self._sampler.add_hook_time(elapsed)

    def _hook_failed(self, idx: int | None, err: Exception) -> None:
        where = ROOT_HOOKS if idx is None else self._layers[idx].name
        with self._error_lock:
            first = self._errors[where] == 0
            self._errors[where] += 1
        if first:
            logger.warning(
                "bnwatch: hook on %s raised %s: %s -- counted and ignored; the model is "
                "unaffected (further errors on this layer are only counted)",
                where,
                type(err).__name__,
                err,
                exc_info=err,
            )

    def _inherited(self) -> bool:
        """In a process forked after this monitor was created: remove its hooks (this copy of
        them, the parent's monitor is unaffected), say once what to do, return True."""
        if self._pid == os.getpid():
            return False
        if self._detach():
            logger.warning(
                "bnwatch: the monitor of %s@%s was created in process %d, and this process "
                "(%d) is a fork of it (gunicorn --preload, uWSGI without --lazy-apps, "
                "multiprocessing's fork start method): its threads and its store connection "
                "did not survive the fork, so it is detached here and measures nothing -- call "
                "bnwatch.watch() in the process that runs the model (gunicorn: in the "
                "post_fork hook, or without --preload; uWSGI: in a @postfork function, or "
                "with --lazy-apps)",
                self.model_name,
                self.version,
                self._pid,
                os.getpid(),
            )
        return True

    def _detach(self) -> bool:
        """Close an inherited copy (in a forked process) by removing its hooks; whether it
        was still open."""
        if self._closed:
            return False
        self._closed = True
        self._remove_hooks()
        return True

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- windows -------------------------------------------------------------------------
    def _tick(self) -> float:
        """One turn of the window thread: close the window if it is due; how long to wait."""
        if time.monotonic() >= self._deadline:
            try:
                self._close_window()
            except Exception:  # pragma: no cover - logged; the next window tries again
                self._window_errors += 1
                logger.exception("bnwatch: closing a window failed")
                self._deadline = time.monotonic() + (self.window_seconds or 60.0)
        return max(0.0, self._deadline - time.monotonic())

    def _close_window(self) -> dict[str, LayerReport]:
        if self._inherited():  # the parent's data, and the parent's sink: not ours to report
            return {}
        with self._flush_lock:
            end = utcnow()
            start, self._window_start = self._window_start, end
            if self.window_seconds is not None:
                self._deadline = time.monotonic() + self.window_seconds
            # a layer's batches are counted once: as measured by its accumulator (collected
            # here), or as not measured by the counters (taken here), so a forward running as
            # the window closes is seen in the window that measures it, and the totals are
            # exact.  Unmeasured traffic of windows in which a layer measured nothing is
            # reported with the next window that does (the counters of layer_totals stay whole;
            # what follows the last window that measured anything has none, at close)
            forwards = self._sampler.forwards  # first: their layers' counts are in both below
            unmeasured = self._seen.take()
            collected = {
                layer.name: acc.collect()
                for layer, acc in zip(self._layers, self._accs, strict=True)
            }
            self._check_layers(forwards)
            reached = any(b for b, _ in unmeasured) or any(
                stats is not None and stats.n_batches for stats in collected.values()
            )
            self._check_reached(forwards, reached)
            carried = [
                (b + cb, n + cn)
                for (b, n), (cb, cn) in zip(unmeasured, self._unreported, strict=True)
            ]
            self._unreported = []
            for (b, n), (name, stats) in zip(carried, list(collected.items()), strict=True):
                if stats is None or stats.n_batches == 0:  # not reported: carried
                    self._unreported.append((b, n))
                    continue
                collected[name] = dataclasses.replace(
                    stats, batches_seen=stats.batches_seen + b, samples_seen=stats.samples_seen + n
                )
                self._unreported.append((0, 0))
            assessed: dict[str, LayerReport] = {}
            for layer in self._layers:
                stats = collected[layer.name]
                if stats is None or stats.n_batches == 0:
                    continue  # nothing to report: a change of the buffers waits for a window
                mutated = self._running_stats_mutated(layer)
                baseline = self._baseline.get(layer.name)
                if baseline is not None and baseline.moments is not None:
                    null: ChannelMoments | None = baseline.moments
                elif layer.name in self._warmup:
                    null = self._warmup[layer.name].moments
                else:
                    null = None
                assessed[layer.name] = assess_layer(
                    layer.name,
                    layer.kind,
                    stats,
                    eps=float(layer.module.eps),
                    running=self._running.get(layer.name),
                    baseline=baseline,
                    baseline_kind=self._baseline_kinds.get(layer.name, "warming_up"),
                    null=null,
                    depth=layer.depth,
                    running_stats_mutated=mutated,
                    config=self.config,
                )
            reports = decide(assessed, self.config)
            self._advance_warmup(collected)
            for idx, (layer, acc) in enumerate(zip(self._layers, self._accs, strict=True)):
                stats = collected[layer.name]
                if stats is not None and stats.moments.n_samples:
                    try:  # for the windows to come: this one is reported whatever happens
                        acc.update_shift(stats.moments.mean, stats.moments.var)
                    except Exception as err:
                        self._hook_failed(idx, err)
            if reports:
                own = self.stats()
                record = WindowRecord(
                    model=self.model_name,
                    version=self.version,
                    source=self.source,
                    start=start,
                    end=end,
                    reports=reports,
                    monitor={
                        "overhead_ratio": own.overhead_ratio,
                        "windows_dropped": float(own.windows_dropped),
                        "hook_errors": float(sum(own.hook_errors.values())),
                        "forwards": float(own.forwards),
                        "forwards_measured": float(own.forwards_measured),
                        # the thresholds that decided these flags, stored with the source
                        **config_account(self.config),
                    },
                )
                self._sink.write(record)
                self._windows_closed += 1
                self._latest = reports
            return dict(reports)

    def _check_layers(self, forwards: int) -> None:
        """Warn (once per change) when the model's BatchNorm layers are not those ``watch()``
        found: replaced (``nn.SyncBatchNorm.convert_sync_batchnorm`` before DDP), removed or
        added.  Hooks go on the layers found at ``watch()``: a replaced layer went unmeasured
        without a word, and the only warning blamed ``torch.compile``.  Compared at the close
        of a window in which the model ran (a walk over its modules)."""
        if forwards == self._layers_checked_at:
            return
        self._layers_checked_at = forwards
        model = self._model()
        if model is None:
            return
        now = batchnorm_modules(model)
        replaced = [
            lay.name for lay in self._layers if now.get(lay.name, lay.module) is not lay.module
        ]
        removed = [lay.name for lay in self._layers if lay.name not in now]
        added = sorted(set(now) - self._names_at_watch)
        change = tuple(
            f"{kind} {name}"
            for kind, names in (("replaced", replaced), ("removed", removed), ("added", added))
            for name in names
        )
        if not change or change == self._layer_change:
            return
        self._layer_change = change
        self._reached = True  # no BatchNorm hook ran: this is why, not a compiled graph
        shown = ", ".join(change[:6]) + (f" and {len(change) - 6} more" if len(change) > 6 else "")
        logger.warning(
            "bnwatch: the BatchNorm layers of %s changed after watch() (%s): hooks are put on "
            "the layers found when watch() runs, so the new ones are not measured. Run "
            "bnwatch.watch() again once the model is final (after "
            "nn.SyncBatchNorm.convert_sync_batchnorm, say): it replaces this monitor",
            self.model_name,
            shown,
        )

    def _check_reached(self, forwards: int, reached: bool) -> None:
        """Warn once if whole forwards of the model ran and not one reached a watched layer's
        hook (``reached``: a layer's batch was counted in this window).  The likely cause is a
        ``torch.compile`` graph traced without the hooks: one that must be whole
        (``fullgraph=True``, :func:`_whole_graph` warned when it was traced), or one that
        dynamo reuses, compiled for another instance of the class before ``watch()``.  (A
        forward's layer hooks run before its root post-hook counts it, so ``forwards``, read
        before the layers' counts, cannot count a forward whose layers are not in them yet.)"""
        if self._reached:
            return
        if reached:
            self._reached = True
        elif forwards and _whole_graphs > self._whole_graphs_at_watch:
            self._reached = True  # a whole graph was traced since watch(): that is why
            if self._whole_graph_warned_at_watch:  # said for another model: say it for this
                logger.warning(
                    "bnwatch: %d forwards of %s ran since watch(), and none reached a watched "
                    "BatchNorm layer: %s",
                    forwards,
                    self.model_name,
                    _WHOLE_GRAPH_WARNING,
                )
        elif forwards:
            self._reached = True  # said once
            logger.warning(
                "bnwatch: %d forwards of %s ran since watch(), and none reached a watched "
                "BatchNorm layer. If it runs compiled, torch.compile is reusing a graph it "
                "traced without bnwatch's hooks, for another instance of %s compiled before "
                "watch() (torch does not guard on module hooks by default): set "
                "torch._dynamo.config.skip_nnmodule_hook_guards = False before the first "
                "compile, or watch before compiling any instance",
                forwards,
                self.model_name,
                self._model_class,
            )

    def _advance_warmup(self, collected: Mapping[str, LayerStats | None]) -> None:
        """Until a layer has a baseline, merge its windows into the warm-up; freeze it once
        large."""
        for name, stats in collected.items():
            if name in self._baseline or stats is None or stats.n_batches == 0:
                continue
            stats = dataclasses.replace(stats, reservoir=None)  # the baseline is moments only
            merged = stats if name not in self._warmup else self._warmup[name].merge(stats)
            if merged.moments.n_samples >= self.config.warmup_samples:
                self._baseline[name] = Reference.from_moments(merged.moments)
                self._warmup.pop(name, None)
                self._baseline_kinds[name] = "warmup"
            else:
                self._warmup[name] = merged

    # -- public API ----------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Qualified names of the watched layers, in discovery order."""
        return [layer.name for layer in self._layers]

    @property
    def baseline_ready(self) -> bool:
        """Whether every watched layer has a drift baseline (profile, or finished warm-up)."""
        return all(layer.name in self._baseline for layer in self._layers)

    @property
    def sink(self) -> Sink:
        return self._sink

    @property
    def metrics_url(self) -> str | None:
        """Where this monitor's Prometheus metrics are served (``watch(metrics_port=...)``):
        ``http://addr:port/metrics``, with the port actually bound (``metrics_port=0`` picks a
        free one); ``None`` when none is served -- no ``metrics_port``, the monitor closed, or
        another process of a multi-process server serves them on that port."""
        urls = getattr(self._sink, "urls", None)  # a MonitorExporter (capture imports no export)
        return urls[0] if urls else None

    def flush(self) -> dict[str, LayerReport]:
        """Close the current window now and return its reports (layer name -> report).

        Called where this thread holds the locks a window's close takes -- from a signal
        handler that interrupted a forward of the watched model, or a sink's write -- the
        window is closed by a thread of its own once they are released, and nothing is
        returned (:meth:`_close_apart`)."""
        if self._holding():
            self._close_apart(self._flush_logged)
            return {}
        return self._close_window()

    def _flush_logged(self) -> None:
        try:
            self._close_window()
        except Exception:
            self._window_errors += 1
            logger.exception("bnwatch: closing a window failed")

    def adopt_running_statistics(self, change: Callable[[], object] | None = None) -> None:
        """Take the layers' current running statistics as the new reference of the
        train/inference gap (after a recalibration was applied on purpose), so the change is
        not reported as ``running_stats_mutated``.

        ``change``, when given, is what changes them (``RecalibrationResult.apply``, say): it
        runs under the lock that closing a window takes, so that no window can close between
        the change and its adoption and report it as a mutation.
        """
        with self._flush_lock:
            if change is not None:
                change()
            for layer in self._layers:
                self._running.pop(layer.name, None)
                self._snapshot_running(layer)

    def inputs(self) -> torch.Tensor | None:
        """The most recent model inputs kept with ``keep_inputs`` (oldest first), or ``None``
        (also when the model is called otherwise than with one tensor: see
        :meth:`kept_inputs`).

        They are copies taken on measured forwards -- recent production data to recalibrate
        on: ``bnwatch.recalibrate(model, mon.inputs())``.
        """
        kept = self.kept_inputs()
        return None if kept is None else kept.inputs

    def kept_inputs(self) -> KeptInputs | None:
        """What ``keep_inputs`` kept -- samples of one tensor, or whole calls -- and when the
        oldest and the newest of them arrived, or ``None``.  ``bnwatch.recalibrate(model,
        kept.batches(), forward=kept.forward)`` recalibrates on them as the model was called.
        """
        return None if self._inputs is None else self._inputs.snapshot()

    def latest(self) -> dict[str, LayerReport]:
        """The reports of the last closed window (empty before the first one)."""
        return dict(self._latest)

    def stats(self) -> MonitorStats:
        s = self._sampler
        with self._error_lock:
            errors = dict(self._errors)
        return MonitorStats(
            forwards=s.forwards,
            forwards_measured=s.measured,
            hook_seconds=s.hook_seconds,
            model_seconds=s.model_seconds,
            overhead_ratio=_ratio(s.hook_seconds, s.model_seconds),
            hook_errors=errors,
            windows_closed=self._windows_closed,
            windows_dropped=self._sink.dropped,
            window_errors=self._window_errors,
        )

    @property
    def closed(self) -> bool:
        """Closed, or inherited by a forked process (where it never measures)."""
        return self._closed or self._pid != os.getpid()

    def close(self, timeout: float | None = 30.0) -> dict[str, LayerReport]:
        """Remove the hooks, close the last window, and close the sink -- unless another open
        monitor writes to it too (one sink passed to several ``watch()`` calls), which then
        closes it when it closes.

        Idempotent.  Returns the last window's reports (empty if it saw no data).  Called
        where this thread holds locks that closing takes -- the window thread (a sink's write),
        or a signal handler (SIGTERM in a server's worker) that interrupted a forward of the
        watched model or a window's close -- it returns at once, and a thread of its own closes
        the last window and the sink once they are released (:meth:`_close_apart`).
        """
        if self._inherited() or self._closed:
            return {}
        self._closed = True
        self._remove_hooks()
        self._stop.set()
        self._finalizer.detach()  # closed now: nothing left for the collector to do
        if self._thread is threading.current_thread() or self._holding():
            self._close_apart(self._finish_close, timeout)
            return {}
        return self._finish_close(timeout)

    def _holding(self) -> bool:
        """Whether this thread runs inside a monitor's hook, or a method that holds a lock
        closing a window takes (the flush lock, the error count's): it may hold one -- an
        accumulator's, in a hook -- and would wait for itself for ever.  A signal handler runs
        on top of the frames it interrupted, so the stack says; looked at here, not marked in
        the hooks, which run for every layer of every forward."""
        holding = {Monitor._close_window.__code__, Monitor.stats.__code__}
        holding.add(Monitor.adopt_running_statistics.__code__)
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            if frame.f_code in _frames_skipped or frame.f_code in holding:
                return True
            frame = frame.f_back
        return False

    def _close_apart(self, target: Callable[..., object], *args: object) -> None:
        """Run ``target`` (closing a window) in a thread of its own: it starts at once and waits
        for the locks this thread holds, which it cannot wait for.  A signal handler that exits
        the process next is covered: an interpreter's exit waits for it
        (:func:`_close_at_exit`, within its time)."""
        apart = threading.Thread(target=target, args=args, name="bnwatch-close", daemon=True)
        self._apart = [t for t in self._apart if t.is_alive()] + [apart]
        apart.start()

    def _join_apart(self, deadline: float) -> None:
        """Wait, until ``deadline`` (``time.monotonic()``), for :meth:`_close_apart`'s threads."""
        for apart in list(self._apart):
            apart.join(max(0.0, deadline - time.monotonic()))

    def _finish_close(self, timeout: float | None) -> dict[str, LayerReport]:
        reports: dict[str, LayerReport] = {}
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # stuck in a sink's write, holding the flush lock
                self._window_errors += 1
                logger.error(
                    "bnwatch: the window thread of %s@%s did not finish within %s s (a sink "
                    "that blocks?): its last window is not closed",
                    self.model_name,
                    self.version,
                    timeout,
                )
                release(self._sink, timeout)
                return reports
        try:
            reports = self._close_window()
        except Exception:
            self._window_errors += 1
            logger.exception("bnwatch: closing the last window failed")
        release(self._sink, timeout)
        return reports

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "watching"
        seconds = self.window_seconds
        windows = "windows on flush()" if seconds is None else f"window {seconds:g} s"
        return (
            f"<bnwatch.Monitor {self.model_name}@{self.version} {state} "
            f"{len(self._layers)} BatchNorm layers, {windows}>"
        )


def _ratio(hook: float, model: float) -> float:
    if model:
        return hook / model
    return math.nan if hook else 0.0


def _eager(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` as a hook: run eagerly inside ``torch.compile`` (a graph break) instead of being
    traced -- left out of a graph that must be whole, which cannot break (:func:`_whole_graph`)
    -- and skipped while ``torch.export`` or ``torch.jit.trace`` traces the model: their
    tracing passes are not traffic, a strict export fails on any function the compiler must not
    trace, and a TorchScript trace warned about every conversion the hook made.  Calls under a
    ``torch.func`` transform (``vmap``, ``grad``) are skipped too: the layers see per-example
    tensors there, which no hook can read, in batches of the per-example size."""
    eager = torch.compiler.disable(fn)  # type: ignore[no-untyped-call]
    # marked here, not where defined: importing torch._dynamo costs a second, disable() pays it
    torch._dynamo.assume_constant_result(_whole_graph)  # type: ignore[no-untyped-call]
    # bound once: the checks run on every forward of every layer (~0.4 us together).  An
    # older torch without torch.compiler.is_exporting runs the hooks under export as before
    exporting = getattr(torch.compiler, "is_exporting", _never)
    compiling = getattr(torch.compiler, "is_compiling", _never)
    tracing = torch.jit.is_tracing  # type: ignore[attr-defined]
    # inside torch.func.vmap / grad / jacrev the layers see per-example views that no hook
    # can read (every one raised), and a batch is counted as its per-example size
    transform = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    transformed = transform if transform is not None else _nothing

    def hook(*args: Any) -> None:
        if exporting() or tracing():  # type: ignore[no-untyped-call]
            return None
        if compiling():
            if _whole_graph():
                return None
        elif transformed() is not None:
            return None
        return eager(*args)  # type: ignore[no-any-return]

    _skip_frame(hook.__code__)
    return hook


_frames_skipped: set[CodeType] = set()


def _skip_frame(code: CodeType) -> None:
    """Never let ``torch.compile`` compile ``code`` as a frame of its own.

    Traced inside a compiled forward, the hook wrapper breaks the graph at the eager call, and
    dynamo then compiled the wrapper itself as a frame -- one code object for every hook, with
    guards on each call's arguments -- and recompiled it for every hook kind and input shape:
    the recompile limit was hit, and ``error_on_recompile`` or ``fail_on_recompile_limit_hit``
    made the *model's* forward raise.  Skipped as a frame, the wrapper runs as plain Python
    there; dynamo still inlines it when it traces a forward (``fullgraph`` leaves it out).
    """
    if code in _frames_skipped:
        return
    skip = getattr(getattr(torch._dynamo, "eval_frame", None), "skip_code", None)
    if skip is not None:  # an older torch compiles the wrapper as before
        skip(code)
    _frames_skipped.add(code)


def drop_detached(model: nn.Module) -> None:
    """Remove the no-op hooks a copy of a watched model carries (:class:`Detached`): the model
    is watched anew (or recalibrated), and they would only cost a call each."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(hook, Detached)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_with_kwargs.pop(key, None)


def _never() -> bool:
    return False


def _nothing() -> None:
    return None


_CALL_IMPL = nn.Module._call_impl.__code__


def _forward_running(model: nn.Module, also: CodeType | None = None) -> bool:
    """Whether a forward of ``model`` runs in this thread outside the module call whose hook
    calls this.  A look at the stack, taken only where the forward depth cannot say: in a root
    pre-hook at a depth above 0 (a model that calls itself -- or a forward that a BaseException
    ended, which left the depth behind), in a BatchNorm hook of a thread that has not run a
    watched forward (a forward that began before ``watch()``).  torch's frame that calls a
    module's hooks holds the module as ``self``, and so does that of an outer forward of the
    model -- or, with ``also=_call_impl``'s code, its ``_call_impl`` when it began without
    hooks."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code not in _frames_skipped:  # to the hook's wrapper
        frame = frame.f_back
    if frame is None or (caller := frame.f_back) is None:
        return True  # called otherwise than thought: as before
    codes = (caller.f_code, also)
    outer = caller.f_back
    while outer is not None:
        if outer.f_code in codes and outer.f_locals.get("self") is model:
            return True
        outer = outer.f_back
    return False


_whole_graph_warned = False
"""Once per process: dynamo calls :func:`_whole_graph` once per hook, and compiles the root's
hooks as frames of their own."""
_whole_graphs = 0
"""Hooks :func:`_whole_graph` left out of whole graphs in this process (at trace time): a
monitor whose model then ran and reached no layer knows why (:meth:`Monitor._check_reached`)
instead of blaming a graph reused from another instance."""
_WHOLE_GRAPH_WARNING = (
    "torch.compile(fullgraph=True) of a watched model: the hooks cannot run inside a whole "
    "graph, so the compiled model's forwards are not measured (with alerts on, no_data says "
    "so). Compile without fullgraph=True to keep watching: the hooks then run eagerly between "
    "graphs"
)


def _whole_graph() -> bool:
    """Whether the graph ``torch.compile`` is tracing must be whole (``fullgraph=True``, or
    ``error_on_graph_break``): the hooks cannot break it to run eagerly, so they are left out
    of it -- its forwards are not measured, where the graph break made the compile fail.

    Dynamo calls this once per hook while tracing (``assume_constant_result``, applied by
    :func:`_eager`: the result is a constant of the graph), never at run time.  It reads the
    tracer's private state; on a torch where that is not found the answer is "no", and such a
    compile fails on the hooks as it did before."""
    global _whole_graph_warned, _whole_graphs
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        whole = bool(tx.one_graph or getattr(tx, "error_on_graph_break", False))
    except Exception:  # private API: fall back to the graph break
        return False
    if whole:
        _whole_graphs += 1
        if not _whole_graph_warned:
            _whole_graph_warned = True
            logger.warning("bnwatch: %s", _WHOLE_GRAPH_WARNING)
    return whole


class _Hook(functools.partial[None]):
    """A monitor's hook as PyTorch keeps it on a module; a copy of the module is not watched.

    ``copy.deepcopy(model)`` (an EMA copy, a model to quantize) and pickling the whole model
    (``torch.save(model)``) copy the modules' hook dictionaries.  A plain hook would make the
    copy feed the monitor another model's activations (judged against the original's running
    statistics), and would not pickle at all (the monitor holds threads and locks).  In the
    copy this hook becomes :class:`Detached`, which does nothing.  A ``functools.partial``
    (called in C): the subclass adds nothing to the cost of a call.
    """

    def __reduce__(self) -> tuple[type[Detached], tuple[()]]:
        return (Detached, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> Detached:
        return Detached()


class Detached:
    """What a copy of a watched module holds where the monitor's hook was: a no-op."""

    def __call__(self, *args: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "<bnwatch hook of a copied module: does nothing>"


def _tracked(module: _BatchNorm) -> int:
    nbt = getattr(module, "num_batches_tracked", None)  # a frozen BatchNorm has none
    if nbt is None or isinstance(nbt, UninitializedBuffer):
        return -1
    return int(nbt.item())


def _channels(module: _BatchNorm) -> int | None:
    rm = module.running_mean
    if isinstance(rm, UninitializedBuffer) or isinstance(module.weight, nn.UninitializedParameter):
        return None
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):  # not yet its own class again
        return None  # (a lazy layer without weight or buffers has num_features 0 until then)
    features = getattr(module, "num_features", None)
    if features is None:  # torchvision's frozen BatchNorm: only its buffers say
        return None if rm is None else int(rm.numel())
    return int(features)
