"""Reference profiles: what each BatchNorm layer receives on validation data."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnwatch.capture.accumulator import LayerAccumulator
from bnwatch.capture.discovery import BatchNormLayer, check_layer_paths, discover
from bnwatch.capture.monitor import unwatched
from bnwatch.errors import (
    BnwatchError,
    ConfigError,
    NonFiniteDataError,
    ShapeError,
    check_positive_int,
)
from bnwatch.inputs import Forward, check_data, check_forward, iter_inputs, whole_batches
from bnwatch.schema import LayerProfile, Profile, utcnow
from bnwatch.stats import ChannelMoments, Reservoir

logger = logging.getLogger("bnwatch")


def profile(
    model: nn.Module,
    data: Iterable[Any],
    *,
    name: str = "model",
    version: str = "0",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    reservoir_size: int = 512,
    num_samples: int | None = None,
    input_key: str | None = None,
    forward: Forward | None = None,
    seed: int = 0,
) -> Profile:
    """Record a reference profile of every BatchNorm layer from validation data.

    The model runs in eval mode under ``torch.no_grad()`` (every module's mode is restored
    afterwards, also when ``data`` raises).  Every sample is measured: per layer the profile
    keeps the full sufficient statistics (including ``between_var``), a uniform reservoir of
    at most ``reservoir_size`` per-sample channel means, and the running statistics at the
    time.  Pass it to ``bnwatch.watch(..., reference=profile)`` to judge drift against it
    from the first window on, with tighter standard errors than a warm-up baseline.

    Args:
        data: an iterable of tensors, ``(inputs, labels)`` tuples or dicts (``input_key``).
        num_samples: stop after this many samples (all of ``data`` if ``None``).
        forward: for a model that does not take one tensor, ``forward(model, batch)`` runs
            it on a batch as ``data`` yields it (its tensors moved to the model's device),
            e.g. ``lambda model, batch: model(**batch)``; batches are then used whole, and
            ``num_samples`` stops before the first that would pass it (see
            ``bnwatch.recalibrate``).

    Raises:
        NonFiniteDataError: a layer received fewer than 2 finite values in some channel (its
            inputs were NaN or infinite there): there is nothing to profile.
    """
    check_positive_int("reservoir_size", reservoir_size)
    if num_samples is not None:
        check_positive_int("num_samples", num_samples)
    check_forward(forward)
    check_data("data", data)
    layers = discover(model, include, exclude)
    check_layer_paths(model, layers)  # a stored profile holds them: fail before any pass
    accs = [LayerAccumulator(layer.name, reservoir=reservoir_size, seed=seed) for layer in layers]
    modes = {module: module.training for module in model.modules()}
    device = next((p.device for p in model.parameters()), None)

    seen = 0
    try:
        model.eval()
        # a profile's passes (validation data) are not production traffic for a monitor
        # already watching the model (in this thread)
        with torch.no_grad(), unwatched(model), measuring(layers, accs):
            if forward is not None:
                for batch, n in whole_batches(data, input_key, num_samples, device):
                    with data_errors("profile data", f"a batch of {n} samples"):
                        forward(model, batch)
                    seen += n
            else:
                for x in iter_inputs(data, input_key):
                    if not isinstance(x, torch.Tensor):
                        raise ConfigError("data", type(x).__name__, "batches of torch tensors")
                    if num_samples is not None and seen + x.shape[0] > num_samples:
                        x = x[: num_samples - seen]
                    if device is not None and x.device != device:
                        x = x.to(device)
                    with data_errors("profile data", f"{tuple(x.shape)}", forward=False):
                        model(x)
                    seen += int(x.shape[0])
                    if num_samples is not None and seen >= num_samples:
                        break
    finally:
        for module, training in modes.items():
            module.train(training)
    if seen == 0:
        raise ConfigError("data", "an empty iterable", "at least one batch of validation data")
    out: dict[str, LayerProfile] = {}
    unreached = []
    for layer, acc in zip(layers, accs, strict=True):
        stats = acc.collect()
        if stats is None:  # the layer is never reached by this data (e.g. an unused branch)
            unreached.append(layer.name)
            continue
        check_finite_values("profile data", layer.name, stats.moments)
        reservoir = stats.reservoir or Reservoir(reservoir_size, stats.moments.channels)
        rm, rv = layer.module.running_mean, layer.module.running_var
        out[layer.name] = LayerProfile(
            layer=layer.name,
            kind=layer.kind,
            eps=float(layer.module.eps),
            stats=dataclasses.replace(stats, reservoir=None),  # kept once, as ``reservoir``
            reservoir=reservoir,
            running_mean=None if rm is None else rm.detach().double().cpu().numpy(),
            running_var=None if rv is None else rv.detach().double().cpu().numpy(),
        )
    if unreached:
        logger.warning(
            "bnwatch.profile: the data never reached %s (a branch that runs only in training, "
            "say): the profile has no statistics of them, and a monitor given it warms up a "
            "baseline for them instead",
            ", ".join(unreached),
        )
    return Profile(name=name, version=version, created=utcnow(), layers=out)


def check_finite_values(what: str, layer: str, moments: ChannelMoments) -> None:
    """Raise :class:`NonFiniteDataError` when a channel of ``layer`` counted fewer than 2
    finite elements (``what``: whose data, for the message) -- before anything is stored or
    applied."""
    count = np.asarray(moments.count)
    short = np.flatnonzero(count < 2)
    if short.size:
        raise NonFiniteDataError(what, layer, short.tolist(), int(count.min()))


_SHAPE_OR_DTYPE = re.compile(
    r"shape|size|dimension|\bdim|channel|dtype|scalar type|type \(|[0-9]D input|mat[12]\b"
    r"|must match|expected input|to have .* channels",
    re.IGNORECASE,
)
"""What torch says when a model cannot take a batch's shape or dtype (``mat1 and mat2 shapes
cannot be multiplied``, ``expected 4D input``, ``expected input[...] to have 3 channels``,
``expected scalar type Float``, ``Input type (...) and weight type``): the data's fault."""


@contextlib.contextmanager
def data_errors(what: str, got: str, *, forward: bool = True) -> Iterator[None]:
    """A model that cannot run on a batch (a shape or dtype it does not take) is the data's
    fault: say so, naming ``what`` data and what the batch was (``got``) -- and, when the
    model was called with one tensor (``forward=False``), how to call it otherwise.

    Only shape and dtype errors are: any other error of the model (a BatchNorm with
    ``eps=0`` in training mode, a bug in its forward) is raised as it is, with its own
    message -- relabelled "expected shape inputs the model accepts", it sent the user after
    their data for a problem of the model."""
    try:
        yield
    except (RuntimeError, ValueError) as err:
        if isinstance(err, BnwatchError) or not _SHAPE_OR_DTYPE.search(str(err)):
            raise
        expected = "inputs the model accepts"
        if not forward:
            expected += (
                " (called as model(batch); a model that takes a list, a dict or several "
                "arguments needs forward=, --forward on the command line)"
            )
        raise ShapeError(what, expected, f"{got}: {err}") from err


@contextlib.contextmanager
def measuring(layers: Sequence[BatchNormLayer], accs: Sequence[LayerAccumulator]) -> Iterator[None]:
    """Inside, everything ``layers`` receive in this thread goes to their accumulators
    (forward pre-hooks, removed on the way out); a layer in ``train()`` counts as normalizing
    by batch, unless it is frozen.  Other threads' forwards -- a model served while it is
    profiled -- are not this data's."""
    thread = threading.get_ident()

    def hook(acc: LayerAccumulator, frozen: bool, module: _BatchNorm, args: Any) -> None:
        if threading.get_ident() == thread:
            acc.observe(args[0], batch_stat_mode=module.training and not frozen)

    handles = [
        layer.module.register_forward_pre_hook(functools.partial(hook, acc, layer.frozen))
        for layer, acc in zip(layers, accs, strict=True)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
