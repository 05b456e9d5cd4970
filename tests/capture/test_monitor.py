"""The Monitor: hooks, windows, sampling, references, robustness (DESIGN §4)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import re
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import bnwatch
from bnwatch.capture.accumulator import LayerAccumulator
from bnwatch.capture.discovery import discover
from bnwatch.capture.monitor import Detached, _Sampler
from bnwatch.drift import config_account, config_from_account
from bnwatch.errors import (
    ConfigError,
    NoBatchNormError,
    ProfileFileError,
    ReferenceMismatchError,
)
from bnwatch.sink import MemorySink
from tests.capture.helpers import full_watch, reference
from tests.client.conftest import wait_for


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
    )


def inputs(n: int, batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Images whose pixels share a per-sample, per-channel brightness (as real images do)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 3, 8, 8, generator=g) + torch.randn(batch, 3, 1, 1, generator=g)
        for _ in range(n)
    ]


def bn_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


# -- the model is never affected -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_and_gradients_are_bit_identical(mode: str) -> None:
    plain = small_cnn()
    watched = copy.deepcopy(plain)
    plain.train(mode == "train")
    watched.train(mode == "train")
    mon = full_watch(watched)
    for x in inputs(5):
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        out_a, out_b = plain(xa), watched(xb)
        assert torch.equal(out_a, out_b)
        out_a.square().sum().backward()
        out_b.square().sum().backward()
        assert torch.equal(xa.grad, xb.grad)  # type: ignore[arg-type]
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), watched.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert mon.flush()["1"].n_batches == 5
    mon.close()


def test_a_deep_copy_of_a_watched_model_is_not_watched() -> None:
    """An EMA copy, a copy to quantize: its forwards are another model's, and must not reach
    the monitor of the original (they were judged against the original's running stats)."""
    model = small_cnn().eval()
    mon = full_watch(model)
    copied = copy.deepcopy(model)
    xs = inputs(3)
    for x in xs:
        model(x)
        assert torch.equal(copied(x * 5 + 3), model(x * 5 + 3))
        model(x)
    reports = mon.flush()
    assert mon.stats().forwards == 9  # the copy's three forwards are not among them
    assert reports["1"].n_batches == 9
    with torch.no_grad():  # what layer "1" received from the watched model alone
        conv = model.get_submodule("0")
        received = [conv(x) for x in [x * 5 + 3 for x in xs] + xs + xs]
    np.testing.assert_allclose(reports["1"].mean, reference(received)["mean"], rtol=1e-6)
    assert {type(h).__name__ for m in copied.modules() for h in m._forward_pre_hooks.values()} == {
        "Detached"
    }
    # the copy can be watched on its own
    own = full_watch(copied)
    copied(xs[0])
    assert own.flush()["1"].n_batches == 1 and mon.stats().forwards == 9
    own.close()
    mon.close()


def test_an_averaged_model_of_a_watched_model_is_not_watched() -> None:
    """``torch.optim.swa_utils.AveragedModel`` (SWA, EMA) deep-copies the model it averages."""
    model = small_cnn().eval()
    mon = full_watch(model)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    averaged(inputs(1)[0] * 5)
    assert mon.stats().forwards == 0 and mon.flush() == {}
    mon.close()


def test_a_watched_model_can_be_saved_whole_and_the_loaded_copy_is_not_watched(
    tmp_path: Any,
) -> None:
    """``torch.save(model)`` pickles the modules' hooks: the monitor's (threads, locks) must
    not make it fail, and the loaded model reports to nobody."""
    model = small_cnn().eval()
    mon = full_watch(model)
    x = inputs(1)[0]
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded(x), model(x))
    assert mon.stats().forwards == 1
    torch.save(loaded, tmp_path / "again.pt")  # the placeholder hooks pickle too
    mon.close()
    assert bn_hooks(model) == 0
    # watching the loaded model drops the placeholders: only the new monitor's hooks remain
    assert bn_hooks(loaded) == 4 and len(loaded._forward_hooks) == 1
    again = full_watch(loaded)
    assert bn_hooks(loaded) == 4 and len(loaded._forward_hooks) == 1
    assert not any(
        isinstance(h, Detached)
        for m in loaded.modules()
        for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
    )
    loaded(x)
    assert again.close()["1"].n_batches == 1
    assert bn_hooks(loaded) == 0 and not loaded._forward_hooks_always_called


def test_watching_a_model_again_closes_the_monitor_it_would_duplicate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A notebook cell or a reloaded module runs the same watch() again: two open monitors
    of one name, version and source would store every window twice, and the first one may
    be out of reach (its variable rebound).  The second closes it; others are left alone."""
    model = small_cnn().eval()
    x = inputs(1)[0]
    first = full_watch(model)
    model(x)
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        second = full_watch(model)
    assert first.closed and not second.closed
    assert [w.reports["1"].n_batches for w in first.sink.windows] == [1]  # type: ignore[attr-defined]
    assert sum("already watched" in r.getMessage() for r in caplog.records) == 1
    assert bn_hooks(model) == 4  # three layers and the root: one monitor's hooks
    model(x)
    assert second.flush()["1"].n_batches == 1
    # another source or another name is another stream in the store: both stay open
    canary = full_watch(model, source="canary")
    other = full_watch(model, name="other")
    assert not any(m.closed for m in (second, canary, other))
    for mon in (second, canary, other):
        mon.close()
    # a watch() that fails leaves the monitor it would have replaced watching
    kept = full_watch(model)
    with pytest.raises(ConfigError, match="window_seconds"):
        full_watch(model, window_seconds=-1)
    assert not kept.closed and bn_hooks(model) == 4
    kept.close()


def test_the_monitor_watched_again_stops_measuring_before_the_new_one_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both measuring between the new monitor's hooks and the old one's close() counted the
    forwards of serving threads twice (3.7 % of the samples under load)."""
    model = small_cnn().eval()
    first = full_watch(model)
    hooks_then: list[int] = []
    remove = type(first)._remove_hooks

    def counting(self: Any) -> None:
        if self is first and self._handles:
            hooks_then.append(bn_hooks(model))
        remove(self)

    monkeypatch.setattr(type(first), "_remove_hooks", counting)
    second = full_watch(model)
    assert hooks_then == [4]  # the old monitor's four hooks alone: the new ones came after
    assert first.closed and bn_hooks(model) == 4
    second.close()


class _Held(nn.Module):
    """Waits between its BatchNorm layers, when told to, until released."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)
        self.hold = False
        self.inside = threading.Event()
        self.release = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(x)
        if self.hold:
            self.inside.set()
            self.release.wait(30)
        out: torch.Tensor = self.bn2(y)
        return out


def test_watch_run_again_while_a_forward_runs_does_not_take_it_for_direct_calls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The new monitor's layer hooks ran in the forwards in flight, which its root pre-hook
    had not seen begin: it warned that the layers ran outside a forward of the model, and
    measured them as direct calls of the layers."""
    model = _Held().eval()
    full_watch(model)
    x = torch.randn(2, 3, 4, 4)
    model.hold = True
    serving = threading.Thread(target=model, args=(x,), daemon=True)
    serving.start()
    assert model.inside.wait(30)
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        second = full_watch(model)  # replaces the first
        model.release.set()
        serving.join(timeout=30)
    assert not serving.is_alive()
    assert "ran outside a forward" not in caplog.text
    model.hold = False
    model(x)
    assert {name: r.n_batches for name, r in second.flush().items()} == {"bn1": 1, "bn2": 1}
    second.close()


class _CallbackSink(MemorySink):
    """A sink that runs ``on_write`` on every window (from the monitor's window thread)."""

    def __init__(self, on_write: Any) -> None:
        super().__init__()
        self.on_write = on_write
        self.closes = 0

    def write(self, window: Any) -> None:
        super().write(window)
        self.on_write()

    def close(self, timeout: float | None = None) -> None:
        self.closes += 1
        super().close(timeout)


def test_close_from_the_window_thread_finishes_and_releases_the_sink() -> None:
    """A sink that closes the monitor from its write (the window thread): close() joined its
    own thread -- RuntimeError -- and the sink was never released."""
    model = small_cnn().eval()
    monitors: list[bnwatch.Monitor] = []
    sink = _CallbackSink(lambda: monitors[0].close())
    mon = bnwatch.watch(model, store=sink, window_seconds=0.05, overhead_budget=None)
    monitors.append(mon)
    model(inputs(1)[0])
    assert wait_for(lambda: sink.closes == 1)
    assert mon.closed and bn_hooks(model) == 0
    assert wait_for(lambda: not any(t.name.startswith("bnwatch-") for t in threading.enumerate()))
    assert [w.reports["1"].n_batches for w in sink.windows] == [1]
    assert mon.close() == {} and sink.closes == 1  # idempotent


def test_close_returns_within_its_timeout_when_a_sink_blocks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sink whose write never returns holds the window thread: close(timeout) waited for
    ever (and so did watch() run again, which closes the old monitor)."""
    release = threading.Event()
    sink = _CallbackSink(lambda: release.wait(30))
    model = small_cnn().eval()
    mon = bnwatch.watch(model, store=sink, window_seconds=0.05, overhead_budget=None)
    model(inputs(1)[0])
    assert wait_for(lambda: len(sink.windows) == 1)  # the window thread is in write()
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="bnwatch"):
        mon.close(timeout=0.3)
    assert time.monotonic() - started < 5
    assert any("did not finish within 0.3 s" in r.getMessage() for r in caplog.records)
    assert bn_hooks(model) == 0
    release.set()


@pytest.mark.parametrize("call", ["close", "flush"])
def test_close_or_flush_from_a_signal_handler_inside_a_hook_neither_hangs_nor_loses_the_window(
    call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM handler (a gunicorn or TorchServe worker's graceful shutdown) runs close() or
    flush() in the thread it interrupts -- here inside a layer's hook, in its accumulator,
    whose lock the window's close takes: the process hung for ever.  The handler then exits
    (SystemExit), as handlers do; the window is still delivered, and an exiting interpreter
    waits for it."""
    model = small_cnn().eval()
    sink = _CallbackSink(lambda: None)
    mon = bnwatch.watch(model, store=sink, window_seconds=None, overhead_budget=None)
    for x in inputs(2):
        model(x)
    acc = mon._accs[0]
    reduce = acc._reduce

    def interrupted(xs: torch.Tensor) -> None:  # the signal lands with the lock held
        reduce(xs)
        assert getattr(mon, call)() == {}  # the handler
        raise SystemExit(0)

    monkeypatch.setattr(acc, "_reduce", interrupted)
    exited = threading.Event()

    def serve() -> None:
        try:
            model(torch.randn(5, 3, 8, 8))  # another batch size: the general path
        except SystemExit:
            exited.set()

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert exited.is_set(), f"{call}() from inside a hook waited for a lock its thread held"
    mon._join_apart(time.monotonic() + 20)  # as an exiting interpreter does (_close_at_exit)
    assert sink.closes == (call == "close")
    (window,) = sink.windows  # the interrupted batch is not in it: its rows were dropped
    assert {name: r.n_batches for name, r in window.reports.items()} == {"1": 2, "3.1": 2, "7": 2}
    mon.close()
    assert sink.closes == 1 and len(sink.windows) == 1


class _Interruptible(nn.Module):
    """Raises ``interrupt`` between its BatchNorm layers, when set; calls itself once on its
    output when ``again``."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)
        self.interrupt: type[BaseException] | None = None

    def forward(self, x: torch.Tensor, again: bool = False) -> torch.Tensor:
        y = self.bn1(x)
        if self.interrupt is not None:
            raise self.interrupt
        out: torch.Tensor = self.bn2(y)
        return self(out) if again else out


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_a_forward_ended_by_a_base_exception_leaves_the_next_ones_watched(
    interrupt: type[BaseException],
) -> None:
    """torch runs an always-called forward hook on an Exception only: a forward ended by a
    KeyboardInterrupt (a notebook), a SystemExit (a signal handler) or a gevent.Timeout left
    its thread's forward depth at 1, and the thread's later forwards went uncounted, measured
    outside the budget (or never), their inputs never kept."""
    model = _Interruptible().eval()
    mon = full_watch(model, keep_inputs=16, sample_every=2)
    x = torch.randn(2, 3, 4, 4)
    model(x)  # measured
    model.interrupt = interrupt
    with pytest.raises(interrupt):
        model(x)  # not measured (one in two), and not counted
    model.interrupt = None
    for _ in range(4):
        model(x)  # the second and the fourth measured
    kept = mon.kept_inputs()
    assert kept is not None and kept.samples == 6  # the measured forwards'
    model(x, again=True)  # measured, and its call of itself with it: one forward
    stats = mon.stats()
    assert (stats.forwards, stats.forwards_measured) == (6, 4)
    reports = mon.flush()
    assert (reports["bn1"].n_batches, reports["bn2"].n_batches) == (5, 5)
    model.interrupt = interrupt
    with pytest.raises(interrupt):
        model(x)  # measured: its first layer's batch is
    model.interrupt = None
    model(x)  # not measured: the interrupted one took its turn
    model(x)
    assert mon.flush()["bn2"].n_batches == 1 and mon.stats().forwards == 8
    mon.close()


def test_a_monitor_whose_model_is_dropped_is_collected_with_its_thread() -> None:
    """A watched model dropped without close(): the window thread held the monitor, which
    held the layers -- both lived, and woke, for ever."""
    import gc
    import weakref

    model = small_cnn().eval()
    sink = _CallbackSink(lambda: None)
    mon = bnwatch.watch(model, name="dropped", store=sink, window_seconds=0.05)
    model(inputs(1)[0])
    gone = weakref.ref(mon)
    del model, mon
    gc.collect()
    assert wait_for(lambda: gone() is None and sink.closes == 1)
    assert wait_for(
        lambda: not any(t.name == "bnwatch-windows-dropped" for t in threading.enumerate())
    )


def test_a_forked_childs_collected_copy_does_not_release_the_parents_sink() -> None:
    """In a forked child a monitor collected releases nothing: its sink is a copy of the
    parent's (connections, queue), not the child's to drain."""
    import os

    from bnwatch.capture.monitor import _let_go

    sink = _CallbackSink(lambda: None)
    stop = threading.Event()
    _let_go(sink, stop, os.getpid() + 1)  # made in another process
    assert not stop.is_set() and sink.closes == 0
    _let_go(sink, stop, os.getpid())
    assert stop.is_set() and wait_for(lambda: sink.closes == 1)


def test_windows_are_stored_when_the_interpreter_exits_without_close(tmp_path: Path) -> None:
    """The window and writer threads are daemons, killed at exit: the last window, and those
    still queued for the writer, were lost without a word."""
    import sqlite3
    import subprocess
    import sys

    db = tmp_path / "exit.db"
    script = f"""
import torch, bnwatch
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
mon = bnwatch.watch(model, store="sqlite:///{db}", window_seconds=60, overhead_budget=None)
for _ in range(40):
    model(torch.randn(5, 4))
mon.flush()  # one window queued for the writer ...
model(torch.randn(5, 4))  # ... and one open
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    with sqlite3.connect(db) as conn:
        ((windows, samples),) = conn.execute(
            "SELECT count(*), sum(samples_seen) FROM windows"
        ).fetchall()
    assert (windows, samples) == (2, 205)


def test_hook_exception_is_counted_logged_once_and_swallowed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = small_cnn().eval()
    want = [model(x) for x in inputs(3)]
    mon = full_watch(model)

    def boom(self: LayerAccumulator, x: torch.Tensor, **_: object) -> None:
        raise RuntimeError("simulated hook failure")

    monkeypatch.setattr(LayerAccumulator, "observe", boom)
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        got = [model(x) for x in inputs(3)]
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert mon.stats().hook_errors == {"1": 3, "3.1": 3, "7": 3}
    warnings = [r for r in caplog.records if "simulated hook failure" in r.getMessage()]
    assert len(warnings) == 3  # once per layer, not once per call
    mon.close()


def test_hooks_are_removed_on_close_and_when_the_with_body_raises() -> None:
    model = small_cnn()
    before = bn_hooks(model)
    with bnwatch.watch(model, window_seconds=None) as mon:
        assert bn_hooks(model) == before + 4  # three BN layers and the root timing hook
    assert bn_hooks(model) == before
    assert mon.closed
    with pytest.raises(KeyError), bnwatch.watch(model, window_seconds=None):
        raise KeyError("user code failed")
    assert bn_hooks(model) == before
    assert not model._forward_hooks


def test_close_is_idempotent_and_returns_the_last_window() -> None:
    model = small_cnn().eval()
    mon = full_watch(model)
    model(inputs(1)[0])
    last = mon.close()
    assert set(last) == {"1", "3.1", "7"}
    assert mon.close() == {}
    model(inputs(1)[0])  # no hooks left: nothing happens
    assert mon.latest().keys() == last.keys()


def test_flush_without_data_returns_nothing() -> None:
    mon = full_watch(small_cnn())
    assert mon.flush() == {}
    assert mon.latest() == {}
    mon.close()


# -- statistics under concurrency ----------------------------------------------------------------
def test_concurrent_threads_lose_nothing_and_merge_exactly() -> None:
    model = small_cnn().eval()
    captured: list[torch.Tensor] = []
    lock = threading.Lock()

    def capture(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        with lock:
            captured.append(args[0].detach().clone())

    handle = model[1].register_forward_pre_hook(capture)  # type: ignore[index]
    mon = full_watch(model)
    batches = [inputs(25, seed=s) for s in range(4)]
    errors: list[BaseException] = []

    def worker(xs: list[torch.Tensor]) -> None:
        try:
            with torch.inference_mode():
                for x in xs:
                    model(x)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handle.remove()
    assert not errors
    report = mon.flush()["1"]
    mon.close()
    assert report.n_batches == 100
    assert report.n_samples == 400
    want = reference(captured)
    np.testing.assert_allclose(report.mean, want["mean"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(report.var, want["var"], rtol=1e-6)
    np.testing.assert_allclose(report.between_var, want["between_var"], rtol=1e-6, atol=1e-9)
    assert mon.stats().forwards == 100


# -- windows and sampling --------------------------------------------------------------------------
def test_windows_close_on_their_own() -> None:
    model = small_cnn().eval()
    sink = MemorySink()
    mon = bnwatch.watch(model, window_seconds=0.2, store=sink, overhead_budget=None)
    deadline = time.monotonic() + 30
    while len(sink.windows) < 2 and time.monotonic() < deadline:
        with torch.inference_mode():
            model(inputs(1)[0])
    mon.close()
    windows = sink.windows
    assert len(windows) >= 2
    for a, b in itertools.pairwise(windows):
        assert a.end == b.start  # contiguous, no gap or overlap
        assert a.model == "model" and a.source
    assert mon.latest().keys() == windows[-1].reports.keys()


def test_sample_every_measures_one_forward_in_k() -> None:
    model = small_cnn().eval()
    mon = full_watch(model, sample_every=3)
    for x in inputs(10):
        model(x)
    r = mon.flush()["1"]
    assert r.n_batches == 4  # forwards 1, 4, 7, 10
    assert r.stats.batches_seen == 10
    s = mon.stats()
    assert (s.forwards, s.forwards_measured) == (10, 4)
    mon.close()


def test_overhead_budget_keeps_the_measured_share_at_the_budget() -> None:
    """Deterministic clock: a measured forward costs 0.1 s of hooks, the model 1 s."""
    sampler = _Sampler(sample_every=1, budget=0.02)
    measured = 0
    for _ in range(5000):
        m = sampler.decide()
        measured += m
        sampler.record(
            forward_seconds=1.0 + (0.1 if m else 0.001),
            hook_seconds=0.1 if m else 0.001,
            measured=m,
        )
    ratio = sampler.hook_seconds / sampler.model_seconds
    assert ratio == pytest.approx(0.02, rel=0.1)
    assert measured / 5000 == pytest.approx((0.02 - 0.001) / 0.1, rel=0.15)
    free = _Sampler(sample_every=1, budget=None)
    assert all(free.decide() for _ in range(10))


def test_budget_is_reported() -> None:
    model = small_cnn().eval()
    mon = bnwatch.watch(model, window_seconds=None)  # default budget 2 %
    for x in inputs(30):
        model(x)
    s = mon.stats()
    assert s.forwards == 30
    assert 1 <= s.forwards_measured <= 30
    assert s.hook_seconds > 0 and s.model_seconds > 0
    assert math.isclose(s.overhead_ratio, s.hook_seconds / s.model_seconds)
    mon.close()


def test_each_window_accounts_for_the_thresholds_that_decided_it() -> None:
    """A window's flags depend on the monitor's DriftConfig: its account of itself names it,
    so a store and every view of merged windows can judge at the same thresholds."""
    model = small_cnn().eval()
    config = bnwatch.DriftConfig(alpha=1e-4, min_shift=5.0, min_samples=4, warmup_samples=64)
    sink = MemorySink()
    with (
        bnwatch.watch(model, store=sink, window_seconds=None, config=config) as mon,
        torch.no_grad(),
    ):
        for x in inputs(3):
            model(x)
        mon.flush()
    (window,) = sink.windows
    assert config_from_account(window.monitor) == config
    assert {k: v for k, v in window.monitor.items() if k.startswith("drift_")} == (
        config_account(config)
    )
    assert {k for k in window.monitor if not k.startswith("drift_")} == {
        "overhead_ratio",
        "windows_dropped",
        "hook_errors",
        "forwards",
        "forwards_measured",
    }


# -- what the report says ----------------------------------------------------------------------
def test_train_mode_reports_batch_stat_mode_and_mutated_running_stats() -> None:
    model = small_cnn().eval()
    mon = full_watch(model)
    for x in inputs(3, batch=2):
        model(x)
    clean = mon.flush()
    assert not any(r.batch_stat_mode or r.running_stats_mutated for r in clean.values())
    model[3][1].train()  # type: ignore[index]  # one layer accidentally left in train()
    for x in inputs(20, batch=2):
        model(x)
    reports = mon.flush()
    mon.close()
    bad = reports["3.1"]
    assert bad.batch_stat_mode and bad.running_stats_mutated
    assert bad.small_batch_mismatch  # batches of 2: batch statistics are very noisy
    assert bad.observed_batch_noise is not None and bad.observed_batch_noise.batch_size == 2
    assert not reports["1"].batch_stat_mode and not reports["1"].running_stats_mutated


def test_watching_a_model_in_training_mode_warns_once_naming_the_layers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A model left in ``train()`` normalizes by batch statistics and rewrites its running
    statistics: only the reports' ``batch_stat_mode`` said so, which a user without a store
    never reads.  Layers that ignore the mode (frozen) or always normalize by batch
    (``track_running_stats=False``) are not named: ``eval()`` would not change them."""
    wide = nn.Sequential(*(nn.BatchNorm1d(4) for _ in range(7)))
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        mon = full_watch(wide.train())
        for _ in range(2):
            wide(torch.randn(8, 4))
        mon.close()
    warned = [r.getMessage() for r in caplog.records if "training mode" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "7 of the 7 watched BatchNorm layers" in warned[0]
    assert "(0, 1, 2, 3, 4 and 2 more)" in warned[0] and "model.eval()" in warned[0]
    caplog.clear()
    mixed = nn.Sequential(
        nn.BatchNorm1d(4).eval(), nn.BatchNorm1d(4, track_running_stats=False), nn.BatchNorm1d(4)
    )
    mixed[2].train()
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        full_watch(mixed).close()
        full_watch(small_cnn().eval()).close()
        full_watch(nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False)).train()).close()
    warned = [r.getMessage() for r in caplog.records if "training mode" in r.getMessage()]
    assert len(warned) == 1 and "1 of the 3 watched BatchNorm layers" in warned[0], warned
    assert "(2)" in warned[0]


def test_running_reference_is_the_attach_snapshot() -> None:
    model = small_cnn().eval()
    bn = model[1]  # type: ignore[index]
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
    mon = full_watch(model)
    with torch.no_grad():
        bn.running_mean.fill_(-7.0)  # changed after attach: reported, not adopted
    model(inputs(1)[0])
    r = mon.flush()["1"]
    mon.close()
    np.testing.assert_array_equal(r.ref_mean, 0.5)
    assert r.running_stats_mutated


def test_warmup_baseline_then_drift() -> None:
    model = small_cnn().eval()
    cfg = bnwatch.DriftConfig(warmup_samples=64)
    mon = full_watch(model, config=cfg)
    for x in inputs(8, batch=4, seed=1):  # 32 samples: still warming up
        model(x)
    first = mon.flush()
    assert all(r.baseline == "warming_up" and math.isnan(r.p_value) for r in first.values())
    for x in inputs(8, batch=4, seed=2):
        model(x)
    mon.flush()
    assert mon.baseline_ready
    for x in inputs(16, batch=4, seed=3):
        model(x)
    same = mon.flush()
    assert all(r.baseline == "warmup" and math.isfinite(r.p_value) for r in same.values())
    assert not any(r.drifted for r in same.values())
    for x in inputs(16, batch=4, seed=4):
        model(x * 3 + 1)  # brighter, higher-contrast images
    shifted = mon.flush()
    mon.close()
    assert shifted["1"].drifted and shifted["1"].frac_drifted > 0.5


# -- torch.compile ---------------------------------------------------------------------------
def test_works_on_a_model_compiled_after_watch() -> None:
    torch.compiler.reset()  # not the graphs another test compiled for this class
    model = small_cnn().eval()
    xs = inputs(3)
    want = [model(x) for x in xs]
    mon = full_watch(model)
    compiled = torch.compile(model)
    with torch.no_grad():
        got = [compiled(x) for x in xs]
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    reports = mon.flush()
    mon.close()
    assert {k: r.n_batches for k, r in reports.items()} == {"1": 3, "3.1": 3, "7": 3}
    assert mon.stats().hook_errors == {}


def test_a_compiled_watched_model_does_not_recompile_the_hooks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dynamo compiled bnwatch's hook wrapper as a frame of its own (one code object for every
    hook) and recompiled it for every hook and input shape: eight recompiles over seven
    forwards hit the recompile limit, and with ``fail_on_recompile_limit_hit`` -- a setting
    users turn on to catch silent fallbacks -- the model's forward raised."""
    import torch._dynamo

    torch.compiler.reset()
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    model = small_cnn().eval()
    mon = full_watch(model)
    compiled = torch.compile(model)
    sizes = [4, 4, 6, 1, 8, 3, 12, 2, 5, 7]
    with torch.no_grad():
        for n in sizes:
            compiled(torch.randn(n, 3, 12, 12))
    reports = mon.flush()
    mon.close()
    torch.compiler.reset()
    assert {k: r.n_samples for k, r in reports.items()} == dict.fromkeys(reports, sum(sizes))
    assert set(reports) == {"1", "3.1", "7"} and mon.stats().hook_errors == {}


def test_calls_under_torch_func_transforms_are_not_measured() -> None:
    """``torch.func.vmap`` over a watched model made every layer's hook raise (caught and
    counted as hook errors), counted the forwards as measured, and put each call's
    per-example batch size into the next window's traffic."""
    model = small_cnn().eval()
    mon = full_watch(model)
    x = torch.randn(5, 2, 3, 12, 12)  # 5 chunks of 2 samples
    with torch.no_grad():
        want = torch.stack([model(chunk) for chunk in x])
        mon.flush()
        got = torch.func.vmap(model)(x)
        torch.func.grad(lambda p: model(p).sum())(x[0])
        assert mon.stats().hook_errors == {} and mon.flush() == {}
        model(x[0])
    reports = mon.flush()
    mon.close()
    torch.testing.assert_close(got, want)
    assert {r.stats.samples_seen for r in reports.values()} == {2}
    assert mon.stats().hook_errors == {}


class _Net(nn.Module):
    """A model class of its own, as real models are (not an ``nn.Sequential``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = small_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def test_a_compiled_graph_without_the_hooks_is_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """dynamo reuses the graph it compiled for one instance of a class for another: a model
    watched after an instance of its class was compiled runs a graph without the layer hooks.
    The monitor counted its forwards and measured nothing, without a word.  (The root's hooks
    still run for a model class of its own; for an ``nn.Sequential`` they are in the reused
    graph too, and the monitor sees no forward at all: only the no_data alert tells.)"""
    torch.compiler.reset()
    try:
        other, model = _Net().eval(), _Net().eval()
        x = inputs(1)[0]
        with torch.no_grad():
            torch.compile(other)(x)  # compiled before watch(), without hooks
            mon = full_watch(model)
            compiled = torch.compile(model)
            compiled(x)
            compiled(x)
        with caplog.at_level(logging.WARNING, logger="bnwatch"):
            assert mon.flush() == {} and mon.stats().forwards == 2
            compiled(x)
            mon.flush()
        warned = [r.getMessage() for r in caplog.records if "none reached" in r.getMessage()]
        assert len(warned) == 1, warned
        assert "2 forwards of model ran" in warned[0] and "skip_nnmodule_hook_guards" in warned[0]
        mon.close()
        # an eager model's layers are reached: no warning
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bnwatch"):
            mon = full_watch(model)
            model(x)
            mon.flush()
            model(x)
            mon.close()
        assert not any("none reached" in r.getMessage() for r in caplog.records)
        # the way out the warning gives: torch's guards on module hooks, before any compile
        torch.compiler.reset()
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), torch.no_grad():
            other, model = _Net().eval(), _Net().eval()
            torch.compile(other)(x)
            mon = full_watch(model)
            torch.compile(model)(x)
            assert {k: r.n_batches for k, r in mon.close().items()} == {
                "body.1": 1,
                "body.3.1": 1,
                "body.7": 1,
            }
    finally:
        torch.compiler.reset()  # this class's graphs have no hooks: not for later tests


def test_a_whole_graph_compile_after_watch_works_and_is_not_measured(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.compile(fullgraph=True)`` cannot break the graph to run the hooks eagerly: the
    compile failed on them.  They are left out of a whole graph, with one warning saying the
    compiled model is not measured; the uncompiled model still is."""
    torch.compiler.reset()  # not the graphs another test compiled for this class
    monkeypatch.setattr("bnwatch.capture.monitor._whole_graph_warned", False)  # once a process
    model = small_cnn().eval()
    xs = inputs(3)
    want = [model(x) for x in xs]
    mon = full_watch(model)
    compiled = torch.compile(model, fullgraph=True)
    with caplog.at_level(logging.WARNING, logger="bnwatch"), torch.no_grad():
        got = [compiled(x) for x in xs]
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert sum("fullgraph=True" in r.getMessage() for r in caplog.records) == 1
    assert mon.stats().forwards == 0 and mon.stats().hook_errors == {}
    model(xs[0])
    assert {k: r.n_batches for k, r in mon.flush().items()} == {"1": 1, "3.1": 1, "7": 1}
    mon.close()


@pytest.mark.parametrize("warned_before", [False, True])
def test_a_whole_graph_compile_of_a_model_class_of_its_own_is_diagnosed_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, warned_before: bool
) -> None:
    """For a model class of its own, the root's hooks run outside a ``fullgraph=True`` graph
    (the layer hooks are left out of it): the monitor counted its forwards as measured
    (``forwards_measured=2``, nothing measured), and at the window's close warned a second
    time, that a graph compiled for another instance before ``watch()`` was reused -- none
    was, and its advice (``skip_nnmodule_hook_guards``) was wrong.  When the process's one
    fullgraph warning was given for another model before, the close says it for this one."""
    torch.compiler.reset()
    monkeypatch.setattr("bnwatch.capture.monitor._whole_graph_warned", warned_before)
    try:
        model = _Net().eval()
        x = inputs(1)[0]
        with caplog.at_level(logging.WARNING, logger="bnwatch"), torch.no_grad():
            mon = full_watch(model)
            compiled = torch.compile(model, fullgraph=True)
            compiled(x)
            compiled(x)
            assert mon.flush() == {}
            compiled(x)
            mon.flush()
        messages = [r.getMessage() for r in caplog.records]
        assert sum("fullgraph=True" in m for m in messages) == 1, messages
        assert not any("skip_nnmodule_hook_guards" in m for m in messages), messages
        if warned_before:
            assert any("2 forwards of model ran" in m and "fullgraph" in m for m in messages)
        stats = mon.stats()
        assert (stats.forwards, stats.forwards_measured) == (3, 0)
        model(x)  # the uncompiled model is measured, and counted so
        assert {k: r.n_batches for k, r in mon.close().items()} == {
            "body.1": 1,
            "body.3.1": 1,
            "body.7": 1,
        }
        assert mon.stats().forwards_measured == 1
    finally:
        torch.compiler.reset()  # this class's graphs have no hooks: not for later tests


@pytest.mark.parametrize("strict", [False, True])
def test_a_watched_model_can_be_exported_and_export_is_not_traffic(strict: bool) -> None:
    """``torch.export`` traces the model with fake tensors: the hooks must not count that as a
    forward or fail on it (they raised on every layer), and a strict export must not fail on
    them (it refused the compiler-disabled hooks).  The exported program is not watched."""
    model = small_cnn().eval()
    mon = full_watch(model)
    x = inputs(1)[0]
    exported = torch.export.export(model, (x,), strict=strict)
    assert mon.stats().forwards == 0 and mon.stats().hook_errors == {}
    assert torch.equal(exported.module()(x), model(x))
    assert mon.flush()["1"].n_batches == 1  # the watched model's own forward, measured
    mon.close()


def test_a_watched_model_can_be_traced_and_tracing_is_not_traffic() -> None:
    """``torch.jit.trace`` runs the model three times: twice traced (the trace and its check),
    which the hooks counted as forwards while the tracer warned about each of their tensor
    conversions, and once eagerly to compare."""
    import warnings

    model = small_cnn().eval()
    mon = full_watch(model)
    x = inputs(1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x)
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]  # type: ignore[attr-defined]
    # of the three, only the check's eager run of the model is a forward like any other
    assert tracer == [] and mon.stats().forwards == 1
    assert torch.equal(traced(x), model(x))
    assert mon.flush()["1"].n_batches == 2
    mon.close()


# -- discovery and arguments -----------------------------------------------------------------------
def test_discovers_every_kind_at_any_depth_and_filters_by_name() -> None:
    model = nn.ModuleDict(
        {
            "a": nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm2d(4))),
            "b": nn.BatchNorm3d(2),
            "sync": nn.SyncBatchNorm(5),
            "lazy": nn.LazyBatchNorm2d(),
            "other": nn.LayerNorm(3),
        }
    )
    names = bnwatch.watch(model, window_seconds=None).layers
    assert names == ["a.0", "a.1.0", "b", "sync", "lazy"]
    assert bnwatch.watch(model, include="a.*", window_seconds=None).layers == ["a.0", "a.1.0"]
    only = bnwatch.watch(model, exclude=["a.*", "lazy"], window_seconds=None).layers
    assert only == ["b", "sync"]


def test_lazy_batchnorm_is_watched_from_its_first_forward() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d()).eval()
    mon = full_watch(model)
    for x in inputs(2):
        model(x)
    r = mon.flush()["1"]
    mon.close()
    assert r.channels == 4 and r.n_batches == 2


@pytest.mark.parametrize("kwargs", [{}, {"affine": False, "track_running_stats": False}])
def test_an_unmaterialized_lazy_batchnorm_takes_a_reference_profile(
    kwargs: dict[str, bool],
) -> None:
    """A lazy layer without weight or buffers (``affine=False, track_running_stats=False``)
    has ``num_features`` 0 until its first forward: a matching profile was refused, "0
    channels in the model but 4 in the reference profile"."""
    ref = bnwatch.profile(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, **kwargs)).eval(),
        inputs(2),
        name="m",
        version="1",
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(**kwargs)).eval()
    mon = bnwatch.watch(model, reference=ref, window_seconds=None, overhead_budget=None)
    with torch.no_grad():
        model(inputs(1)[0])
    r = mon.flush()["1"]
    mon.close()
    assert (r.channels, r.baseline) == (4, "profile")


@pytest.mark.parametrize("train", [False, True])
def test_lazy_batchnorm_first_window_reports_a_mutation_only_in_train_mode(train: bool) -> None:
    # the buffers start from their reset values when the layer materializes; a forward in
    # train() moves them within the very first window, which must not go unnoticed
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d()).train(train)
    mon = full_watch(model)
    for x in inputs(2):
        model(x)
    first = mon.flush()["1"]
    model.eval()
    for x in inputs(2):
        model(x)
    second = mon.flush()["1"]
    mon.close()
    assert first.running_stats_mutated is train
    assert first.batch_stat_mode is train
    assert not second.running_stats_mutated


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_casting_the_model_after_watch_is_not_a_mutation(dtype: torch.dtype) -> None:
    """``model.half()`` after watch(): the buffers were rounded by the cast, not updated, yet
    the window reported ``running_stats_mutated`` (and the alert told the operator to reload
    the checkpoint).  A real update after the cast still is one."""
    model = small_cnn().eval()
    mon = full_watch(model)
    with torch.no_grad():
        model(inputs(1)[0])
        assert not any(r.running_stats_mutated for r in mon.flush().values())
        model.to(dtype)
        model(inputs(1)[0].to(dtype))
        assert not any(r.running_stats_mutated for r in mon.flush().values())
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert bn.running_mean is not None
        bn.running_mean.add_(1)
        model(inputs(1)[0].to(dtype))
        reports = mon.flush()
    mon.close()
    assert [name for name, r in reports.items() if r.running_stats_mutated] == ["1"]


def test_a_mutation_in_a_window_that_measured_nothing_is_reported_with_the_next() -> None:
    model = small_cnn().eval()
    mon = bnwatch.watch(model, window_seconds=None, overhead_budget=None, sample_every=20)
    for x in inputs(2):
        model(x)  # the first forward is measured, the second is not
    assert all(not r.running_stats_mutated for r in mon.flush().values())
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.train()
    model(inputs(1)[0])  # not measured (1 in 20), but it moves the running statistics
    bn.eval()
    assert mon.flush() == {}  # nothing measured: no window
    for _ in range(40):  # until the sampler measures a forward again
        model(inputs(1)[0])
        if mon.stats().forwards_measured > 1:
            break
    reports = mon.flush()
    mon.close()
    assert [name for name, r in reports.items() if r.running_stats_mutated] == ["1"]


def test_traffic_of_a_window_that_measured_nothing_is_counted_with_the_next() -> None:
    # a lightly sampled model: a window without a measured forward is not emitted, and its
    # traffic was lost from batches_seen / samples_seen (and the store's counters)
    model = small_cnn().eval()
    mon = bnwatch.watch(model, window_seconds=None, overhead_budget=None, sample_every=20)
    emitted = []
    forwards = 0
    for burst in (1, 5, 30):
        for x in inputs(burst):
            model(x)
            forwards += 1
        emitted.append(mon.flush())
    mon.close()
    assert [bool(w) for w in emitted] == [True, False, True]
    for name in emitted[0]:
        assert sum(w[name].stats.batches_seen for w in emitted if w) == forwards
        assert sum(w[name].stats.samples_seen for w in emitted if w) == forwards * 4


def test_a_forward_in_flight_as_a_window_closes_is_seen_where_it_is_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forward of another thread counted as seen just after the window read the counters,
    and measured just before it collected the layers, was reported as measured in that window
    and as seen in the next: a window measured more samples than it saw, and when the next
    measured nothing (the last, on close) the store's totals kept it so (764 seen, 784
    measured)."""
    model = small_cnn().eval()
    mon = full_watch(model)
    x = inputs(1)[0]
    model(x)
    take = mon._seen.take

    def take_then_forward() -> list[tuple[int, int]]:
        counts = take()
        monkeypatch.setattr(mon._seen, "take", take)  # once
        worker = threading.Thread(target=model, args=(x,))
        worker.start()
        worker.join(timeout=30)
        return counts

    monkeypatch.setattr(mon._seen, "take", take_then_forward)
    windows = [mon.flush(), mon.flush()]
    model(x)
    windows.append(mon.flush())
    mon.close()
    assert [bool(w) for w in windows] == [True, False, True]
    for name in ("1", "3.1", "7"):
        for w in (windows[0], windows[2]):
            assert w[name].stats.batches_seen >= w[name].n_batches
            assert w[name].stats.samples_seen >= w[name].n_samples
        assert [w[name].stats.batches_seen for w in windows if w] == [2, 1]


def test_a_forward_seen_before_a_window_closes_and_measured_after_is_counted_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forward of another thread counted as seen just before the window read the counters,
    and measured just after it collected the layers, was reported as seen in that window and,
    as the next window measured more than it had counted, as seen in the next one too: that
    window's seen count was raised to what it measured and the difference carried as a
    negative count -- lost when the window was the last (close()), so the store's totals
    over-counted (16,255 samples seen of 16,252 served, two serving threads)."""
    model = small_cnn().eval()
    mon = full_watch(model)
    x = inputs(1)[0]
    model(x)
    acc = mon._accs[0]  # layer "1", the first a forward reaches
    observe = acc.observe
    inside, release = threading.Event(), threading.Event()

    def observe_late(*args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is worker:
            inside.set()  # counted as seen: the window closes before it is measured
            release.wait(timeout=30)
        observe(*args, **kwargs)

    monkeypatch.setattr(acc, "observe", observe_late)
    worker = threading.Thread(target=model, args=(x,))
    worker.start()
    assert inside.wait(timeout=30)
    windows = [mon.flush()]
    release.set()
    worker.join(timeout=30)
    windows.append(mon.close())
    for name in ("1", "3.1", "7"):
        for w in windows:
            assert w[name].stats.batches_seen >= w[name].n_batches
            assert w[name].stats.samples_seen >= w[name].n_samples
        assert sum(w[name].stats.batches_seen for w in windows) == 2, name
        assert sum(w[name].stats.samples_seen for w in windows) == 2 * len(x), name


def test_profiling_a_watched_model_is_not_production_traffic() -> None:
    # the README's order -- watch, then profile on validation data -- counted the validation
    # forwards as production windows
    model = small_cnn().eval()
    mon = full_watch(model)
    ref = bnwatch.profile(model, inputs(3))
    assert ref.layers and mon.stats().forwards == 0
    assert mon.flush() == {}
    for x in inputs(2):
        model(x)
    assert mon.stats().forwards == 2
    assert all(r.n_batches == 2 for r in mon.flush().values())
    mon.close()


def test_model_without_batchnorm_is_a_clear_error() -> None:
    with pytest.raises(NoBatchNormError, match=r"has none .*folded into its convolutions"):
        bnwatch.watch(nn.Sequential(nn.Linear(3, 3)))
    # running statistics of another kind: named, not watched
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True))
    with pytest.raises(NoBatchNormError, match=r"not watched: 1 InstanceNorm2d") as info:
        bnwatch.watch(other)
    assert info.value.others == {"InstanceNorm2d": 1}
    assert bn_hooks(other) == 0
    # a transformer or a ConvNeXt: per-sample normalization stores no statistics
    layered = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(NoBatchNormError, match="normalizes with 2 LayerNorm, which compute"):
        bnwatch.watch(layered)
    with pytest.raises(ValueError, match="no BatchNorm layer matches include"):
        bnwatch.watch(small_cnn(), include="nothing*")


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("window_seconds", 0),
        ("window_seconds", float("inf")),
        ("sample_every", 0),
        ("spatial_stride", 1.5),
        ("max_samples_per_batch", 0),
        ("overhead_budget", 1.5),
        ("include", [3]),
        ("include", 5),
        ("exclude", 5),
        ("sample_every", np.int64(2)),  # a numpy scalar would follow into JSON: int() it
        ("window_seconds", np.float32(5)),
        ("name", ""),
        ("version", 3),
        ("store", "ftp://example.com/bnwatch"),
        ("store", "http://"),
        ("config", {"alpha": 0.1}),
        ("reference", "profile.npz"),
    ],
)
def test_invalid_arguments_name_the_argument(argument: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        bnwatch.watch(small_cnn(), **{argument: value})  # type: ignore[arg-type]
    assert info.value.argument == argument
    assert argument in str(info.value)
    if isinstance(value, np.generic):
        assert "pass int(value)" in str(info.value) or "pass float(value)" in str(info.value)


@pytest.mark.parametrize("call", [bnwatch.profile, bnwatch.recalibrate], ids=lambda f: f.__name__)
@pytest.mark.parametrize("data", [None, 5, "images/"], ids=["None", "int", "str"])
def test_data_that_is_not_batches_names_the_argument(call: Any, data: object) -> None:
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="expected an iterable of batches") as info:
        call(model, data)
    assert info.value.argument == "data"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("argument", "value", "words"),
    [
        ("name", "org/resnet50", "'/' is not allowed"),
        ("version", "..", "'..' is not allowed"),
        ("name", ".", "'.' is not allowed"),
        ("version", "2025-06-01\n", "control characters"),
        ("name", "m\x00", "NUL"),
        ("name", "x" * 201, "at most 200 characters"),
        ("version", "\ud800", "unpaired surrogate"),
        ("source", "host:1\n", "control characters"),
        ("source", "h" * 201, "at most 200 characters"),
    ],
)
def test_names_the_store_or_the_service_cannot_take_fail_at_watch(
    argument: str, value: str, words: str
) -> None:
    """A monitor whose name the store refuses (or the service cannot address) would fail at
    every write; it fails at watch() with what is allowed."""
    model = small_cnn()
    with pytest.raises(ConfigError) as info:
        bnwatch.watch(model, **{argument: value})  # type: ignore[arg-type]
    assert info.value.argument == argument
    assert words in str(info.value)
    assert "characters" in info.value.allowed
    assert bn_hooks(model) == 0


@pytest.mark.parametrize(
    ("argument", "value", "words"),
    [
        ("name", "org/resnet50", "'/' is not allowed"),
        ("version", "2025-06-01\n", "control characters"),
        ("source", "h" * 201, "at most 200 characters"),
    ],
)
def test_a_monitor_built_directly_checks_the_same_names(
    argument: str, value: str, words: str
) -> None:
    """``bnwatch.Monitor`` is public: built without watch(), it refuses the same names, before
    a hook is added."""
    model = small_cnn()
    names = {"name": "cnn", "version": "1", "source": None} | {argument: value}
    with pytest.raises(ConfigError) as info:
        bnwatch.Monitor(model, discover(model), sink=MemorySink(), **names)  # type: ignore[arg-type]
    assert info.value.argument == argument
    assert words in str(info.value)
    assert bn_hooks(model) == 0


def test_a_monitor_built_directly_checks_layer_paths() -> None:
    model = nn.Sequential()
    model.add_module("b\nn", nn.BatchNorm1d(2))
    with pytest.raises(ConfigError, match="module paths the store can hold"):
        bnwatch.Monitor(model, discover(model), name="m", version="1", sink=MemorySink())
    assert bn_hooks(model) == 0


def test_every_other_name_is_accepted_by_watch() -> None:
    for name in ("a b", "a%b", "a?b#c", "é", "a.b", "...", "x" * 200):
        with bnwatch.watch(small_cnn(), name=name, version=name, source=name) as mon:
            assert (mon.model_name, mon.version, mon.source) == (name, name, name)


def test_the_default_source_is_stored_whatever_the_host_name(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``host:pid`` of a host name past the store's 200 characters was refused by PostgreSQL
    at every write (every window rejected); it is shortened to a prefix and a digest, which
    keeps two such hosts apart, and an ordinary host name is left as it is."""
    import os
    import socket

    from bnwatch.schema import text_problem
    from bnwatch.store.migrate import engine_for
    from bnwatch.store.repository import Repository

    pid = os.getpid()
    long_a, long_b = "n" * 230 + ".a.example.com", "n" * 230 + ".b.example.com"
    hosts = (long_a, long_b, "node\udcff7", "gpu-07.example.com")  # the third is not UTF-8
    sources = []
    for version, host in enumerate(hosts):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        model = small_cnn().eval()
        mon = bnwatch.watch(model, name="cnn", version=str(version), store=db_url)
        with torch.no_grad():
            model(inputs(1)[0])
        mon.close()
        assert text_problem(mon.source) is None, mon.source
        assert mon.source.endswith(f":{pid}")
        sources.append(mon.source)
    assert sources[0][:150] == long_a[:150] and len(sources[0]) == 200  # recognisable
    assert sources[0] != sources[1]
    assert sources[2].startswith("node?7~")
    assert sources[3] == f"gpu-07.example.com:{pid}"
    engine = engine_for(db_url, create=False)
    try:
        repo = Repository(engine)
        for version, source in enumerate(sources):
            windows = repo.windows("cnn", str(version))
            assert len(windows) == 3 and {w.source for w in windows} == {source}
    finally:
        engine.dispose()


def _fork_as_uwsgi_does() -> int:
    """fork(2) called from C, as uWSGI forks its workers: Python's at-fork handlers do not run
    (``PyDLL``: the GIL stays held across the call, as in a C caller that holds it)."""
    import ctypes

    return int(ctypes.PyDLL(None).fork())


def _in_a_forked_child(work: Any, fork: Any = None) -> tuple[int, dict[str, Any]]:
    """Run ``work(messages)`` in a forked child (``fork``: ``os.fork`` by default) and return
    the child's pid and the dict ``work`` returned; ``messages`` collects the child's bnwatch
    warnings.  The child never returns into pytest; one that hangs is killed, a test failure."""
    import os

    read, write = os.pipe()
    pid = (fork or os.fork)()
    if pid == 0:  # the child: answer through the pipe and never return into pytest
        code = 1
        try:
            os.close(read)
            torch.set_num_threads(1)  # torch's OpenMP pool does not survive a fork
            messages: list[str] = []
            handler = logging.Handler(logging.WARNING)
            handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
            logging.getLogger("bnwatch").addHandler(handler)
            os.write(write, json.dumps(work(messages)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + 120
    while not (ended := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a child that must end by itself
    if not ended[0]:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    with os.fdopen(read) as pipe:
        child: dict[str, Any] = json.loads(pipe.read() or "{}")
    assert os.waitstatus_to_exitcode(ended[1]) == 0, child
    return pid, child


def test_watching_again_in_a_forked_process_detaches_the_inherited_monitor_quietly() -> None:
    """gunicorn's ``post_fork`` hook runs ``watch()`` in the worker before its first forward,
    as the fork warning advises: the inherited monitor's hooks go then, without the warning
    (it said to do exactly this), and the child's monitor measures alone."""
    model = small_cnn().eval()
    options: dict[str, Any] = {"name": "cnn", "version": "1", "window_seconds": None}
    mon = bnwatch.watch(model, overhead_budget=None, **options)
    xs = inputs(2)

    def in_child(messages: list[str]) -> dict[str, Any]:
        own = bnwatch.watch(model, overhead_budget=None, **options)
        with torch.no_grad():
            model(xs[0])
        return {
            "hooks": bn_hooks(model),
            "inherited_closed": mon.closed and "closed" in repr(mon),
            "batches": own.close()["1"].n_batches,
            "fork_warnings": sum("is a fork of it" in m for m in messages),
        }

    _, child = _in_a_forked_child(in_child)
    assert child == {"hooks": 4, "inherited_closed": True, "batches": 1, "fork_warnings": 0}
    with torch.no_grad():  # the parent's monitor is untouched by its child
        model(xs[1])
    assert bn_hooks(model) == 4 and not mon.closed
    assert mon.close()["1"].n_batches == 1


@pytest.mark.parametrize("fork", ["os.fork", "fork(2) from C"])
def test_a_forked_process_detaches_the_inherited_monitor_and_can_watch_on_its_own(
    db_url: str, fork: str
) -> None:
    """gunicorn --preload, uWSGI without --lazy-apps: the model is watched in the master and
    forked into the workers, where the monitor's threads and store connection do not exist.
    The inherited monitor must neither measure there in silence (nothing would ever be stored)
    nor report the parent's data a second time: it detaches at the child's first forward, says
    so once, and a monitor created in the child stores the child's windows under the child's
    source.  uWSGI forks in C, without the at-fork handlers ``os.fork`` runs: the inherited
    monitor measured on there."""

    from bnwatch.store.migrate import engine_for
    from bnwatch.store.repository import Repository

    model = small_cnn().eval()
    options: dict[str, Any] = {
        "name": "cnn",
        "version": "1",
        "store": db_url,
        "window_seconds": None,
        "overhead_budget": None,
    }
    mon = bnwatch.watch(model, **options)
    xs = inputs(4)
    with torch.no_grad():
        model(xs[0])  # before the fork: the parent's, reported once, by the parent

    def in_child(messages: list[str]) -> dict[str, Any]:
        with torch.no_grad():
            model(xs[1])
            model(xs[2])
        child: dict[str, Any] = {
            "closed": mon.closed and "closed" in repr(mon),
            "hooks": bn_hooks(model),
            "flushed": len(mon.flush()) + len(mon.close()),
            "warnings": sum("is a fork of it" in m for m in messages),
        }
        own = bnwatch.watch(model, **options)
        with torch.no_grad():
            model(xs[3])
        child["batches"] = own.close()["1"].n_batches
        child["source"] = own.source
        return child

    pid, child = _in_a_forked_child(in_child, None if fork == "os.fork" else _fork_as_uwsgi_does)
    assert child == {
        "closed": True,
        "hooks": 0,
        "flushed": 0,
        "warnings": 1,
        "batches": 1,
        "source": child["source"],
    }
    assert child["source"] != mon.source and child["source"].endswith(f":{pid}")
    # the parent's monitor is untouched by its child
    with torch.no_grad():
        model(xs[1])
    assert bn_hooks(model) == 4 and not mon.closed
    assert mon.close()["1"].n_batches == 2
    engine = engine_for(db_url, create=False)
    try:
        stored = Repository(engine).windows("cnn", "1", layer="1")
    finally:
        engine.dispose()
    assert sorted((w.source, w.n_batches) for w in stored) == sorted(
        [(mon.source, 2), (child["source"], 1)]
    )


def test_a_layer_path_longer_than_the_store_holds_fails_at_watch() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model.add_module("b" * 501, nn.BatchNorm1d(3))
    with pytest.raises(ConfigError, match="exclude=") as info:
        bnwatch.watch(model)
    assert "at most 500 characters" in str(info.value)
    assert bn_hooks(model) == 0
    with bnwatch.watch(model, exclude="bbb*") as mon:
        assert mon.layers == ["1"]


def test_a_layer_path_longer_than_the_store_holds_fails_at_profile(db_url: str) -> None:
    """As at watch(): refused before a batch is read, so nothing is computed or stored (it
    was profiled, then stored on SQLite and refused by PostgreSQL after the whole pass)."""
    from bnwatch.store.migrate import engine_for
    from bnwatch.store.repository import Repository

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model.add_module("b" * 501, nn.BatchNorm1d(3))

    def data() -> Iterator[torch.Tensor]:
        yield from ()  # a generator that fails when it is read
        raise AssertionError("read before the layer paths were checked")

    with pytest.raises(ConfigError, match="exclude=") as info:
        bnwatch.profile(model, data(), name="mlp", store=db_url)
    assert info.value.argument == "model"
    assert "at most 500 characters" in str(info.value)
    assert model.training and bn_hooks(model) == 0  # untouched
    engine = engine_for(db_url)
    try:
        assert Repository(engine).models() == []
        prof = bnwatch.profile(model, [torch.randn(8, 3)], name="mlp", exclude="bbb*", store=db_url)
        assert set(prof.layers) == {"1"}
        assert [layer.name for layer in Repository(engine).layers("mlp", "0")] == ["1"]
    finally:
        engine.dispose()


def test_profile_checks_names_before_reading_data() -> None:
    def data() -> Iterator[torch.Tensor]:
        yield from ()  # a generator that fails when it is read
        raise AssertionError("read before the names were checked")

    with pytest.raises(ConfigError, match="'/' is not allowed") as info:
        bnwatch.profile(small_cnn(), data(), name="org/resnet50")
    assert info.value.argument == "name"
    with pytest.raises(ConfigError, match="at most 200") as info:
        bnwatch.profile(small_cnn(), data(), version="v" * 201)
    assert info.value.argument == "version"


# -- reference profiles ---------------------------------------------------------------------------
def test_profile_is_the_baseline_from_the_first_window(tmp_path: object) -> None:
    model = small_cnn().eval()
    data = [(x, torch.zeros(4)) for x in inputs(64, seed=5)]
    prof = bnwatch.profile(model, data, name="cnn", version="1", reservoir_size=100)
    assert set(prof.layers) == {"1", "3.1", "7"}
    assert prof.layers["1"].reservoir.rows.shape == (100, 8)
    assert prof.layers["1"].stats.moments.n_samples == 256
    mon = full_watch(model, reference=prof)
    for x in inputs(8, seed=6):
        model(x)
    same = mon.flush()
    for x in inputs(8, seed=7):
        model(x + 0.5)
    moved = mon.flush()
    mon.close()
    assert all(r.baseline == "profile" for r in same.values())
    assert not any(r.drifted for r in same.values())
    assert moved["1"].drifted


def test_profile_roundtrips_through_a_file(tmp_path: pytest.TempPathFactory) -> None:
    model = small_cnn().eval()
    prof = bnwatch.profile(model, inputs(10), name="cnn", version="7", reservoir_size=16)
    path = prof.save(tmp_path / "profile.npz")  # type: ignore[operator]
    back = bnwatch.Profile.load(path)
    assert (back.name, back.version, back.created) == ("cnn", "7", prof.created)
    for name, lp in prof.layers.items():
        lb = back.layers[name]
        for a, b in zip(lp.stats.moments.as_arrays(), lb.stats.moments.as_arrays(), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(lp.reservoir.rows, lb.reservoir.rows)
        assert lb.reservoir.seen == lp.reservoir.seen == 40
        assert lb.stats.batch_sizes == lp.stats.batch_sizes
        np.testing.assert_array_equal(lp.running_mean, lb.running_mean)  # type: ignore[arg-type]


def test_profile_measures_its_own_data_while_another_thread_serves_the_model() -> None:
    """Profiling a model that a serving thread keeps calling: the profile holds the validation
    data only (exactly: its float64 moments), not the served traffic in between its batches."""
    model = small_cnn().eval()
    validation = inputs(6, seed=5)
    served = threading.Event()
    stop = threading.Event()

    def serve() -> None:
        with torch.no_grad():
            while not stop.is_set():
                model(inputs(1, seed=9)[0] + 100.0)  # traffic far from the validation data
                served.set()

    def data() -> Iterator[torch.Tensor]:
        for x in validation:
            served.clear()
            assert served.wait(10), "the serving thread did not run"  # one served forward
            yield x  # between every two batches

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        prof = bnwatch.profile(model, data())
    finally:
        stop.set()
        thread.join(10)
    with torch.no_grad():  # what the first BatchNorm receives: the first conv's output
        want = reference([model[0](x) for x in validation])  # type: ignore[index]
    got = prof.layers["1"].stats.moments
    assert got.n_samples == 4 * len(validation)
    np.testing.assert_allclose(got.mean, want["mean"], rtol=1e-6)
    np.testing.assert_allclose(got.var, want["var"], rtol=1e-6)


def _edited_profile(source: Path, target: Path, **arrays: Any) -> Path:
    """A copy of the profile file ``source`` with ``arrays`` replaced (``None``: removed)."""
    with np.load(source, allow_pickle=False) as data:
        content = {k: data[k] for k in data.files}
    for key, value in arrays.items():
        if value is None:
            content.pop(key)
        else:
            content[key] = value
    np.savez(target, **content)
    return target


def test_a_file_that_is_no_profile_says_which_and_why(tmp_path: Path) -> None:
    """Truncated, edited or another kind of file: a ProfileFileError naming the file, not a
    BadZipFile, KeyError or IndexError -- nor a profile loaded with wrong shapes."""
    good = bnwatch.profile(small_cnn(), inputs(4), name="cnn", version="1")
    path = good.save(tmp_path / "good.npz")
    raw = path.read_bytes()
    meta = json.loads(np.load(path)["meta"].tobytes())
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.npz").write_text('{"name": "cnn"}')
    np.save(tmp_path / "array.npy", np.zeros(3))
    listed = np.frombuffer(json.dumps([1]).encode(), dtype=np.uint8)
    channels = good.layers["1"].stats.moments.channels
    cases = {
        "cut.npz": "not a profile that Profile.save wrote (BadZipFile",
        "text.npz": "not a profile that Profile.save wrote",
        "array.npy": "not a profile that Profile.save wrote",
        "no-moments.npz": "moments_0",
        "meta-list.npz": "its meta entry is not a profile's description",
        "wide-reservoir.npz": f"layer 1 reservoir: expected shape [k, {channels}]",
        "short-running.npz": f"layer 1 running statistics: expected shape (2, {channels})",
        "flat-moments.npz": "layer 1 moments: expected shape [13, C], found (13,)",
    }
    _edited_profile(path, tmp_path / "no-moments.npz", moments_0=None)
    _edited_profile(path, tmp_path / "meta-list.npz", meta=listed)
    _edited_profile(path, tmp_path / "wide-reservoir.npz", reservoir_0=np.zeros((2, channels + 4)))
    _edited_profile(path, tmp_path / "short-running.npz", running_0=np.zeros((1, channels)))
    _edited_profile(path, tmp_path / "flat-moments.npz", moments_0=np.zeros(13))
    assert meta["layers"][0]["layer"] == "1"
    for name, words in cases.items():
        with pytest.raises(ProfileFileError, match=re.escape(words)) as info:
            bnwatch.Profile.load(tmp_path / name)
        assert str(tmp_path / name) in str(info.value), name
    with pytest.raises(FileNotFoundError):
        bnwatch.Profile.load(tmp_path / "missing.npz")


def test_a_profile_with_half_its_running_statistics_saves_and_loads(tmp_path: Path) -> None:
    prof = bnwatch.profile(small_cnn(), inputs(2))
    layer = prof.layers["1"]
    half = dataclasses.replace(layer, running_var=None)  # saved as none: both or neither
    path = dataclasses.replace(prof, layers={**prof.layers, "1": half}).save(tmp_path / "p.npz")
    back = bnwatch.Profile.load(path)
    assert back.layers["1"].running_mean is None and back.layers["3.1"].running_var is not None


def test_profile_restores_modes_even_when_the_data_raises() -> None:
    model = small_cnn().train()
    model[3].eval()  # type: ignore[index]  # a mixed state must come back as it was

    def data() -> object:
        yield inputs(1)[0]
        raise OSError("disk gone")

    before = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(OSError, match="disk gone"):
        bnwatch.profile(model, data())  # type: ignore[arg-type]
    assert {n: m.training for n, m in model.named_modules()} == before
    assert bn_hooks(model) == 0


def test_profile_accepts_dicts_and_checks_the_key() -> None:
    model = small_cnn()
    data = [{"image": x, "label": 0} for x in inputs(2)]
    assert bnwatch.profile(model, data, input_key="image").layers["1"].stats.n_batches == 2
    with pytest.raises(ConfigError, match="input_key"):
        bnwatch.profile(model, data)


def test_profile_from_another_architecture_is_rejected() -> None:
    prof = bnwatch.profile(small_cnn(), inputs(2))
    other = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Identity(), nn.BatchNorm2d(8))
    with pytest.raises(ReferenceMismatchError, match="'2' is missing from the reference"):
        bnwatch.watch(other, reference=prof)
    renamed = nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5))
    prof2 = bnwatch.profile(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), inputs(2))
    with pytest.raises(ReferenceMismatchError, match="5 channels in the model but 4"):
        bnwatch.watch(renamed, reference=prof2)


class _WithAuxiliary(nn.Module):
    """An Inception-style auxiliary head that runs only in training."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.body(x)
        return self.aux(y) if self.training else y


def test_a_layer_the_profile_data_never_reached_warms_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = _WithAuxiliary().eval()
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        prof = bnwatch.profile(model, inputs(2))
    assert list(prof.layers) == ["body.1"]
    assert "never reached aux.1" in caplog.text
    config = bnwatch.DriftConfig(warmup_samples=8, min_samples=4)
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        mon = full_watch(model, reference=prof, config=config)
    assert "no statistics of aux.1" in caplog.text
    model.train()  # the auxiliary head runs now, and warms up its own baseline
    with torch.no_grad():
        for x in inputs(4):
            model(x)
    first = mon.flush()
    assert first["body.1"].baseline == "profile" and first["aux.1"].baseline == "warming_up"
    with torch.no_grad():
        model(inputs(1)[0])
    assert mon.flush()["aux.1"].baseline == "warmup"
    mon.close()


def test_a_failed_watch_stops_what_it_started(tmp_path: object) -> None:
    import socket

    wrong = bnwatch.profile(nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5)), inputs(1))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(ReferenceMismatchError):
        bnwatch.watch(
            model,
            reference=wrong,
            metrics_port=port,
            store=f"sqlite:///{tmp_path}/x.db",
            window_seconds=None,
        )
    assert {t.name for t in threading.enumerate()} == before  # no writer left running
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # and the metrics port is free again


def test_a_model_that_is_a_batchnorm_layer_keeps_its_budget() -> None:
    bn = nn.BatchNorm2d(4).eval()
    mon = bnwatch.watch(bn, window_seconds=None, overhead_budget=0.001)
    x = torch.randn(2, 4, 3, 3)
    for _ in range(200):
        bn(x)
    s = mon.stats()
    assert s.forwards == 200 and s.forwards_measured < 50  # decided by the root: budgeted
    assert mon.flush()["(root)"].n_batches == s.forwards_measured
    mon.close()


def test_layers_called_outside_the_model_forward_warn_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = small_cnn().eval()
    mon = full_watch(model)
    stem = nn.Sequential(*list(model.children())[:2])  # a submodule called directly
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        for x in inputs(3, batch=2):
            stem(x)  # the model's own hooks do not run
    assert caplog.text.count("ran outside a forward of the watched model") == 1
    s = mon.stats()
    assert s.forwards == 0 and s.hook_seconds > 0 and math.isnan(s.overhead_ratio)
    assert mon.flush()["1"].n_batches == 3
    mon.close()


def test_threads_that_ended_leave_their_counts_and_nothing_else() -> None:
    model = small_cnn().eval()
    mon = full_watch(model)

    def request() -> None:
        with torch.no_grad():
            model(inputs(1, batch=2)[0])

    for _ in range(3):
        threads = [threading.Thread(target=request) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert mon.flush()["1"].n_samples == 40
    assert mon._seen._threads == []  # the ended threads' counters are gone
    mon.close()


def test_scripted_and_compiled_models_are_refused_with_the_way_out() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ConfigError, match="TorchScript runs no Python hooks"):
        bnwatch.watch(torch.jit.script(model))
    compiled: Any = torch.compile(model)  # compiles on its first call: nothing runs here
    with pytest.raises(ConfigError, match=r"compile after bnwatch\.watch"):
        bnwatch.watch(compiled)
    with pytest.raises(ConfigError, match="_orig_mod"):
        bnwatch.recalibrate(compiled, [torch.randn(16, 3, 2, 2)])
    assert bnwatch.recalibrate(compiled._orig_mod, [torch.randn(16, 3, 2, 2)]).samples == 16


def test_the_repr_of_a_monitor_without_timed_windows_reads_well() -> None:
    mon = full_watch(small_cnn().eval())
    assert "windows on flush()" in repr(mon) and "None" not in repr(mon)
    mon.close()
    mon = bnwatch.watch(small_cnn().eval(), window_seconds=30)
    assert repr(mon).endswith("3 BatchNorm layers, window 30 s>")
    mon.close()


def test_a_model_compiled_in_place_is_refused_with_a_way_out_that_exists() -> None:
    """``model.compile()`` compiles the module itself: the advice to pass "an
    OptimizedModule's _orig_mod" named a module that does not exist there."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4))).eval()
    model.compile()
    with pytest.raises(ConfigError, match=r"model\.compile\(\) compiled it in place") as err:
        bnwatch.watch(model)
    assert "_orig_mod" not in str(err.value)
    part = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4))).eval()
    part[1].compile()
    with pytest.raises(ConfigError, match=r"model\.1\.compile\(\) compiled it in place"):
        bnwatch.recalibrate(part, [torch.randn(16, 3, 2, 2)])


def test_a_model_on_the_meta_device_is_refused_with_how_to_materialize_it() -> None:
    """``watch()`` of a model built on the meta device raised torch's ``Tensor.item() cannot
    be called on meta tensors`` from inside the monitor."""
    with torch.device("meta"):
        model = small_cnn().eval()
    with pytest.raises(ConfigError, match="meta device") as err:
        bnwatch.watch(model)
    assert "'1'" in str(err.value) and "to_empty" in str(err.value)
    with pytest.raises(ConfigError, match="meta device"):
        bnwatch.profile(model, [torch.randn(4, 3, 8, 8)])
    model.to_empty(device="cpu").load_state_dict(small_cnn().state_dict())
    mon = full_watch(model)  # materialized: watched
    model(inputs(1)[0])
    assert set(mon.close()) == {"1", "3.1", "7"}


def test_the_metrics_url_says_which_port_metrics_port_0_picked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = small_cnn().eval()
    with caplog.at_level(logging.INFO, logger="bnwatch"):
        mon = full_watch(model, metrics_port=0)
    url = mon.metrics_url
    assert url is not None and re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url), url
    assert not url.endswith(":0/metrics")
    assert any(url in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        assert b"bnwatch_" in response.read()
    mon.close()
    assert mon.metrics_url is None
    plain = full_watch(model)
    assert plain.metrics_url is None
    plain.close()


def test_layers_replaced_after_watch_are_named_and_watch_again_takes_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` after watch() (the usual step before
    DDP) replaces every layer: the next windows were empty without a word, or the one warning
    blamed torch.compile.  The change is named, once, and watch() run again replaces the
    monitor whose layers are gone."""
    model = small_cnn().eval()
    mon = full_watch(model)
    with torch.no_grad():
        model(inputs(1)[0])
        assert set(mon.flush()) == {"1", "3.1", "7"}
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same root, new 2d layers
        model.add_module("extra", nn.BatchNorm1d(6))  # run last by the Sequential
        with caplog.at_level(logging.WARNING, logger="bnwatch"):
            for _ in range(2):
                model(inputs(1)[0])
                assert mon.flush() == {}
    changed = [r.getMessage() for r in caplog.records if "changed after watch()" in r.getMessage()]
    assert len(changed) == 1, changed
    assert "(replaced 1, replaced 3.1, replaced 7, added extra)" in changed[0]
    assert not any("torch.compile" in r.getMessage() for r in caplog.records)
    again = full_watch(model)
    assert mon.closed
    with torch.no_grad():
        model(inputs(1)[0])
    assert set(again.flush()) == {"1", "3.1", "7", "extra"}
    again.close()


def test_a_channel_with_no_finite_value_reports_no_mean_and_no_shift() -> None:
    """A dead sensor (every value NaN in one channel) reported mean 0, so ``d`` = -3 and
    ``d_rms`` 2.1 against running means of 3: a made-up shift, stored and exported.  Its
    mean, ``d`` and ``kl`` are NaN now, as ``var`` was, and the layer's summaries are the
    other channels'."""
    bn = nn.BatchNorm2d(2).eval()
    assert bn.running_mean is not None
    bn.running_mean.fill_(3.0)
    model = nn.Sequential(bn)
    mon = full_watch(model)
    x = 3.0 + torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    x[:, 1] = float("nan")
    with torch.no_grad():
        model(x)
    r = mon.flush()["0"]
    mon.close()
    assert r.nonfinite == 256 and np.isnan([r.mean[1], r.var[1], r.d[1], r.kl[1]]).all()
    assert r.mean[0] == pytest.approx(float(x[:, 0].double().mean()), rel=1e-6)
    assert r.d_rms == pytest.approx(abs(r.d[0]))


def test_a_zero_reference_variance_with_eps_zero_is_an_infinite_kl_and_no_warning() -> None:
    """``eps=0`` and a channel whose running variance is 0 (dead in training): ``kl`` was NaN
    where it is +inf, and numpy's divide-by-zero warning made ``flush()`` raise under
    warnings-as-errors -- after the window was taken, so its data was lost."""
    bn = nn.BatchNorm2d(2, eps=0.0).eval()
    assert bn.running_var is not None
    bn.running_var[1] = 0.0
    model = nn.Sequential(bn)
    mon = full_watch(model)
    with torch.no_grad():
        model(torch.randn(32, 2, 4, 4, generator=torch.Generator().manual_seed(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = mon.flush()["0"]
    mon.close()
    assert np.isfinite(r.kl[0]) and r.kl[1] == np.inf and np.isinf(r.d[1])


def test_a_variance_beyond_float32_is_reported_without_a_warning() -> None:
    """A diverged model (std 1e20: variance 1e40, beyond float32): the window's close cast it
    to float32 for the next windows' shift, which overflowed and warned -- under
    warnings-as-errors, after the window was taken, so it was lost."""
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    sink = MemorySink()
    mon = bnwatch.watch(model, store=sink, window_seconds=None, overhead_budget=None)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in (1.0, 1e20, 1.0):
            with torch.no_grad():
                model(torch.randn(8, 4, generator=g) * scale)
            assert set(mon.flush()) == {"0", "2"}
    mon.close()
    assert len(sink.windows) == 3 and mon.stats().hook_errors == {}
    assert sink.windows[1].reports["0"].var.min() > 1e38


def test_a_failure_preparing_the_next_windows_does_not_lose_this_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shift for the windows to come is set from a window's statistics before the window
    goes to the sink: an error there lost the window."""

    def fails(self: LayerAccumulator, mean: Any, var: Any) -> None:
        raise RuntimeError("simulated")

    monkeypatch.setattr(LayerAccumulator, "update_shift", fails)
    model = small_cnn().eval()
    sink = MemorySink()
    mon = bnwatch.watch(model, store=sink, window_seconds=None, overhead_budget=None)
    model(inputs(1)[0])
    assert set(mon.flush()) == {"1", "3.1", "7"}
    mon.close()
    assert len(sink.windows) == 1 and mon.stats().hook_errors == {"1": 1, "3.1": 1, "7": 1}
