"""What a recalibration produced: new buffers, their judgement, apply and rollback."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnwatch.capture.accumulator import LayerAccumulator
from bnwatch.capture.discovery import ROOT_NAME, BatchNormLayer
from bnwatch.capture.monitor import unwatched, watching
from bnwatch.capture.profile import data_errors, measuring
from bnwatch.drift import Reference, finite_mean, gaussian_kl, rms, standardized_shift
from bnwatch.errors import ConfigError, ShapeError, first_line
from bnwatch.files import atomic_path
from bnwatch.inputs import Forward, model_input, to_device
from bnwatch.recalibration import distributed
from bnwatch.stats import ChannelMoments


@dataclass
class LayerUpdate:
    """New running statistics for one layer, and the statistics it had when it was
    recalibrated (``old_mean``, ``old_var``: what the held-out data was judged against, the
    "before" of the judgement -- not necessarily what :meth:`RecalibrationResult.rollback`
    puts back, which is what the layer held just before :meth:`~RecalibrationResult.apply`).
    """

    name: str
    module: _BatchNorm
    old_mean: torch.Tensor
    old_var: torch.Tensor
    new_mean: torch.Tensor
    new_var: torch.Tensor
    samples: int

    @property
    def key(self) -> str:
        """The layer's prefix in ``model.state_dict()``."""
        return "" if self.name == ROOT_NAME else self.name + "."


@dataclass
class LayerJudgement:
    """How far a layer's held-out inputs are from its running statistics, before and after:
    the mean Gaussian KL over channels and the RMS standardized mean shift ``d``."""

    kl_before: float
    kl_after: float
    d_rms_before: float
    d_rms_after: float


@dataclass
class RecalibrationResult:
    """The outcome of :func:`bnwatch.recalibrate`.

    ``status`` is ``pending`` (computed, not applied), ``applied``, ``rejected`` (held-out data
    showed no improvement; not applied) or ``rolled_back``.

    ``left_out`` names the BatchNorm layers that were not recalibrated, with why: frozen
    layers and, unless ``layers=`` named them, layers without running statistics.
    """

    model: nn.Module
    method: str
    prior_strength: float | None
    samples: int
    updates: list[LayerUpdate]
    status: str = "pending"
    layers: dict[str, LayerJudgement] = field(default_factory=dict)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    left_out: dict[str, str] = field(default_factory=dict)
    # what apply() replaced, per update: running mean, running var, num_batches_tracked
    _replaced: list[list[torch.Tensor]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    # -- the judgement -----------------------------------------------------------------------
    @property
    def kl_before(self) -> float | None:
        values = [j.kl_before for j in self.layers.values() if math.isfinite(j.kl_before)]
        return sum(values) / len(values) if values else None

    @property
    def kl_after(self) -> float | None:
        values = [j.kl_after for j in self.layers.values() if math.isfinite(j.kl_after)]
        return sum(values) / len(values) if values else None

    @property
    def improved(self) -> bool | None:
        """Whether held-out data is closer to the new statistics (``None``: not judged)."""
        before, after = self.kl_before, self.kl_after
        if before is None or after is None:
            return None
        return after < before

    def bound_to(self, model: nn.Module) -> RecalibrationResult:
        """The same new statistics for another instance of the architecture (e.g. the live
        model when a copy was recalibrated), judged as this one was (``old_mean``/``old_var``
        stay the statistics it was judged against); not applied yet."""
        modules = dict(model.named_modules())
        updates = []
        for u in self.updates:
            target = modules.get("" if u.name == ROOT_NAME else u.name)
            if not isinstance(target, _BatchNorm):
                raise ValueError(f"{type(model).__name__} has no BatchNorm layer {u.name!r}")
            if target.running_mean is None or target.running_var is None:
                raise ValueError(f"layer {u.name!r} has no running statistics")
            if target.running_mean.shape != u.new_mean.shape:
                raise ValueError(
                    f"layer {u.name!r} of {type(model).__name__} has "
                    f"{target.running_mean.numel()} channels, the recalibrated one "
                    f"{u.new_mean.numel()}: not the same architecture"
                )
            updates.append(
                LayerUpdate(
                    name=u.name,
                    module=target,
                    old_mean=u.old_mean.to(target.running_mean.device),
                    old_var=u.old_var.to(target.running_var.device),
                    new_mean=u.new_mean.to(target.running_mean.device),
                    new_var=u.new_var.to(target.running_var.device),
                    samples=u.samples,
                )
            )
        return RecalibrationResult(
            model=model,
            method=self.method,
            prior_strength=self.prior_strength,
            samples=self.samples,
            updates=updates,
            status="pending",
            layers=dict(self.layers),
            accuracy_before=self.accuracy_before,
            accuracy_after=self.accuracy_after,
            left_out=dict(self.left_out),
        )

    # -- buffers -----------------------------------------------------------------------------
    def apply(self) -> None:
        """Write the new statistics into the model.

        The layers' buffers as they are just before (running statistics and
        ``num_batches_tracked``) are what :meth:`rollback` puts back -- not those the result
        was computed from: a checkpoint loaded, or another recalibration applied, since
        :func:`~bnwatch.recalibrate` ran is what the model returns to.

        A monitor watching the model takes them as its new train/inference reference at once
        (:meth:`~bnwatch.capture.Monitor.adopt_running_statistics`): a change made on purpose
        is not ``running_stats_mutated``.
        """
        self._adopted(new=True)
        self.status = "applied"

    def rollback(self) -> None:
        """Put back the buffers the model had just before the last :meth:`apply` (adopted by
        its monitors, as :meth:`apply`).

        Raises:
            ValueError: the result was not applied (or was rolled back already).
        """
        if self._replaced is None:
            raise ValueError(
                f"nothing to roll back: the result is {self.status}, and rollback() puts back "
                "what apply() replaced"
            )
        self._adopted(new=False)
        self.status = "rolled_back"

    def _adopted(self, *, new: bool) -> None:
        write = self._replace if new else self._put_back
        monitors = watching(u.module for u in self.updates)
        if not monitors:
            write()
            return
        first, *rest = monitors  # the write happens once, under the first one's window lock
        first.adopt_running_statistics(write)
        for monitor in rest:
            monitor.adopt_running_statistics()

    def _check_layers(self) -> None:
        """Every layer checked before any is written: all of them change, or none."""
        for u in self.updates:
            rm, rv = u.module.running_mean, u.module.running_var
            if rm is None or rv is None:
                raise ValueError(f"layer {u.name!r} lost its running statistics")
            if rm.shape != u.new_mean.shape or rv.shape != u.new_var.shape:
                raise ValueError(
                    f"layer {u.name!r} now has {rm.numel()} channels, the recalibrated one "
                    f"{u.new_mean.numel()}: nothing was written"
                )

    def _write(self) -> None:
        """Write the new statistics into the layers (a held-out pass, or :meth:`apply`)."""
        self._check_layers()
        with torch.no_grad():
            for u in self.updates:
                u.module.running_mean.copy_(u.new_mean)  # type: ignore[union-attr]
                u.module.running_var.copy_(u.new_var)  # type: ignore[union-attr]

    def _replace(self) -> None:
        """:meth:`apply`'s write: keep the layers' buffers as they are, then write."""
        self._check_layers()
        replaced = [[b.detach().clone() for b in _layer_buffers(u.module)] for u in self.updates]
        self._write()
        self._replaced = replaced

    def _put_back(self) -> None:
        """:meth:`rollback`'s write: the buffers :meth:`apply` replaced."""
        self._check_layers()
        if self._replaced is None:  # pragma: no cover - rollback() checks first
            raise ValueError("nothing to roll back")
        with torch.no_grad():
            for u, saved in zip(self.updates, self._replaced, strict=True):
                for buffer, value in zip(_layer_buffers(u.module), saved, strict=True):
                    buffer.copy_(value)
        self._replaced = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Only the new BatchNorm buffers, keyed as in ``model.state_dict()``:
        ``model.load_state_dict(result.state_dict(), strict=False)`` applies them."""
        out: dict[str, torch.Tensor] = {}
        for u in self.updates:
            out[f"{u.key}running_mean"] = u.new_mean.detach().cpu().clone()
            out[f"{u.key}running_var"] = u.new_var.detach().cpu().clone()
        return out

    def save(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` with ``torch.save``, atomically: to a temporary file in
        the same directory, renamed over ``path`` -- a write that fails midway (a full disk)
        leaves the previous file as it was, not a truncated one that ``torch.load`` refuses.

        Raises:
            OSError: the file could not be written (torch's own write errors included).
        """
        out = Path(path)
        state = self.state_dict()
        with atomic_path(out) as tmp:
            try:
                torch.save(state, tmp)
            except RuntimeError as err:  # torch's writer reports a failed write(2) this way
                raise OSError(f"could not write {out}: {first_line(err)}") from err
        return out

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (for logs, the store and triggers)."""
        return {
            "method": self.method,
            "prior_strength": self.prior_strength,
            "samples": self.samples,
            "status": self.status,
            "layers": [u.name for u in self.updates],
            "left_out": dict(self.left_out),
            "kl_before": self.kl_before,
            "kl_after": self.kl_after,
            "improved": self.improved,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "per_layer": {
                name: {
                    "kl_before": j.kl_before,
                    "kl_after": j.kl_after,
                    "d_rms_before": j.d_rms_before,
                    "d_rms_after": j.d_rms_after,
                }
                for name, j in self.layers.items()
            },
        }


def _layer_buffers(bn: _BatchNorm) -> list[torch.Tensor]:
    """A layer's running statistics and ``num_batches_tracked`` (those it has)."""
    return [b for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None]


class BatchNormBuffers:
    """The running statistics (and ``num_batches_tracked``) of every BatchNorm layer of a
    model, as they are now; :meth:`restore` puts them back.

    A recalibration's passes run the model as it is: a layer it leaves out, or every layer
    while held-out data is judged, may be in ``train()`` and update its buffers.
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved = [
            (buffer, buffer.detach().clone())
            for module in model.modules()
            if isinstance(module, _BatchNorm)
            for buffer in _layer_buffers(module)
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, value in self._saved:
                buffer.copy_(value)


def evaluate(
    result: RecalibrationResult,
    held_out: Iterable[Any],
    *,
    input_key: str | None = None,
    forward: Forward | None = None,
    label_key: str | None = None,
    device: torch.device | None = None,
) -> None:
    """Judge ``result`` on held-out data: per-layer gap before/after, accuracy if labelled.

    The model runs as deployed (its modes unchanged) -- ``model(input)``, or ``forward(model,
    batch)`` -- once with its current statistics and once with the new ones; its buffers are
    the current ones again afterwards.  Under ``torch.distributed`` every rank judges its own
    held-out shard and the ranks merge what they measured, so all of them reach the same
    judgement.
    """
    items = list(held_out)  # iterated twice
    layers = [BatchNormLayer(u.name, u.module, i) for i, u in enumerate(result.updates)]

    def one_pass() -> _HeldOut:
        return _HeldOut.measure(result.model, layers, items, input_key, forward, label_key, device)

    def measure() -> tuple[_HeldOut, _HeldOut]:
        buffers = BatchNormBuffers(result.model)
        # a monitor watching this model must not take these passes for production traffic
        with unwatched(result.model):
            try:
                before = one_pass()
                buffers.restore()
                result._write()
                after = one_pass()
            finally:
                buffers.restore()
        return before, after

    parts = distributed.exchange(measure)
    before = _HeldOut.merge([b for b, _ in parts])
    after = _HeldOut.merge([a for _, a in parts])
    for u in result.updates:
        seen_before, seen_after = before.moments.get(u.name), after.moments.get(u.name)
        if seen_before is None:
            continue  # the held-out data never reached this layer
        eps = float(u.module.eps)
        kb, db = _gap(seen_before, u.old_mean, u.old_var, eps)
        ka, da = (
            (math.nan, math.nan)
            if seen_after is None
            else _gap(seen_after, u.new_mean, u.new_var, eps)
        )
        result.layers[u.name] = LayerJudgement(kb, ka, db, da)
    result.accuracy_before, result.accuracy_after = before.accuracy, after.accuracy


def _gap(
    seen: ChannelMoments, mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[float, float]:
    """Mean Gaussian KL over channels and RMS standardized shift ``d`` of what a layer
    received against running statistics (as a monitor's window reports them)."""
    ref = Reference.running(mean.detach().cpu().numpy(), var.detach().cpu().numpy())
    kl = gaussian_kl(seen.mean, seen.var, ref.mean, ref.var, eps)
    d = standardized_shift(seen.mean, ref.mean, ref.var, eps)
    return finite_mean(kl), rms(d)


def _labels(item: Any, label_key: str | None) -> Any:
    """The labels of a held-out batch: a tuple's second element, or a dict's ``label_key``
    entry (``None``: unlabelled)."""
    if isinstance(item, Mapping):
        if label_key is not None and label_key not in item:
            raise ConfigError("label_key", label_key, f"one of {sorted(map(str, item))}")
        return item[label_key] if label_key is not None else None
    if isinstance(item, (tuple, list)) and len(item) > 1:
        return item[1]
    return None


@dataclass(frozen=True)
class _HeldOut:
    """What one pass over held-out data saw: each layer's input moments (``None``: the layer
    was not reached) and, when every item was labelled, the correct predictions."""

    moments: dict[str, ChannelMoments | None]
    correct: int
    total: int
    labelled: bool

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.labelled and self.total else None

    @classmethod
    def merge(cls, parts: list[_HeldOut]) -> _HeldOut:
        """The ranks' passes as one (merged in rank order: the same on every rank)."""
        return cls(
            moments={
                name: ChannelMoments.merge_present(p.moments.get(name) for p in parts)
                for name in parts[0].moments
            },
            correct=sum(p.correct for p in parts),
            total=sum(p.total for p in parts),
            labelled=all(p.labelled for p in parts),
        )

    @classmethod
    def measure(
        cls,
        model: nn.Module,
        layers: list[BatchNormLayer],
        items: list[Any],
        input_key: str | None,
        forward: Forward | None,
        label_key: str | None,
        device: torch.device | None,
    ) -> _HeldOut:
        accs = [LayerAccumulator(layer.name) for layer in layers]
        correct = total = 0
        labelled = True
        with torch.no_grad(), measuring(layers, accs):
            for item in items:
                if forward is None:
                    x = model_input(item, input_key)
                    got = f"{tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__
                    with data_errors("held-out data", got, forward=False):
                        out = model(x if device is None else x.to(device))
                else:
                    with data_errors("held-out data", "a batch"):
                        out = forward(model, item if device is None else to_device(item, device))
                y = _labels(item, label_key)
                if isinstance(y, torch.Tensor) and isinstance(out, torch.Tensor) and out.dim() == 2:
                    if y.dim() == 2 and y.shape[1] == 1:
                        y = y[:, 0]  # a column of labels
                    if y.shape != out.shape[:1]:
                        raise ShapeError(
                            "held-out labels",
                            f"[{out.shape[0]}] class indices (one per output row)",
                            tuple(y.shape),
                        )
                    correct += int((out.argmax(dim=1).cpu() == y.cpu()).sum())
                    total += int(y.shape[0])
                else:
                    labelled = False
        moments = {}
        for layer, acc in zip(layers, accs, strict=True):
            stats = acc.collect()
            moments[layer.name] = None if stats is None else stats.moments
        return cls(moments=moments, correct=correct, total=total, labelled=labelled)
