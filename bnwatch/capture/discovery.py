"""Find the BatchNorm layers of a model."""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnwatch.errors import ConfigError, NoBatchNormError
from bnwatch.schema import MAX_LAYER_NAME_LENGTH, text_problem

ROOT_NAME = "(root)"
"""The name used when the model itself is a BatchNorm layer (its qualified name is empty)."""


@dataclass(frozen=True, eq=False)
class BatchNormLayer:
    """A discovered BatchNorm layer.

    Attributes:
        name: qualified module name, as in ``model.named_modules()``.
        module: the layer itself.
        depth: position in forward-definition order (0 = first discovered).
    """

    name: str
    module: _BatchNorm
    depth: int

    @property
    def kind(self) -> str:
        """Class name (lazy layers report the class they became once initialized)."""
        return type(self.module).__name__

    @property
    def frozen(self) -> bool:
        """A frozen BatchNorm (:func:`is_frozen_batchnorm`): it always normalizes with its
        stored statistics, whatever its mode, and is not recalibrated."""
        return is_frozen_batchnorm(self.module)


_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a frozen BatchNorm: ``FrozenBatchNorm2d`` of torchvision's and
    detectron2's detection backbones (recognized by name and attributes: neither library is
    a dependency).  Its statistics and affine parameters are buffers that no mode or
    optimizer changes, and it always normalizes with them -- what an eval-mode BatchNorm
    does -- so what it receives is measured and compared with them like any BatchNorm's."""
    return (
        not isinstance(module, _BatchNorm)
        and "FrozenBatchNorm" in type(module).__name__
        and all(isinstance(getattr(module, name, None), torch.Tensor) for name in _FROZEN_BUFFERS)
        and isinstance(getattr(module, "eps", None), (int, float))
    )


def _patterns(argument: str, value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (str, Iterable)):
        raise ConfigError(argument, value, "a glob pattern or a list of glob patterns")
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) and p for p in items):
        raise ConfigError(argument, value, "a glob pattern or a list of glob patterns")
    return items


def discover(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[BatchNormLayer]:
    """All BatchNorm layers of ``model`` at any depth, filtered by name.

    Every subclass of ``torch.nn.modules.batchnorm._BatchNorm`` counts: BatchNorm1d/2d/3d,
    SyncBatchNorm and the Lazy variants (watched from their first forward on); so do frozen
    BatchNorm layers (:func:`is_frozen_batchnorm`).  ``include``
    and ``exclude`` are :mod:`fnmatch` globs on qualified names (``"layer1.*"``,
    ``"*.bn2"``): a layer is watched when it matches some ``include`` pattern (all layers if
    none is given) and no ``exclude`` pattern.

    Raises:
        NoBatchNormError: the model has no BatchNorm layer, or the filters leave none.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError("model", type(model).__name__, "a torch.nn.Module")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(
            "model",
            type(model).__name__,
            "an eager torch.nn.Module: TorchScript runs no Python hooks -- pass the module "
            "before torch.jit.script/trace (and script a watched model only after close())",
        )
    if _compiled(model):
        raise ConfigError("model", f"{type(model).__name__} (compiled)", _uncompiled(model))
    inc = _patterns("include", include)
    exc = _patterns("exclude", exclude)
    found: list[BatchNormLayer] = []
    for qualified, module in batchnorm_modules(model).items():
        if inc is not None and not any(fnmatch.fnmatchcase(qualified, p) for p in inc):
            continue
        if exc is not None and any(fnmatch.fnmatchcase(qualified, p) for p in exc):
            continue
        # a frozen layer has every attribute of a BatchNorm that capture reads (buffers, eps,
        # training); what it lacks (momentum, num_batches_tracked) only recalibration uses,
        # and recalibration leaves it out
        layer = cast(_BatchNorm, module)
        found.append(BatchNormLayer(name=qualified, module=layer, depth=len(found)))
    if not found:
        raise NoBatchNormError(type(model).__name__, inc, exc, *_other_norms(model))
    check_materialized(model, found)
    return found


def check_materialized(model: nn.Module, layers: Sequence[BatchNormLayer]) -> None:
    """Refuse layers whose tensors are on the ``meta`` device (a model built under
    ``torch.device("meta")`` or an empty-weights context, to be loaded later): they hold no
    values, so there are no running statistics to compare with -- reading them raised torch's
    ``Tensor.item() cannot be called on meta tensors`` from inside ``watch()``.

    Raises:
        ConfigError: naming the first such layer and how to materialize the model.
    """
    for layer in layers:
        module = layer.module
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(t.is_meta for t in tensors):
            raise ConfigError(
                "model",
                f"{type(model).__name__} (on the meta device)",
                f"a model whose tensors hold values: BatchNorm layer {layer.name!r} (and maybe "
                "others) has tensors on the meta device, without data or running statistics. "
                "Materialize the model before bnwatch.watch(), profile() or recalibrate(): "
                "model.to_empty(device=...) and then model.load_state_dict(weights), or "
                "model.load_state_dict(weights, assign=True)",
            )


def batchnorm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm layer of ``model`` (frozen ones too), unfiltered, by qualified name."""
    return {
        name or ROOT_NAME: module
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) or is_frozen_batchnorm(module)
    }


_PER_SAMPLE_NORMS = ("LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm")
"""Class names (and their endings) of normalization layers without stored statistics."""


def _other_norms(model: nn.Module) -> tuple[Counter[str], Counter[str]]:
    """A model's normalization layers of other kinds, by class name, so that a model without
    BatchNorm is told why it has nothing to watch: those that keep running statistics without
    being BatchNorm layers (``InstanceNorm`` with ``track_running_stats``), and those that
    keep none (``LayerNorm``, ``GroupNorm``, ...)."""
    stored: Counter[str] = Counter()
    per_sample: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, _BatchNorm) or is_frozen_batchnorm(module):
            continue
        kind = type(module).__name__
        if all(
            isinstance(getattr(module, buffer, None), torch.Tensor)
            for buffer in ("running_mean", "running_var")
        ):
            stored[kind] += 1
        elif any(name in kind for name in _PER_SAMPLE_NORMS):
            per_sample[kind] += 1
    return stored, per_sample


def check_layer_paths(model: nn.Module, layers: Sequence[BatchNormLayer]) -> None:
    """Refuse layers whose module paths the store cannot hold (more than
    :data:`~bnwatch.schema.MAX_LAYER_NAME_LENGTH` characters, control characters, ...:
    :func:`~bnwatch.schema.text_problem`): :func:`bnwatch.watch` and :func:`bnwatch.profile`
    store them, so they fail here -- before a hook is added or a batch is read -- and not at
    every write, or after a whole profiling pass.

    Raises:
        ConfigError: naming ``model``, the problem and the way out (``exclude=``).
    """
    for layer in layers:
        problem = text_problem(layer.name, MAX_LAYER_NAME_LENGTH)
        if problem is not None:
            raise ConfigError(
                "model",
                type(model).__name__,
                f"BatchNorm layers whose module paths the store can hold ({problem}: "
                f"{layer.name[:100]!r}...); leave the layer out with exclude=",
            )


def _uncompiled(model: nn.Module) -> str:
    """What to pass instead of a compiled ``model`` (see :func:`_compiled`): the way out
    differs for ``torch.compile``'s wrapper, which keeps the uncompiled module, and for a
    module compiled in place, which has no uncompiled one."""
    why = (
        "a module not compiled yet: a graph torch.compile traced without bnwatch's hooks "
        "never calls them -- compile after bnwatch.watch(model), which works; "
    )
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        return why + (
            "profile or recalibrate the uncompiled module (this OptimizedModule's _orig_mod)"
        )
    where = next(
        (name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None)),
        "",
    )
    compiled = f"model.{where}.compile()" if where else "model.compile()"
    return why + (
        f"{compiled} compiled it in place, so there is no uncompiled module to pass: call it "
        "after bnwatch.watch(model), and profile or recalibrate the model before compiling it "
        "(or a new instance with the same weights)"
    )


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile``'s wrapper or was compiled in place
    (``module.compile()``), without importing ``torch._dynamo``."""
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
