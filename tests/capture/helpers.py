"""Helpers for capture tests: a float64 reference of BN-input moments, a full-rate monitor."""

from __future__ import annotations

import numpy as np
import torch

import bnwatch
from bnwatch.capture import Monitor


def reference(batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """float64 numpy reference of what a window over ``batches`` must report (finite values)."""
    rows_m, rows_v, flat = [], [], []
    for x in batches:
        a = x.detach().to(torch.float64).numpy()
        a = a.reshape(a.shape[0], a.shape[1], -1)
        rows_m.append(a.mean(axis=2))
        rows_v.append(a.var(axis=2))
        flat.append(a.transpose(1, 0, 2).reshape(a.shape[1], -1))
    m = np.concatenate(rows_m)
    v = np.concatenate(rows_v)
    allx = np.concatenate(flat, axis=1)
    return {
        "mean": allx.mean(axis=1),
        "var": allx.var(axis=1),
        "between_var": m.var(axis=0),
        "within_var": v.mean(axis=0),
    }


def assert_rel(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    """|got - want| <= rtol * max(|want|, scale): relative error with a per-array floor."""
    got = np.asarray(got, dtype=np.float64)
    scale = np.maximum(np.abs(want), 1e-12)
    err = np.abs(got - want) / scale
    assert np.all(err <= rtol), f"{what}: max relative error {err.max():.3g} > {rtol}"


def full_watch(model: torch.nn.Module, **kwargs: object) -> Monitor:
    """Measure every batch, close windows only on flush."""
    options: dict[str, object] = {"window_seconds": None, "overhead_budget": None}
    options.update(kwargs)
    return bnwatch.watch(model, **options)  # type: ignore[arg-type]
