"""The ``bnwatch demo`` scenario: train, profile, watch, and break production three ways.

1. Train :class:`~bnwatch.demo.digits.DigitsCNN` on scikit-learn digits with +-1 pixel shifts.
2. Record a reference profile on the validation split (``bnwatch.profile``).
3. Watch the model (``bnwatch.watch(..., reference=profile)``) and send production traffic in
   phases, closing one window per phase with ``mon.flush()``:

   * ``clean`` -- the production split, batch sizes 1 to 128: no drift, but a train/inference
     *gap* where the augmented training statistics differ from clean images;
   * ``noise``, ``contrast``, ``blur`` -- corrupted images: the layers *drift* and accuracy
     drops;
   * ``train-mode`` -- ``bn3`` accidentally left in ``train()`` while production sends batches
     of 2: it normalizes with batch statistics (*batch-stat mode*), overwrites its running
     statistics (*mutated*), and the noise of 2-sample statistics is large enough to change
     outputs (*small-batch mismatch*).

Every phase prints one row per layer and a summary line; :func:`run_demo` returns the same
reports as a :class:`DemoResult`.  With an output directory the demo writes the trained
weights (``model.pt``), the profile (``profile.npz``) and the reports (``reports.json``); files
are replaced atomically, so re-running is safe.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bnwatch
from bnwatch.demo import digits
from bnwatch.errors import ConfigError
from bnwatch.schema import LayerReport, Profile

MODEL_NAME = "digits-cnn"
FULL_EPOCHS = 30
QUICK_EPOCHS = 10
PRODUCTION_BATCH_SIZES = (1, 8, 32, 2, 64, 16, 4, 128)
"""Clean and corrupted traffic cycles through these batch sizes (single images included)."""
TRAIN_MODE_LAYER = "bn3"
"""The layer the ``train-mode`` phase leaves in ``train()``."""
TRAIN_MODE_BATCH_SIZE = 2
NOISE_SIGMA = 0.2
CONTRAST_FACTOR = 0.6
LINE_WIDTH = 100
"""Every line the demo prints fits in this many columns."""


@dataclass(frozen=True, eq=False)
class PhaseResult:
    """One phase of production traffic and the window the monitor closed after it.

    Attributes:
        name: short id (``clean``, ``noise``, ``contrast``, ``blur``, ``train-mode``).
        title: one-line description, as printed.
        accuracy: share of the phase's images the model classified correctly.
        n_images: images sent.
        batch_sizes: the distinct batch sizes sent, ascending.
        train_mode_layers: layers that were in ``train()`` during the phase.
        reports: the window's report per watched layer (from ``mon.flush()``).
    """

    name: str
    title: str
    accuracy: float
    n_images: int
    batch_sizes: tuple[int, ...]
    train_mode_layers: tuple[str, ...]
    reports: Mapping[str, LayerReport]

    def layers_where(self, flag: str) -> list[str]:
        """Layers whose report has the boolean field ``flag`` set (e.g. ``"drifted"``)."""
        return [name for name, r in self.reports.items() if bool(getattr(r, flag))]


@dataclass(frozen=True, eq=False)
class DemoResult:
    """Everything the demo did, for tests and for callers that want more than the printout.

    Attributes:
        seed: the seed of the split, the weights, the augmentation and the corruptions.
        quick: whether the short training schedule was used.
        model_name, version: as passed to ``bnwatch.profile`` and ``bnwatch.watch``.
        model: the trained model, in ``eval()`` mode with its trained running statistics
            (restored after the ``train-mode`` phase overwrote them).
        layers: the watched BatchNorm layers, in discovery order.
        split_sizes: images in (train, validation, production).
        training: epochs, time and training accuracy.
        validation_accuracy: accuracy on the validation split after training.
        profile: the reference profile recorded on the validation split.
        phases: the production phases, in order.
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
    files: tuple[Path, ...]
    seconds: float

    def phase(self, name: str) -> PhaseResult:
        """The phase called ``name``; ``KeyError`` lists the names that exist."""
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase {name!r}; phases: {[p.name for p in self.phases]}")


def run_demo(
    out_dir: str | os.PathLike[str] | None = "bnwatch-demo",
    *,
    seed: int = 0,
    quick: bool = False,
    stream: TextIO | None = None,
) -> DemoResult:
    """Run the demo scenario (module docstring), print it to ``stream``, return the results.

    Args:
        out_dir: directory for ``model.pt``, ``profile.npz`` and ``reports.json`` (created if
            missing, files replaced if present); ``None`` writes nothing.
        seed: a non-negative integer; the same seed gives the same split, weights and reports.
        quick: train for fewer epochs (for tests and a fast look).
        stream: where to print (default ``sys.stdout``).

    Raises:
        ConfigError: ``seed`` is not a non-negative integer or ``out_dir`` is not a directory.
        DemoDependencyError: scikit-learn is missing.
        OSError: the output directory cannot be created or written.
    """
    start = time.perf_counter()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("seed", seed, "an integer >= 0")
    out = _prepare_out_dir(out_dir)
    emit = _printer(stream or sys.stdout)
    with _single_torch_thread():
        return _run(out, seed=seed, quick=quick, emit=emit, start=start)


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


def _run(
    out: Path | None, *, seed: int, quick: bool, emit: Callable[[str], None], start: float
) -> DemoResult:
    """The scenario of :func:`run_demo`, after its arguments have been checked."""
    version = f"seed-{seed}"
    epochs = QUICK_EPOCHS if quick else FULL_EPOCHS

    emit(f"bnwatch demo: BatchNorm monitoring on scikit-learn digits (seed {seed})")
    emit("")
    splits = digits.load_splits(seed)
    n_train, n_val, n_prod = splits.sizes
    emit(
        f"data      {n_train} train / {n_val} validation / {n_prod} production images "
        "(8x8, scaled to [0, 1])"
    )
    model = digits.make_model(seed)
    n_params = sum(p.numel() for p in model.parameters())
    training = digits.train(model, splits.train_x, splits.train_y, epochs=epochs, seed=seed)
    val_accuracy = digits.accuracy(model, splits.val_x, splits.val_y)
    emit(
        f"training  {digits.DigitsCNN.__name__} ({n_params:,} parameters), {epochs} epochs "
        f"with +-1 pixel shifts in {training.seconds:.1f} s"
    )
    emit(f"          accuracy: train {training.train_accuracy:.1%}, validation {val_accuracy:.1%}")
    checkpoint = _state_bytes(model)

    val_loader = DataLoader(TensorDataset(splits.val_x, splits.val_y), batch_size=64)
    store = _fresh_database(out)
    profile = bnwatch.profile(model, val_loader, name=MODEL_NAME, version=version, store=store)
    layers = tuple(profile.layers)
    emit(f"profile   bnwatch.profile(model, validation images): {n_val} samples per layer")
    emit(f"          {len(layers)} BatchNorm layers: {', '.join(layers)}")
    emit("watch     bnwatch.watch(model, reference=profile); one window per phase (mon.flush())")
    emit("")
    for line in _LEGEND:
        emit(line)

    corrupt = torch.Generator().manual_seed(seed + 1)
    x, y = splits.prod_x, splits.prod_y
    sizes = list(PRODUCTION_BATCH_SIZES)
    corrupted = "production images"
    plan = [
        _Traffic("clean", "clean production images", x, sizes),
        _Traffic(
            "noise",
            f"{corrupted} with Gaussian noise (sigma {NOISE_SIGMA})",
            digits.gaussian_noise(x, NOISE_SIGMA, corrupt),
            sizes,
        ),
        _Traffic(
            "contrast",
            f"{corrupted} with contrast reduced to {CONTRAST_FACTOR:.0%}",
            digits.reduce_contrast(x, CONTRAST_FACTOR),
            sizes,
        ),
        _Traffic("blur", f"{corrupted}, blurred (3x3 binomial)", digits.blur(x), sizes),
        _Traffic(
            "train-mode",
            f"clean images; {TRAIN_MODE_LAYER} left in train(), batches of {TRAIN_MODE_BATCH_SIZE}",
            x,
            [TRAIN_MODE_BATCH_SIZE],
            train_mode_layer=TRAIN_MODE_LAYER,
        ),
    ]
    phases: list[PhaseResult] = []
    with bnwatch.watch(
        model,
        name=MODEL_NAME,
        version=version,
        reference=profile,
        store=store,
        window_seconds=None,
        overhead_budget=None,
    ) as mon:
        for i, traffic in enumerate(plan, start=1):
            with _left_in_train_mode(model, traffic.train_mode_layer):
                predicted = digits.predict(model, traffic.images, traffic.batch_sizes)
            phase = PhaseResult(
                name=traffic.name,
                title=traffic.title,
                accuracy=float((predicted == y).float().mean()),
                n_images=len(traffic.images),
                batch_sizes=tuple(sorted(set(traffic.batch_sizes))),
                train_mode_layers=tuple(filter(None, [traffic.train_mode_layer])),
                reports=mon.flush(),
            )
            phases.append(phase)
            emit("")
            for line in _format_phase(i, len(plan), phase, clean_accuracy=phases[0].accuracy):
                emit(line)
    # the train-mode phase overwrote the running statistics of TRAIN_MODE_LAYER: put the
    # trained ones back, so the returned model is the one that was trained and profiled
    model.load_state_dict(torch.load(io.BytesIO(checkpoint), weights_only=True))

    files: tuple[Path, ...] = ()
    emit("")
    if out is not None:
        files = _write_outputs(out, checkpoint, profile, phases, seed=seed, version=version)
        emit(f"wrote     {', '.join(f.name for f in files)} (weights, profile, reports)")
        emit(f"          in {out}")
        emit(f"stored    every window and the profile in {store}")
        emit(f"          (bnwatch db current --db {store})")
    seconds = time.perf_counter() - start
    emit(f"done in {seconds:.1f} s")
    return DemoResult(
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
        phases=tuple(phases),
        files=files,
        seconds=seconds,
    )


@dataclass(frozen=True, eq=False)
class _Traffic:
    """One phase's production traffic: images in batches of ``batch_sizes`` (cycled)."""

    name: str
    title: str
    images: Tensor
    batch_sizes: list[int]
    train_mode_layer: str | None = None


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


# --------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------
_LEGEND = (
    "legend    n            samples measured in the window",
    "          d_rms, gap   RMS mean shift from running_mean/var, in running std units; gap:",
    "                       significant and above the tolerance (the train/inference gap)",
    "          drift p      layer p-value against the validation profile (the drift baseline)",
    "          frac         share of channels whose shift is significant and above the tolerance",
    "          drifted      significant and large: production changed since the profile",
    "          batch-stat   the layer normalizes with batch statistics (train() mode)",
    "          mutated      running_mean/running_var changed while watched",
    "          small-batch  batch-statistics noise at the observed batch sizes exceeds tolerance",
)
_HEADER = (
    f"{'layer':<10}{'n':>6}{'d_rms':>8}  {'gap':<5}{'drift p':>9}{'frac':>7}  {'drifted':<9}"
    f"{'batch-stat':<12}{'mutated':<9}{'small-batch':<11}"
)


def _printer(stream: TextIO) -> Callable[[str], None]:
    def emit(line: str) -> None:
        print(line, file=stream, flush=True)

    return emit


def _yes(flag: bool) -> str:
    return "YES" if flag else "no"


def _p(p: float) -> str:
    """A p-value in at most 8 characters: fixed point down to 1e-4, then scientific."""
    if not math.isfinite(p):
        return "-"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _count(phase: PhaseResult, flag: str) -> str:
    return f"{len(phase.layers_where(flag))}/{len(phase.reports)}"


def _format_phase(
    index: int, total: int, phase: PhaseResult, *, clean_accuracy: float
) -> list[str]:
    """The phase's title, one row per layer and a summary line, each within LINE_WIDTH."""
    sizes = phase.batch_sizes
    batches = f"batch size {sizes[0]}" if len(sizes) == 1 else f"batch sizes {sizes[0]}-{sizes[-1]}"
    accuracy = f"accuracy {phase.accuracy:.1%}"
    if phase.name != "clean":
        accuracy += f" (clean {clean_accuracy:.1%})"
    lines = [
        f"[{index}/{total}] {phase.name}: {phase.title}",
        f"      {phase.n_images} images, {batches}; {accuracy}",
        _HEADER,
    ]
    for name, r in phase.reports.items():
        lines.append(
            f"{name:<10}{r.n_samples:>6}{r.d_rms:>8.2f}  {_yes(r.gap):<5}{_p(r.p_value):>9}"
            f"{r.frac_drifted:>7.2f}  {_yes(r.drifted):<9}{_yes(r.batch_stat_mode):<12}"
            f"{_yes(r.running_stats_mutated):<9}{_yes(r.small_batch_mismatch):<11}"
        )
    lines.append(
        f"=> drift in {_count(phase, 'drifted')} layers; gap {_count(phase, 'gap')}; "
        f"batch-stat {_count(phase, 'batch_stat_mode')}; mutated "
        f"{_count(phase, 'running_stats_mutated')}; small-batch "
        f"{_count(phase, 'small_batch_mismatch')}"
    )
    return [line.rstrip() for line in lines]


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
    return out


def _state_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path`` that replaces it when the block succeeds.

    Readers, an interrupted re-run and two demos writing to one directory never see a
    half-written file; on error the temporary file is removed and ``path`` is left as it was.
    """
    # a unique name (not mkstemp, whose 0600 mode would outlive the rename); created by the
    # caller's write with the usual umask-derived permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


DATABASE_FILE = "bnwatch.db"


def _fresh_database(out: Path | None) -> str | None:
    """The demo's SQLite URL in ``out`` (a previous run's database is replaced), or ``None``
    (memory only) when the demo writes no files."""
    if out is None:
        return None
    for suffix in ("", "-wal", "-shm"):
        (out / f"{DATABASE_FILE}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{out / DATABASE_FILE}"


def _write_outputs(
    out: Path,
    checkpoint: bytes,
    profile: Profile,
    phases: Sequence[PhaseResult],
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
                "layers": [r.summary() for r in p.reports.values()],
            }
            for p in phases
        ],
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
