"""``forward=``: recalibrating and profiling models that do not take one tensor -- a dict,
keyword arguments, a list of images -- with the model's own layer names."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import bnwatch
from bnwatch.errors import ConfigError, ShapeError
from bnwatch.inputs import ModelCall, count_samples, replay, to_device
from bnwatch.recalibration import recalibrate
from tests.recalibration.test_recalibrate import buffers, data, net, population_reference


class _TakesADict(nn.Module):
    """A forward taking a dict (a feature store's batch): ``x`` scaled by ``scale``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(2, 3)
        self.bn = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2)
        self.eval()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.head(self.bn(self.linear(batch["x"] * batch["scale"])))
        return out


class _TakesKeywords(_TakesADict):
    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward({"x": x, "scale": scale})


class _TakesImages(nn.Module):
    """A forward taking a list of images (as torchvision's detection models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.body: Any = net()

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.body(torch.stack(images))
        return out


def dict_batches(batches: int = 4, size: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(size, 2, generator=g) * 3 + 1, "scale": torch.tensor(2.0), "id": "b"}
        for _ in range(batches)
    ]


def received(model: _TakesADict, batches: list[dict[str, Any]]) -> torch.Tensor:
    """float64: what ``model.bn`` receives from ``batches`` (computed independently)."""
    x = torch.cat([b["x"] * b["scale"] for b in batches]).double()
    return x @ model.linear.weight.double().T + model.linear.bias.double()


def call_with_dict(model: nn.Module, batch: Any) -> Any:
    return model(batch)


def test_a_model_taking_a_dict_gets_the_population_statistics_under_its_own_names(
    tmp_path: Path,
) -> None:
    model, batches = _TakesADict(), dict_batches()
    with pytest.raises(ConfigError, match="input_key"):  # without forward=: which tensor?
        recalibrate(model, batches, num_samples=32, progress=False)
    result = recalibrate(model, batches, forward=call_with_dict, num_samples=32, progress=False)
    assert result.status == "applied" and result.samples == 32
    want = received(model, batches)
    assert model.bn.running_mean is not None and model.bn.running_var is not None
    torch.testing.assert_close(model.bn.running_mean.double(), want.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var.double(), want.var(0), rtol=1e-5, atol=1e-6)
    result.save(tmp_path / "bn.pt")
    saved = torch.load(tmp_path / "bn.pt")
    assert sorted(saved) == ["bn.running_mean", "bn.running_var"]  # the model's own names
    fresh = _TakesADict()
    _missing, unexpected = fresh.load_state_dict(saved, strict=False)
    assert not unexpected
    assert fresh.bn.running_var is not None and model.bn.running_var is not None
    assert torch.equal(fresh.bn.running_var, model.bn.running_var)


class _Wrapped(nn.Module):
    """A wrapper whose forward takes the tensor (what docs/recalibration.md warns about)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner({"x": x, "scale": torch.tensor(2.0)})
        return out


def test_a_wrapper_recalibrates_the_same_layers_under_the_wrappers_names(
    tmp_path: Path,
) -> None:
    """What the docs say: the wrapper gets the same statistics, but its file names them by
    the wrapper's paths, which the model's own load_state_dict(strict=False) ignores."""
    model, batches = _TakesADict(), dict_batches()
    result = recalibrate(_Wrapped(model), batches, input_key="x", num_samples=32, progress=False)
    assert result.status == "applied"
    want = received(model, batches)
    torch.testing.assert_close(model.bn.running_mean.double(), want.mean(0), rtol=1e-5, atol=1e-6)  # type: ignore[union-attr]
    result.save(tmp_path / "bn.pt")
    saved = torch.load(tmp_path / "bn.pt")
    assert sorted(saved) == ["inner.bn.running_mean", "inner.bn.running_var"]
    _missing, unexpected = _TakesADict().load_state_dict(saved, strict=False)
    assert sorted(unexpected) == sorted(saved)  # nothing of it would be loaded


def test_keyword_arguments_and_mix() -> None:
    model, batches = _TakesKeywords(), dict_batches()
    kept = [{k: v for k, v in b.items() if k != "id"} for b in batches]
    result = recalibrate(
        model,
        kept,
        forward=lambda m, b: m(**b),
        method="mix",
        prior_strength=16,
        num_samples=32,
        progress=False,
    )
    reference = _TakesADict()  # the same weights, running statistics of a fresh layer
    want = received(reference, batches)
    assert reference.bn.running_mean is not None and reference.bn.running_var is not None
    w = 16 / (16 + 32)
    mean = w * reference.bn.running_mean.double() + (1 - w) * want.mean(0)
    var = w * reference.bn.running_var.double() + (1 - w) * want.var(0)
    assert result.status == "applied"
    assert model.bn.running_mean is not None and model.bn.running_var is not None
    torch.testing.assert_close(model.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var.double(), var, rtol=1e-4, atol=1e-6)


def test_a_list_of_images_counts_its_images_and_judges_held_out_accuracy() -> None:
    model = _TakesImages()
    xs = data(6, shift=3.0)
    images = [(list(x), torch.zeros(x.shape[0], dtype=torch.long)) for x in xs]
    held_out = [
        (list(x), torch.zeros(x.shape[0], dtype=torch.long)) for x in data(3, seed=9, shift=3.0)
    ]
    want = population_reference(model.body, xs)
    result = recalibrate(
        model, images, forward=lambda m, b: m(b[0]), held_out=held_out, progress=False
    )
    assert result.samples == 48
    assert result.improved is True and result.status == "applied"
    assert result.accuracy_before is not None and result.accuracy_after is not None
    for name, (mean, var) in want.items():
        bn = model.body.get_submodule(name)
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5, atol=1e-6)
    # the same model called on the stacked tensors measures the same accuracy
    plain = recalibrate(
        model.body,
        data(6, shift=3.0),
        held_out=[(torch.stack(b[0]), b[1]) for b in held_out],
        apply=False,
        progress=False,
    )
    assert plain.accuracy_after == result.accuracy_after


def test_held_out_dicts_give_accuracy_with_label_key() -> None:
    """Batches as a feature store serves them, labels inside: the same judgement as tuples."""
    model = _TakesImages()
    xs, held = data(6, shift=3.0), data(3, seed=9, shift=3.0)
    labels = [torch.arange(x.shape[0]) % 4 for x in held]
    as_tuples = recalibrate(
        model.body,
        xs,
        held_out=list(zip(held, labels, strict=True)),
        apply=False,
        progress=False,
    )
    keyed = [{"image": x} for x in xs]
    held_dicts = [{"image": x, "y": y} for x, y in zip(held, labels, strict=True)]

    def from_dicts(**kwargs: Any) -> Any:
        return recalibrate(model.body, keyed, held_out=held_dicts, progress=False, **kwargs)

    as_dicts = from_dicts(input_key="image", label_key="y", apply=False)
    unlabelled = from_dicts(forward=lambda m, b: m(b["image"]), apply=False)
    assert as_tuples.accuracy_after is not None and as_tuples.accuracy_before is not None
    assert as_dicts.accuracy_before == as_tuples.accuracy_before
    assert as_dicts.accuracy_after == as_tuples.accuracy_after
    assert unlabelled.accuracy_after is None  # no label_key: judged by drift alone
    assert unlabelled.improved == as_tuples.improved is not None
    before = buffers(model)
    with pytest.raises(ConfigError, match=r"label_key='label' is invalid.*\['image', 'y'\]"):
        from_dicts(input_key="image", label_key="label")
    assert all(torch.equal(v, before[k]) for k, v in buffers(model).items())


def test_batches_are_used_whole() -> None:
    """A function that takes a batch as it comes cannot be given part of it: the samples stop
    before the first batch that would pass num_samples, and a first batch larger than it is
    used whole."""
    model = _TakesADict()
    result = recalibrate(
        model, dict_batches(6), forward=call_with_dict, num_samples=20, progress=False
    )
    assert result.samples == 16
    torch.testing.assert_close(
        model.bn.running_mean.double(),  # type: ignore[union-attr]
        received(model, dict_batches(6)[:2]).mean(0),
        rtol=1e-5,
        atol=1e-6,
    )
    big = recalibrate(
        _TakesADict(),
        dict_batches(2, size=40),
        forward=call_with_dict,
        num_samples=20,
        progress=False,
    )
    assert big.samples == 40


def test_bad_forward_and_bad_batches_say_what_to_fix() -> None:
    model = _TakesADict()
    before = buffers(model)
    with pytest.raises(ConfigError, match="a function"):
        recalibrate(model, dict_batches(), forward="model(**batch)", progress=False)  # type: ignore[arg-type]
    ragged = [{"x": torch.randn(8, 2), "mask": torch.ones(4)} for _ in range(4)]
    with pytest.raises(ConfigError, match=r"input_key.*first dimensions \[4, 8\]"):
        recalibrate(model, ragged, forward=call_with_dict, progress=False)
    with pytest.raises(ConfigError, match="'nope'"):
        recalibrate(model, ragged, forward=call_with_dict, input_key="nope", progress=False)
    wrong = [{"x": torch.randn(8, 5), "scale": torch.tensor(1.0)} for _ in range(4)]
    with pytest.raises(ShapeError, match="a batch of 8 samples") as info:
        recalibrate(model, wrong, forward=call_with_dict, progress=False)
    assert "needs forward=" not in str(info.value)  # it was given one
    assert all(torch.equal(v, before[k]) for k, v in buffers(model).items())


def test_modes_and_buffers_are_restored_when_forward_raises() -> None:
    model = _TakesADict()
    model.head.train()
    before = buffers(model)
    modes = {n: m.training for n, m in model.named_modules()}
    calls = []

    def flaky(m: nn.Module, batch: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("feature store gone")
        return m(batch)

    with pytest.raises(OSError, match="feature store gone"):
        recalibrate(model, dict_batches(), forward=flaky, progress=False)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(v, before[k]) for k, v in buffers(model).items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_ragged_dict_counts_the_samples_of_input_key() -> None:
    model = _TakesADict()
    ragged = [
        {"x": torch.randn(8, 2), "scale": torch.tensor(1.0), "lengths": torch.ones(3)}
        for _ in range(4)
    ]
    result = recalibrate(model, ragged, forward=call_with_dict, input_key="x", progress=False)
    assert result.samples == 32


def test_a_profile_through_forward_equals_the_profile_of_the_tensors() -> None:
    model = net()
    xs = data(5)
    plain = bnwatch.profile(model, xs, num_samples=24)
    keyed = bnwatch.profile(
        model,
        [{"image": x, "label": torch.zeros(8)} for x in xs],
        forward=lambda m, b: m(b["image"]),
        num_samples=24,
    )
    assert set(plain.layers) == set(keyed.layers) == {"1", "5", "8"}
    for name, layer in plain.layers.items():
        other = keyed.layers[name]
        assert other.stats.samples_seen == layer.stats.samples_seen == 24
        np.testing.assert_array_equal(other.stats.moments.mean, layer.stats.moments.mean)
        np.testing.assert_array_equal(other.stats.moments.m2, layer.stats.moments.m2)


def test_count_samples() -> None:
    x = torch.zeros(5, 3)
    assert count_samples(x) == 5
    assert count_samples((x, torch.zeros(5))) == 5
    assert count_samples(([x, x, x], [{"boxes": x}] * 3)) == 3  # images, targets
    assert count_samples({"a": x, "b": torch.zeros(5), "n": torch.tensor(1), "s": "x"}) == 5
    assert count_samples(({"a": x}, torch.zeros(5))) == 5
    assert count_samples({"a": x, "b": torch.zeros(2)}, input_key="b") == 2
    assert count_samples(({"a": x, "b": torch.zeros(2)}, x), input_key="b") == 2  # (dict, labels)
    with pytest.raises(ConfigError, match="no tensor"):
        count_samples({"s": "text"})
    with pytest.raises(ConfigError, match="a tensor"):
        count_samples(torch.tensor(3.0))
    assert count_samples(ModelCall((x,), {"mask": torch.zeros(2)}, 5)) == 5  # a kept call


def test_a_kept_call_moves_to_the_device_and_replays_as_it_was_called() -> None:
    call = ModelCall((torch.zeros(2, 3),), {"mask": torch.ones(3), "scale": 2.0}, 2)
    moved = to_device(call, torch.device("meta"))
    assert isinstance(moved, ModelCall) and moved.samples == 2
    assert moved.args[0].device.type == moved.kwargs["mask"].device.type == "meta"
    assert moved.kwargs["scale"] == 2.0
    got = replay(lambda x, *, mask, scale: (x + mask) * scale, call)
    assert torch.equal(got, torch.full((2, 3), 2.0))
    with pytest.raises(ConfigError, match="ModelCall items"):
        replay(lambda x: x, torch.zeros(2))  # type: ignore[arg-type]


def test_to_device_moves_every_tensor_and_keeps_the_structure() -> None:
    Batch = namedtuple("Batch", ["images", "meta"])
    batch = Batch([torch.zeros(2), torch.ones(3)], {"y": (torch.zeros(1), "name"), "k": 3})
    moved = to_device(batch, torch.device("meta"))
    assert isinstance(moved, Batch) and isinstance(moved.images, list)
    assert [t.device.type for t in moved.images] == ["meta", "meta"]
    assert moved.meta["y"][0].device.type == "meta" and moved.meta["y"][1] == "name"
    assert moved.meta["k"] == 3
    cpu = torch.zeros(2)
    assert to_device(cpu, torch.device("cpu")) is cpu  # nothing copied when already there
