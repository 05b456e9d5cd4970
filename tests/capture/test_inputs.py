"""The inputs a monitor keeps (``watch(..., keep_inputs=N)``): the last N samples, oldest
first, and when they arrived."""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import bnwatch
from bnwatch.capture.monitor import InputRing, KeptInputs, _join_calls
from bnwatch.errors import ConfigError
from bnwatch.inputs import ModelCall, replay


def rows(*values: int) -> torch.Tensor:
    """A batch of [N, 2] samples whose first column is ``values``."""
    v = torch.tensor(values, dtype=torch.float32)
    return torch.stack([v, -v], dim=1)


def firsts(kept: KeptInputs | None) -> list[float]:
    """The first column of the kept samples (``rows``'s values)."""
    assert kept is not None and kept.inputs is not None
    values: list[float] = kept.inputs[:, 0].tolist()
    return values


def test_the_ring_keeps_the_last_samples_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(float(t) for t in range(100, 200))
    monkeypatch.setattr("bnwatch.capture.monitor.time.time", lambda: next(clock))
    ring = InputRing(5)
    assert ring.snapshot() is None
    ring.add(rows(0, 1))  # arrives at 100
    ring.add(rows(2, 3))  # 101
    kept = ring.snapshot()
    assert firsts(kept) == [0, 1, 2, 3] and kept is not None
    assert kept.first_at == datetime.fromtimestamp(100, tz=timezone.utc)
    assert kept.last_at == datetime.fromtimestamp(101, tz=timezone.utc)
    ring.add(rows(4, 5, 6))  # 102: wraps around, 0 and 1 are gone
    kept = ring.snapshot()
    assert firsts(kept) == [2, 3, 4, 5, 6] and kept is not None
    assert kept.first_at.timestamp() == 101 and kept.last_at.timestamp() == 102
    ring.add(rows(*range(10, 17)))  # 103: more than the ring holds: its last 5
    kept = ring.snapshot()
    assert firsts(kept) == [12, 13, 14, 15, 16] and kept is not None
    assert kept.first_at.timestamp() == kept.last_at.timestamp() == 103
    assert kept.describe() == {
        "kept": 5,
        "first_at": "1970-01-01T00:01:43+00:00",
        "last_at": "1970-01-01T00:01:43+00:00",
    }
    ring.add(torch.zeros(2, 3))  # 104: another sample shape restarts the ring
    kept = ring.snapshot()
    assert kept is not None and kept.samples == 2 and len(firsts(kept)) == 2
    assert kept.first_at.timestamp() == 104


def test_a_monitor_keeps_what_its_model_saw() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).eval()
    start = datetime.now(timezone.utc)
    with bnwatch.watch(model, keep_inputs=6, overhead_budget=None, window_seconds=None) as mon:
        assert mon.inputs() is None and mon.kept_inputs() is None
        for b in range(4):
            model(rows(*range(3 * b, 3 * b + 3)))
        kept = mon.kept_inputs()
        inputs = mon.inputs()
    assert kept is not None and inputs is not None
    assert inputs[:, 0].tolist() == [6, 7, 8, 9, 10, 11] == firsts(kept)
    assert start <= kept.first_at <= kept.last_at <= datetime.now(timezone.utc)


class _Dict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).eval()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.net(batch["x"])
        return out


class _Keywords(_Dict):
    def forward(  # type: ignore[override]
        self,
        *,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        scale: float = 1.0,
        skip: bool = False,
    ) -> torch.Tensor:
        if skip:  # a path that reaches no BatchNorm layer
            return x
        out: torch.Tensor = self.net(x * scale if mask is None else x * mask)
        return out


class _Positional(_Dict):
    def forward(  # type: ignore[override]
        self, x: torch.Tensor, mask: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor:
        out: torch.Tensor = self.net(x * mask * scale)
        return out


class _Images(_Dict):
    """Called with a list of samples, as torchvision's detection models are."""

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        out: torch.Tensor = self.net(torch.stack(images))
        return out


CALLS: list[Any] = [
    pytest.param(_Dict(), lambda m, x: m({"x": x}), id="dict"),
    pytest.param(
        _Keywords(), lambda m, x: m(x=x, mask=torch.ones_like(x)), id="two-tensor-keywords"
    ),
    pytest.param(_Keywords(), lambda m, x: m(x=x, scale=0.5), id="tensor-and-option"),
    pytest.param(
        _Positional(), lambda m, x: m(x, torch.ones_like(x), scale=2.0), id="two-positional"
    ),
    pytest.param(_Images(), lambda m, x: m(list(x)), id="list-of-samples"),
]


@pytest.mark.parametrize(("model", "call"), CALLS)
def test_a_forward_of_another_form_is_kept_as_a_whole_call(model: nn.Module, call: Any) -> None:
    """Dicts, lists, several tensors, a tensor and options: the calls are kept whole (copies
    of their tensors), as many of the most recent as hold at most keep_inputs samples, and
    replaying one gives what the model gave."""
    outputs = []
    with bnwatch.watch(model, keep_inputs=8, overhead_budget=None, window_seconds=None) as mon:
        for b in range(4):
            x = rows(3 * b, 3 * b + 1, 3 * b + 2)
            outputs.append(call(model, x))
            x.fill_(-1.0)  # the caller reuses its buffer: the kept copy is not affected
        kept = mon.kept_inputs()
        assert mon.inputs() is None  # no single tensor to give
    assert kept is not None and kept.inputs is None and kept.key is None
    assert kept.samples == 6 and len(kept.calls) == 2  # 3 calls would be 9 > 8
    assert kept.describe()["kept"] == 6 and kept.describe()["calls"] == 2
    assert kept.forward is replay
    with torch.no_grad():
        for old, want in zip(kept.calls, outputs[2:], strict=True):
            assert torch.equal(replay(model, old), want)


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (lambda m: m(x=rows(*range(9)), scale=1.0), "9 samples in one call, more than"),
        (lambda m: m(x=rows(1, 2), skip=True), "arguments that reached no BatchNorm layer"),
    ],
    ids=["more-than-keep_inputs", "no-batchnorm-reached"],
)
def test_a_call_that_cannot_be_kept_is_skipped_and_says_why_once(
    call: Any, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Saying so at the first forward beats a triggered recalibration failing on "only 0 kept
    inputs" weeks later."""
    model = _Keywords()
    with (
        caplog.at_level(logging.WARNING, logger="bnwatch"),
        bnwatch.watch(
            model, name="multi", keep_inputs=8, overhead_budget=None, window_seconds=None
        ) as mon,
    ):
        for _ in range(3):
            call(model)
        assert mon.kept_inputs() is None
    warned = [r.getMessage() for r in caplog.records if "keep_inputs" in r.getMessage()]
    assert len(warned) == 1 and said in warned[0] and "multi was called with" in warned[0]


def test_a_forward_that_raises_keeps_nothing_and_raises_its_own_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = _Keywords()
    with (
        caplog.at_level(logging.WARNING, logger="bnwatch"),
        bnwatch.watch(model, keep_inputs=8, overhead_budget=None, window_seconds=None) as mon,
    ):
        with pytest.raises(RuntimeError, match="must match the size"):
            model(x=rows(1, 2), mask=torch.ones(3, 2))  # [2, 2] * [3, 2]
        model(x=rows(3), scale=2.0)
        kept = mon.kept_inputs()
        assert dict(mon.stats().hook_errors) == {}
    assert kept is not None and [c.samples for c in kept.calls] == [1]
    assert not [r for r in caplog.records if "keep_inputs" in r.getMessage()]


class _Refuses(nn.Module):
    """Refuses (ValueError) a batch whose BatchNorm output holds a NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        if out.isnan().any():
            raise ValueError("invalid request")
        return out


def test_a_forward_of_one_tensor_that_raises_is_not_kept_and_restarts_nothing() -> None:
    """A forward called with one tensor was kept before it ran: the NaN input the model
    refused was kept, and one malformed request (another feature count, which the model's
    first layer refuses) restarted the ring with its shape -- the kept inputs became that one
    request, and a recalibration on them had nothing to run on."""
    model = _Refuses()
    with bnwatch.watch(model, keep_inputs=6, overhead_budget=None, window_seconds=None) as mon:
        model(rows(0, 1))
        with pytest.raises(ValueError, match="invalid request"):
            model(rows(2, 3) * math.nan)
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            model(torch.zeros(2, 5))
        x = rows(4, 5)
        model(x)
        x.fill_(-1.0)  # the caller reuses its buffer: what was kept is a copy
        model(rows(6, 7, 8))  # wraps around
        kept = mon.kept_inputs()
    assert firsts(kept) == [1, 4, 5, 6, 7, 8]


def test_the_kind_of_input_changing_restarts_the_ring() -> None:
    model = _Keywords()
    with bnwatch.watch(model, keep_inputs=8, overhead_budget=None, window_seconds=None) as mon:
        model(x=rows(0, 1))
        model(x=rows(2), scale=2.0)  # a call of another form: the ring restarts
        kept = mon.kept_inputs()
        assert kept is not None and kept.samples == 1 and len(kept.calls) == 1
        model(x=rows(3, 4))  # and back
        kept = mon.kept_inputs()
    assert kept is not None and kept.calls == () and kept.inputs is not None
    assert kept.inputs[:, 0].tolist() == [3, 4] and kept.key == "x"


@pytest.mark.parametrize("key", [None, "pixel_values"])
def test_kept_tensors_come_in_batches_of_about_equal_size(key: str | None) -> None:
    """65 kept samples in batches of 64 gave 64 and a lone one, which a BatchNorm layer cannot
    normalize in training mode: a triggered recalibration whose fit part happened to be
    64k + 1 samples failed ("Expected more than 1 value per channel")."""
    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    inputs = torch.arange(65.0)[:, None]
    got = KeptInputs(inputs, at, at, key=key).batches(64)
    tensors = [b if key is None else b[key] for b in got]
    assert [len(t) for t in tensors] == [33, 32]
    assert torch.equal(torch.cat(tensors), inputs)
    assert [len(b) for b in KeptInputs(inputs[:64], at, at).batches(64)] == [64]
    assert [len(b) for b in KeptInputs(inputs, at, at).batches(16)] == [13] * 5
    with pytest.raises(ConfigError, match="batch_size"):
        KeptInputs(inputs, at, at).batches(0)


def test_one_sample_calls_are_joined_into_batches() -> None:
    """A model served one sample at a time: consecutive calls of the same form are joined into
    batches (BatchNorm1d in training mode cannot take one sample), and ``precise`` on them gives
    the population statistics of what the layer received (float64 reference)."""
    model = _Keywords()
    with bnwatch.watch(model, keep_inputs=32, overhead_budget=None, window_seconds=None) as mon:
        for i in range(20):
            model(x=rows(i), scale=1.0 if i < 18 else 2.0)  # the last two: another option
        kept = mon.kept_inputs()
    assert kept is not None and len(kept.calls) == 20
    joined = kept.batches(8)
    assert [c.samples for c in joined] == [6, 6, 6, 2]  # 18 in three, not 8, 8 and 2
    assert [c.kwargs["scale"] for c in joined] == [1.0, 1.0, 1.0, 2.0]
    assert joined[1].kwargs["x"][:, 0].tolist() == list(range(6, 12))
    assert [c.samples for c in kept.batches(17)] == [9, 9, 2]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model.train()(x=rows(0), scale=1.0)  # what an unjoined call would meet
    model.eval()
    result = bnwatch.recalibrate(
        model, joined, forward=kept.forward, num_samples=kept.samples, progress=False
    )
    assert result.status == "applied" and result.samples == 20
    x = torch.cat([c.kwargs["x"] * c.kwargs["scale"] for c in joined]).double()
    linear, bn = dict(model.net[0].named_parameters()), model.net[1]
    got = x @ linear["weight"].double().T + linear["bias"].double()
    torch.testing.assert_close(bn.running_mean.double(), got.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), got.var(0), rtol=1e-5, atol=1e-6)


def test_joining_keeps_lists_of_samples_and_leaves_unequal_calls_apart() -> None:
    calls = [ModelCall(([rows(i)[0]],), {"mask": torch.ones(2)}, 1) for i in range(3)] + [
        ModelCall(([rows(9)[0]],), {"mask": torch.zeros(2)}, 1)
    ]  # another fixed tensor
    joined = _join_calls(calls, 64)
    assert [c.samples for c in joined] == [3, 1]  # the mask differs in value: not joined
    assert [t[0].item() for t in joined[0].args[0]] == [0, 1, 2]
    assert torch.equal(joined[0].kwargs["mask"], torch.ones(2))
    assert joined[1] is calls[3]
    assert [c.samples for c in _join_calls(calls, 2)] == [2, 1, 1]  # at most batch_size
    assert _join_calls([], 64) == []
    sizes = [ModelCall((rows(*range(n)),), {}, n) for n in (32, 32, 1)]
    assert [c.samples for c in _join_calls(sizes, 64)] == [32, 33]  # no lone sample


class _Parts(_Dict):
    """Called with a list of per-modality batches, not of samples: ``model([rgb, depth])``."""

    def forward(self, parts: list[torch.Tensor], sizes: Any = None) -> torch.Tensor:  # type: ignore[override]
        out: torch.Tensor = self.net(parts[0] + parts[1])
        return out


class _Table(_Dict):
    """Called with a table passed as the same tensor every time."""

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out: torch.Tensor = self.net(x @ table)
        return out


class _Frames(_Dict):
    def forward(self, frames: list[np.ndarray]) -> torch.Tensor:  # type: ignore[override]
        out: torch.Tensor = self.net(torch.as_tensor(np.stack(frames)))
        return out


def test_the_samples_of_a_call_are_what_its_first_batchnorm_received() -> None:
    """A list of modalities holds 4 samples, not 2 (its length); keyword calls with a size
    beside them are counted too; and the bound holds in samples."""
    model = _Parts()
    with bnwatch.watch(model, keep_inputs=8, overhead_budget=None, window_seconds=None) as mon:
        for b in range(3):
            x = rows(*range(4 * b, 4 * b + 4))
            model([x, x], sizes=[8, 8])
        kept = mon.kept_inputs()
    assert kept is not None and [c.samples for c in kept.calls] == [4, 4]  # 12 > 8
    joined = kept.batches(8)
    assert len(joined) == 1 and joined[0].samples == 8
    assert [p.shape for p in joined[0].args[0]] == [(8, 2), (8, 2)]  # parts, not samples
    assert joined[0].kwargs == {"sizes": [8, 8]}
    with torch.no_grad():
        assert torch.equal(replay(model, joined[0])[:, 0], model.net(2 * rows(*range(4, 12)))[:, 0])


def test_a_tensor_passed_again_is_kept_once_and_not_taken_for_a_batch() -> None:
    """A 2 x 2 table beside calls of 2 samples: the same tensor each call is copied once and
    shared, and joining does not concatenate it although its first dimension matches."""
    model, table = _Table(), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    with bnwatch.watch(model, keep_inputs=8, overhead_budget=None, window_seconds=None) as mon:
        for b in range(3):
            model(rows(2 * b, 2 * b + 1), table)
        table.mul_(3.0)  # changed in place: a new version, copied anew
        model(rows(6, 7), table)
        kept = mon.kept_inputs()
    assert kept is not None and len(kept.calls) == 4
    tables = [c.args[1] for c in kept.calls]
    assert tables[0] is tables[1] is tables[2] and tables[3] is not tables[0]  # shared
    assert torch.equal(tables[3], 3 * tables[0])
    joined = kept.batches(64)
    assert [c.samples for c in joined] == [6, 2]  # the changed table is another form
    assert joined[0].args[1].shape == (2, 2) and joined[0].args[0].shape == (6, 2)
    replay(model, joined[0])


def test_kept_calls_are_copies_the_caller_and_a_replay_cannot_change() -> None:
    """numpy frames the caller reuses, a kept tensor changed in place by whoever took a
    snapshot: later snapshots still hold what the model was called with."""
    model, frame = _Frames(), np.zeros(2, dtype=np.float32)
    with bnwatch.watch(model, keep_inputs=8, overhead_budget=None, window_seconds=None) as mon:
        for b in range(3):
            frame[:] = b  # the caller's buffer, reused
            model([frame.copy(), frame])
        first = mon.kept_inputs()
        assert first is not None
        first.calls[0].args[0][1].fill(-1.0)  # changed by the snapshot's owner
        again = mon.kept_inputs()
    assert again is not None
    assert [float(c.args[0][1][0]) for c in again.calls] == [0.0, 1.0, 2.0]


def test_options_of_another_type_are_another_form() -> None:
    at = datetime.now(timezone.utc)
    calls = [ModelCall((rows(i),), {"flag": v}, 1) for i, v in enumerate([1, True, 1.0, 1])]
    joined = KeptInputs(None, at, at, calls=tuple(calls)).batches(64)
    assert [(c.samples, type(c.kwargs["flag"])) for c in joined] == [
        (2, int),
        (1, bool),
        (1, float),
    ]


def test_shuffled_halves_are_still_joined_by_form() -> None:
    """The trigger's fit and held-out parts are drawn at random; their calls of one form are
    joined wherever they lie (one-sample requests of two forms in turn)."""
    at = datetime.now(timezone.utc)
    calls = [ModelCall((rows(i),), {"mode": "ab"[i % 2]}, 1) for i in range(128)]
    fit, judge = KeptInputs(None, at, at, calls=tuple(calls)).split(
        0.25, torch.Generator().manual_seed(0)
    )
    assert sorted(c.samples for c in fit.batches(64)) == [45, 51]  # a form each: not 1s
    assert [c.args[0][0, 0].item() for c in fit.calls] == sorted(
        c.args[0][0, 0].item() for c in fit.calls
    )  # in the order they came
    assert min(c.samples for c in judge.batches(64)) > 1


def test_split_keeps_calls_whole() -> None:
    at = datetime.now(timezone.utc)
    g = torch.Generator().manual_seed(0)
    kept = KeptInputs(None, at, at, calls=tuple(ModelCall((rows(i, i),), {}, 2) for i in range(4)))
    fit, judge = kept.split(0.25, g)
    assert (fit.samples, judge.samples) == (6, 2)
    assert sorted(c.args[0][0, 0].item() for c in fit.calls + judge.calls) == [0, 1, 2, 3]
    one = KeptInputs(None, at, at, calls=kept.calls[:1])
    fit, judge = one.split(0.25, g)
    assert (fit.samples, judge.samples) == (2, 0)
    tensors = KeptInputs(rows(*range(8)), at, at)
    fit, judge = tensors.split(0.25, g)
    assert (fit.samples, judge.samples) == (6, 2)
    assert fit.inputs is not None and judge.inputs is not None
    assert sorted(torch.cat([fit.inputs, judge.inputs])[:, 0].tolist()) == list(range(8))


def test_the_only_tensor_keyword_is_kept_with_its_name() -> None:
    """``model(pixel_values=x)``, as Hugging Face models are called: kept, with the name, and
    a change of name (or to a positional input) restarts the ring."""
    model = _Keywords()
    with bnwatch.watch(model, keep_inputs=6, overhead_budget=None, window_seconds=None) as mon:
        model(x=rows(0, 1, 2))
        model(x=rows(3, 4))
        kept = mon.kept_inputs()
        assert kept is not None and kept.key == "x"
        assert firsts(kept) == [0, 1, 2, 3, 4]
        assert kept.describe()["keyword"] == "x"
        model.net(rows(5))  # a submodule called directly is not a forward of the model
        kept = mon.kept_inputs()
        assert kept is not None and kept.samples == 5
    positional = _Dict().net
    with bnwatch.watch(positional, keep_inputs=6, overhead_budget=None) as mon:
        positional(rows(0, 1))
        kept = mon.kept_inputs()
        assert kept is not None and kept.key is None and "keyword" not in kept.describe()
