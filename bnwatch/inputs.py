"""Turn what a data loader yields into the model's input (duck-typed; no torch import)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from bnwatch.errors import ConfigError


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
