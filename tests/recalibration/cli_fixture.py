"""A model factory and data loaders for the `bnwatch recalibrate` command-line tests."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from tests.recalibration.test_recalibrate import data, net


def factory() -> nn.Module:
    model: nn.Module = net()
    return model


def loader() -> list[torch.Tensor]:
    return data(8, shift=3.0)


def held_out() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in data(3, seed=7, shift=3.0)]


wrong = [torch.randn(8, 4, 5, 5)]

not_iterable = 42


class Models:
    """``--model tests.recalibration.cli_fixture:Models.factory``: a dotted name."""

    factory = staticmethod(factory)


def dict_loader() -> list[dict[str, torch.Tensor]]:
    """Batches as a feature store serves them: the model's input under ``image``."""
    return [{"image": x, "weight": torch.ones(x.shape[0])} for x in data(8, shift=3.0)]


def by_image(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``--forward``: run the model on a batch's ``image``."""
    out: torch.Tensor = model(batch["image"] * batch["weight"][:, None, None, None])
    return out


def dict_held_out() -> list[dict[str, torch.Tensor]]:
    """``held_out`` as dicts, the labels under ``label``."""
    return [
        {"image": x, "weight": torch.ones(x.shape[0]), "label": torch.zeros(x.shape[0]).long()}
        for x, _ in held_out()
    ]


def frozen_factory() -> nn.Module:
    """:func:`factory`'s model with its first BatchNorm (``1``) frozen, as a detection
    backbone's."""
    from tests.capture.test_frozen import FrozenBatchNorm2d

    model: nn.Module = net()
    model.add_module("1", FrozenBatchNorm2d(6))  # replaces the BatchNorm2d in place
    return model


def nan_loader() -> list[torch.Tensor]:
    """Batches without a finite value: nothing to estimate statistics from."""
    return [torch.full_like(x, float("nan")) for x in data(4)]


def raising_factory() -> nn.Module:
    """A factory that fails on this host (its weights are elsewhere)."""
    raise ValueError("no weights on this host")


def raising_loader() -> list[torch.Tensor]:
    raise FileNotFoundError("/data/val is not mounted")


class LoaderClass:
    """``--data ...:LoaderClass``: a class whose instances are iterables of batches (an
    IterableDataset-style loader) -- called, not iterated as the class."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from loader()


def short_loader() -> list[torch.Tensor]:
    """8 samples: fewer than a recalibration needs."""
    return data(1)


def string_loader() -> list[str]:
    """Batches that are not tensors."""
    return ["a", "b"]
