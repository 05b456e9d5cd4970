"""What does watching cost?  bnwatch's overhead on a ResNet-50 forward pass (CPU, float32).

Run ``python benchmarks/overhead.py`` (``make bench``); ``--smoke`` runs in seconds (tiny
images, one round), ``--json PATH`` keeps every number, ``--help`` lists the knobs.

What is measured
    The wall time of ``model(x)`` for a ResNet-50 defined in this file (torchvision is not a
    dependency): 53 ``BatchNorm2d`` layers with 26,560 channels, torchvision-style random
    init, ``eval()`` mode, under ``torch.inference_mode()``, on the CPU in float32, for
    batch 8 and batch 1 at 224×224.  Five configurations, each reported as a ratio to the
    unwatched model timed in the same run:

    * ``unwatched`` -- no hooks; the denominator of every ratio.
    * ``bnwatch default`` -- ``bnwatch.watch(model, window_seconds=None)``: adaptive
      sampling that keeps the monitor within its default budget of 2 % of model time.
    * ``bnwatch full stats every batch`` -- the same with ``overhead_budget=None``.
    * ``naive hook: torch.var_mean`` -- a forward pre-hook on every BN layer calling
      ``torch.var_mean(x, dim=(0, 2, 3))``, what one would write by hand.
    * ``naive hook: copy to numpy`` -- a pre-hook on every BN layer computing the channel
      mean and variance with numpy on ``x.detach().cpu().numpy()``.

Methodology -- the machine is shared and noisy, so each choice is about honest numbers
    * One set of weights, five module trees.  Each configuration has its own copy of the
      module tree whose parameters and buffers *are* the same tensors (``load_state_dict(...,
      assign=True)``): every configuration computes with the same weights in the same memory
      and differs only by its hooks.  Hooks are attached once per input setting and stay
      attached through all rounds, as in production where a monitor lives for hours.  This
      matters for ``bnwatch default``: its sampler carries its credit from round to round, so
      we time its converged behaviour.  Attaching a fresh monitor every round would instead
      time, each round, the first forward that a new monitor always measures plus the
      one-time set-up of every layer -- costs production pays once.
    * Round-robin interleaving.  Each round runs every configuration in turn: ``W`` untimed
      warm-up forwards, then ``R`` forwards timed one by one with ``time.perf_counter``.  The
      order rotates by one each round, so no configuration always follows the expensive numpy
      hook.  A disturbance of the machine (another job, a frequency change) then hits all
      configurations alike instead of whichever happened to run during it.  Before the first
      round every configuration runs a longer warm-up (kernels primed, sampler converged).
    * Robust statistics.  A configuration's time per forward is the median of its per-forward
      times, with p25 and p75 beside it; a ratio is a median over the unwatched median.
    * The median must not hide the sampled forwards.  Under the default budget only a share
      ``s`` of the forwards are measured, so the plain median of per-forward times would be
      the time of an *unmeasured* forward and show almost no cost.  For the bnwatch
      configurations each timed forward is therefore classified as measured or not (from
      ``mon.stats()`` read before and after it, outside the timed region) and every quantile
      is the share-weighted mixture ``(1 - s)·q(unmeasured) + s·q(measured)``: the amortized
      cost per forward, still robust to outliers in either class.  With a single class
      (every other configuration) this is the plain quantile.
    * bnwatch's own account.  The table also shows the ``overhead_ratio`` of ``mon.stats()``
      (hook seconds / model seconds) and the measured share of forwards, both accumulated
      over the timed forwards only.  The self-reported ratio counts the time inside
      bnwatch's hook bodies; the cost of PyTorch dispatching to the hooks at all is not in
      it, so it should be compared with, not substituted for, the measured ratio - 1.
    * Windows: ``window_seconds=None`` (no background thread).  Each monitor's window is
      flushed once, untimed, at the end of its setting, and the number of layers it reports
      is recorded as a check that the monitor really measured.
    * ``torch`` keeps its default thread count (printed; ``--threads`` changes it); ``gc`` is
      left enabled because garbage the hooks create is part of their cost.
    * Contention.  With as many intra-op threads as cores, a second busy process on the
      machine does not slow a forward by 2x but by up to 10x or more (a parallel region waits
      for its slowest, descheduled thread), and the spread explodes.  Interleaving keeps the
      *ratios* fair as long as the disturbance is shared, but the p25-p75 columns and the
      1-minute load average printed before and after the run are there to judge whether a
      run was quiet enough to be believed.  ``--time-budget`` (default 240 s) bounds the
      run on a busy machine: once a batch size has used its share, no new round starts
      (at least two rounds always run, and the table says how many did).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import bnwatch
from bnwatch.capture import Monitor

UNWATCHED = "unwatched"
BNWATCH_DEFAULT = "bnwatch default"
BNWATCH_FULL = "bnwatch full stats every batch"
NAIVE_VAR_MEAN = "naive hook: torch.var_mean"
NAIVE_NUMPY = "naive hook: copy to numpy"
CONFIGS: tuple[str, ...] = (UNWATCHED, BNWATCH_DEFAULT, BNWATCH_FULL, NAIVE_VAR_MEAN, NAIVE_NUMPY)
"""Every configuration, in table order."""

RESNET50_BN_LAYERS = 53
RESNET50_BN_CHANNELS = 26_560

DEFAULT_BATCH_SIZES = (8, 1)
DEFAULT_IMAGE_SIZE = 224
DEFAULT_ROUNDS = 6
IMAGES_PER_ROUND = 48
"""Default timed forwards per configuration and round: ``ceil(48 / batch)``, at least 4."""
WARMUP_IMAGES = 8
"""Default untimed warm-up forwards per configuration and round: ``ceil(8 / batch)``."""
INITIAL_WARMUP_IMAGES = 24
"""Default warm-up forwards per configuration before the first round: ``ceil(24 / batch)``."""
DEFAULT_TIME_BUDGET = 240.0
"""Seconds; once a setting has used its share, it stops after the current round ..."""
MIN_ROUNDS = 2
"""... provided it has completed this many rounds."""


# -- ResNet-50 ---------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1×1 reduce, 3×3 (carries the stride), 1×1 expand ×4."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        result: Tensor = self.relu(out + identity)
        return result


class ResNet50(nn.Module):
    """ResNet-50 (v1.5, as in torchvision): stem, stages of 3, 4, 6 and 3 bottlenecks."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages: list[nn.Sequential] = []
        in_channels = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers: list[nn.Module] = []
            for i in range(blocks):
                layers.append(Bottleneck(in_channels, width, stride if i == 0 else 1))
                in_channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits: Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits


def resnet50(seed: int = 0) -> ResNet50:
    """A randomly initialized ResNet-50 in eval mode."""
    torch.manual_seed(seed)
    return ResNet50().eval()


def twin(model: ResNet50) -> ResNet50:
    """A second module tree whose parameters and buffers are ``model``'s very tensors."""
    with torch.device("meta"):
        copy = ResNet50()
    copy.load_state_dict(model.state_dict(), assign=True)
    return copy.eval()


def batchnorm_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def batchnorm_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in batchnorm_layers(model))


# -- configurations ------------------------------------------------------------------------------
def _var_mean_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    torch.var_mean(args[0], dim=(0, 2, 3))


def _numpy_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    a = args[0].detach().cpu().numpy()
    a.mean(axis=(0, 2, 3))
    a.var(axis=(0, 2, 3))


@dataclass
class Attached:
    """A configuration's hooks on its module tree: a bnwatch monitor or plain pre-hooks."""

    monitor: Monitor | None = None
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def attach(config: str, model: nn.Module) -> Attached:
    """Attach ``config``'s hooks to ``model``."""
    if config == UNWATCHED:
        return Attached()
    if config == BNWATCH_DEFAULT:
        return Attached(monitor=bnwatch.watch(model, window_seconds=None))
    if config == BNWATCH_FULL:
        return Attached(monitor=bnwatch.watch(model, window_seconds=None, overhead_budget=None))
    hooks: dict[str, Callable[[nn.Module, tuple[Any, ...]], None]] = {
        NAIVE_VAR_MEAN: _var_mean_hook,
        NAIVE_NUMPY: _numpy_hook,
    }
    if config not in hooks:
        raise ValueError(f"unknown configuration {config!r}; known: {', '.join(CONFIGS)}")
    handles = [bn.register_forward_pre_hook(hooks[config]) for bn in batchnorm_layers(model)]
    return Attached(handles=handles)


def target(config: str, batch: int) -> float | None:
    """The ratio a configuration should stay within (``None``: baselines, no target)."""
    if config == BNWATCH_DEFAULT:
        return 1.03 if batch > 1 else 1.05
    if config == BNWATCH_FULL:
        return 1.15
    return None


# -- measurement ---------------------------------------------------------------------------------
@dataclass
class Timings:
    """The timed forwards of one configuration in one setting."""

    seconds: list[float] = field(default_factory=list)
    measured: list[bool] = field(default_factory=list)
    hook_seconds: float = 0.0
    model_seconds: float = 0.0
    layers_reported: int | None = None
    flush_seconds: float | None = None


def _measured_count(monitor: Monitor | None) -> tuple[int, float, float]:
    if monitor is None:
        return 0, 0.0, 0.0
    s = monitor.stats()
    return s.forwards_measured, s.hook_seconds, s.model_seconds


def run_setting(
    models: dict[str, nn.Module],
    *,
    batch: int,
    image_size: int,
    rounds: int,
    forwards: int,
    warmup: int,
    initial_warmup: int,
    seed: int = 0,
    deadline: float | None = None,
    min_rounds: int = MIN_ROUNDS,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Timings], int]:
    """Time every configuration round-robin on one input setting (see the module docstring).

    No new round starts after ``deadline`` (``time.monotonic()``) once ``min_rounds`` are
    done.  Returns the timings and the number of rounds completed.
    """
    gen = torch.Generator().manual_seed(seed + batch)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen)
    configs = list(models)
    attached = {name: attach(name, models[name]) for name in configs}
    timings = {name: Timings() for name in configs}
    done = 0
    try:
        with torch.inference_mode():
            for name in configs:
                for _ in range(initial_warmup):
                    models[name](x)
            for r in range(rounds):
                if deadline is not None and r >= min_rounds and time.monotonic() > deadline:
                    break
                shift = r % len(configs)
                for name in configs[shift:] + configs[:shift]:
                    model, monitor, t = models[name], attached[name].monitor, timings[name]
                    for _ in range(warmup):
                        model(x)
                    measured, hook_s, model_s = _measured_count(monitor)
                    for _ in range(forwards):
                        start = time.perf_counter()
                        model(x)
                        t.seconds.append(time.perf_counter() - start)
                        after = _measured_count(monitor)
                        t.measured.append(monitor is None or after[0] > measured)
                        t.hook_seconds += after[1] - hook_s
                        t.model_seconds += after[2] - model_s
                        measured, hook_s, model_s = after
                done = r + 1
                if progress is not None:
                    progress(f" batch {batch}: round {done}/{rounds} done")
        for name in configs:
            monitor = attached[name].monitor
            if monitor is not None:
                start = time.perf_counter()
                reports = monitor.flush()
                timings[name].flush_seconds = time.perf_counter() - start
                timings[name].layers_reported = len(reports)
    finally:
        for a in attached.values():
            a.close()
    return timings, done


def mixture_quantile(seconds: Sequence[float], measured: Sequence[bool], q: float) -> float:
    """Share-weighted ``q``-quantile over the measured and unmeasured forwards."""
    times = np.asarray(seconds, dtype=np.float64)
    flags = np.asarray(measured, dtype=bool)
    total = 0.0
    for part in (times[flags], times[~flags]):
        if part.size:
            total += part.size / times.size * float(np.quantile(part, q))
    return total


def summarize(config: str, batch: int, t: Timings, baseline_ms: float | None) -> dict[str, Any]:
    """One row of results; ``baseline_ms`` is the unwatched median (``None`` for itself)."""
    ms = [1e3 * s for s in t.seconds]
    median = mixture_quantile(ms, t.measured, 0.5)
    base = median if baseline_ms is None else baseline_ms
    watched = config in (BNWATCH_DEFAULT, BNWATCH_FULL)
    flags = np.asarray(t.measured, dtype=bool)
    times = np.asarray(ms, dtype=np.float64)
    goal = target(config, batch)
    ratio = median / base
    return {
        "config": config,
        "batch": batch,
        "forwards_timed": len(ms),
        "ms_median": median,
        "ms_p25": mixture_quantile(ms, t.measured, 0.25),
        "ms_p75": mixture_quantile(ms, t.measured, 0.75),
        "ms_mean": float(times.mean()),
        "ratio": ratio,
        "target": goal,
        "meets_target": None if goal is None else bool(ratio <= goal),
        "measured_share": float(flags.mean()) if watched else None,
        "forwards_measured": int(flags.sum()) if watched else None,
        "ms_measured_median": float(np.median(times[flags])) if watched and flags.any() else None,
        "ms_unmeasured_median": (
            float(np.median(times[~flags])) if watched and (~flags).any() else None
        ),
        "self_reported_overhead": (
            t.hook_seconds / t.model_seconds if watched and t.model_seconds else None
        ),
        "layers_reported": t.layers_reported,
        "flush_ms": None if t.flush_seconds is None else 1e3 * t.flush_seconds,
        "times_ms": ms,
        "measured": [bool(f) for f in t.measured] if watched else None,
    }


# -- output --------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'config':<31} {'batch':>5}  {'ms/forward median [p25, p75]':<30} {'ratio':>6}  "
        f"{'target':<12} {'self-reported':>13}  {'measured share':<18}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        goal = row["target"]
        verdict = "-" if goal is None else f"<={goal:.2f} {'ok' if row['meets_target'] else 'MISS'}"
        share = (
            "-"
            if row["measured_share"] is None
            else f"{_pct(row['measured_share'])} ({row['forwards_measured']}/"
            f"{row['forwards_timed']})"
        )
        timing = f"{row['ms_median']:8.2f} [{row['ms_p25']:.2f}, {row['ms_p75']:.2f}]"
        lines.append(
            f"{row['config']:<31} {row['batch']:>5}  {timing:<30} {row['ratio']:>5.3f}x  "
            f"{verdict:<12} {_pct(row['self_reported_overhead']):>13}  {share:<18}"
        )
    return "\n".join(lines)


def format_notes(rows: Sequence[dict[str, Any]]) -> str:
    notes = []
    for row in rows:
        if row["config"] == BNWATCH_DEFAULT:
            measured, unmeasured = row["ms_measured_median"], row["ms_unmeasured_median"]
            notes.append(
                f"  {row['config']}, batch {row['batch']}: measured forwards "
                f"{'-' if measured is None else f'{measured:.2f}'} ms, unmeasured "
                f"{'-' if unmeasured is None else f'{unmeasured:.2f}'} ms (medians)"
            )
        if row["flush_ms"] is not None:
            notes.append(
                f"  {row['config']}, batch {row['batch']}: flush {row['flush_ms']:.1f} ms "
                f"(untimed), {row['layers_reported']} layers reported"
            )
    return "\n".join(notes)


# -- command line --------------------------------------------------------------------------------
def _per_batch(images: int, batch: int, minimum: int) -> int:
    return max(minimum, math.ceil(images / batch))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="bnwatch overhead on a ResNet-50 forward pass (CPU, float32).",
        epilog="Methodology: see the module docstring of benchmarks/overhead.py.",
    )
    p.add_argument("--rounds", type=int, default=None, help=f"rounds (default {DEFAULT_ROUNDS})")
    p.add_argument(
        "--forwards",
        type=int,
        default=None,
        help=f"timed forwards per configuration per round (default ceil({IMAGES_PER_ROUND}"
        "/batch), at least 4)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed warm-up forwards per configuration per round (default ceil("
        f"{WARMUP_IMAGES}/batch))",
    )
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help=f"batch sizes (default {' '.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    p.add_argument(
        "--image-size", type=int, default=None, help=f"image side (default {DEFAULT_IMAGE_SIZE})"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny run for tests: image 64, 1 round, 2 forwards"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=DEFAULT_TIME_BUDGET,
        metavar="SECONDS",
        help="stop starting new rounds once a batch size has used its share of this budget "
        f"(at least {MIN_ROUNDS} rounds are always run; 0 = no budget; default "
        f"{DEFAULT_TIME_BUDGET:.0f})",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds = 1 if args.rounds is None else args.rounds
        args.forwards = 2 if args.forwards is None else args.forwards
        args.warmup = 1 if args.warmup is None else args.warmup
        args.image_size = 64 if args.image_size is None else args.image_size
    args.rounds = DEFAULT_ROUNDS if args.rounds is None else args.rounds
    args.image_size = DEFAULT_IMAGE_SIZE if args.image_size is None else args.image_size
    args.batch_sizes = list(args.batch_sizes or DEFAULT_BATCH_SIZES)
    for flag, value in (
        ("--rounds", args.rounds),
        ("--forwards", args.forwards),
        ("--image-size", args.image_size),
        ("--threads", args.threads),
        *(("--batch-sizes", b) for b in args.batch_sizes),
    ):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if args.image_size < 32:
        p.error(f"--image-size must be >= 32 (ResNet-50 downsamples 32x), got {args.image_size}")
    if args.time_budget < 0:
        p.error(f"--time-budget must be >= 0, got {args.time_budget}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, optionally write JSON; returns the results."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f}s]{message}", file=sys.stderr, flush=True)

    base = resnet50(args.seed)
    layers, channels = len(batchnorm_layers(base)), batchnorm_channels(base)
    assert (layers, channels) == (RESNET50_BN_LAYERS, RESNET50_BN_CHANNELS), (layers, channels)
    models: dict[str, nn.Module] = {
        name: base if name == UNWATCHED else twin(base) for name in CONFIGS
    }

    rows: list[dict[str, Any]] = []
    settings: list[dict[str, int]] = []
    for i, batch in enumerate(args.batch_sizes):
        deadline = None
        if args.time_budget:  # the budget left, shared by the settings left
            left = args.time_budget - (time.perf_counter() - started)
            deadline = time.monotonic() + left / (len(args.batch_sizes) - i)
        setting = {
            "batch": batch,
            "image_size": args.image_size,
            "rounds": args.rounds,
            "forwards": args.forwards or _per_batch(IMAGES_PER_ROUND, batch, 4),
            "warmup": (
                args.warmup if args.warmup is not None else _per_batch(WARMUP_IMAGES, batch, 1)
            ),
            "initial_warmup": (1 if args.smoke else _per_batch(INITIAL_WARMUP_IMAGES, batch, 2)),
        }
        settings.append(setting)
        progress(f" batch {batch}: {setting}")
        timings, setting["rounds_done"] = run_setting(
            models,
            batch=batch,
            image_size=args.image_size,
            rounds=setting["rounds"],
            forwards=setting["forwards"],
            warmup=setting["warmup"],
            initial_warmup=setting["initial_warmup"],
            seed=args.seed,
            deadline=deadline,
            progress=progress,
        )
        baseline = summarize(UNWATCHED, batch, timings[UNWATCHED], None)
        rows.append(baseline)
        rows.extend(
            summarize(name, batch, timings[name], baseline["ms_median"])
            for name in CONFIGS
            if name != UNWATCHED
        )
    total = time.perf_counter() - started
    load_after = os.getloadavg()

    meta = {
        "model": "ResNet-50 (v1.5), random init, eval, inference_mode, float32, CPU",
        "bn_layers": layers,
        "bn_channels": channels,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "bnwatch": bnwatch.__version__,
        "smoke": args.smoke,
        "settings": settings,
        "time_budget_seconds": args.time_budget,
        "total_seconds": total,
        "load_average_1m_before_after": [load_before[0], load_after[0]],
    }
    print(
        f"ResNet-50: {layers} BatchNorm2d layers, {channels:,} BN channels; CPU float32, "
        f"inference_mode; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for s in settings:
        cut = " (time budget reached)" if s["rounds_done"] < s["rounds"] else ""
        print(
            f"batch {s['batch']} at {s['image_size']}x{s['image_size']}: {s['rounds_done']} of "
            f"{s['rounds']} rounds round-robin{cut}, per round and config {s['warmup']} "
            f"warm-up + {s['forwards']} timed forwards (+{s['initial_warmup']} warm-up first)"
        )
    print("ratio = median ms/forward / unwatched median of the same batch size; bnwatch rows")
    print("  weight measured and unmeasured forwards by their share (see module docstring)")
    print()
    print(format_table(rows))
    print()
    print(format_notes(rows))
    print(
        f"total runtime {total:.1f} s; 1-min load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs"
    )

    results = {"meta": meta, "results": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")
    return results


if __name__ == "__main__":
    main()
