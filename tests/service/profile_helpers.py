"""Reference profiles of a tiny BatchNorm model, and a bit-for-bit check of a stored one
(``POST /api/v1/profiles`` and ``bnwatch.profile(store="http://...")`` tests)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
import torch
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from torch import nn

import bnwatch
from bnwatch.codec import decode_arrays, decode_moments
from bnwatch.schema import Profile
from bnwatch.store.models import Layer, Model, Ref

MODEL = "tiny"
VERSION = "1"


def tiny_model(channels: Sequence[int] = (4, 5), seed: int = 0) -> nn.Module:
    """Conv2d + BatchNorm2d blocks (layer names ``"1"``, ``"4"``, ...), running statistics
    moved off their defaults so that they are worth comparing."""
    torch.manual_seed(seed)
    modules: list[nn.Module] = []
    previous = 3
    for width in channels:
        bn = nn.BatchNorm2d(width)
        assert bn.running_mean is not None and bn.running_var is not None
        with torch.no_grad():
            bn.running_mean.normal_(0.0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        modules += [nn.Conv2d(previous, width, 3), bn, nn.ReLU()]
        previous = width
    return nn.Sequential(*modules)


def tiny_data(batches: int = 3, seed: int = 0, shift: float = 0.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 10, 10, generator=generator) + shift for _ in range(batches)]


def tiny_profile(
    channels: Sequence[int] = (4, 5),
    *,
    seed: int = 0,
    shift: float = 0.0,
    model: str = MODEL,
    version: str = VERSION,
    reservoir_size: int = 16,
) -> Profile:
    """A real ``bnwatch.profile`` of :func:`tiny_model` on random data (24 samples, so the
    reservoir of 16 rows is a sample, not everything)."""
    return bnwatch.profile(
        tiny_model(channels, seed),
        tiny_data(seed=seed, shift=shift),
        name=model,
        version=version,
        reservoir_size=reservoir_size,
    )


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (NaN == NaN, and -0.0 != 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_stored_exactly(engine: Engine, profile: Profile, references: dict[str, int]) -> None:
    """The store holds ``profile`` as the model version's newest references, bit for bit:
    the ids ``references`` names, the sufficient statistics (float64), the mean/var pair, the
    reservoir rows (float32) and ``seen``, eps, the layers' kind, channels and depth."""
    assert list(references) == list(profile.layers)
    with Session(engine) as session:
        rows = session.execute(
            sa.select(Ref, Layer.name, Layer.kind, Layer.channels, Layer.depth)
            .join(Layer, Layer.id == Ref.layer_id)
            .join(Model, Model.id == Layer.model_id)
            .where(Model.name == profile.name, Model.version == profile.version)
            .where(Ref.kind == "profile", Ref.id.in_(list(references.values())))
        ).all()
    stored = {row.name: row for row in rows}
    assert set(stored) == set(profile.layers)
    for depth, (name, lp) in enumerate(profile.layers.items()):
        row = stored[name]
        ref = row[0]
        assert ref.id == references[name]
        assert (row.kind, row.channels, row.depth) == (lp.kind, lp.channels, depth)
        assert ref.eps == lp.eps
        assert ref.moments is not None and ref.reservoir is not None and ref.lineage is not None
        moments = decode_moments(ref.moments)
        for sent, got in zip(lp.stats.moments.as_arrays(), moments.as_arrays(), strict=True):
            assert same_bits(sent, got)
        mean_var = decode_arrays(ref.mean_var)
        assert same_bits(mean_var, np.stack([lp.stats.moments.mean, lp.stats.moments.var]))
        assert same_bits(decode_arrays(ref.reservoir), lp.reservoir.rows)
        assert ref.reservoir_seen == lp.reservoir.seen
        assert ref.lineage["samples_seen"] == lp.stats.samples_seen
        assert ref.lineage["n_batches"] == lp.stats.n_batches
