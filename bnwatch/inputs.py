"""Turn what a data loader yields into the model's input (duck-typed; no torch import)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from bnwatch.errors import ConfigError

Forward = Callable[[Any, Any], Any]
"""``forward(model, batch)``: runs the model on one item of the data, as the loader yields
it (its tensors moved to the model's device), and returns the output -- for models that do
not take one tensor, e.g. ``lambda model, batch: model(**batch)``."""


@dataclass(frozen=True, eq=False)
class ModelCall:
    """One forward's arguments, kept whole -- ``model(*args, **kwargs)`` -- for a model that
    is not called with one tensor (a dict, a list of images, several tensors, a tensor and
    options).  ``samples`` is how many samples the call held.  As an item of data, a
    ``forward=`` of :func:`replay` runs the model on it as it was called.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    samples: int = 0


def replay(model: Any, call: ModelCall) -> Any:
    """``forward=`` for data of :class:`ModelCall`: ``model(*call.args, **call.kwargs)``."""
    if not isinstance(call, ModelCall):
        raise ConfigError("data", type(call).__name__, "ModelCall items (kept calls) to replay")
    return model(*call.args, **call.kwargs)


def check_forward(forward: Any) -> None:
    """A ``forward=`` argument is ``None`` or callable."""
    if forward is not None and not callable(forward):
        raise ConfigError(
            "forward",
            forward,
            "a function (model, batch) -> output, e.g. lambda model, batch: model(**batch)",
        )


def check_data(argument: str, data: Any) -> None:
    """``data`` (or ``held_out``) is something to iterate over batches of."""
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ConfigError(
            argument,
            type(data).__name__,
            "an iterable of batches: a DataLoader, a list of tensors, (inputs, labels) tuples "
            "or dicts, or one tensor [N, ...]",
        )


def model_input(batch: Any, input_key: str | None = None) -> Any:
    """The model input inside one loader item.

    A tensor is the input itself; a tuple or list (``(inputs, labels)``) gives its first
    element; a mapping gives ``batch[input_key]``.
    """
    if isinstance(batch, Mapping):
        if input_key is None:
            raise ConfigError(
                "input_key", None, f"the key of the model input among {sorted(map(str, batch))}"
            )
        if input_key not in batch:
            raise ConfigError("input_key", input_key, f"one of {sorted(map(str, batch))}")
        return batch[input_key]
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ConfigError("data", batch, "non-empty (inputs, ...) tuples")
        return batch[0]
    return batch


def iter_inputs(data: Iterable[Any], input_key: str | None = None) -> Iterator[Any]:
    """Model inputs of every item of ``data`` (see :func:`model_input`)."""
    for batch in data:
        yield model_input(batch, input_key)


def count_samples(batch: Any, input_key: str | None = None) -> int:
    """How many samples one loader item holds, when a ``forward=`` function takes it whole.

    The count is the length of the item's input (as :func:`model_input` finds it): a
    tensor's first dimension, or the length of a list or tuple of samples (a detection
    model's list of images).  A mapping -- alone, or first in a tuple -- counts its
    ``input_key`` entry or, without one, the first dimension its tensors share.
    """
    if isinstance(batch, ModelCall):
        return batch.samples
    x = batch
    if isinstance(x, (tuple, list)):
        x = model_input(x)
    if isinstance(x, Mapping) and input_key is not None:  # a dict alone, or first in a tuple
        x = model_input(x, input_key)
    if isinstance(x, Mapping):
        lengths = {n for v in x.values() if (n := _length(v)) is not None}
        if len(lengths) == 1:
            return lengths.pop()
        found = f"first dimensions {sorted(lengths)}" if lengths else "no tensor"
        raise ConfigError(
            "input_key",
            None,
            f"the key among {sorted(map(str, x))} whose first dimension counts the samples "
            f"(the batch's tensors give {found})",
        )
    n = _length(x)
    if n is None:
        raise ConfigError(
            "data",
            type(x).__name__,
            "batches whose input is a tensor [N, ...] or a list of N samples",
        )
    return n


def _length(x: Any) -> int | None:
    shape = getattr(x, "shape", None)
    if shape is not None:
        return int(shape[0]) if len(shape) else None
    if isinstance(x, (tuple, list)):
        return len(x)
    return None


def map_tensors(
    batch: Any, fn: Callable[[Any], Any], other: Callable[[Any], Any] | None = None
) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it -- nested in tuples (named ones
    too), lists, mappings (which come back as dicts) and :class:`ModelCall` -- and ``other``
    (if given) to everything else in it, which is otherwise kept as it is."""

    def walk(x: Any) -> Any:
        if isinstance(x, ModelCall):
            return ModelCall(walk(x.args), walk(x.kwargs), x.samples)
        if isinstance(x, Mapping):
            return {key: walk(value) for key, value in x.items()}
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
            return type(x)(*(walk(value) for value in x))
        if isinstance(x, (tuple, list)):
            return type(x)(walk(value) for value in x)
        if hasattr(x, "device") and callable(getattr(x, "to", None)):  # a tensor
            return fn(x)
        return x if other is None else other(x)

    return walk(batch)


def to_device(batch: Any, device: Any) -> Any:
    """``batch`` with every tensor in it on ``device`` (see :func:`map_tensors`)."""
    return map_tensors(batch, lambda t: t if t.device == device else t.to(device))


def whole_batches(
    data: Iterable[Any], input_key: str | None, num_samples: int | None, device: Any
) -> Iterator[tuple[Any, int]]:
    """The items of ``data`` for a ``forward=`` function, on ``device``, each with its sample
    count (:func:`count_samples`).  Items are used whole -- a function that takes a batch as
    it comes cannot be given a slice of it -- so the samples stop before the first item that
    would go past ``num_samples`` (the first is always used; ``None``: no limit).  Items of
    no sample are skipped."""
    seen = 0
    for item in data:
        n = count_samples(item, input_key)
        if n == 0:
            continue
        if num_samples is not None and seen and seen + n > num_samples:
            return
        yield (item if device is None else to_device(item, device)), n
        seen += n
        if num_samples is not None and seen >= num_samples:
            return
