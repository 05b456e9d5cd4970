"""Frozen BatchNorm (``FrozenBatchNorm2d`` of torchvision's and detectron2's detection
backbones): watched like a BatchNorm in eval mode -- whatever the model's mode -- and never
recalibrated."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import bnwatch
from bnwatch.capture.discovery import discover, is_frozen_batchnorm
from bnwatch.errors import ConfigError
from bnwatch.recalibration import recalibrate
from tests.capture.helpers import RTOL, full_watch


class FrozenBatchNorm2d(nn.Module):
    """``torchvision.ops.misc.FrozenBatchNorm2d`` as torchvision 0.28 writes it (torchvision is
    not a dependency): fixed statistics and affine parameters in buffers."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


def detector(seed: int = 0) -> Any:  # Any: tests reach into submodules
    """A backbone stem with a frozen BatchNorm (its statistics from "pretraining": the conv
    output of inputs centred at 1 with sd 2), then a trainable BatchNorm and a head."""
    torch.manual_seed(seed)
    frozen = FrozenBatchNorm2d(6)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        frozen,
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.Flatten(),
        nn.Linear(5 * 36, 4),
    ).eval()
    with torch.no_grad():
        out = model[0](images(8, shift=0.0)[0].repeat(4, 1, 1, 1))
        frozen.running_mean.copy_(out.mean((0, 2, 3)))
        frozen.running_var.copy_(out.var((0, 2, 3)))
        frozen.weight.uniform_(0.5, 1.5)
        frozen.bias.uniform_(-0.2, 0.2)
    return model


def images(batches: int, size: int = 8, seed: int = 1, shift: float = 0.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 6, 6, generator=g) * 2 + 1 + shift for _ in range(batches)]


def test_it_is_recognized_by_name_and_buffers() -> None:
    model = detector()
    assert is_frozen_batchnorm(model[1])
    assert not is_frozen_batchnorm(model[4])  # a BatchNorm2d
    assert not is_frozen_batchnorm(nn.InstanceNorm2d(3, track_running_stats=True))

    class FrozenBatchNormLookalike(nn.Module):  # the name, but no statistics
        eps = 1e-5

    assert not is_frozen_batchnorm(FrozenBatchNormLookalike())
    found = discover(model)
    assert [(layer.name, layer.kind, layer.frozen) for layer in found] == [
        ("1", "FrozenBatchNorm2d", True),
        ("4", "BatchNorm2d", False),
    ]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_it_is_measured_exactly_and_never_in_batch_stat_mode(mode: str) -> None:
    """Detection fine-tuning runs the model in train(), where a frozen layer still uses its
    stored statistics: it is not in batch-statistics mode, the trainable BatchNorm is."""
    model = detector()
    plain = copy.deepcopy(model)
    model.train(mode == "train")
    plain.train(mode == "train")
    seen: list[torch.Tensor] = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    with full_watch(model) as mon:
        for x in images(5):
            assert torch.equal(model(x), plain(x))  # bit-identical outputs
        reports = mon.flush()
    assert set(reports) == {"1", "4"}
    frozen = reports["1"]
    assert frozen.kind == "FrozenBatchNorm2d" and frozen.n_samples == 40
    assert not frozen.batch_stat_mode and not frozen.small_batch_mismatch
    assert reports["4"].batch_stat_mode is (mode == "train")
    x = torch.cat(seen)
    flat = x.transpose(0, 1).reshape(6, -1)
    np.testing.assert_allclose(frozen.mean, flat.mean(1).numpy(), rtol=RTOL)
    np.testing.assert_allclose(frozen.var, flat.var(1, unbiased=False).numpy(), rtol=RTOL)
    # the gap: against the statistics the layer was frozen with
    np.testing.assert_array_equal(frozen.ref_mean, model[1].running_mean.double().numpy())
    assert not frozen.running_stats_mutated
    assert mon.stats().hook_errors == {}


def test_drift_against_a_profile_and_a_changed_checkpoint() -> None:
    model = detector()
    ref = bnwatch.profile(model, images(6, seed=2), name="detector")
    assert ref.layers["1"].kind == "FrozenBatchNorm2d"
    with full_watch(model, reference=ref) as mon:
        for x in images(6, seed=3):
            model(x)
        same = mon.flush()
        for x in images(6, seed=4, shift=1.5):  # a new camera
            model(x)
        shifted = mon.flush()
        state = detector(seed=5).state_dict()  # another checkpoint's frozen statistics
        model.load_state_dict(state)
        model(images(1)[0])
        reloaded = mon.flush()
    assert not same["1"].drifted and same["1"].p_value > 0.01
    assert shifted["1"].drifted and shifted["1"].p_value < 1e-6
    assert reloaded["1"].running_stats_mutated


def test_recalibration_leaves_frozen_layers_alone() -> None:
    model = detector()
    frozen_before = {k: v.clone() for k, v in model[1].state_dict().items()}
    bn_before = model[4].running_mean.clone()
    with full_watch(model) as mon:
        result = recalibrate(model, images(8, shift=2.0), progress=False)
        assert mon.flush() == {}  # the passes are not production traffic, frozen layer included
    assert [u.name for u in result.updates] == ["4"]
    assert result.status == "applied"
    assert not torch.equal(model[4].running_mean, bn_before)
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    # a model whose BatchNorm layers are all frozen, or layers= that picks only frozen ones
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), FrozenBatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"model='Sequential'.*\(1, 2\) are frozen"):
        recalibrate(backbone, images(4), progress=False)
    with pytest.raises(ConfigError, match=r"layers='1'.*those matched \(1\) are frozen"):
        recalibrate(model, images(4), layers="1", progress=False)
    with pytest.raises(ConfigError, match=r"recalibrate=True is invalid.*frozen"):
        bnwatch.watch(backbone, store="sqlite://", keep_inputs=64, recalibrate=True)
