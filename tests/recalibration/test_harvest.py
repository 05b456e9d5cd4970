"""precise pools the layers' own batch statistics: the same result as measuring the input."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnwatch.recalibration import core, recalibrate

Reference = dict[str, tuple[np.ndarray, np.ndarray]]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 25, 4),
        nn.BatchNorm1d(4),
    ).eval()


def _stats(model: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray]:
    bn = model.get_submodule(name)
    assert isinstance(bn, _BatchNorm)
    assert bn.running_mean is not None and bn.running_var is not None
    return bn.running_mean.double().numpy(), bn.running_var.double().numpy()


def _reference(model: nn.Module, xs: list[torch.Tensor]) -> Reference:
    """Float64 pooled mean and unbiased variance of what each BN layer receives in train mode,
    non-finite elements excluded."""
    ref = copy.deepcopy(model)
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name: str) -> object:
        return lambda mod, a: seen.setdefault(name, []).append(a[0].double())

    for name, m in ref.named_modules():
        if isinstance(m, _BatchNorm):
            m.train()
            m.register_forward_pre_hook(keep(name))  # type: ignore[arg-type]
    with torch.no_grad():
        for x in xs:
            ref(x)
    out = {}
    for name, chunks in seen.items():
        x = torch.cat(chunks)
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        rows = [row[torch.isfinite(row)] for row in flat]
        out[name] = (
            np.array([float(r.mean()) for r in rows]),
            np.array([float(r.var(unbiased=True)) for r in rows]),
        )
    return out


def _assert_matches(model: nn.Module, want: Reference, var_rtol: float = 1e-5) -> None:
    for name, (mean, var) in want.items():
        got_mean, got_var = _stats(model, name)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_var, var, rtol=var_rtol)


def test_large_offsets_and_unequal_batches() -> None:
    model = _net()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 3, 5, 5, generator=g) * 0.01 + 10.0 for n in (7, 16, 3, 30)]
    want = _reference(model, xs)
    recalibrate(model, xs, apply=True, min_samples=2)
    _assert_matches(model, want, var_rtol=1e-4)


def test_non_finite_batches_fall_back_to_measuring_the_input() -> None:
    model = _net()
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(8, 3, 5, 5, generator=g) for _ in range(4)]
    xs[1][0, 0, 0, 0] = float("nan")
    xs[2][3, 1, 2, 2] = float("inf")
    want = _reference(model, xs)
    result = recalibrate(model, xs, apply=True)
    # the first BN layer measures the two poisoned batches from the input, NaN/inf excluded
    _assert_matches(model, {"1": want["1"]})
    assert result.samples == 32


def test_a_layer_called_twice_per_forward_pools_both_calls() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.bn(self.bn(x) * 2 + 1)
            return out

    model = Twice().eval()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(6, 3, 4, 4, generator=g) + 3 for _ in range(3)]
    want = _reference(model, xs)
    recalibrate(model, xs, apply=True, min_samples=2)
    _assert_matches(model, want)


def test_pooled_moments_count_elements_and_samples() -> None:
    p = core._Pooled()
    p.add(torch.tensor([[1.0], [2.0]]), 10, 10)
    p.add(torch.tensor([[3.0], [4.0]]), 30, 30)
    m = p.moments()
    assert m is not None
    np.testing.assert_allclose(m.mean, [(1 * 10 + 3 * 30) / 40])
    np.testing.assert_allclose(m.m2, [2 * 9 + 4 * 29 + (3 - 1) ** 2 * 10 * 30 / 40])
    assert m.n_samples == 40
