"""The demo's data and model: scikit-learn digits and a small BatchNorm CNN.

scikit-learn ships its 1,797 8×8 handwritten digits (values 0-16), so the demo needs no
download.  :func:`load_splits` scales them to ``[0, 1]`` and splits them deterministically into
*train* (fits the weights and the running statistics), *validation* (the reference profile)
and *production* (the traffic the monitor watches).  :class:`DigitsCNN` has three
``BatchNorm2d`` layers and one ``BatchNorm1d``; :func:`train` fits it with ±1-pixel random
shifts, the kind of augmentation that makes the running statistics differ from clean data --
the persistent train/inference *gap* of DESIGN §3.  The corruptions (:func:`gaussian_noise`,
:func:`reduce_contrast`, :func:`blur`) make production *drift* away from the validation data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 -- the universal spelling
from torch import Tensor, nn

from bnwatch.errors import BnwatchError

NUM_CLASSES = 10
PIXEL_MAX = 16.0
"""scikit-learn's digits are 4-bit intensities in ``0..16``."""


class DemoDependencyError(BnwatchError, ImportError):
    """An optional dependency of the demo (scikit-learn) is not installed."""

    def __init__(self, package: str, err: ImportError) -> None:
        self.package = package
        super().__init__(
            f"the demo needs {package}, which is not installed ({err}); "
            "install it with: pip install 'bnwatch[demo]'"
        )


@dataclass(frozen=True, eq=False)
class DigitsSplits:
    """Images ``[N, 1, 8, 8]`` float32 in ``[0, 1]`` and labels ``[N]`` int64 of each split."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    prod_x: Tensor
    prod_y: Tensor

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Samples in (train, validation, production)."""
        return len(self.train_y), len(self.val_y), len(self.prod_y)


def load_splits(seed: int, fractions: tuple[float, float] = (0.5, 0.2)) -> DigitsSplits:
    """scikit-learn's digits scaled to ``[0, 1]``, shuffled with ``seed`` and split.

    ``fractions`` are the train and validation shares; production gets the rest.  The split is
    a permutation drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same
    split on every platform.

    Raises:
        DemoDependencyError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DemoDependencyError("scikit-learn", err) from err
    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32) / PIXEL_MAX
    labels = np.asarray(digits.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_train = round(fractions[0] * len(labels))
    n_val = round(fractions[1] * len(labels))
    parts = np.split(order, [n_train, n_train + n_val])

    def pick(idx: np.ndarray) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(images[idx]).unsqueeze(1).contiguous()
        return x, torch.from_numpy(labels[idx])

    (tx, ty), (vx, vy), (px, py) = (pick(p) for p in parts)
    return DigitsSplits(tx, ty, vx, vy, px, py)


class DigitsCNN(nn.Module):
    """A small CNN for 8×8 digits with four BatchNorm layers (~15k parameters).

    ``conv1(1→16)-bn1-ReLU-conv2(16→32)-bn2-ReLU-maxpool(2)-conv3(32→32)-bn3-ReLU``
    ``-global average pool-head_bn (BatchNorm1d)-fc(32→10)``

    ``bn1``, ``bn2`` see ``[N, C, 8, 8]`` maps, ``bn3`` ``[N, C, 4, 4]`` and ``head_bn`` the
    pooled ``[N, C]`` features -- both shapes bnwatch measures (DESIGN §2).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.head_bn = nn.BatchNorm1d(32)
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.head_bn(x.mean(dim=(2, 3)))
        return self.fc(x)  # type: ignore[no-any-return]


def make_model(seed: int) -> DigitsCNN:
    """A freshly initialized :class:`DigitsCNN` whose weights depend only on ``seed``.

    The global torch RNG is forked, so building the model leaves the caller's RNG untouched.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return DigitsCNN()


def shift_augment(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift every image by an independent random offset in ``[-max_shift, max_shift]`` pixels
    along each axis, filling with 0 (the digits' background), as a random crop of the
    zero-padded image."""
    n, _, h, w = x.shape
    k = 2 * max_shift + 1
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, k, (n,), generator=generator)
    dx = torch.randint(0, k, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + k - 1)
    picked = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    return picked.gather(3, cols)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did: epochs, wall time and accuracy on the training split."""

    epochs: int
    seconds: float
    train_accuracy: float


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 32,
    lr: float = 0.01,
    on_epoch: Callable[[int], object] | None = None,
) -> TrainResult:
    """Fit ``model`` with Adam and ±1-pixel shift augmentation; leaves it in ``eval()`` mode.

    Deterministic for a given model initialization and ``seed`` (shuffling and shifts draw
    from a generator seeded with it; the model has no dropout).  The running statistics end up
    as the EMA (momentum 0.1) over the *augmented* training batches.  ``on_epoch(epoch)`` is
    called after each epoch (1-based), e.g. to advance a progress bar.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * -(-len(y) // batch_size)
    )
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a single sample
                continue
            loss = F.cross_entropy(model(shift_augment(x[idx], generator)), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
        if on_epoch is not None:
            on_epoch(epoch)
    model.eval()
    return TrainResult(
        epochs=epochs,
        seconds=time.perf_counter() - start,
        train_accuracy=accuracy(model, x, y),
    )


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_sizes: list[int] | None = None) -> Tensor:
    """Predicted classes of ``x``, run in batches of ``batch_sizes`` (cycled; default 256).

    The model's train/eval modes are left as they are: a layer left in ``train()`` normalizes
    each batch with that batch's statistics, which is what the demo wants to show.
    """
    sizes = batch_sizes or [256]
    out: list[Tensor] = []
    i = 0
    for b in cycle_until(sizes, len(x)):
        out.append(model(x[i : i + b]).argmax(dim=1))
        i += b
    return torch.cat(out)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Share of correctly classified images, with the model in its current mode."""
    return float((predict(model, x) == y).float().mean())


def cycle_until(sizes: list[int], total: int) -> list[int]:
    """Batch sizes cycling through ``sizes`` whose sum is exactly ``total`` (last one cut)."""
    out: list[int] = []
    i = 0
    while total > 0:
        b = min(sizes[i % len(sizes)], total)
        out.append(b)
        total -= b
        i += 1
    return out


# --------------------------------------------------------------------------------------
# Corruptions (image-space covariate shift; inputs and outputs in [0, 1])
# --------------------------------------------------------------------------------------
def gaussian_noise(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Add i.i.d. normal noise of standard deviation ``sigma`` and clip to ``[0, 1]``."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return (x + sigma * noise).clamp(0.0, 1.0)


def reduce_contrast(x: Tensor, factor: float) -> Tensor:
    """Pull every pixel towards its image's mean: ``m + factor · (x - m)`` (``factor < 1``)."""
    m = x.mean(dim=(2, 3), keepdim=True)
    return m + factor * (x - m)


def blur(x: Tensor) -> Tensor:
    """3×3 binomial blur (``[1, 2, 1] ⊗ [1, 2, 1] / 16``), zero-padded like the background."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype)
    kernel = (torch.outer(k1, k1) / 16.0).reshape(1, 1, 3, 3)
    return F.conv2d(x, kernel, padding=1)
