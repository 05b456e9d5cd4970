"""The ``bnwatch demo`` scenario: train, profile, watch production break twice, recalibrate.

1. Train :class:`~bnwatch.demo.digits.DigitsCNN` on scikit-learn digits with +-1 pixel shifts.
2. Record a reference profile on the validation split (``bnwatch.profile``), stored with the
   model version: the drift baseline.
3. Watch the model as production would (``bnwatch.watch(..., reference=profile, store=URL,
   alerts=AlertConfig(), recalibrate=True, keep_inputs=512, metrics_port=0)``): every window
   goes to the store, the alert engine runs after each stored batch, a drift alert triggers an
   in-process recalibration on the kept inputs, and the monitor's Prometheus endpoint is
   scraped once.  Production traffic comes in phases of several windows each, because an
   alert opens only after its condition held in ``open_after`` windows in a row:

   * ``clean`` -- the production split, batch sizes 1 to 64: no drift, but a train/inference
     *gap*: the running statistics were averaged over shifted training images, not clean ones;
   * ``drift`` -- a new camera: the same images with contrast reduced to 60 %.  Every layer
     drifts, accuracy collapses, the drift alert opens after three windows and its trigger
     recalibrates the live model on 384 of the 512 inputs the monitor kept (judged on the other
     128, held out; applied only if they moved closer to the new statistics).  A second pass over
     the same images shows the accuracy after it;
   * ``train-mode`` -- still on the new camera, a redeploy leaves ``bn3`` in ``train()`` while
     a client sends batches of 2: it normalizes with batch statistics (*batch-stat mode*),
     overwrites its running statistics (*mutated*), and the noise of 2-sample statistics is
     large enough to change outputs (*small-batch mismatch*).

4. ``recalibrate`` -- the gap of phase 1, fixed: the trained model is recalibrated on the
   clean (un-augmented) training and validation images (``bnwatch.recalibrate(model,
   clean_loader)``) and measured again on the clean production images: the gap closes.  (The
   359 validation images alone leave a gap in ``head_bn``, some channels' std off by more than
   10 %: its pooled features are class-selective and need more images.)  This step comes last,
   on a copy of the trained model, because the production phases are about the model as it
   was trained, profiled and deployed -- recalibrating first would change what every layer
   below the first receives, invalidate the profile, and hide the gap the phase-1 windows
   show.  It is the fix an operator ships as the next model version.

The printout has one row per window, the alerts and the recalibration as they happen, a
per-layer table of each phase's last window, a closing summary and the command that opens the
dashboard on the result.  :func:`run_demo` returns the same facts as a :class:`DemoResult`.

By default everything is stored in a fresh SQLite database in the output directory
(``bnwatch.db``), built under a temporary name and renamed over the previous run's when the
run succeeds; the trained weights (``model.pt``), the profile (``profile.npz``) and the reports
(``reports.json``) are replaced atomically too, so re-running is safe.  ``store=`` sends the
windows elsewhere: another database (a new, time-stamped model version per run, so a re-run
opens its own alerts), or a bnwatch service (``http(s)://``), which stores the windows and
evaluates the alerts itself, and takes the profile (``POST /api/v1/profiles``); a service
records only the recalibrations its own webhook triggers start (``BNWATCH_WEBHOOK_URL``), so
the demo then acts on the drift alert the service reports and says that its in-process
recalibration was not recorded.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TextIO

import httpx
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bnwatch
from bnwatch.alerts import AlertConfig
from bnwatch.api import is_service_url
from bnwatch.capture import Monitor
from bnwatch.client import HttpSink, ServiceError
from bnwatch.demo import digits
from bnwatch.errors import BnwatchError, ConfigError
from bnwatch.export import MonitorExporter
from bnwatch.recalibration import RecalibrationResult
from bnwatch.schema import LayerReport, Profile
from bnwatch.store.engine import parse_url, redacted
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from bnwatch.store.writer import StoreSink
from bnwatch.triggers import RecalibrateAction, TriggerEvent

MODEL_NAME = "digits-cnn"
FULL_EPOCHS = 30
QUICK_EPOCHS = 10
PRODUCTION_BATCH_SIZES = (1, 8, 32, 2, 64, 16, 4, 128)
"""Clean and drifted traffic cycles through these batch sizes (single images included); a
window holds ~180 images, so its 128 is cut to what is left (53): sizes 1 to 64 are sent."""
WINDOWS_PER_PASS = 3
"""Each pass over the production images is cut into this many windows (``mon.flush()``)."""
DRIFT_PASSES = 2
"""The drifted images are sent twice: before and after the recalibration their alert starts."""
KEEP_INPUTS = 512
"""``watch(..., keep_inputs=)``: the recent inputs a triggered recalibration works on."""
CONTRAST_FACTOR = 0.6
TRAIN_MODE_LAYER = "bn3"
"""The layer the ``train-mode`` phase leaves in ``train()``."""
TRAIN_MODE_BATCH_SIZE = 2
DATABASE_FILE = "bnwatch.db"
DELIVERY_TIMEOUT = 60.0
"""Seconds to wait for the store or service to take a window before giving up."""
LINE_WIDTH = 100
"""Every line the demo prints fits in this many columns (but lines naming the user's paths)."""


class DemoStoreError(BnwatchError):
    """The store or bnwatch service the demo writes to cannot be reached or refused windows."""


@dataclass(frozen=True)
class WindowResult:
    """One closed window: the traffic sent in it and what the monitor reported.

    Attributes:
        index: 1-based, within its phase.
        n_images: images sent in the window.
        accuracy: share of them the model classified correctly.
        reports: the window's report per watched layer (from ``mon.flush()``).
    """

    index: int
    n_images: int
    accuracy: float
    reports: Mapping[str, LayerReport]


@dataclass(frozen=True)
class AlertEvent:
    """An alert that opened or resolved after a window was stored (read back from the store)."""

    id: int
    action: str
    """``opened`` or ``resolved``."""
    kind: str
    layer: str | None
    phase: str
    window: int
    """The window of ``phase`` (1-based) after which it opened or resolved."""


@dataclass(frozen=True)
class RecalibrationEvent:
    """A recalibration the drift alert triggered during the run.

    Attributes:
        id: its id in the store (``None`` when it could not be recorded: a bnwatch service).
        status: ``applied``, ``rejected``, ``failed`` or ``pending``.
        method: the recalibration method.
        alert: the alert that triggered it.
        phase, window: the phase and its window (1-based) after which it ran.
        outcome: what the action reported (kept samples, held-out KL before/after, ...).
        recorded: whether the store has it (``recalibrations`` table).
    """

    id: int | None
    status: str
    method: str
    alert: AlertEvent | None
    phase: str
    window: int
    outcome: Mapping[str, Any]
    recorded: bool


@dataclass(frozen=True, eq=False)
class PhaseResult:
    """One phase of production traffic and the windows the monitor closed during it.

    Attributes:
        name: short id (``clean``, ``drift``, ``train-mode``).
        title: one-line description, as printed.
        windows: the phase's windows, in order.
        batch_sizes: the distinct batch sizes sent, ascending.
        train_mode_layers: layers that were in ``train()`` during the phase.
    """

    name: str
    title: str
    windows: tuple[WindowResult, ...]
    batch_sizes: tuple[int, ...]
    train_mode_layers: tuple[str, ...]

    @property
    def n_images(self) -> int:
        """Images sent in the phase (all windows)."""
        return sum(w.n_images for w in self.windows)

    @property
    def accuracy(self) -> float:
        """Share of the phase's images classified correctly."""
        return accuracy_of(self.windows)

    @property
    def reports(self) -> Mapping[str, LayerReport]:
        """The reports of the phase's last window."""
        return self.windows[-1].reports

    def layers_where(self, flag: str, *, any_window: bool = False) -> list[str]:
        """Layers whose report has the boolean field ``flag`` set (e.g. ``"drifted"``) in the
        phase's last window, or with ``any_window`` in at least one of its windows."""
        windows = self.windows if any_window else self.windows[-1:]
        return [
            name
            for name in self.reports
            if any(bool(getattr(w.reports[name], flag)) for w in windows if name in w.reports)
        ]


def accuracy_of(windows: Sequence[WindowResult]) -> float:
    """Share of the images of ``windows`` classified correctly (NaN for none)."""
    total = sum(w.n_images for w in windows)
    if not total:
        return math.nan
    return sum(w.accuracy * w.n_images for w in windows) / total


@dataclass(frozen=True, eq=False)
class CleanRecalibration:
    """Step 4: the trained model recalibrated on clean training and validation images.

    Attributes:
        result: what ``bnwatch.recalibrate`` returned (applied to a copy of the trained
            model), judged on the clean production images.
        before, after: a window over the clean production images with the trained and with
            the recalibrated statistics (``gap`` and ``d_rms`` per layer).
        accuracy_before, accuracy_after: accuracy on the clean production images.
    """

    result: RecalibrationResult
    before: Mapping[str, LayerReport]
    after: Mapping[str, LayerReport]
    accuracy_before: float
    accuracy_after: float

    def gap_layers(self, which: str) -> list[str]:
        """Layers with a train/inference gap ``"before"`` or ``"after"`` the recalibration."""
        reports = self.before if which == "before" else self.after
        return [name for name, r in reports.items() if r.gap]


@dataclass(frozen=True, eq=False)
class DemoResult:
    """Everything the demo did, for tests and for callers that want more than the printout.

    Attributes:
        seed: the seed of the split, the weights, the augmentation and the corruptions.
        quick: whether the short training schedule was used.
        model_name, version: as passed to ``bnwatch.profile`` and ``bnwatch.watch``.
        model: the trained model, in ``eval()`` mode with its trained running statistics
            (restored after production recalibrated and overwrote them).
        layers: the watched BatchNorm layers, in discovery order.
        split_sizes: images in (train, validation, production).
        training: epochs, time and training accuracy.
        validation_accuracy: accuracy on the validation split after training.
        profile: the reference profile recorded on the validation split.
        phases: the production phases, in order.
        alerts: the alerts that opened during the run, in order.
        recalibration: the recalibration the drift alert triggered (``None``: none did).
        drift_accuracy: accuracy on the drifted images before and after that recalibration.
        clean_recalibration: step 4, recalibrating the trained model on clean data.
        store: where the windows went (a database URL or a service URL; password hidden);
            ``None`` when the demo's database was temporary (no output directory).
        profile_stored: whether the whole profile (with its reservoir, the reference of
            drift reports) is in the store: always, since services take profiles too.
        layer_windows_stored: rows in the store's ``windows`` table for this model version
            (one per layer and window).
        metrics_url: the monitor's Prometheus endpoint while the demo ran.
        metrics_sample: the ``bnwatch_layer_drifted`` lines one scrape of it returned.
        dashboard_command: the command that opens the dashboard on the result (``None``
            when the store is a service, whose own dashboard shows it, or temporary).
        files: the files written (empty without an output directory).
        seconds: wall time of the whole run.
    """

    seed: int
    quick: bool
    model_name: str
    version: str
    model: digits.DigitsCNN
    layers: tuple[str, ...]
    split_sizes: tuple[int, int, int]
    training: digits.TrainResult
    validation_accuracy: float
    profile: Profile
    phases: tuple[PhaseResult, ...]
    alerts: tuple[AlertEvent, ...]
    recalibration: RecalibrationEvent | None
    drift_accuracy: tuple[float, float]
    clean_recalibration: CleanRecalibration
    store: str | None
    profile_stored: bool
    layer_windows_stored: int
    metrics_url: str
    metrics_sample: tuple[str, ...]
    dashboard_command: str | None
    files: tuple[Path, ...]
    seconds: float

    def phase(self, name: str) -> PhaseResult:
        """The phase called ``name``; ``KeyError`` lists the names that exist."""
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase {name!r}; phases: {[p.name for p in self.phases]}")

    @property
    def windows(self) -> int:
        """Windows closed during the production phases."""
        return sum(len(p.windows) for p in self.phases)


def run_demo(
    out_dir: str | os.PathLike[str] | None = "bnwatch-demo",
    *,
    seed: int = 0,
    quick: bool = False,
    store: str | None = None,
    stream: TextIO | None = None,
    progress: bool | None = None,
) -> DemoResult:
    """Run the demo scenario (module docstring), print it to ``stream``, return the results.

    Args:
        out_dir: directory for ``model.pt``, ``profile.npz``, ``reports.json`` and (without
            ``store``) ``bnwatch.db`` -- created if missing, files replaced if present;
            ``None`` writes nothing (the database lives in a temporary directory).
        seed: a non-negative integer; the same seed gives the same split, weights and reports.
        quick: train for fewer epochs (for tests and a fast look).
        store: where the windows go instead of ``<out_dir>/bnwatch.db``: a SQLAlchemy URL, or
            the ``http(s)://`` URL of a bnwatch service (token from ``$BNWATCH_API_TOKEN``).
        stream: where to print (default ``sys.stdout``).
        progress: show progress bars on stderr (default: when stderr is a terminal).

    Raises:
        ConfigError: ``seed``, ``out_dir`` or ``store`` is invalid.
        DemoStoreError: the service is unreachable, or the store did not take the windows.
        DemoDependencyError: scikit-learn is missing.
        OSError: the output directory cannot be created or written.
    """
    start = time.perf_counter()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("seed", seed, "an integer >= 0")
    if store is not None:
        _check_store(store)
    out = _prepare_out_dir(out_dir)
    show = sys.stderr.isatty() if progress is None else progress
    emit = _printer(stream or sys.stdout, show)
    with _single_torch_thread(), _quiet_reported_events(), _Target.open(store, out) as target:
        return _run(out, target, seed=seed, quick=quick, emit=emit, progress=show, start=start)


@contextmanager
def _single_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the block, then restore the previous setting.

    The model is tiny: one thread is faster than several (which spin-wait on each other and
    slow down by an order of magnitude on a busy machine), and float reductions then happen
    in the same order on every machine, so a seed gives the same weights everywhere.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _ReportedByTheDemo(logging.Filter):
    """Drops the log records of alert changes and trigger outcomes: the demo prints them."""

    PREFIXES = ("bnwatch alert ", "bnwatch: recalibration %d of")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


@contextmanager
def _quiet_reported_events() -> Iterator[None]:
    logger = logging.getLogger("bnwatch")
    quiet = _ReportedByTheDemo()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


# --------------------------------------------------------------------------------------
# Where the windows go
# --------------------------------------------------------------------------------------
def _check_store(store: object) -> None:
    if not isinstance(store, str) or not store.strip():
        raise ConfigError("store", store, "a database URL or a bnwatch service URL")
    if not is_service_url(store):
        parse_url(store, argument="store")


@dataclass
class _Target:
    """The store of one run: the URL windows are written to, how to read them back, and --
    for the demo's own SQLite file -- the temporary file that replaces the previous one."""

    url: str
    """What ``watch``/``profile`` get (a temporary file for the demo's own database)."""
    shown: str | None
    """The store as printed and returned (the final file; ``None``: temporary)."""
    service: bool
    own_database: bool = False
    """Whether this is the demo's fresh SQLite file (not a store the user named)."""
    _repository: Repository | None = field(default=None, repr=False)

    @classmethod
    @contextmanager
    def open(cls, store: str | None, out: Path | None) -> Iterator[_Target]:
        if store is not None:
            service = is_service_url(store)
            url = store.strip().rstrip("/") if service else store
            target = cls(url, url if service else redacted(store), service)
            try:
                yield target
            finally:
                target.close()
            return
        directory = out if out is not None else Path(tempfile.mkdtemp(prefix="bnwatch-demo-"))
        final = directory / DATABASE_FILE
        tmp = _temporary(directory / DATABASE_FILE)
        target = cls(
            f"sqlite:///{tmp.resolve()}",
            f"sqlite:///{final.resolve()}" if out is not None else None,
            service=False,
            own_database=True,
        )
        try:
            yield target
            target.close()
            if out is not None:
                _replace_database(tmp, final)
        finally:
            target.close()
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)
            if out is None:
                shutil.rmtree(directory, ignore_errors=True)

    @property
    def repository(self) -> Repository:
        """The store, for reading back alerts and recalibrations (not for a service)."""
        if self._repository is None:
            self._repository = Repository(engine_for(self.url, create=False))
        return self._repository

    def close(self) -> None:
        if self._repository is not None:
            self._repository.engine.dispose()
            self._repository = None

    # -- reading back what the alert engine and the triggers did ---------------------------
    def check_reachable(self) -> None:
        """A service must answer ``/healthz`` before training starts."""
        if not self.service:
            return
        try:
            answer = httpx.get(f"{self.url}/healthz", timeout=10.0)
        except httpx.HTTPError as err:
            raise DemoStoreError(
                f"cannot reach the bnwatch service at {self.url} ({type(err).__name__}: {err}); "
                "start it with `bnwatch serve`, or leave out --store"
            ) from err
        if answer.status_code != 200:
            raise DemoStoreError(
                f"the bnwatch service at {self.url} is not healthy (/healthz answered "
                f"HTTP {answer.status_code})"
            )

    def alerts(self, version: str) -> list[tuple[int, str, str | None, str]]:
        """(id, kind, layer, state) of every alert of the demo's model version, oldest
        first."""
        if self.service:
            answer = self._get_pages("/api/v1/alerts", model=MODEL_NAME, version=version)
            rows = [(int(a["id"]), str(a["kind"]), a.get("layer"), str(a["state"])) for a in answer]
        else:
            infos = self.repository.alerts(model=MODEL_NAME, version=version)
            rows = [(a.id, a.kind, a.layer, a.state) for a in infos]
        return sorted(rows)

    def recalibrations(
        self, version: str
    ) -> list[tuple[int, str, str, int | None, dict[str, Any]]]:
        """(id, status, method, alert id, outcome) of the version's recorded recalibrations
        (a service records none through the demo)."""
        if self.service:
            return []
        infos = self.repository.recalibrations(model=MODEL_NAME, version=version)
        return sorted((r.id, r.status, r.method, r.alert_id, dict(r.outcome or {})) for r in infos)

    def layer_windows(self, version: str) -> int:
        """Stored layer-windows of the version."""
        if self.service:
            models = self._get("/api/v1/models")
            return sum(
                int(m["windows"])
                for m in models
                if m["name"] == MODEL_NAME and m["version"] == version
            )
        return sum(
            m.windows
            for m in self.repository.models()
            if m.name == MODEL_NAME and m.version == version
        )

    def _get(self, path: str, **params: str) -> Any:
        try:
            answer = httpx.get(f"{self.url}{path}", params=params, timeout=10.0)
            answer.raise_for_status()
        except httpx.HTTPError as err:
            raise DemoStoreError(f"reading {path} from {self.url} failed: {err}") from err
        return answer.json()

    def _get_pages(self, path: str, **params: str) -> list[Any]:
        """Every page of a paged list (``GET /api/v1/alerts``), following its ``Link``
        headers (``rel="next"``)."""
        rows: list[Any] = []
        url: str | None = f"{self.url}{path}"
        while url is not None:
            try:
                answer = httpx.get(url, params=params or None, timeout=10.0)
                answer.raise_for_status()
            except httpx.HTTPError as err:
                raise DemoStoreError(f"reading {path} from {self.url} failed: {err}") from err
            rows += answer.json()
            url, params = answer.links.get("next", {}).get("url"), {}
        return rows


def _replace_database(tmp: Path, final: Path) -> None:
    """Make ``tmp`` (closed) the database at ``final`` in one rename.

    The temporary database leaves WAL mode first, so it is one self-contained file; the
    previous database's ``-wal``/``-shm`` files go before the rename, or SQLite would replay
    an old log into the new file.  bnwatch's engines put the file back in WAL mode when they
    open it.
    """
    with sqlite3.connect(tmp) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{final}{suffix}").unlink(missing_ok=True)
    tmp.replace(final)


def _delivery(mon: Monitor) -> StoreSink | HttpSink:
    """The sink that delivers the monitor's windows (under the Prometheus exporter)."""
    sink: object = mon.sink
    if isinstance(sink, MonitorExporter):
        sink = sink.inner
    if not isinstance(sink, (StoreSink, HttpSink)):  # pragma: no cover - watch() picks these
        raise TypeError(f"unexpected sink {type(sink).__name__}")
    return sink


def _wait_delivered(mon: Monitor, target: _Target) -> None:
    """Wait until the store took every closed window (and, for a database, the alert engine
    and the triggers ran on them): the demo then reads back what they did."""
    sink = _delivery(mon)
    if not sink.flush(DELIVERY_TIMEOUT):
        error = sink.stats().last_error or "no answer"
        raise DemoStoreError(
            f"{target.shown or target.url} did not take the demo's windows within "
            f"{DELIVERY_TIMEOUT:.0f} s (last error: {error})"
        )


# --------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Traffic:
    """One phase's production traffic: ``passes`` over the images, each cut into
    :data:`WINDOWS_PER_PASS` windows, in batches of ``batch_sizes`` (cycled)."""

    name: str
    title: str
    images: Tensor
    labels: Tensor
    batch_sizes: list[int]
    passes: int = 1
    train_mode_layer: str | None = None


class _Emit(Protocol):
    def __call__(self, line: str = "") -> None: ...


def _run(
    out: Path | None,
    target: _Target,
    *,
    seed: int,
    quick: bool,
    emit: _Emit,
    progress: bool,
    start: float,
) -> DemoResult:
    """The scenario of :func:`run_demo`, after its arguments have been checked."""
    version = f"seed-{seed}"
    if not target.own_database:  # a shared store: a new model version per run, with its own alerts
        version += f"-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    epochs = QUICK_EPOCHS if quick else FULL_EPOCHS
    target.check_reachable()

    emit(f"bnwatch demo: BatchNorm monitoring on scikit-learn digits (seed {seed})")
    emit()
    splits = digits.load_splits(seed)
    n_train, n_val, n_prod = splits.sizes
    emit(
        f"data      {n_train} train / {n_val} validation / {n_prod} production images "
        "(8x8, scaled to [0, 1])"
    )
    model = digits.make_model(seed)
    n_params = sum(p.numel() for p in model.parameters())
    with _bar(progress, epochs, "training", "epoch") as advance:
        training = digits.train(
            model,
            splits.train_x,
            splits.train_y,
            epochs=epochs,
            seed=seed,
            on_epoch=lambda _: advance(1),
        )
    val_accuracy = digits.accuracy(model, splits.val_x, splits.val_y)
    emit(
        f"training  {digits.DigitsCNN.__name__} ({n_params:,} parameters), {epochs} epochs "
        f"with +-1 pixel shifts in {training.seconds:.1f} s"
    )
    emit(f"          accuracy: train {training.train_accuracy:.1%}, validation {val_accuracy:.1%}")
    checkpoint = _state_bytes(model)

    if target.own_database:
        where = "a new SQLite database" + (
            ", replacing the previous run's at the end" if target.shown else " (temporary)"
        )
    elif target.service:
        where = "a bnwatch service, which stores the windows and evaluates the alerts"
    else:
        where = "a database of your own: a new model version in it"
    emit(f"store     {target.shown or target.url}")
    emit(f"          {where}")
    emit(f"          model {MODEL_NAME}, version {version}")
    val_loader = DataLoader(TensorDataset(splits.val_x, splits.val_y), batch_size=64)
    try:
        profile = bnwatch.profile(
            model, val_loader, name=MODEL_NAME, version=version, store=target.url
        )
    except ServiceError as err:
        raise DemoStoreError(f"the bnwatch service did not take the profile: {err}") from err
    layers = tuple(profile.layers)
    stored = "uploaded to the service" if target.service else "stored"
    emit(
        f"profile   bnwatch.profile(model, validation images): {n_val} samples per layer, {stored}"
    )
    emit(f"          {len(layers)} BatchNorm layers: {', '.join(layers)}")

    alert_config = AlertConfig()
    x, y = splits.prod_x, splits.prod_y
    drifted = digits.reduce_contrast(x, CONTRAST_FACTOR)
    sizes = list(PRODUCTION_BATCH_SIZES)
    plan = [
        _Traffic("clean", "clean production images", x, y, sizes),
        _Traffic(
            "drift",
            f"a new camera: contrast reduced to {CONTRAST_FACTOR:.0%}, sent twice",
            drifted,
            y,
            sizes,
            passes=DRIFT_PASSES,
        ),
        _Traffic(
            "train-mode",
            f"new camera; {TRAIN_MODE_LAYER} left in train(), batches of {TRAIN_MODE_BATCH_SIZE}",
            drifted,
            y,
            [TRAIN_MODE_BATCH_SIZE],
            train_mode_layer=TRAIN_MODE_LAYER,
        ),
    ]
    total_steps = len(plan) + 1
    with bnwatch.watch(
        model,
        name=MODEL_NAME,
        version=version,
        reference=profile,
        store=target.url,
        window_seconds=None,
        overhead_budget=None,
        alerts=None if target.service else alert_config,
        recalibrate=not target.service,
        keep_inputs=KEEP_INPUTS,
        metrics_port=0,
    ) as mon:
        metrics_url = _metrics_url(mon)
        _print_watch(emit, target, alert_config, metrics_url)
        run = _Production(model, mon, target, version, metrics_url, emit, progress)
        for step, traffic in enumerate(plan, start=1):
            run.phase(step, total_steps, traffic)
    layer_windows = target.layer_windows(version)
    # production recalibrated the live model and the train-mode phase overwrote bn3's
    # statistics: put the trained ones back, so the returned model is the one that was trained
    model.load_state_dict(torch.load(io.BytesIO(checkpoint), weights_only=True))

    # the images the model trained on, without the augmentation, and the validation images
    clean_loader = DataLoader(
        TensorDataset(
            torch.cat([splits.train_x, splits.val_x]), torch.cat([splits.train_y, splits.val_y])
        ),
        batch_size=64,
    )
    clean = _recalibrate_on_clean_data(
        model, profile, clean_loader, x, y, sizes, step=total_steps, emit=emit, progress=progress
    )

    phases = tuple(run.phases)
    recalibration = run.recalibration
    drift_accuracy = _drift_accuracy(run.phase_of("drift"), recalibration)
    files: tuple[Path, ...] = ()
    if out is not None:
        files = _write_outputs(
            out,
            checkpoint,
            profile,
            phases,
            run.alerts,
            recalibration,
            clean,
            seed=seed,
            version=version,
        )
    dashboard = None
    if target.shown is not None and not target.service:
        dashboard = f"bnwatch dashboard --db {target.shown}"
    seconds = time.perf_counter() - start
    result = DemoResult(
        seed=seed,
        quick=quick,
        model_name=MODEL_NAME,
        version=version,
        model=model,
        layers=layers,
        split_sizes=splits.sizes,
        training=training,
        validation_accuracy=val_accuracy,
        profile=profile,
        phases=phases,
        alerts=tuple(run.alerts),
        recalibration=recalibration,
        drift_accuracy=drift_accuracy,
        clean_recalibration=clean,
        store=target.shown,
        profile_stored=True,
        layer_windows_stored=layer_windows,
        metrics_url=metrics_url,
        metrics_sample=run.metrics_sample,
        dashboard_command=dashboard,
        files=files,
        seconds=seconds,
    )
    _print_summary(emit, result, target, out)
    return result


class _Production:
    """Serves the phases' traffic through the watched model, one window at a time, and reads
    back from the store what the alert engine and the triggers did after each window."""

    def __init__(
        self,
        model: nn.Module,
        mon: Monitor,
        target: _Target,
        version: str,
        metrics_url: str,
        emit: _Emit,
        progress: bool,
    ) -> None:
        self.model = model
        self.mon = mon
        self.target = target
        self.version = version
        self.metrics_url = metrics_url
        self.emit = emit
        self.progress = progress
        self.phases: list[PhaseResult] = []
        self.alerts: list[AlertEvent] = []
        self.recalibration: RecalibrationEvent | None = None
        self.metrics_sample: tuple[str, ...] = ()
        self._alert_states: dict[int, str] = {}
        """The last known state of every alert seen."""
        self._recalibration_ids: set[int] = set()

    def phase_of(self, name: str) -> PhaseResult | None:
        return next((p for p in self.phases if p.name == name), None)

    def phase(self, step: int, total: int, traffic: _Traffic) -> None:
        emit = self.emit
        n = len(traffic.images)
        windows = traffic.passes * WINDOWS_PER_PASS
        chunks = torch.tensor_split(torch.arange(n), WINDOWS_PER_PASS)
        # the sizes sent: each window cycles through traffic.batch_sizes and cuts the last
        sizes = sorted(
            {b for idx in chunks for b in digits.cycle_until(traffic.batch_sizes, len(idx))}
        )
        batches = (
            f"batch size {sizes[0]}" if len(sizes) == 1 else f"batch sizes {sizes[0]}-{sizes[-1]}"
        )
        emit()
        emit(f"[{step}/{total}] {traffic.name}: {traffic.title}")
        emit(
            f"      {n * traffic.passes} images in {windows} windows of ~{n // WINDOWS_PER_PASS}, "
            f"{batches}"
        )
        emit(_WINDOW_HEADER)
        results: list[WindowResult] = []
        with (
            _left_in_train_mode(self.model, traffic.train_mode_layer),
            _bar(self.progress, n * traffic.passes, traffic.name, "image") as bar,
        ):
            for _ in range(traffic.passes):
                for idx in chunks:
                    images, labels = traffic.images[idx], traffic.labels[idx]
                    predicted = digits.predict(self.model, images, traffic.batch_sizes)
                    reports = self.mon.flush()
                    window = WindowResult(
                        index=len(results) + 1,
                        n_images=len(idx),
                        accuracy=float((predicted == labels).float().mean()),
                        reports=reports,
                    )
                    results.append(window)
                    bar(len(idx))
                    emit(_format_window(window))
                    _wait_delivered(self.mon, self.target)
                    self._after_window(traffic.name, window)
        phase = PhaseResult(
            name=traffic.name,
            title=traffic.title,
            windows=tuple(results),
            batch_sizes=tuple(sizes),
            train_mode_layers=tuple(filter(None, [traffic.train_mode_layer])),
        )
        self.phases.append(phase)
        for line in _format_last_window(phase):
            emit(line)

    def _after_window(self, phase: str, window: WindowResult) -> None:
        """Print the alerts that opened or resolved and the recalibrations that ran after
        ``window``."""
        changes = []
        for aid, kind, layer, state in self.target.alerts(self.version):
            known = self._alert_states.get(aid)
            self._alert_states[aid] = state
            if known is None:
                changes.append(AlertEvent(aid, "opened", kind, layer, phase, window.index))
            if state == "resolved" and known != "resolved":
                changes.append(AlertEvent(aid, "resolved", kind, layer, phase, window.index))
        self.alerts.extend(changes)
        by_kind: dict[tuple[str, str], list[str]] = {}
        for a in changes:
            by_kind.setdefault((a.action, a.kind), []).append(a.layer or "the model")
        for (action, kind), where in by_kind.items():
            self.emit(f"        ! alert {action}: {kind} on {', '.join(where)}")
        opened = [a for a in changes if a.action == "opened"]
        if ("opened", "drift") in by_kind and not self.metrics_sample:
            # what Prometheus sees at that moment: the monitor's own endpoint, scraped once
            self.metrics_sample = _scrape(self.metrics_url, "bnwatch_layer_drifted{")
            self.emit(f"          Prometheus, one scrape of {self.metrics_url}:")
            for line in self.metrics_sample or ("(no bnwatch_layer_drifted series)",):
                self.emit(f"          {line}")
        for rid, status, method, alert_id, outcome in self.target.recalibrations(self.version):
            if rid in self._recalibration_ids:
                continue
            self._recalibration_ids.add(rid)
            alert = next((a for a in self.alerts if a.id == alert_id), None)
            self._recalibrated(
                RecalibrationEvent(rid, status, method, alert, phase, window.index, outcome, True)
            )
        if self.target.service and self.recalibration is None:
            drift = next((a for a in opened if a.kind == "drift"), None)
            if drift is not None:
                self._recalibrate_locally(drift, phase, window)

    def _recalibrate_locally(self, alert: AlertEvent, phase: str, window: WindowResult) -> None:
        """What ``watch(..., recalibrate=True)`` does on a database store, for a service (which
        evaluates the alerts but cannot run a trigger in this process): the same action on the
        kept inputs, its outcome printed but not recorded."""
        action = RecalibrateAction(self.model, self.mon)
        # no recalibration row to number it: 0 (the action seeds its held-out split with it)
        event = TriggerEvent(0, MODEL_NAME, self.version, alert.id, alert.kind, alert.layer, {})
        outcome = action(event)
        self._recalibrated(
            RecalibrationEvent(
                None,
                outcome.status,
                action.method,
                alert,
                phase,
                window.index,
                dict(outcome.details),
                recorded=False,
            )
        )

    def _recalibrated(self, event: RecalibrationEvent) -> None:
        if self.recalibration is None:
            self.recalibration = event
        for line in _format_recalibration(event):
            self.emit(line)


def _drift_accuracy(
    phase: PhaseResult | None, recalibration: RecalibrationEvent | None
) -> tuple[float, float]:
    """Accuracy on the drifted images in the windows before and after the recalibration (the
    same images when it ran after the first pass; NaN for a side without windows)."""
    if phase is None:
        return math.nan, math.nan
    if (
        recalibration is None
        or recalibration.status != "applied"
        or recalibration.phase != phase.name
    ):
        return phase.accuracy, math.nan
    before = [w for w in phase.windows if w.index <= recalibration.window]
    after = [w for w in phase.windows if w.index > recalibration.window]
    return accuracy_of(before), accuracy_of(after)


def _recalibrate_on_clean_data(
    model: nn.Module,
    profile: Profile,
    clean_loader: DataLoader[tuple[Tensor, ...]],
    x: Tensor,
    y: Tensor,
    sizes: list[int],
    *,
    step: int,
    emit: _Emit,
    progress: bool,
) -> CleanRecalibration:
    """Step 4: recalibrate a copy of the trained model on clean images (training and
    validation, no augmentation) and measure the gap on the clean production images before
    and after."""
    emit()
    emit(f"[{step}/{step}] recalibrate: the trained model on clean training + validation images")
    emit("      bnwatch.recalibrate(model, clean_loader, held_out=clean production images) on")
    emit(f"      a copy; the gap measured on the {len(x)} clean production images before and after")
    fixed = copy.deepcopy(model)
    held_out = list(zip(torch.split(x, 64), torch.split(y, 64), strict=True))
    result = bnwatch.recalibrate(fixed, clean_loader, held_out=held_out, progress=progress)
    before = _measure(model, profile, x, sizes)
    after = _measure(fixed, profile, x, sizes)
    clean = CleanRecalibration(
        result=result,
        before=before,
        after=after,
        accuracy_before=digits.accuracy(model, x, y),
        accuracy_after=digits.accuracy(fixed, x, y),
    )
    emit(f"{'layer':<10}{'d_rms before':>13}{'after':>8}  {'gap before':<12}after")
    for name, r in before.items():
        a = after[name]
        emit(f"{name:<10}{r.d_rms:>13.3f}{a.d_rms:>8.3f}  {_yes(r.gap):<12}{_yes(a.gap)}")
    n = len(before)
    emit(
        f"=> {result.status}: gap in {len(clean.gap_layers('before'))}/{n} layers before, "
        f"{len(clean.gap_layers('after'))}/{n} after; clean accuracy "
        f"{clean.accuracy_before:.1%} -> {clean.accuracy_after:.1%}"
    )
    return clean


def _measure(
    model: nn.Module, profile: Profile, x: Tensor, sizes: list[int]
) -> dict[str, LayerReport]:
    """One in-memory window of ``model`` over the images ``x``."""
    with bnwatch.watch(
        model, reference=profile, store=None, window_seconds=None, overhead_budget=None
    ) as mon:
        digits.predict(model, x, sizes)
        return mon.flush()


@contextmanager
def _left_in_train_mode(model: nn.Module, layer: str | None) -> Iterator[None]:
    """Put ``layer`` (a submodule name) in ``train()`` for the block; ``eval()`` afterwards."""
    if layer is None:
        yield
        return
    module = model.get_submodule(layer)
    module.train()
    try:
        yield
    finally:
        module.eval()


def _metrics_url(mon: Monitor) -> str:
    sink = mon.sink
    if not isinstance(sink, MonitorExporter) or not sink.urls:  # pragma: no cover
        raise TypeError("watch(metrics_port=...) serves no metrics")
    return sink.urls[0]


def _scrape(url: str, prefix: str) -> tuple[str, ...]:
    """The sample lines of one scrape of ``url`` that start with ``prefix`` (empty if the
    endpoint did not answer)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
    except OSError:
        return ()
    return tuple(line for line in text.splitlines() if line.startswith(prefix))


# --------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------
_LEGEND = (
    "legend    d_rms, gap   RMS mean shift from running_mean/var, in running std units; gap:",
    "                       significant and above the tolerance (the train/inference gap)",
    "          drift p      layer p-value against the validation profile (the drift baseline)",
    "          frac         share of channels whose shift is significant and above the tolerance",
    "          drifted      significant and large: production changed since the profile",
    "          batch-stat   the layer normalizes with batch statistics (train() mode)",
    "          mutated      running_mean/running_var changed while watched",
    "          small-batch  batch-statistics noise at the observed batch sizes exceeds tolerance",
)
_WINDOW_HEADER = (
    f"{'window':>6}{'images':>8}{'accuracy':>10}  {'drifted':<9}{'gap':<6}{'batch-stat':<12}"
    f"{'mutated':<9}{'small-batch':<11}"
)
_HEADER = (
    f"{'layer':<10}{'n':>6}{'d_rms':>8}  {'gap':<5}{'drift p':>9}{'frac':>7}  {'drifted':<9}"
    f"{'batch-stat':<12}{'mutated':<9}{'small-batch':<11}"
)


_SHORT = {
    "small_batch_mismatch": "small-batch",
    "batch_stat_mode": "batch-stat",
    "running_stats_mutated": "mutated",
}
"""Alert kinds as the tables' column titles spell them."""


def _printer(stream: TextIO, progress: bool) -> _Emit:
    def emit(line: str = "") -> None:
        if progress:  # print above the progress bar instead of through it
            from tqdm import tqdm

            tqdm.write(line, file=stream)
            stream.flush()
        else:
            print(line, file=stream, flush=True)

    return emit


@contextmanager
def _bar(enabled: bool, total: int, desc: str, unit: str) -> Iterator[Callable[[int], None]]:
    """A tqdm progress bar on stderr (when ``enabled``) as a function ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"bnwatch demo: {desc}", unit=unit, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()


def _yes(flag: bool) -> str:
    return "YES" if flag else "no"


def _p(p: float) -> str:
    """A p-value in at most 8 characters: fixed point down to 1e-4, then scientific."""
    if not math.isfinite(p):
        return "-"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _pct(value: float) -> str:
    return f"{value:.1%}" if math.isfinite(value) else "-"


def _count(reports: Mapping[str, LayerReport], flag: str) -> str:
    return f"{sum(bool(getattr(r, flag)) for r in reports.values())}/{len(reports)}"


def _print_watch(emit: _Emit, target: _Target, alerts: AlertConfig, metrics_url: str) -> None:
    store = "store=URL" if not target.service else "store=SERVICE_URL"
    if target.service:
        emit(
            f"watch     bnwatch.watch(model, reference=profile, {store}, keep_inputs={KEEP_INPUTS},"
        )
        emit("                        metrics_port=0); the service evaluates the alerts and the")
        emit(
            "          demo recalibrates on a drift alert as recalibrate=True would (not recorded)"
        )
    else:
        emit(f"watch     bnwatch.watch(model, reference=profile, {store}, alerts=AlertConfig(),")
        emit(
            f"                        recalibrate=True, keep_inputs={KEEP_INPUTS}, metrics_port=0)"
        )
        rules = ", ".join(
            f"{_SHORT.get(kind, kind)} {getattr(alerts, kind).open_after}"
            for kind in ("drift", *_SHORT)
        )
        emit(f"          alerts open after N windows in a row: {rules}")
        emit(
            f"          a drift alert recalibrates the live model on the {KEEP_INPUTS} kept inputs "
            "(if better)"
        )
    emit(f"metrics   {metrics_url} (Prometheus, up while the demo runs)")
    emit()
    for line in _LEGEND:
        emit(line)


def _format_window(w: WindowResult) -> str:
    r = w.reports
    return (
        f"{w.index:>6}{w.n_images:>8}{w.accuracy:>10.1%}  {_count(r, 'drifted'):<9}"
        f"{_count(r, 'gap'):<6}{_count(r, 'batch_stat_mode'):<12}"
        f"{_count(r, 'running_stats_mutated'):<9}{_count(r, 'small_batch_mismatch'):<11}"
    ).rstrip()


def _format_last_window(phase: PhaseResult) -> list[str]:
    """The per-layer table of the phase's last window, each line within LINE_WIDTH."""
    lines = [f"      last window ({phase.windows[-1].n_images} images), by layer:", _HEADER]
    for name, r in phase.reports.items():
        lines.append(
            f"{name:<10}{r.n_samples:>6}{r.d_rms:>8.2f}  {_yes(r.gap):<5}{_p(r.p_value):>9}"
            f"{r.frac_drifted:>7.2f}  {_yes(r.drifted):<9}{_yes(r.batch_stat_mode):<12}"
            f"{_yes(r.running_stats_mutated):<9}{_yes(r.small_batch_mismatch):<11}"
        )
    return [line.rstrip() for line in lines]


def _format_recalibration(event: RecalibrationEvent) -> list[str]:
    o = event.outcome
    trigger = f"the {event.alert.kind} alert on {event.alert.layer}" if event.alert else "an alert"
    name = f"recalibration {event.id}" if event.id is not None else "recalibration"
    lines = [f"        ! {name} triggered by {trigger}: {event.status}"]
    kl_before, kl_after = o.get("kl_before"), o.get("kl_after")
    if isinstance(kl_before, (int, float)) and isinstance(kl_after, (int, float)):
        samples = o.get("samples", "?")
        lines.append(
            f"          {event.method} on {samples} kept inputs; held-out inputs' KL to the "
            f"running stats {kl_before:.3f} -> {kl_after:.3f}"
        )
    elif o.get("reason") or o.get("error"):
        lines.append(f"          {o.get('reason') or o.get('error')}")
    if not event.recorded:
        lines.append(
            "          (not recorded: a bnwatch service records only what its webhook "
            "triggers start)"
        )
    return lines


def _print_summary(emit: _Emit, result: DemoResult, target: _Target, out: Path | None) -> None:
    n = len(result.layers)
    emit()
    emit("summary")
    emit(
        f"{'phase':<13}{'windows':>7}{'images':>8}  {'accuracy':<16}{'drifted':<9}{'gap':<12}"
        "alerts opened"
    )
    for p in result.phases:
        accuracy = _pct(p.accuracy)
        if p.name == "drift" and math.isfinite(result.drift_accuracy[1]):
            accuracy = f"{_pct(result.drift_accuracy[0])} -> {_pct(result.drift_accuracy[1])}"
        emit(
            (
                f"{p.name:<13}{len(p.windows):>7}{p.n_images:>8}  {accuracy:<16}"
                f"{len(p.layers_where('drifted', any_window=True))}/{n:<7}"
                f"{len(p.layers_where('gap', any_window=True))}/{n:<10}"
                f"{_alerts_opened([a for a in result.alerts if a.phase == p.name])}"
            ).rstrip()
        )
    c = result.clean_recalibration
    measured = next(iter(c.after.values())).n_samples
    accuracy = f"{_pct(c.accuracy_before)} -> {_pct(c.accuracy_after)}"
    emit(
        f"{'recalibrate':<13}{'-':>7}{measured:>8}  {accuracy:<16}{'-':<9}"
        f"{len(c.gap_layers('before'))}/{n} -> {len(c.gap_layers('after'))}/{n}"
    )
    emit("(drifted, gap: layers flagged in any window of the phase)")
    rec = result.recalibration
    if rec is None:
        emit("recalibration  none triggered")
    else:
        where = f"#{rec.id}" if rec.id is not None else "(not recorded)"
        cause = f"the {rec.alert.kind} alert on {rec.alert.layer}" if rec.alert else "an alert"
        emit(f"recalibration  {where} {rec.status}, triggered by {cause}")
        emit(f"               after window {rec.window} of the {rec.phase} phase")
        before, after = result.drift_accuracy
        if math.isfinite(after):
            emit(f"               accuracy on the drifted images {_pct(before)} -> {_pct(after)}")
    emit(
        f"windows        {result.windows} closed, {result.layer_windows_stored} layer-windows "
        "stored"
    )
    if result.store is not None:
        emit(f"               in {result.store}")
    if out is not None:
        emit(f"files          {', '.join(f.name for f in result.files)}, in {out.resolve()}")
    emit(f"time           {result.seconds:.1f} s (training {result.training.seconds:.1f} s)")
    if result.dashboard_command is not None:
        emit("dashboard      " + result.dashboard_command)
    elif target.service:
        emit(
            "dashboard      the service's dashboard (docker compose: http://127.0.0.1:8501; "
            "without it: bnwatch dashboard --db <the service's database URL>)"
        )


def _alerts_opened(alerts: Sequence[AlertEvent]) -> str:
    """The kinds of the alerts that opened, with their counts."""
    kinds: dict[str, int] = {}
    for a in alerts:
        if a.action != "opened":
            continue
        kinds[a.kind] = kinds.get(a.kind, 0) + 1
    return (
        ", ".join(
            f"{_SHORT.get(k, k)} x{c}" if c > 1 else _SHORT.get(k, k) for k, c in kinds.items()
        )
        or "-"
    )


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def _prepare_out_dir(out_dir: str | os.PathLike[str] | None) -> Path | None:
    """Create the output directory up front, so a bad path fails before training starts."""
    if out_dir is None:
        return None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError("out_dir", str(out), "a directory (a file of that name exists)")
    out.mkdir(parents=True, exist_ok=True)
    remove_orphans(out)
    return out


def _state_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def _temporary(path: Path) -> Path:
    """A unique temporary name next to ``path``: ``.<name>.<pid>.<8 hex>.tmp`` (the pid lets
    :func:`remove_orphans` tell a killed run's files from a live one's)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp(-wal|-shm|-journal)?")
ORPHAN_AGE_SECONDS = 600.0
"""A temporary file is an orphan only once it is this old: a demo takes about a minute."""


def remove_orphans(directory: Path, *, now: float | None = None) -> list[Path]:
    """Remove the temporary files (see :func:`_replacing`) that a killed demo left in
    ``directory``; returns them.

    A file is removed only when the process named in it is gone *and* the file is older than
    :data:`ORPHAN_AGE_SECONDS` (another machine's demo writing to a shared directory has a
    process id that means nothing here).  A clean or interrupted run removes its own files;
    only ``kill -9`` (or a crash) leaves them behind.
    """
    now = time.time() if now is None else now
    removed = []
    for path in directory.glob(".*.tmp*"):
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or _alive(int(match["pid"])):
            continue
        try:
            if now - path.stat().st_mtime < ORPHAN_AGE_SECONDS:
                continue
            path.unlink()
        except FileNotFoundError:  # another demo removed it first
            continue
        removed.append(path)
    if removed:
        logging.getLogger("bnwatch").info(
            "removed %d temporary file(s) a killed demo left in %s", len(removed), directory
        )
    return removed


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one we may not signal counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # not a process id at all
        return False
    return True


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` that replaces it when the block succeeds.

    Readers, an interrupted re-run and two demos writing to one directory never see a
    half-written file; on error the temporary file is removed and ``path`` is left as it was.
    """
    # a unique name (not mkstemp, whose 0600 mode would outlive the rename); created by the
    # caller's write with the usual umask-derived permissions
    tmp = _temporary(path)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_outputs(
    out: Path,
    checkpoint: bytes,
    profile: Profile,
    phases: Sequence[PhaseResult],
    alerts: Sequence[AlertEvent],
    recalibration: RecalibrationEvent | None,
    clean: CleanRecalibration,
    *,
    seed: int,
    version: str,
) -> tuple[Path, ...]:
    """``model.pt`` (trained weights), ``profile.npz`` and ``reports.json`` in ``out``."""
    paths = out / "model.pt", out / "profile.npz", out / "reports.json"
    with _replacing(paths[0]) as tmp:
        tmp.write_bytes(checkpoint)
    with _replacing(paths[1]) as tmp:
        profile.save(tmp)
    doc = {
        "model": MODEL_NAME,
        "version": version,
        "seed": seed,
        "phases": [
            {
                "name": p.name,
                "title": p.title,
                "accuracy": p.accuracy,
                "n_images": p.n_images,
                "batch_sizes": list(p.batch_sizes),
                "train_mode_layers": list(p.train_mode_layers),
                "windows": [
                    {
                        "index": w.index,
                        "n_images": w.n_images,
                        "accuracy": w.accuracy,
                        "layers": [r.summary() for r in w.reports.values()],
                    }
                    for w in p.windows
                ],
            }
            for p in phases
        ],
        "alerts": [
            {
                "id": a.id,
                "action": a.action,
                "kind": a.kind,
                "layer": a.layer,
                "phase": a.phase,
                "window": a.window,
            }
            for a in alerts
        ],
        "recalibration": None
        if recalibration is None
        else {
            "id": recalibration.id,
            "status": recalibration.status,
            "method": recalibration.method,
            "alert_id": recalibration.alert.id if recalibration.alert else None,
            "window": recalibration.window,
            "recorded": recalibration.recorded,
            "outcome": _seeded(recalibration.outcome),
        },
        "clean_recalibration": {
            **clean.result.summary(),
            "gap_before": clean.gap_layers("before"),
            "gap_after": clean.gap_layers("after"),
            "clean_accuracy_before": clean.accuracy_before,
            "clean_accuracy_after": clean.accuracy_after,
        },
    }
    with _replacing(paths[2]) as tmp:
        tmp.write_text(json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")
    return paths


def _json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats as ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _seeded(outcome: Mapping[str, Any]) -> dict[str, Any]:
    """A recalibration's outcome without the wall-clock times of its data (when the kept
    inputs arrived): ``reports.json`` holds what the seed decides, so re-runs compare equal;
    the database keeps the times."""
    out = dict(outcome)
    if isinstance(out.get("data"), Mapping):
        out["data"] = {k: v for k, v in out["data"].items() if k not in ("first_at", "last_at")}
    return out
