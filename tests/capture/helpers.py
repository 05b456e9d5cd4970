"""Helpers for capture tests: a float64 reference of BN-input moments and a check against it,
batches to measure, a full-rate monitor."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

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


RTOL = 1e-4  # the contract; the measured errors are ~1e-7


def run(model: nn.Module, batches: list[torch.Tensor], **kwargs: object) -> dict[str, object]:
    mon = full_watch(model, **kwargs)
    try:
        with torch.inference_mode():
            for x in batches:
                model(x)
        return dict(mon.flush())
    finally:
        mon.close()


def check(report: object, batches: list[torch.Tensor], rtol: float = RTOL) -> None:
    want = reference(batches)
    for field in ("mean", "var", "between_var", "within_var"):
        got = getattr(report, field)
        if field == "mean":
            scale = np.sqrt(want["var"]) + np.abs(want["mean"])
            err = np.abs(got - want["mean"]) / scale
            assert np.all(err <= rtol), f"mean: {err.max():.3g}"
        elif field == "within_var" and not np.any(want["within_var"]):
            np.testing.assert_array_equal(got, 0.0)
        else:
            # between/within parts are compared relative to the total variance they add up to
            err = np.abs(got - want[field]) / np.maximum(want["var"], 1e-30)
            assert np.all(err <= rtol), f"{field}: {err.max():.3g}"
    assert_rel(report.var, want["var"], rtol, "var")  # type: ignore[attr-defined]


def batches_of(
    shape: tuple[int, ...],
    sizes: list[int],
    seed: int = 0,
    offset: float = 0.0,
    std: float = 1.0,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = shape[0]
    out = []
    for n in sizes:
        per_sample = torch.randn((n, c) + (1,) * (len(shape) - 1), generator=g, dtype=torch.float64)
        x = per_sample + torch.randn((n, *shape), generator=g, dtype=torch.float64)
        scale = torch.linspace(0.5, 2.0, c, dtype=torch.float64).view(
            (1, c) + (1,) * (len(shape) - 1)
        )
        x = (x * scale * std + offset).to(dtype)
        if channels_last:
            x = x.contiguous(
                memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            )
        out.append(x)
    return out
