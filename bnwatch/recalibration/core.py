"""Re-estimate BatchNorm statistics: ``bnwatch.recalibrate``.

Methods (per layer, with ``μs, σs²`` the current running statistics and ``μt, σt²`` the
population statistics of the recalibration data, ``n`` its samples):

``precise``
    ``running_mean = μt``, ``running_var = σt² · N/(N - 1)`` with ``N`` the elements seen:
    the population statistics pooled over every element (PreciseBN's estimator, with the
    between-batch variance included, so unequal batches weigh by their elements).  During
    the pass every recalibrated layer normalizes with batch statistics, so downstream layers
    see what training would show them.  The layer computes those batch statistics anyway:
    with momentum 1 its running buffers hold them after each call, and a forward hook keeps
    them (pooled in float64 at the end) instead of reducing the input a second time.
    Batches whose statistics are not finite, inputs off the CPU (where checking would
    synchronize) and ``SyncBatchNorm`` (whose batch statistics are already global) are
    measured from the input instead, excluding non-finite elements as the monitor does.
``mix``
    Schneider et al. (2020): ``μ = w μs + (1 - w) μt`` and ``σ² = w σs² + (1 - w) σt²`` with
    ``w = N/(N + n)`` for a prior strength of ``N`` samples -- for few target samples.  During
    the pass each layer normalizes with the mix of the data it has seen so far, this batch
    included: close to what it will use at inference, and equal to it for the last batch, but
    the layers below a mixed one are measured while its mix is still moving (with many small
    batches the deeper layers' estimates differ by a few percent from a layer-by-layer pass).

Frozen BatchNorm layers (``FrozenBatchNorm2d``) are never recalibrated: the layers after one
were trained on what its fixed statistics make of their input.  Only the BatchNorm layers
being recalibrated change mode; dropout and every other module keep
theirs (``torch.optim.swa_utils.update_bn`` switches the whole model to train mode).  Modes,
momenta, hooks and buffers are restored even when the data raises midway.  With
``torch.distributed`` initialized, the sufficient statistics of all ranks are merged, so
every rank ends with identical statistics, judgement and errors
(:mod:`bnwatch.recalibration.distributed`).
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnwatch.capture.accumulator import LayerAccumulator
from bnwatch.capture.discovery import BatchNormLayer, discover
from bnwatch.capture.monitor import drop_detached, unwatched, watching
from bnwatch.capture.profile import check_finite_values, data_errors
from bnwatch.errors import BnwatchError, ConfigError, ShapeError, check_positive_int
from bnwatch.inputs import (
    Forward,
    check_data,
    check_forward,
    count_samples,
    model_input,
    whole_batches,
)
from bnwatch.recalibration import distributed
from bnwatch.recalibration.result import (
    BatchNormBuffers,
    LayerUpdate,
    RecalibrationResult,
    evaluate,
)
from bnwatch.stats import MOMENT_FIELDS, ChannelMoments

TENSOR_BATCH = 64
"""Batch size for ``data`` (or ``held_out``) given as one tensor of samples."""

MIN_SAMPLES = 16
"""Default ``min_samples`` of :func:`recalibrate`: fewer samples give noise, not statistics."""

FROZEN = "frozen"
"""Why a frozen BatchNorm layer is left out (:attr:`RecalibrationResult.left_out`)."""

NO_RUNNING_STATISTICS = "no running statistics (track_running_stats=False)"
"""Why a BatchNorm layer without running statistics is left out."""

Method = Literal["precise", "mix"]
METHODS: tuple[str, ...] = ("precise", "mix")


class NotEnoughDataError(BnwatchError, ValueError):
    """The data held fewer samples than the recalibration needs."""

    def __init__(self, seen: int, needed: int) -> None:
        self.seen = seen
        self.needed = needed
        super().__init__(
            f"recalibration saw {seen} samples but needs at least {needed}: pass more data "
            "(or lower min_samples)"
        )


class FrozenLayersError(ConfigError):
    """Every layer the recalibration would take is a frozen BatchNorm, which is never
    recalibrated (see the module docstring).

    Attributes:
        frozen: the qualified names of those layers.
    """

    def __init__(self, model: nn.Module, layers: str | Sequence[str] | None, frozen: list[str]):
        self.frozen = frozen
        named = ", ".join(frozen[:5]) + (f" and {len(frozen) - 5} more" if len(frozen) > 5 else "")
        super().__init__(
            "layers" if layers is not None else "model",
            layers if layers is not None else type(model).__name__,
            "BatchNorm layers that are not frozen: "
            + ("those matched" if layers is not None else "its BatchNorm layers")
            + f" ({named}) are frozen BatchNorm layers (FrozenBatchNorm2d), which are "
            "watched but not recalibrated: the layers after one were trained on what its fixed "
            "statistics make of their input, and new statistics would change that",
        )


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_samples: int = 8192,
    method: Method = "precise",
    prior_strength: float = 16.0,
    layers: str | Sequence[str] | None = None,
    input_key: str | None = None,
    forward: Forward | None = None,
    label_key: str | None = None,
    min_samples: int = MIN_SAMPLES,
    held_out: Iterable[Any] | None = None,
    apply: bool | Literal["if_better"] = "if_better",
    progress: bool | None = None,
    device: torch.device | str | None = None,
) -> RecalibrationResult:
    """Re-estimate the running statistics of a model's BatchNorm layers.

    Args:
        model: the model; its BatchNorm buffers change only when the result is applied.
        data: recalibration inputs: an iterable of batches -- tensors, ``(inputs, ...)``
            tuples or dicts (``input_key``), e.g. a DataLoader -- or one tensor of samples,
            run in batches of 64 (``mon.inputs()`` of a monitor that kept recent production
            inputs).
        num_samples: use at most this many samples.
        method: ``"precise"`` or ``"mix"`` (see the module docstring).
        prior_strength: ``N`` of the ``mix`` method, in samples.
        layers: recalibrate only layers whose qualified name matches these globs.
        input_key: the model input's key when batches are dicts.
        forward: for a model that does not take one tensor, ``forward(model, batch)`` runs
            it on a batch as ``data`` yields it (its tensors moved to ``device``), e.g.
            ``lambda model, batch: model(**batch)``; a batch's samples are counted on its
            input (a tensor's first dimension, a list's length; ``input_key`` names it in a
            dict whose tensors do not all have the same first dimension).  Batches are then
            used whole: the samples stop before the first batch that would pass
            ``num_samples``.  Also used on ``held_out``.
        label_key: the labels' key in ``held_out`` batches that are dicts (tuples give them
            as their second element).
        min_samples: fewer samples than this is an error (statistics would be noise).
        held_out: data to judge the result on, as ``data`` -- the gap between what each
            layer receives and its running statistics before and after, and the accuracy when
            it yields ``(inputs, labels)`` (or dicts with ``label_key``) and the model (or
            ``forward``) returns class scores ``[N, classes]``.
        apply: ``True`` applies the new statistics, ``False`` leaves the model as it was,
            ``"if_better"`` applies them unless the held-out data shows no improvement
            (always when there is no held-out data).
        progress: show a progress bar (default: when stderr is a terminal).
        device: move inputs there (default: the device of the model's first parameter).

    Under ``torch.distributed`` every rank calls this with its own shard of ``data`` (and of
    ``held_out``, if any rank passes it, then every rank must, even an empty one: else every
    rank raises ``ConfigError``) and the same other arguments; all ranks end with the same
    statistics, judgement and status, or errors: a rank whose arguments are refused raises its
    error, and the others :class:`RankFailedError` at once.

    Raises:
        NoBatchNormError: the model (or ``layers``) has no BatchNorm layer.
        FrozenLayersError: all of them are frozen (see the module docstring).
        ConfigError: ``layers`` matches a layer without running statistics
            (``track_running_stats=False``), or no layer with them is left (with
            ``layers=None`` those without are left out, as frozen layers are: see
            ``result.left_out``).
        NotEnoughDataError: fewer than ``min_samples`` samples (on all ranks together).
        NonFiniteDataError: a layer received fewer than 2 finite values in some channel (its
            inputs were NaN or infinite); the model is left untouched.
        ShapeError: the data does not fit the model; the model is left untouched.
        RankFailedError: another rank raised; nothing changed on this one either.
    """
    if isinstance(data, torch.Tensor):
        data = torch.split(data, TENSOR_BATCH)
    if isinstance(held_out, torch.Tensor):
        held_out = torch.split(held_out, TENSOR_BATCH)
    live = model
    # what this rank prepared: the model measured (a copy of a watched one), its layers
    local: dict[str, Any] = {}

    def prepare_and_measure() -> tuple[dict[str, ChannelMoments | None], int, bool]:
        # the arguments are checked inside the first exchange: a rank whose arguments are
        # wrong (its data None) raises its error, and the others RankFailedError at once --
        # checked before it, they waited in the exchange until the process group's timeout
        _check_arguments(method, num_samples, min_samples, forward, prior_strength, apply)
        check_data("data", data)
        if held_out is not None:
            check_data("held_out", held_out)
        measured = live
        if watching(live.modules()):
            # a watched model is served: its passes run on a copy -- BatchNorm layers
            # normalizing by batch, with momentum 1, would change what every other thread's
            # forward returns, and feed their batches into the statistics -- and the live
            # model changes only when the result is applied
            measured = hook_free_copy(live)
        selected, left_out = _select(measured, layers)
        target_device = torch.device(device) if device is not None else _model_device(measured)
        local.update(
            model=measured,
            selected=selected,
            left_out=left_out,
            device=target_device,
            before={layer.name: _buffers(layer.module) for layer in selected},
        )
        moments, seen = _measure(
            measured,
            selected,
            data,
            method,
            prior_strength,
            num_samples,
            input_key,
            forward,
            target_device,
            _show_progress(progress),
        )
        return moments, seen, held_out is not None

    # each rank measures its shard; every rank merges all of them, in rank order
    parts = distributed.exchange(prepare_and_measure)
    if len({judged for _, _, judged in parts}) > 1:  # the judgement is a collective too
        raise ConfigError(
            "held_out",
            "passed on some ranks only",
            "held-out data on every rank (an empty shard where a rank has none) or on none",
        )
    model, selected, before = local["model"], local["selected"], local["before"]
    target_device = local["device"]
    seen = sum(samples for _, samples, _ in parts)
    if seen < min_samples:
        raise NotEnoughDataError(seen, min_samples)
    updates = []
    for layer in selected:
        m = ChannelMoments.merge_present(moments[layer.name] for moments, _, _ in parts)
        if m is None:
            raise BnwatchError(
                f"layer {layer.name!r} received no data during recalibration: the model's "
                "forward does not use it on these inputs (leave it out with layers=)"
            )
        # all-NaN inputs are excluded, not measured: a count of 0 would write mean 0, var 0
        check_finite_values("recalibration data", layer.name, m)
        samples = min(m.n_samples, seen)  # a layer reached twice per forward counts twice
        old_mean, old_var = before[layer.name]
        mean, var = _new_statistics(m, old_mean, old_var, method, prior_strength, samples)
        updates.append(
            LayerUpdate(
                name=layer.name,
                module=layer.module,
                old_mean=old_mean,
                old_var=old_var,
                new_mean=torch.as_tensor(mean, dtype=old_mean.dtype, device=old_mean.device),
                new_var=torch.as_tensor(var, dtype=old_var.dtype, device=old_var.device),
                samples=samples,
            )
        )
    result = RecalibrationResult(
        model=model,
        method=method,
        prior_strength=prior_strength if method == "mix" else None,
        samples=seen,
        updates=updates,
        left_out=local["left_out"],
    )
    if held_out is not None:
        evaluate(
            result,
            held_out,
            input_key=input_key,
            forward=forward,
            label_key=label_key,
            device=target_device,
        )
    if live is not model:  # judged on the copy; applied (and rolled back) on the live model
        result = result.bound_to(live)
    if apply is True or (apply == "if_better" and result.improved is not False):
        result.apply()
    elif apply == "if_better":
        result.status = "rejected"
    return result


def _check_arguments(
    method: str,
    num_samples: int,
    min_samples: int,
    forward: Forward | None,
    prior_strength: float,
    apply: bool | str,
) -> None:
    if method not in METHODS:
        raise ConfigError("method", method, f"one of {list(METHODS)}")
    check_positive_int("num_samples", num_samples)
    check_positive_int("min_samples", min_samples)
    check_forward(forward)
    if (
        isinstance(prior_strength, bool)
        or not isinstance(prior_strength, (int, float))
        or not (0 <= prior_strength < math.inf)
    ):
        raise ConfigError("prior_strength", prior_strength, "a number of samples >= 0")
    if apply not in (True, False, "if_better"):
        raise ConfigError("apply", apply, "True, False or 'if_better'")


# --------------------------------------------------------------------------------------------
def hook_free_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without the hooks of bnwatch's monitors, with its own hooks.

    The copy is what a recalibration of a served model measures and judges: its forwards must
    not reach a monitor -- they are not production traffic, and no monitor must measure
    another model's activations against the live model's running statistics -- and a monitor
    (threads, locks) does not copy.  Every monitor's hook copies as a no-op
    (:class:`~bnwatch.capture.monitor.Detached`, whichever monitor put it there), which is
    then removed.  The model's other hooks -- input preprocessing in a forward pre-hook, say
    -- are part of what it computes: they are copied as ``copy.deepcopy`` copies them, so the
    copy computes what the model serves (global hooks, ``register_module_forward_hook``, run
    on every module anyway).
    """
    copied = copy.deepcopy(model)
    drop_detached(copied)
    return copied


def _select(
    model: nn.Module, layers: str | Sequence[str] | None
) -> tuple[list[BatchNormLayer], dict[str, str]]:
    """The layers to recalibrate, and those left out with why.

    Frozen layers are left out -- the layers after a frozen BatchNorm were trained on what its
    fixed statistics make of their input, so new statistics would change what they see, not
    restore it -- and so, with ``layers=None``, are layers without running statistics
    (``track_running_stats=False``: they normalize by batch, always).  Patterns in
    ``layers`` that match such a layer are an error: it was asked for and cannot be.
    """
    everything = discover(model, include=layers)
    found = [layer for layer in everything if not layer.frozen]
    if not found:
        raise FrozenLayersError(model, layers, [layer.name for layer in everything])
    left_out = {layer.name: FROZEN for layer in everything if layer.frozen}
    kept = []
    for layer in found:
        bn = layer.module
        if bn.running_mean is not None and bn.running_var is not None:
            kept.append(layer)
        elif layers is not None:
            raise ConfigError(  # named by what the caller passed: layer '3' was not
                "layers",
                layers,
                f"patterns matching only BatchNorm layers with running statistics: "
                f"{layer.name!r} has none (track_running_stats=False) to recalibrate",
            )
        else:
            left_out[layer.name] = NO_RUNNING_STATISTICS
    if not kept:
        raise ConfigError(
            "model",
            type(model).__name__,
            "a model with BatchNorm layers to recalibrate: "
            + ", ".join(f"{name!r} ({why})" for name, why in list(left_out.items())[:5])
            + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
            + " are left out, and no other BatchNorm layer is left",
        )
    return kept, left_out


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _running(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's running buffers (``_select`` admits only layers that have them)."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:  # pragma: no cover - excluded by _select
        raise ConfigError("layers", type(bn).__name__, "layers with running statistics")
    return mean, var


def _buffers(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = _running(bn)
    return mean.detach().clone(), var.detach().clone()


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _samples_in(data: Iterable[Any], input_key: str | None) -> int | float:
    """The samples ``data`` holds, when that is known without iterating it (a list or tuple
    of batches, a DataLoader of a sized dataset); else infinity."""
    dataset = getattr(data, "dataset", None)
    if isinstance(data, torch.utils.data.DataLoader) and isinstance(dataset, Sized):
        return len(dataset)
    if isinstance(data, (list, tuple)):
        try:
            return sum(count_samples(item, input_key) for item in data)
        except (ConfigError, TypeError):  # what the pass makes of such an item, it will say
            return math.inf
    return math.inf


def _batches(
    data: Iterable[Any],
    input_key: str | None,
    num_samples: int,
    device: torch.device,
    *,
    join_single: bool,
) -> Iterator[tuple[torch.Tensor, int]]:
    """The model inputs of ``data``, cut at ``num_samples``, on ``device``, each with its
    sample count.

    With ``join_single`` (``precise``, where BatchNorm normalizes by batch statistics, which
    one sample of a ``[1, C]`` input does not have) a batch of one sample -- a loader's last,
    or one that ``num_samples`` cut -- is joined to the next batch; a single sample left at
    the end is not used.
    """
    seen = 0
    held: torch.Tensor | None = None
    for item in data:
        x = model_input(item, input_key)
        if not isinstance(x, torch.Tensor):
            raise ConfigError(
                "data", type(x).__name__, "batches of tensors (or tuples/dicts of them)"
            )
        if x.dim() == 0:
            raise ShapeError("recalibration data", "batches [N, ...]", "a 0-dim tensor")
        if seen + x.shape[0] > num_samples:
            x = x[: num_samples - seen]
        if x.device != device:
            x = x.to(device)
        seen += int(x.shape[0])
        if held is not None:
            try:
                x = torch.cat((held, x))
            except RuntimeError:  # another sample shape: let the model say what it makes of it
                yield held, 1
            held = None
        if join_single and x.shape[0] == 1:
            held = x
        elif x.shape[0]:
            yield x, int(x.shape[0])
        if seen >= num_samples:
            return


def _measure(
    model: nn.Module,
    selected: list[BatchNormLayer],
    data: Iterable[Any],
    method: str,
    prior_strength: float,
    num_samples: int,
    input_key: str | None,
    forward: Forward | None,
    device: torch.device,
    progress: bool,
) -> tuple[dict[str, ChannelMoments | None], int]:
    """One pass over this rank's data with the selected layers normalizing as the method
    says, measuring exactly what each receives (``None``: a layer the pass never reached)
    and the samples seen.  Everything is restored afterwards."""
    accs: dict[str, LayerAccumulator] = {}  # precise harvests: made only where it cannot

    def accumulator(name: str) -> LayerAccumulator:
        if name not in accs:
            accs[name] = LayerAccumulator(name)
        return accs[name]

    pooled = {layer.name: _Pooled() for layer in selected}
    modes = {module: module.training for module in model.modules()}
    momenta = {layer.name: layer.module.momentum for layer in selected}
    buffers = BatchNormBuffers(model)  # of every layer: those left out may be in train()
    handles = []
    seen = 0
    forwarded = [0]  # model inputs so far, this batch included (read by the mix hooks)
    bar: Any = None
    try:
        for layer in selected:
            bn = layer.module
            if method == "precise":
                # normalize with batch statistics, as training would -- the layer alone: a
                # BatchNorm with children (timm's BatchNormAct2d and its drop layer) keeps
                # theirs as they are
                bn.training = True
                bn.momentum = 1.0  # ... and leave them in the running buffers after each call
                hook = _harvesting(functools.partial(accumulator, layer.name), pooled[layer.name])
                handles.append(bn.register_forward_hook(hook))
            else:
                bn.training = False  # normalize with the mixed statistics of this batch
                source = _buffers(bn)
                mixing = _mixing(accumulator(layer.name), bn, source, prior_strength, forwarded)
                handles.append(bn.register_forward_pre_hook(mixing))
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=min(num_samples, _samples_in(data, input_key)),
                unit="sample",
                desc=f"bnwatch recalibrate ({method})",
            )
        # a monitor watching this model must not take these passes for production traffic
        with torch.no_grad(), unwatched(model):
            batches = (
                _batches(data, input_key, num_samples, device, join_single=method == "precise")
                if forward is None
                else whole_batches(data, input_key, num_samples, device)
            )
            for x, n in batches:
                forwarded[0] = seen + n
                got = f"{tuple(x.shape)}" if forward is None else f"a batch of {n} samples"
                with data_errors("recalibration data", got, forward=forward is not None):
                    if forward is None:
                        model(x)
                    else:
                        forward(model, x)
                seen += n
                if bar is not None:
                    bar.update(n)
        moments = {
            layer.name: _collect(accs.get(layer.name), pooled[layer.name]) for layer in selected
        }
    finally:
        if bar is not None:
            if bar.total != seen:  # the data ended first, or a batch was used whole, or left
                bar.total = seen
                bar.refresh()
            bar.close()
        for handle in handles:
            handle.remove()
        for layer in selected:
            layer.module.momentum = momenta[layer.name]
        buffers.restore()
        for module, training in modes.items():
            module.training = training  # as it was, without train()'s walk over the children
    return moments, seen


def _mixing(
    acc: LayerAccumulator,
    bn: _BatchNorm,
    source: tuple[torch.Tensor, torch.Tensor],
    prior: float,
    forwarded: list[int],
) -> Callable[[nn.Module, Any], None]:
    """Measure the batch, then let the layer normalize with prior-mixed statistics of the
    target data seen so far, this batch included (``forwarded[0]``: the model inputs so far).
    """

    def hook(module: nn.Module, args: Any) -> None:
        acc.observe(args[0], batch_stat_mode=False)
        so_far = acc.peek()
        if so_far is None:
            return
        samples = min(so_far.n_samples, forwarded[0])
        mean, var = _new_statistics(so_far, source[0], source[1], "mix", prior, samples)
        running_mean, running_var = _running(bn)
        running_mean.copy_(torch.as_tensor(mean, dtype=running_mean.dtype))
        running_var.copy_(torch.as_tensor(var, dtype=running_var.dtype))

    return hook


class _Pooled:
    """Element-level moments pooled from the batch statistics a layer computed itself.

    Each call contributes its mean and unbiased variance over ``k`` elements per channel; they
    are kept as they come and pooled once, in float64, at the end (two passes: the pooled
    mean, then the within- plus between-batch sums of squares).  Only ``count``, ``mean``,
    ``m2`` and the sample count are known -- all that the recalibration uses; the sample-level
    moments are left at zero.
    """

    def __init__(self) -> None:
        self.stats: list[torch.Tensor] = []  # [2, C] per call: mean, unbiased variance
        self.elements: list[int] = []
        self.samples = 0

    def add(self, stats: torch.Tensor, elements: int, samples: int) -> None:
        self.stats.append(stats)
        self.elements.append(elements)
        self.samples += samples

    def moments(self) -> ChannelMoments | None:
        if not self.stats:
            return None
        s = torch.stack(self.stats).to(torch.float64).numpy()  # [B, 2, C], on the CPU (hook)
        k = np.asarray(self.elements, dtype=np.float64)[:, None]
        count = float(k.sum())
        mean = (k * s[:, 0]).sum(0) / count
        m2 = ((k - 1) * s[:, 1]).sum(0) + (k * (s[:, 0] - mean) ** 2).sum(0)
        zero = np.zeros_like(mean)
        fields = dict.fromkeys(MOMENT_FIELDS, zero)
        fields.update(
            count=zero + count,
            mean=mean,
            m2=m2,
            n=zero + self.samples,
            smean=mean,  # every sample has as many elements: the mean of sample means
        )
        return ChannelMoments(**fields)


def _harvesting(
    acc: Callable[[], LayerAccumulator], pooled: _Pooled
) -> Callable[[nn.Module, Any, Any], None]:
    """Keep the batch statistics the layer just computed (and left in its running buffers,
    momentum 1); measure the input instead where they cannot be trusted or checked cheaply."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        x = args[0]
        mean, var = _running(module)  # type: ignore[arg-type]
        elements = x.numel() // int(x.shape[1]) if x.dim() >= 2 else 0
        if x.device.type == "cpu" and not isinstance(module, nn.SyncBatchNorm) and elements >= 2:
            stats = torch.stack((mean, var))
            if math.isfinite(float(stats.sum())):  # free on the CPU
                pooled.add(stats, elements, int(x.shape[0]))
                return
        acc().observe(x, batch_stat_mode=True)
        with torch.no_grad():  # momentum 1 would carry a non-finite value to the next call
            mean.zero_()
            var.fill_(1.0)

    return hook


def _collect(acc: LayerAccumulator | None, pooled: _Pooled) -> ChannelMoments | None:
    stats = None if acc is None else acc.collect()
    return ChannelMoments.merge_present(
        (pooled.moments(), None if stats is None else stats.moments)
    )


def _new_statistics(
    m: ChannelMoments,
    old_mean: torch.Tensor,
    old_var: torch.Tensor,
    method: str,
    prior: float,
    samples: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The layer's new running statistics from what it received; ``samples`` is ``n`` of
    the ``mix`` weights (model inputs, not calls: a layer reached twice per forward sees
    each sample twice)."""
    count = np.maximum(m.count, 2.0)
    mean = m.mean
    var = m.m2 / (count - 1.0)  # unbiased, as PyTorch stores running_var
    if method == "mix":
        n = float(samples)
        w = prior / (prior + n) if prior + n > 0 else 0.0
        mean = w * old_mean.double().cpu().numpy() + (1 - w) * mean
        var = w * old_var.double().cpu().numpy() + (1 - w) * var
    return np.asarray(mean), np.asarray(var)
