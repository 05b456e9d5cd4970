"""Does recalibration win back the accuracy that corrupted inputs cost?  And what does it cost?

Run ``python benchmarks/recalibration.py`` (7 minutes on a quiet 2-core machine, 14 at a load
of 6, 60 % of it the labelled bound; ``--no-ablations`` runs the four main columns only, in
about 35 s); ``--seed 0 1 2 3 4`` runs five seeds one after the other and ends with a table
across them (``make bench`` runs both); ``--smoke`` runs in seconds (2 epochs, 3 corruptions,
no ablations), ``--json PATH`` keeps every number, ``--help`` lists the knobs.

One seed is one model: the seed draws the split, the initial weights, the corruption noise and
the folds, and the recovered share moves by several points from seed to seed (44-54 % for
``precise 512`` over seeds 0-4 on one machine, 42-56 % on another, whose CPU rounds training
differently: 48.1 % and 50.5 % on average) -- more than any configuration differs from
another on one seed.  Judge the target on the mean across seeds.

What is measured
    A :class:`~bnwatch.demo.digits.DigitsCNN` (four BatchNorm layers) is trained in the run on
    half of scikit-learn's 1,797 digits (30 epochs, ±1-pixel shifts: :func:`bnwatch.demo.
    digits.train`); the other half is the test set.  Twelve corruptions at three severities
    (36 cases) are applied to the test images; for every case the table gives the accuracy of
    the model as trained on clean and on corrupted images, and on corrupted images after
    ``bnwatch.recalibrate`` re-estimated its BatchNorm statistics from unlabeled corrupted
    images:

    * ``precise 512`` -- ``method="precise"``, 512 samples in batches of 64 (all layers);
    * ``fvcore 512`` -- fvcore's PreciseBN (``update_bn_stats``, re-implemented below from its
      algorithm) on the very same batches: the reference the timing is compared with, and a
      check that both estimate the same statistics;
    * ``mix n=16``, ``mix n=64`` -- ``method="mix"`` (Schneider et al. 2020) with bnwatch's
      default ``prior_strength=16`` on 16 or 64 samples (one batch).

    The *recovered* share of a case is ``(acc_recal - acc_corrupt) / (acc_clean -
    acc_corrupt)``; the target is a mean of at least 60 % over the cases that lost accuracy.
    Beside the mean the summary shows the median and the *pooled* share (points won back /
    points lost, summed over cases), which small losses cannot dominate.

    Ablations (summary rows; ``--no-ablations`` skips them) try what a user can select with
    the public API: fewer samples, only some layers (``layers=``), other prior
    strengths, and the ``held_out=`` judgement with ``apply="if_better"`` on 64 further
    unlabeled images.  ``best of all`` picks, per case, the best of every configuration run --
    with the evaluation labels, so it is an upper bound for *any* rule that chooses among
    them (by per-layer drift or otherwise), not a method.

    ``labelled 512`` is the other bound, also not a method: ``precise`` on the 512 images,
    then every BatchNorm layer's mean and log variance fitted by Adam to the cross-entropy on
    the *labels* of those 512 images (:func:`fit_statistics_with_labels`; 100 steps, rate
    0.01, fixed in advance), evaluated like everything else on the held-out fold.  Per channel
    a change of statistics is a change of BatchNorm's affine map, so this is about the most
    that re-estimating statistics -- or TENT-like adaptation of the affine parameters -- can
    recover on this model with 512 images, even knowing the labels.  It is what the 60 %
    target must be judged against: the table across seeds gives each configuration's mean
    also as a share of the bound's mean (``of bound``).  Its fit is not the limit: on seed
    0's twelve severity-2 cases it recovers 63.7 % with the fixed 100 steps at 0.01, 65.4 %
    with 300, 66.7 % with 300 at 0.03 and 64.4 % with 1,000 (over-fitted to the 512 images).

    Tried and not kept (measured on ``--seed 1`` unless said; none gained more than a point,
    most lost): recalibrating only the drifted or the earliest layers (on seed 0 every subset
    loses 2-12 points against all layers, see the ablations); re-estimating only the means (-5
    points); an empirical-Bayes (James-Stein) per-channel mix towards the running statistics,
    with the shift's standard error from the between-sample variance, instead of
    ``prior_strength`` (n = 16: -1.4 to +0.5, n = 64: -1.4 to -2.0 points); Wiener-style
    variance inflation where the variance grew, as noise makes it (+0.7 on seed 1, -1.5 on
    seed 0); mapping the corrupted statistics onto clean reference statistics, so that clean
    data would keep the running statistics and the train/inference gap of the shift augmentation
    (-1 point); entropy minimization of the statistics without labels (collapses at high
    severity); information maximization instead (mean prediction entropy minus the entropy of
    the mean prediction, SHOT-style, which cannot collapse to one class), fitted like the
    labelled bound from ``precise`` -- on seed 0 over gaussian_noise, contrast, gamma, rotate
    and shear it recovered 46.2 % (50 Adam steps at 0.01) and 49.9 % (20 at 0.003) against
    ``precise``'s 53.7 %; aligning the mean and channel covariance of the features with those of
    the clean training images (CORAL-style, the statistics fitted like the labelled bound) --
    52.1 % at the pooled features, 48.4 % at every BN layer, over the same five corruptions;
    re-estimating layer by layer with the earlier layers already on their new population
    statistics (what inference shows them, instead of batch statistics): 53.2 %, equal to
    ``precise`` on all 36 cases; the 512 images plus two ±1-pixel shifted copies (the training
    augmentation the running statistics were averaged over): 52.0 %; self-training on the
    model's own predictions, fitted like the labelled bound from ``precise`` (seed 0, 18 cases:
    gaussian and shot noise, contrast, gamma, rotate, shear, where ``precise`` recovers 47.8 %)
    -- pseudo-labels of the images predicted with confidence > 0.9, 100 Adam steps at 0.01:
    49.1 % (50 steps at 0.003: 46.5 %; every image's pseudo-label: 45.3 %; plus a class-balance
    term: 48.0 %) -- and entropy minimization on the confident images only (entropy below 0.4 ln
    10, weighted, SAR/EATA-style), which still collapses at high severity (-6.5 % on average,
    -167 % on shear at severity 2); going beyond the statistics, ActMAD-style activation
    matching (every weight but the classifier's fitted by Adam so that each BN layer's
    per-channel, per-position output mean and variance on 64-image batches match those of the
    clean training images; seed 0, gaussian and shot noise, gamma, rotate and shear, 15 cases
    where ``precise`` recovers 35.5 %): 29.1 % (60 steps at 1e-3), 29.4 % (200 at 3e-3), 29.0 %
    starting from ``precise`` (100 at 1e-3; 15.3 % with 200 at 3e-3), 26.5 % from ``precise``
    with only ``conv1`` free; and a Saerens-style EM
    correction of the predicted class marginal towards the training prior after ``precise``
    (a logit bias, expressible through ``head_bn``'s mean; seed 0, all 36 cases): 34.5 %
    against 50.7 %; and class-conditional alignment with the clean training images
    (TTAC-style: the statistics fitted like the labelled bound so that each class's mean
    ``head_bn`` feature, weighted by the predicted probabilities, moves to that class's clean
    mean in units of its clean variance; which cannot collapse to one class, since every class
    is pulled to its own anchor; seed 0, gaussian noise, contrast, gamma, rotate and shear, 15
    cases where ``precise`` recovers 52.8 %): 47.3 % (100 Adam steps at 0.01), 38.7 % with
    only the images predicted with confidence > 0.9, 39.9 % matching the class variances too.
    Nor is ``DigitsCNN``
    merely a weak case for recalibration: two deeper BatchNorm nets, defined once and trained
    with the same :func:`~bnwatch.demo.digits.train` recipe -- a residual net (stem and three
    basic blocks, 9 BN layers, 38k parameters) and a VGG-style net (six conv-BN-ReLU, 7 BN
    layers, 35k parameters) -- were run through this file's functions (main configurations and
    the labelled bound; seeds 0 and 1). ``precise 512`` recovered 43.4 % and 48.3 % on average
    against DigitsCNN's 53.5 %, while their labelled bounds rose to 77.5 % and 70.4 % (DigitsCNN
    66.8 %): more BatchNorm layers leave more to win, and unlabeled statistics win a smaller
    share of it.

Methodology
    * Recalibration data never overlaps evaluation data (cross-fitting).  The test images are
      split into 3 folds; for each fold, recalibration draws from the other two (about 600
      images, shuffled per fold) and accuracy is measured on the fold, so every test image is
      evaluated exactly once per configuration, and the clean and corrupted accuracies are
      measured on the same images.  ``mix`` uses 8 disjoint draws per fold (24 per case) and
      averages them, because one draw of 16 images is noisy.  The held-out images of the
      ablations are the last 64 of the pool, disjoint from every draw.
    * Recalibration goes through the public API only: ``recalibrate(..., apply=False)``, then
      ``result.apply()``, accuracy, ``result.rollback()`` (or ``apply="if_better"`` for the
      held-out ablations, counting rejections).
    * Severities were fixed once (seed 0) from the accuracy of the *un-recalibrated* model,
      aiming at roughly 5, 20 and 40 points lost (seed 0 loses 2-10, 13-30 and 29-51 points;
      ``contrast`` at 0.6 loses 67).  They were not tuned on recalibrated accuracy.
      Corruption noise, folds and draws come from generators seeded from ``--seed``, so a
      run is reproducible.
    * ``torch.set_num_threads(1)`` by default (``--threads``): results are bit-identical from
      run to run, the timing is not disturbed by intra-op thread scheduling on a shared
      machine, and the model is too small to gain from more threads.
    * Timing: ``bnwatch.recalibrate(method="precise", apply=True)`` against the whole fvcore
      procedure (BN layers to train mode, ``update_bn_stats``, back to eval) on the same 512
      corrupted images, in batches of 64 and of 16.  Both start from the same buffers, run
      round-robin (the order alternates each round) and are reported as medians with p25-p75;
      the ratio is of medians.  The target is at most 1.1x.  The model is tiny, so fixed
      per-call and per-batch costs weigh more than they would on a real network.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 -- the universal spelling
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnwatch
from bnwatch.demo import digits

TARGET_RECOVERED = 0.60
"""Mean recovered share of the lost accuracy the issue asks for."""
TARGET_TIME_RATIO = 1.10
"""bnwatch precise / fvcore PreciseBN wall time, on the same samples."""

DEFAULT_EPOCHS = 30
TRAIN_FRACTION = 0.5
FOLDS = 3
PRECISE_SAMPLES = 512
MIX_SAMPLES = (16, 64)
MIX_DRAWS = 8
"""Disjoint draws per fold for the small-sample configurations."""
PRIOR = 16.0
"""bnwatch's default ``prior_strength``."""
LABELLED_STEPS = 100
LABELLED_LR = 0.01
"""Adam on the statistics for the labelled bound (fixed in advance, not tuned per case)."""
BOUND = "labelled 512"
"""The labelled bound's name (:func:`fit_statistics_with_labels`)."""
RECAL_BATCH = 64
HELD_OUT = 64
TIMING_BATCHES = (64, 16)
DEFAULT_TIMING_ROUNDS = 30
BN_LAYERS = ("bn1", "bn2", "bn3", "head_bn")

BN_TYPES: tuple[type[_BatchNorm], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)


# -- corruptions ---------------------------------------------------------------------------------
# Images [N, 1, 8, 8] in [0, 1]; every function takes (images, parameter, generator).
Corrupt = Callable[[Tensor, float, torch.Generator], Tensor]


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample with per-image affine maps (output → input coordinates), zero background."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _identity_theta(n: int) -> Tensor:
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    return theta


def _signs(n: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


def gaussian_noise(x: Tensor, sigma: float, g: torch.Generator) -> Tensor:
    """Additive normal noise, clipped (:func:`bnwatch.demo.digits.gaussian_noise`)."""
    return digits.gaussian_noise(x, sigma, g)


def shot_noise(x: Tensor, photons: float, g: torch.Generator) -> Tensor:
    """Poisson noise: ``Poisson(x · photons) / photons``, clipped."""
    return (torch.poisson(x * photons, generator=g) / photons).clamp(0.0, 1.0)


def impulse_noise(x: Tensor, p: float, g: torch.Generator) -> Tensor:
    """Salt and pepper: a share ``p`` of the pixels set to 0 or 1 with equal odds."""
    r = torch.rand(x.shape, generator=g)
    y = x.clone()
    y[r < p / 2] = 0.0
    y[(r >= p / 2) & (r < p)] = 1.0
    return y


def speckle_noise(x: Tensor, s: float, g: torch.Generator) -> Tensor:
    """Multiplicative noise ``x + x · s · N(0, 1)``, clipped."""
    return (x + x * s * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


def blur(x: Tensor, sigma: float, g: torch.Generator) -> Tensor:
    """Gaussian blur with a 5×5 kernel of standard deviation ``sigma`` pixels."""
    k = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = k / k.sum()
    return F.conv2d(x, torch.outer(k, k).reshape(1, 1, 5, 5), padding=2)


def contrast(x: Tensor, factor: float, g: torch.Generator) -> Tensor:
    """Pixels pulled towards the image mean (:func:`bnwatch.demo.digits.reduce_contrast`)."""
    return digits.reduce_contrast(x, factor)


def brightness(x: Tensor, b: float, g: torch.Generator) -> Tensor:
    """``x + b``, clipped."""
    return (x + b).clamp(0.0, 1.0)


def gamma(x: Tensor, exponent: float, g: torch.Generator) -> Tensor:
    """``x ** exponent``: faint strokes fade."""
    return x.clamp(0.0, 1.0) ** exponent


def rotate(x: Tensor, degrees: float, g: torch.Generator) -> Tensor:
    """Rotation by ``±degrees`` (random sign per image), bilinear."""
    a = _signs(x.shape[0], g) * math.radians(degrees)
    theta = _identity_theta(x.shape[0])
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    return _affine(x, theta)


def translate(x: Tensor, pixels: float, g: torch.Generator) -> Tensor:
    """Shift by ``pixels`` in a random direction per image, bilinear (training saw ±1 integer
    shifts along each axis)."""
    n = x.shape[0]
    angle = torch.rand(n, generator=g) * 2 * math.pi
    theta = _identity_theta(n)
    scale = 2.0 / x.shape[-1]  # affine_grid works in [-1, 1]
    theta[:, 0, 2] = -pixels * torch.cos(angle) * scale
    theta[:, 1, 2] = -pixels * torch.sin(angle) * scale
    return _affine(x, theta)


def shear(x: Tensor, k: float, g: torch.Generator) -> Tensor:
    """Horizontal shear by ``±k`` (random sign per image), bilinear."""
    theta = _identity_theta(x.shape[0])
    theta[:, 0, 1] = _signs(x.shape[0], g) * k
    return _affine(x, theta)


def zoom(x: Tensor, factor: float, g: torch.Generator) -> Tensor:
    """Zoom out: the digit shrinks to ``factor`` of its size around the centre."""
    theta = _identity_theta(x.shape[0]) / factor
    return _affine(x, theta)


@dataclass(frozen=True)
class Corruption:
    """A corruption, its family and its parameter at severities 1, 2 and 3."""

    name: str
    family: str
    apply: Corrupt
    severities: tuple[float, float, float]


CORRUPTIONS: tuple[Corruption, ...] = (
    Corruption("gaussian_noise", "noise", gaussian_noise, (0.1, 0.2, 0.28)),
    Corruption("shot_noise", "noise", shot_noise, (12.0, 5.0, 2.5)),
    Corruption("impulse_noise", "noise", impulse_noise, (0.04, 0.1, 0.18)),
    Corruption("speckle_noise", "noise", speckle_noise, (0.35, 0.6, 1.0)),
    Corruption("blur", "photometric", blur, (0.5, 0.6, 0.7)),
    Corruption("contrast", "photometric", contrast, (0.8, 0.7, 0.6)),
    Corruption("brightness", "photometric", brightness, (0.1, 0.14, 0.18)),
    Corruption("gamma", "photometric", gamma, (2.0, 3.0, 5.0)),
    Corruption("rotate", "geometric", rotate, (10.0, 20.0, 30.0)),
    Corruption("translate", "geometric", translate, (1.0, 1.5, 2.0)),
    Corruption("shear", "geometric", shear, (0.3, 0.4, 0.5)),
    Corruption("zoom", "geometric", zoom, (0.9, 0.85, 0.78)),
)
FAMILIES = ("noise", "photometric", "geometric")
SMOKE_CORRUPTIONS = ("gaussian_noise", "contrast", "rotate")


# -- fvcore's PreciseBN, re-implemented --------------------------------------------------------
class _PopulationVariance:
    """fvcore's ``_PopulationVarianceEstimator``: running mean of the batch means and of the
    batch mean squares, each batch weighted by its elements per channel; the population
    variance is their difference (biased, as fvcore stores it)."""

    def __init__(self, mean_buffer: Tensor, var_buffer: Tensor) -> None:
        self.pop_mean = torch.zeros_like(mean_buffer)
        self.pop_square_mean = torch.zeros_like(var_buffer)
        self.total = 0

    def update(self, batch_mean: Tensor, batch_var: Tensor, batch_size: int) -> None:
        self.total += batch_size
        # PyTorch's running_var is the unbiased batch variance: undo Bessel's correction
        square_mean = batch_mean.square() + batch_var * ((batch_size - 1) / batch_size)
        weight = batch_size / self.total
        self.pop_mean += (batch_mean - self.pop_mean) * weight
        self.pop_square_mean += (square_mean - self.pop_square_mean) * weight

    @property
    def pop_var(self) -> Tensor:
        return self.pop_square_mean - self.pop_mean.square()


@torch.no_grad()
def fvcore_update_bn_stats(model: nn.Module, data: Iterable[Tensor], num_iters: int) -> None:
    """fvcore's ``update_bn_stats`` (``fvcore/nn/precise_bn.py``), step by step.

    The BN layers in training mode get momentum 1, so after each forward their running
    buffers hold that batch's mean and unbiased variance; a forward pre-hook records every
    layer's elements per channel (``numel / C``); after each forward the estimators pool the
    buffers; at the end the pooled statistics are assigned and the momenta restored.  As in
    fvcore, the caller puts the layers to recalibrate in train mode first.
    """
    bn_layers = [m for m in model.modules() if m.training and isinstance(m, BN_TYPES)]
    if not bn_layers:
        return
    momenta = [bn.momentum for bn in bn_layers]
    for bn in bn_layers:
        bn.momentum = 1.0
    elements: dict[nn.Module, int] = {}

    def record_batch_size(module: nn.Module, args: tuple[Any, ...]) -> tuple[Tensor]:
        if module in elements:
            raise RuntimeError("a BatchNorm layer is called twice per forward")
        x = args[0]
        elements[module] = x.numel() // x.shape[1]  # spatial positions count as samples
        return (x,)

    hooks = [bn.register_forward_pre_hook(record_batch_size) for bn in bn_layers]
    estimators = [_PopulationVariance(_buffer(bn, "mean"), _buffer(bn, "var")) for bn in bn_layers]
    ind = -1
    for inputs in itertools.islice(data, num_iters):
        ind += 1
        elements.clear()
        model(inputs)
        for i, bn in enumerate(bn_layers):
            size = elements.get(bn)
            if size is None:
                continue  # the layer was not used in this forward
            estimators[i].update(_buffer(bn, "mean"), _buffer(bn, "var"), size)
    if ind != num_iters - 1:
        raise RuntimeError(f"update_bn_stats expected {num_iters} batches, got {ind + 1}")
    for i, bn in enumerate(bn_layers):
        bn.running_mean = estimators[i].pop_mean
        bn.running_var = estimators[i].pop_var
        bn.momentum = momenta[i]
    for hook in hooks:
        hook.remove()


def _buffer(bn: nn.Module, which: str) -> Tensor:
    value = getattr(bn, f"running_{which}")
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(bn).__name__} has no running statistics")
    return value


def fvcore_precise_bn(model: nn.Module, batches: Sequence[Tensor]) -> None:
    """The whole PreciseBN procedure as a user runs it: BN layers to train mode,
    ``update_bn_stats`` over every batch, back to eval mode."""
    for module in model.modules():
        if isinstance(module, BN_TYPES):
            module.train()
    fvcore_update_bn_stats(model, batches, len(batches))
    model.eval()


# -- configurations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One way to recalibrate: a bnwatch call (or fvcore) on ``samples`` images per draw."""

    name: str
    method: str  # "precise", "mix", "fvcore" or "labelled" (the bound, with labels)
    samples: int
    prior: float = PRIOR
    layers: tuple[str, ...] | None = None
    draws: int = 1
    held_out: bool = False
    note: str = ""

    def call(self) -> str:
        """The arguments a user would pass (compact, for the ablation table)."""
        if self.method == "fvcore":
            return "fvcore update_bn_stats"
        if self.method == "labelled":
            return f"precise, then statistics fitted to {self.samples} labels (a bound)"
        parts = [self.method, f"n={self.samples}"]
        if self.method == "mix":
            parts.append(f"prior_strength={self.prior:g}")
        if self.layers is not None:
            parts.append(f"layers={','.join(self.layers)}")
        if self.held_out:
            parts.append("+held_out if_better")
        return " ".join(parts)


def main_configs(smoke: bool) -> list[Config]:
    draws = 1 if smoke else MIX_DRAWS
    return [
        Config("precise 512", "precise", PRECISE_SAMPLES),
        Config("fvcore 512", "fvcore", PRECISE_SAMPLES),
        *(Config(f"mix n={n}", "mix", n, draws=draws) for n in MIX_SAMPLES),
    ]


def ablation_configs() -> list[Config]:
    draws = MIX_DRAWS
    return [
        Config("precise 128", "precise", 128, note="fewer samples"),
        Config("precise 256", "precise", 256, note="fewer samples"),
        Config("precise bn1", "precise", 512, layers=("bn1",), note="first layer only"),
        Config("precise bn1-2", "precise", 512, layers=("bn1", "bn2"), note="early layers"),
        Config("precise bn1-3", "precise", 512, layers=BN_LAYERS[:3], note="all but the head"),
        Config("precise head", "precise", 512, layers=("head_bn",), note="head BN1d only"),
        Config("precise bn3+head", "precise", 512, layers=BN_LAYERS[2:], note="late layers"),
        Config("precise+held-out", "precise", 512, held_out=True, note="judged, if_better"),
        Config("mix n=16 N=0", "mix", 16, prior=0.0, draws=draws, note="no prior"),
        Config("mix n=16 N=4", "mix", 16, prior=4.0, draws=draws, note="weaker prior"),
        Config("mix n=16 N=64", "mix", 16, prior=64.0, draws=draws, note="stronger prior"),
        Config("mix n=16 bn1-3", "mix", 16, layers=BN_LAYERS[:3], draws=draws, note="no head"),
        Config("mix n=16+held-out", "mix", 16, held_out=True, draws=draws, note="if_better"),
        Config("mix n=64 N=0", "mix", 64, prior=0.0, draws=draws, note="no prior"),
        Config("mix n=64 N=64", "mix", 64, prior=64.0, draws=draws, note="stronger prior"),
        Config(BOUND, "labelled", PRECISE_SAMPLES, note="statistics fitted with labels"),
    ]


# -- running one case ----------------------------------------------------------------------------
@dataclass
class Outcome:
    """A configuration on one case: accuracy over the evaluation folds (draws averaged)."""

    accuracy: float
    recalibrations: int
    rejected: int = 0


def _bn_buffers(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    return {
        name: (_buffer(m, "mean").detach().clone(), _buffer(m, "var").detach().clone())
        for name, m in model.named_modules()
        if isinstance(m, BN_TYPES)
    }


def _restore(model: nn.Module, saved: dict[str, tuple[Tensor, Tensor]]) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (mean, var) in saved.items():
            _buffer(modules[name], "mean").copy_(mean)
            _buffer(modules[name], "var").copy_(var)


def _batches(x: Tensor, size: int = RECAL_BATCH) -> list[Tensor]:
    return [x[i : i + size] for i in range(0, len(x), size)]


def _correct(model: nn.Module, x: Tensor, y: Tensor) -> int:
    return int((digits.predict(model, x) == y).sum())


class _StatisticsAsParameters:
    """Every BatchNorm layer normalizes with a per-channel mean and log variance that autograd
    can move (forward hooks replace the layer's output); the model's weights stay fixed."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, BN_TYPES)}
        self.mean = {n: _buffer(m, "mean").detach().clone() for n, m in self.layers.items()}
        self.log_var = {
            n: torch.log(_buffer(m, "var").detach() + m.eps) for n, m in self.layers.items()
        }
        for t in (*self.mean.values(), *self.log_var.values()):
            t.requires_grad_(True)

    def parameters(self) -> list[Tensor]:
        return [*self.mean.values(), *self.log_var.values()]

    def hooks(self) -> list[Any]:
        def hook(name: str, module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
            x = args[0]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale = torch.exp(-0.5 * self.log_var[name])
            if isinstance(module, _BatchNorm) and module.affine:
                return (x - self.mean[name].view(shape)) * (scale * module.weight).view(
                    shape
                ) + module.bias.view(shape)
            return (x - self.mean[name].view(shape)) * scale.view(shape)

        return [
            m.register_forward_hook(lambda mod, a, o, n=n: hook(n, mod, a, o))
            for n, m in self.layers.items()
        ]

    def write(self) -> None:
        with torch.no_grad():
            for n, m in self.layers.items():
                _buffer(m, "mean").copy_(self.mean[n])
                _buffer(m, "var").copy_((torch.exp(self.log_var[n]) - m.eps).clamp_min(0.0))


def fit_statistics_with_labels(
    model: nn.Module, x: Tensor, y: Tensor, steps: int = LABELLED_STEPS, lr: float = LABELLED_LR
) -> None:
    """The labelled bound: starting from ``precise`` on ``x``, fit every BatchNorm layer's
    running statistics to minimize the cross-entropy on ``(x, y)`` (full-batch Adam); the
    weights stay fixed.  Statistics and affine parameters are interchangeable per channel, so
    this also bounds what TENT-like adaptation of the affine parameters could do with the same
    data -- with labels.  Leaves the fitted statistics in the model's buffers."""
    bnwatch.recalibrate(model, _batches(x), num_samples=len(x), apply=True, progress=False)
    stats = _StatisticsAsParameters(model)
    flags = [p.requires_grad for p in model.parameters()]
    handles = stats.hooks()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.Adam(stats.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    stats.write()


def run_config(
    config: Config,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    folds: Sequence[Tensor],
    pools: Sequence[Tensor],
) -> Outcome:
    """Recalibrate on draws from each fold's pool, evaluate on the fold, restore the model."""
    source = _bn_buffers(model)
    correct = 0.0
    total = 0.0
    calls = rejected = 0
    for fold, pool in zip(folds, pools, strict=True):
        held_out = [x[pool[-HELD_OUT:]]] if config.held_out else None
        for d in range(config.draws):
            end = (d + 1) * config.samples
            if end > len(pool) - (HELD_OUT if config.held_out else 0):
                raise ValueError(f"{config.name}: the pool of {len(pool)} images is too small")
            idx = pool[end - config.samples : end]
            data = _batches(x[idx])
            if config.method in ("fvcore", "labelled"):
                if config.method == "fvcore":
                    fvcore_precise_bn(model, data)
                else:
                    fit_statistics_with_labels(model, x[idx], y[idx])
                hits = _correct(model, x[fold], y[fold])
                _restore(model, source)
            else:
                result = bnwatch.recalibrate(
                    model,
                    data,
                    num_samples=config.samples,
                    method="mix" if config.method == "mix" else "precise",
                    prior_strength=config.prior,
                    layers=list(config.layers) if config.layers is not None else None,
                    held_out=held_out,
                    apply="if_better" if config.held_out else False,
                    progress=False,
                )
                if config.held_out:
                    rejected += result.status == "rejected"
                else:
                    result.apply()
                hits = _correct(model, x[fold], y[fold])
                if result.status == "applied":
                    result.rollback()
            calls += 1
            correct += hits / config.draws
            total += len(fold) / config.draws
    return Outcome(accuracy=correct / total, recalibrations=calls, rejected=rejected)


def _seed_for(*parts: object) -> int:
    """A stable 31-bit seed from labels (``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def make_folds(n: int, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """``FOLDS`` evaluation folds of ``range(n)`` and, for each, its shuffled recalibration
    pool (the other folds)."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    folds = [order[k::FOLDS] for k in range(FOLDS)]
    pools = []
    for k in range(FOLDS):
        rest = torch.cat([folds[j] for j in range(FOLDS) if j != k])
        g = torch.Generator().manual_seed(_seed_for("pool", seed, k))
        pools.append(rest[torch.randperm(len(rest), generator=g)])
    return folds, pools


def recovered(acc: float, corrupt: float, clean: float) -> float | None:
    """Share of the lost accuracy won back (``None`` when the case lost nothing)."""
    lost = clean - corrupt
    return (acc - corrupt) / lost if lost > 0 else None


# -- timing --------------------------------------------------------------------------------------
def time_precise(model: nn.Module, x: Tensor, batch: int, rounds: int) -> dict[str, list[float]]:
    """Wall seconds of bnwatch precise and of fvcore PreciseBN on the same batches,
    round-robin from the same buffers (see the module docstring)."""
    data = _batches(x, batch)
    source = _bn_buffers(model)

    def ours() -> None:
        bnwatch.recalibrate(
            model, data, method="precise", num_samples=len(x), apply=True, progress=False
        )

    def theirs() -> None:
        fvcore_precise_bn(model, data)

    runs: dict[str, Callable[[], None]] = {"bnwatch precise": ours, "fvcore PreciseBN": theirs}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds + 1):  # round 0 warms up, untimed
        for name in names if r % 2 == 0 else names[::-1]:
            _restore(model, source)
            start = time.perf_counter()
            runs[name]()
            elapsed = time.perf_counter() - start
            if r:
                seconds[name].append(elapsed)
    _restore(model, source)
    return seconds


def statistics_gap(model: nn.Module, x: Tensor) -> dict[str, float]:
    """How far bnwatch's precise statistics are from fvcore's on the same data: the largest
    ``|Δmean| / σ`` and ``|Δvar| / var`` over all channels of all layers."""
    source = _bn_buffers(model)
    data = _batches(x)
    bnwatch.recalibrate(
        model, data, method="precise", num_samples=len(x), apply=True, progress=False
    )
    ours = _bn_buffers(model)
    _restore(model, source)
    fvcore_precise_bn(model, data)
    theirs = _bn_buffers(model)
    _restore(model, source)
    d_mean = max(
        float(((ours[k][0] - theirs[k][0]).abs() / theirs[k][1].sqrt()).max()) for k in ours
    )
    d_var = max(float(((ours[k][1] - theirs[k][1]).abs() / theirs[k][1]).max()) for k in ours)
    return {"max_mean_diff_in_sd": d_mean, "max_var_rel_diff": d_var}


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    a = np.asarray(values, dtype=np.float64) * 1e3
    return float(np.median(a)), float(np.percentile(a, 25)), float(np.percentile(a, 75))


# -- summaries -----------------------------------------------------------------------------------
@dataclass
class Summary:
    """Recovered shares of one configuration over a set of cases."""

    cases: int
    mean: float | None
    median: float | None
    pooled: float | None
    accuracy: float
    rejected: int = 0
    recalibrations: int = 0
    per_family: dict[str, float | None] = field(default_factory=dict)


def summarize(rows: Sequence[dict[str, Any]], config: str, clean: float) -> Summary:
    shares = [r["methods"][config]["recovered"] for r in rows]
    shares = [s for s in shares if s is not None]
    won = sum(r["methods"][config]["accuracy"] - r["corrupt"] for r in rows if r["lost"] > 0)
    lost = sum(r["lost"] for r in rows if r["lost"] > 0)
    per_family: dict[str, float | None] = {}
    for family in FAMILIES:
        fam = [
            r["methods"][config]["recovered"]
            for r in rows
            if r["family"] == family and r["methods"][config]["recovered"] is not None
        ]
        per_family[family] = float(np.mean(fam)) if fam else None
    return Summary(
        cases=len(shares),
        mean=float(np.mean(shares)) if shares else None,
        median=float(np.median(shares)) if shares else None,
        pooled=won / lost if lost > 0 else None,
        accuracy=float(np.mean([r["methods"][config]["accuracy"] for r in rows])),
        rejected=sum(r["methods"][config].get("rejected", 0) for r in rows),
        recalibrations=sum(r["methods"][config]["recalibrations"] for r in rows),
        per_family=per_family,
    )


def _pct(value: float | None, width: int = 6, signed: bool = False) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{100 * value:+.0f}%".rjust(width) if signed else f"{100 * value:.1f}%".rjust(width)


def format_cases(rows: Sequence[dict[str, Any]], configs: Sequence[str]) -> str:
    head = f"{'corruption':<15}{'sev':>3} {'param':>6} {'corrupt':>8} |"
    head += "".join(f"{c:>15}" for c in configs)
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['corruption']:<15}{r['severity']:>3} {r['param']:>6g} {_pct(r['corrupt'], 8)} |"
        for c in configs:
            m = r["methods"][c]
            line += f"{_pct(m['accuracy'], 8)}{_pct(m['recovered'], 7, signed=True)}"
        lines.append(line)
    return "\n".join(lines)


def format_per_corruption(rows: Sequence[dict[str, Any]], configs: Sequence[str]) -> str:
    head = f"{'corruption':<15}{'family':<12}{'pts lost 1/2/3':>15} |"
    widths = [max(12, len(c) + 2) for c in configs]
    head += "".join(f"{c:>{w}}" for c, w in zip(configs, widths, strict=True))
    lines = [head, "-" * len(head)]
    for name in dict.fromkeys(r["corruption"] for r in rows):
        rs = [r for r in rows if r["corruption"] == name]
        lost = "/".join(f"{100 * r['lost']:.0f}" for r in rs)
        line = f"{name:<15}{rs[0]['family']:<12}{lost:>15} |"
        for c, w in zip(configs, widths, strict=True):
            shares = [r["methods"][c]["recovered"] for r in rs]
            valid = [s for s in shares if s is not None]
            line += _pct(float(np.mean(valid)) if valid else None, w, signed=True)
        lines.append(line)
    return "\n".join(lines)


def format_summary(summaries: dict[str, Summary], families: Sequence[str]) -> str:
    head = (
        f"{'configuration':<18}{'cases':>5}{'mean':>8}{'median':>8}{'pooled':>8}{'accuracy':>9}"
        f"  {'target':<6}" + "".join(f"{f[:11]:>12}" for f in families)
    )
    lines = [head, "-" * len(head)]
    for name, s in summaries.items():
        ok = s.mean is not None and s.mean >= TARGET_RECOVERED
        verdict = "bound" if name in ("best of all", BOUND) else "ok" if ok else "MISS"
        lines.append(
            f"{name:<18}{s.cases:>5}{_pct(s.mean, 8)}{_pct(s.median, 8)}{_pct(s.pooled, 8)}"
            f"{_pct(s.accuracy, 9)}  {verdict:<6}"
            + "".join(_pct(s.per_family.get(f), 12) for f in families)
        )
    return "\n".join(lines)


def format_ablations(
    summaries: dict[str, Summary], configs: Sequence[Config], reference: Summary
) -> str:
    head = f"{'configuration':<18}{'mean':>7}{'pooled':>8}{'vs precise':>11}{'rejected':>9}  call"
    lines = [head, "-" * len(head)]
    for c in configs:
        s = summaries[c.name]
        delta = None if s.mean is None or reference.mean is None else s.mean - reference.mean
        pts = "-" if delta is None else f"{100 * delta:+.1f} pts"
        rej = f"{s.rejected}/{s.recalibrations}" if c.held_out else "-"
        lines.append(
            f"{c.name:<18}{_pct(s.mean, 7)}{_pct(s.pooled, 8)}{pts:>11}{rej:>9}  {c.call()}"
        )
    return "\n".join(lines)


def across_seeds(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Each configuration's mean recovered share per seed, and its mean, min and max over the
    seeds; the share pooled over every seed's cases; per family, the mean over the seeds; the
    timing ratios per seed."""
    first = next(iter(runs.values()))
    out: dict[str, Any] = {"configs": {}, "timing": {}}
    for name in first["summary"]:
        means = [r["summary"][name]["mean_recovered"] for r in runs.values()]
        valid = [m for m in means if m is not None]
        cases = [c for r in runs.values() for c in r["cases"] if c["lost"] > 0]
        lost = sum(c["lost"] for c in cases)
        won = sum(c["methods"][name]["accuracy"] - c["corrupt"] for c in cases)
        families = {}
        for family in FAMILIES:
            values = [r["summary"][name]["per_family"].get(family) for r in runs.values()]
            present = [v for v in values if v is not None]
            families[family] = float(np.mean(present)) if present else None
        out["configs"][name] = {
            "per_seed": means,
            "mean": float(np.mean(valid)) if valid else None,
            "min": min(valid) if valid else None,
            "max": max(valid) if valid else None,
            "pooled": won / lost if lost > 0 else None,
            "per_family": families,
            "meets_target": bool(valid) and float(np.mean(valid)) >= TARGET_RECOVERED,
        }
    bound = out["configs"].get(BOUND, {}).get("mean")
    for c in out["configs"].values():
        # what a configuration recovers as a share of what the labels let the same statistics
        # recover (the 60 % is of the loss; the bound shows how much of it is reachable)
        c["of_bound"] = c["mean"] / bound if bound and c["mean"] is not None else None
    for batch in TIMING_BATCHES:
        out["timing"][str(batch)] = [
            t["ratio"]
            for r in runs.values()
            for t in r["timing"]
            if t["config"] == "bnwatch precise" and t["batch"] == batch
        ]
    return out


def format_across_seeds(across: dict[str, Any], seeds: Sequence[int]) -> str:
    cells = "".join(f"{f'seed {s}':>8}" for s in seeds)
    bounded = any(c["of_bound"] is not None for c in across["configs"].values())
    head = (
        f"{'configuration':<18}{cells}{'mean':>8}{'min':>7}{'max':>7}{'pooled':>8}"
        + (f"{'of bound':>10}" if bounded else "")
        + f"  {'target':<6}"
        + "".join(f"{f[:11]:>12}" for f in FAMILIES)
    )
    lines = [
        f"across {len(seeds)} seeds (each trains its own model on its own split): mean recovered "
        f"share per seed; target: mean over the seeds >= {100 * TARGET_RECOVERED:.0f}%",
        "  pooled = points won back / points lost over every seed's cases; per family: mean "
        "over the seeds",
        *(
            [
                f"  of bound = mean / the mean of {BOUND} (what fitting the same statistics to "
                "the labels recovers)"
            ]
            if bounded
            else []
        ),
        head,
        "-" * len(head),
    ]
    for name, c in across["configs"].items():
        verdict = (
            "bound" if name in ("best of all", BOUND) else "ok" if c["meets_target"] else "MISS"
        )
        lines.append(
            f"{name:<18}"
            + "".join(_pct(m, 8) for m in c["per_seed"])
            + f"{_pct(c['mean'], 8)}{_pct(c['min'], 7)}{_pct(c['max'], 7)}{_pct(c['pooled'], 8)}"
            + (_pct(c["of_bound"], 10) if bounded else "")
            + f"  {verdict:<6}"
            + "".join(_pct(c["per_family"].get(f), 12) for f in FAMILIES)
        )
    for batch, ratios in across["timing"].items():
        shown = ", ".join(f"{r:.3f}x" for r in ratios)
        lines.append(
            f"precise / fvcore PreciseBN wall time, batch {batch}: {shown} (target <= "
            f"{TARGET_TIME_RATIO:.2f}x)"
        )
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Accuracy recovered by bnwatch.recalibrate on corrupted digits, and its "
        "wall time against fvcore's PreciseBN.",
        epilog="Methodology: see the module docstring of benchmarks/recalibration.py.",
    )
    p.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        metavar="N",
        help="split, weights, corruptions, folds (default 0); several seeds run one after the "
        "other and end with a table across them",
    )
    p.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULT_EPOCHS}")
    p.add_argument(
        "--corruptions",
        nargs="+",
        default=None,
        choices=[c.name for c in CORRUPTIONS],
        help="corruptions to run (default: all)",
    )
    p.add_argument("--no-ablations", action="store_true", help="only the four main columns")
    p.add_argument(
        "--timing-rounds",
        type=int,
        default=None,
        help=f"timed rounds per batch size (default {DEFAULT_TIMING_ROUNDS})",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1, see docs)"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run for tests: 2 epochs, 3 corruptions, 1 mix draw, no ablations",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs = 2 if args.epochs is None else args.epochs
        args.corruptions = args.corruptions or list(SMOKE_CORRUPTIONS)
        args.no_ablations = True
        args.timing_rounds = 2 if args.timing_rounds is None else args.timing_rounds
    args.epochs = DEFAULT_EPOCHS if args.epochs is None else args.epochs
    args.timing_rounds = DEFAULT_TIMING_ROUNDS if args.timing_rounds is None else args.timing_rounds
    for flag, value in (
        ("--epochs", args.epochs),
        ("--timing-rounds", args.timing_rounds),
        ("--threads", args.threads),
    ):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark for every seed, print the tables, optionally write JSON; returns the
    results (one seed's, or ``{"seeds": {seed: results}, "across_seeds": ...}``)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {}
    for i, seed in enumerate(args.seed):
        if i:
            print()
        runs[seed] = run_seed(args, seed)
    results = runs[args.seed[0]]
    if len(runs) > 1:
        across = across_seeds(runs)
        print()
        print(format_across_seeds(across, list(runs)))
        results = {"seeds": {str(s): r for s, r in runs.items()}, "across_seeds": across}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json}")
    return results


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Train on ``seed``'s split, run every case and configuration, time, print the tables."""
    started = time.perf_counter()
    load_before = os.getloadavg()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    splits = digits.load_splits(seed, (TRAIN_FRACTION, 0.0))
    model = digits.make_model(seed)
    training = digits.train(model, splits.train_x, splits.train_y, epochs=args.epochs, seed=seed)
    x, y = splits.prod_x, splits.prod_y
    clean = float((digits.predict(model, x) == y).float().mean())
    progress(f"trained {args.epochs} epochs in {training.seconds:.1f}s; clean {100 * clean:.1f}%")

    folds, pools = make_folds(len(y), seed)
    mains = main_configs(args.smoke)
    ablations = [] if args.no_ablations else ablation_configs()
    configs = mains + ablations
    selected = [c for c in CORRUPTIONS if args.corruptions is None or c.name in args.corruptions]

    rows: list[dict[str, Any]] = []
    for corruption in selected:
        for severity, param in enumerate(corruption.severities, start=1):
            g = torch.Generator().manual_seed(_seed_for(seed, corruption.name, severity))
            xc = corruption.apply(x, param, g)
            corrupt = float((digits.predict(model, xc) == y).float().mean())
            row: dict[str, Any] = {
                "corruption": corruption.name,
                "family": corruption.family,
                "severity": severity,
                "param": param,
                "clean": clean,
                "corrupt": corrupt,
                "lost": clean - corrupt,
                "methods": {},
            }
            for config in configs:
                out = run_config(config, model, xc, y, folds, pools)
                row["methods"][config.name] = {
                    "accuracy": out.accuracy,
                    "recovered": recovered(out.accuracy, corrupt, clean),
                    "recalibrations": out.recalibrations,
                    "rejected": out.rejected,
                }
            best = max(
                row["methods"][c.name]["accuracy"]
                for c in configs
                if c.method not in ("fvcore", "labelled")
            )
            row["methods"]["best of all"] = {
                "accuracy": best,
                "recovered": recovered(best, corrupt, clean),
                "recalibrations": 0,
                "rejected": 0,
            }
            rows.append(row)
            progress(f"{corruption.name} severity {severity}: corrupted {100 * corrupt:.1f}%")

    main_names = [c.name for c in mains]
    summaries = {name: summarize(rows, name, clean) for name in main_names}
    ablation_summaries = {c.name: summarize(rows, c.name, clean) for c in ablations}
    if ablations:
        summaries["best of all"] = summarize(rows, "best of all", clean)
        summaries[BOUND] = ablation_summaries[BOUND]

    # timing on the first corruption's severity-2 images (any corrupted set would do)
    timing_x = CORRUPTIONS[0].apply(
        x, CORRUPTIONS[0].severities[1], torch.Generator().manual_seed(_seed_for(seed))
    )[pools[0][:PRECISE_SAMPLES]]
    timing: list[dict[str, Any]] = []
    for batch in TIMING_BATCHES:
        seconds = time_precise(model, timing_x, batch, args.timing_rounds)
        ours, theirs = seconds["bnwatch precise"], seconds["fvcore PreciseBN"]
        ratio = float(np.median(ours) / np.median(theirs))
        for name, values in seconds.items():
            med, p25, p75 = _quantiles(values)
            timing.append(
                {
                    "config": name,
                    "batch": batch,
                    "batches": math.ceil(len(timing_x) / batch),
                    "rounds": len(values),
                    "ms_median": med,
                    "ms_p25": p25,
                    "ms_p75": p75,
                    "ratio": ratio if name == "bnwatch precise" else 1.0,
                    "times_ms": [1e3 * v for v in values],
                }
            )
        progress(f"timing, batch {batch}: ratio {ratio:.3f}")
    gap = statistics_gap(model, timing_x)
    total = time.perf_counter() - started
    load_after = os.getloadavg()

    families = [f for f in FAMILIES if any(r["family"] == f for r in rows)]
    print(
        f"DigitsCNN ({sum(p.numel() for p in model.parameters()):,} parameters; BN layers "
        f"{', '.join(BN_LAYERS)}), seed {seed}"
    )
    print(
        f"trained {args.epochs} epochs on {len(splits.train_y)} digits with ±1-pixel shifts "
        f"({training.seconds:.1f}s); test set {len(y)} digits"
    )
    print(
        f"clean accuracy {100 * clean:.1f}%; recalibrate on 2 of {FOLDS} folds, evaluate on "
        "the third (cross-fitted, disjoint)"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); bnwatch "
        f"{bnwatch.__version__} from {Path(bnwatch.__file__).parent}"
    )
    print("cells: accuracy on corrupted images, and the share of the lost accuracy recovered")
    print()
    print(format_cases(rows, main_names))
    print()
    print("recovered share of the lost accuracy per corruption (mean over its severities)")
    bounds = ["best of all", BOUND] if ablations else []
    print(format_per_corruption(rows, main_names + bounds))
    print()
    print(
        f"summary over the corruption x severity cases that lost accuracy; target: mean >= "
        f"{100 * TARGET_RECOVERED:.0f}%"
    )
    print("  pooled = points won back / points lost; per family: mean recovered share")
    print(format_summary(summaries, families))
    if ablations:
        print("  (best of all: per case the best configuration run, chosen with the evaluation")
        print("   labels -- an upper bound for any selection rule, not a method;")
        print(f"   {BOUND}: precise, then every BN layer's statistics fitted to the labels of the")
        print("   same 512 recalibration images, evaluated on the held-out fold -- about the most")
        print("   that changing only BN statistics or affine parameters buys, even with labels)")
        print()
        print("ablations: what a user can select with bnwatch.recalibrate (recovered share;")
        print("  vs precise: difference of the means; rejected: if_better kept the old statistics;")
        print("  n: num_samples)")
        print(format_ablations(ablation_summaries, ablations, summaries["precise 512"]))
    print()
    print(
        f"wall time of precise recalibration on {len(timing_x)} corrupted images "
        f"(gaussian_noise sev 2), {args.timing_rounds} rounds"
    )
    print(f"  round-robin; ratio = median / fvcore's median (target <= {TARGET_TIME_RATIO:.2f}x)")
    thead = f"{'procedure':<18}{'batch':>6}  {'ms median [p25, p75]':<26}{'ratio':>7}  target"
    print(thead)
    print("-" * len(thead))
    for t in timing:
        timing_cell = f"{t['ms_median']:7.2f} [{t['ms_p25']:.2f}, {t['ms_p75']:.2f}]"
        verdict = ""
        if t["config"] == "bnwatch precise":
            verdict = "ok" if t["ratio"] <= TARGET_TIME_RATIO else "MISS"
        print(f"{t['config']:<18}{t['batch']:>6}  {timing_cell:<26}{t['ratio']:>6.3f}x  {verdict}")
    print(
        f"same statistics: max |mean difference| {gap['max_mean_diff_in_sd']:.1e} sd, max "
        f"relative variance difference {gap['max_var_rel_diff']:.1e}"
    )
    print("  (fvcore's variance is biased, bnwatch's unbiased: 1/(N-1), largest for the BN1d)")
    print(
        f"total runtime {total:.1f} s; 1-min load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs"
    )

    def as_dict(s: Summary) -> dict[str, Any]:
        return {
            "cases": s.cases,
            "mean_recovered": s.mean,
            "median_recovered": s.median,
            "pooled_recovered": s.pooled,
            "mean_accuracy": s.accuracy,
            "meets_target": s.mean is not None and s.mean >= TARGET_RECOVERED,
            "rejected": s.rejected,
            "recalibrations": s.recalibrations,
            "per_family": s.per_family,
        }

    results: dict[str, Any] = {
        "meta": {
            "model": "DigitsCNN (bnwatch.demo.digits), trained in the run",
            "seed": seed,
            "epochs": args.epochs,
            "train_images": len(splits.train_y),
            "test_images": len(y),
            "folds": FOLDS,
            "clean_accuracy": clean,
            "train_accuracy": training.train_accuracy,
            "train_seconds": training.seconds,
            "configs": [
                {"name": c.name, "call": c.call(), "draws": c.draws, "ablation": c in ablations}
                for c in configs
            ],
            "target_recovered": TARGET_RECOVERED,
            "target_time_ratio": TARGET_TIME_RATIO,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "bnwatch": bnwatch.__version__,
            "bnwatch_path": str(Path(bnwatch.__file__).parent),
            "smoke": args.smoke,
            "total_seconds": total,
            "load_average_1m_before_after": [load_before[0], load_after[0]],
        },
        "cases": rows,
        "summary": {name: as_dict(s) for name, s in summaries.items()},
        "ablations": {name: as_dict(s) for name, s in ablation_summaries.items()},
        "timing": timing,
        "statistics_gap": gap,
    }
    return results


if __name__ == "__main__":
    main()
