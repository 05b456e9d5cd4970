"""bnwatch.recalibrate against float64 references, torch's update_bn, and under failure."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import bnwatch
from bnwatch.errors import ConfigError, NoBatchNormError, ShapeError
from bnwatch.recalibration import NotEnoughDataError, recalibrate
from bnwatch.recalibration.core import hook_free_copy

ROOT = Path(__file__).resolve().parents[2]


def net(dropout: float = 0.0, seed: int = 0) -> Any:  # Any: tests reach into submodules
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.Flatten(),
        nn.Linear(5 * 25, 4),
        nn.BatchNorm1d(4),
    ).eval()


def data(batches: int, size: int = 8, seed: int = 1, shift: float = 0.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 5, 5, generator=g) * 2 + 1 + shift for _ in range(batches)]


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def population_reference(
    model: nn.Module, xs: list[torch.Tensor]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Independent float64 reference: BN layers normalize with batch statistics (train mode,
    nothing else), inputs recorded, pooled mean and unbiased variance over all elements."""
    ref = copy.deepcopy(model)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in bn_names(ref)}
    for name, m in ref.named_modules():
        if name in inputs:
            m.training = True  # the layer alone: not a drop layer inside it
            m.register_forward_pre_hook(
                lambda mod, a, name=name: inputs[name].append(a[0].double())
            )
    with torch.no_grad():
        for x in xs:
            ref(x)
    out = {}
    for name, chunks in inputs.items():
        x = torch.cat(chunks)
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        out[name] = (flat.mean(1).numpy(), flat.var(1, unbiased=True).numpy())
    return out


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}


def test_precise_equals_the_population_statistics() -> None:
    model = net()
    xs = data(12)
    want = population_reference(model, xs)
    result = recalibrate(model, xs, apply=True)
    assert result.status == "applied"
    assert result.samples == 96
    for name, (mean, var) in want.items():
        bn = model.get_submodule(name)
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5)


def test_agrees_with_update_bn_where_they_should() -> None:
    """Equal batch sizes, no dropout: identical means; update_bn's variance is the average
    within-batch variance, ours the pooled one: pooled = ((n-1) B v + n Σ(m_b - m)²)/(Bn - 1)."""
    model, theirs = net(), net()
    xs = data(10)
    recalibrate(model, xs, apply=True)
    update_bn(xs, theirs)
    theirs.eval()
    reference = population_reference(net(), xs)
    batch_means: dict[str, list[torch.Tensor]] = {n: [] for n in bn_names(theirs)}
    probe = copy.deepcopy(net())
    for name, m in probe.named_modules():
        if name in batch_means:
            m.train()
            dims = (0, 2, 3) if name != "8" else (0,)
            m.register_forward_pre_hook(
                lambda mod, a, name=name, dims=dims: batch_means[name].append(
                    a[0].double().mean(dims)
                )
            )
    with torch.no_grad():
        for x in xs:
            probe(x)
    for name in bn_names(model):
        ours, other = model.get_submodule(name), theirs.get_submodule(name)
        torch.testing.assert_close(ours.running_mean, other.running_mean, rtol=1e-5, atol=1e-6)
        per = 8 * (25 if name != "8" else 1)  # elements per batch and channel
        B = len(xs)
        means = torch.stack(batch_means[name])
        between = ((means - means.mean(0)) ** 2).sum(0) * per
        pooled = ((per - 1) * B * other.running_var.double() + between) / (B * per - 1)
        torch.testing.assert_close(ours.running_var.double(), pooled, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(pooled.numpy(), reference[name][1], rtol=1e-5)


def test_dropout_stays_off_unlike_update_bn() -> None:
    """update_bn puts the whole model in train mode (dropout on); we touch only BatchNorm."""
    model, theirs = net(dropout=0.5), net(dropout=0.5)
    xs = data(10)
    recalibrate(model, xs, apply=True)
    torch.manual_seed(0)
    update_bn(xs, theirs)
    want = population_reference(net(dropout=0.5), xs)  # the reference keeps dropout in eval
    second = model.get_submodule("5")
    np.testing.assert_allclose(second.running_var.double().numpy(), want["5"][1], rtol=1e-5)
    assert not torch.allclose(theirs.get_submodule("5").running_var, second.running_var, rtol=1e-2)
    assert not model[3].training  # dropout was never switched on


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d shape: a BatchNorm with its activation and drop layer inside."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Dropout(0.5)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(self.drop(super().forward(x)))
        return out


def test_a_batchnorm_with_a_drop_layer_inside_keeps_it_off() -> None:
    """Only the BatchNorm normalizes by batch: the dropout inside it stays in eval, so the
    next layer's statistics are the population's (float64 reference, dropout in eval)."""
    torch.manual_seed(0)
    inner = _BatchNormAct(6)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), inner, nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5)
    )
    model.eval()
    want = population_reference(model, data(10))
    seen: list[bool] = []
    inner.drop.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    recalibrate(model, data(10), apply=True)
    assert seen and not any(seen)
    for name, (mean, var) in want.items():
        bn: Any = model.get_submodule(name)
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5)
    assert not inner.training and not inner.drop.training


def test_mix_weights_source_and_target() -> None:
    model = net()
    xs = data(2)  # n = 16 samples
    target = population_reference(model, xs)
    old = {
        n: (model.get_submodule(n).running_mean.clone(), model.get_submodule(n).running_var.clone())
        for n in bn_names(model)
    }
    result = recalibrate(model, xs, method="mix", prior_strength=48, layers="1", apply=True)
    w = 48 / (48 + 16)
    bn = model.get_submodule("1")  # the first layer sees the same inputs in either mode
    np.testing.assert_allclose(
        bn.running_mean.double().numpy(),
        w * old["1"][0].double().numpy() + (1 - w) * target["1"][0],
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        bn.running_var.double().numpy(),
        w * old["1"][1].double().numpy() + (1 - w) * target["1"][1],
        rtol=1e-5,
    )
    assert [u.name for u in result.updates] == ["1"]
    torch.testing.assert_close(model.get_submodule("5").running_mean, old["5"][0])


def test_modes_momentum_buffers_and_hooks_are_restored_when_data_raises() -> None:
    model = net()
    model[1].momentum = 0.3
    model[3].train()
    before = buffers(model)
    modes = {n: m.training for n, m in model.named_modules()}

    def flaky():  # type: ignore[no-untyped-def]
        yield data(1)[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        recalibrate(model, flaky())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model[1].momentum == 0.3
    for k, v in buffers(model).items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_apply_rollback_and_the_exported_buffers() -> None:
    model = net()
    before = buffers(model)
    result = recalibrate(model, data(6), apply=False)
    assert result.status == "pending"
    assert all(torch.equal(v, before[k]) for k, v in buffers(model).items())
    result.apply()
    changed = buffers(model)
    assert not torch.equal(changed["1.running_mean"], before["1.running_mean"])
    result.rollback()
    assert all(torch.equal(v, before[k]) for k, v in buffers(model).items())
    fresh = net()
    _missing, unexpected = fresh.load_state_dict(result.state_dict(), strict=False)
    assert not unexpected
    assert torch.equal(fresh.get_submodule("5").running_var, changed["5.running_var"])


@pytest.mark.parametrize("watched", [False, True], ids=["unwatched", "watched"])
def test_rollback_puts_back_what_apply_replaced_not_what_was_recalibrated(watched: bool) -> None:
    """A result applied after the model changed (another recalibration applied, a checkpoint
    loaded) rolls back to that change, ``num_batches_tracked`` included -- it went back to the
    buffers from when recalibrate() ran, silently undoing the change.  ``old_mean``/
    ``old_var`` stay what the result was judged against."""
    model = net()
    original = buffers(model)
    mon = bnwatch.watch(model, window_seconds=None, name="net") if watched else None
    try:
        pending = recalibrate(model, data(6), apply=False)
        recalibrate(model, data(6, shift=3.0), apply=True)  # a change made since
        model[5].num_batches_tracked.fill_(7)
        changed = buffers(model)
        pending.apply()
        assert not torch.equal(buffers(model)["1.running_mean"], changed["1.running_mean"])
        pending.rollback()
        assert pending.status == "rolled_back"
        for k, v in buffers(model).items():
            assert torch.equal(v, changed[k]), k
        assert torch.equal(pending.updates[0].old_mean, original["1.running_mean"])
        with pytest.raises(ValueError, match="nothing to roll back"):
            pending.rollback()  # rolled back already
        with pytest.raises(ValueError, match="nothing to roll back: the result is pending"):
            recalibrate(model, data(6), apply=False).rollback()
    finally:
        if mon is not None:
            mon.close()


def test_bound_to_another_architecture_is_refused_and_apply_writes_all_or_nothing() -> None:
    result = recalibrate(net(), data(6), apply=False)
    narrow = nn.Sequential(*[m for m in net()])  # the same names ...
    narrow[8] = nn.BatchNorm1d(6)  # ... but 6 channels where the result has 4
    with pytest.raises(ValueError, match="'8' of Sequential has 6 channels, the recalibrated"):
        result.bound_to(narrow)
    model = net()
    before = buffers(model)
    live = result.bound_to(model)
    model[8].running_mean = torch.zeros(6)  # changed after binding: the last layer fails,
    model[8].running_var = torch.ones(6)  # the others must not have been written
    with pytest.raises(ValueError, match=r"'8' now has 6 channels.*nothing was written"):
        live.apply()
    assert all(torch.equal(v, before[k]) for k, v in buffers(model).items() if k[0] != "8")


@pytest.mark.parametrize(
    ("labels", "accepted"),
    [
        (lambda n: torch.zeros(n, 1, dtype=torch.long), True),  # a column: read as [n]
        (lambda n: torch.zeros(1, dtype=torch.long), False),  # broadcast: 800 % accuracy
        (lambda n: torch.zeros(n - 3, dtype=torch.long), False),
        (lambda n: torch.zeros(n, 4), False),  # one-hot
    ],
    ids=["column", "one", "short", "one-hot"],
)
def test_held_out_labels_of_another_shape_are_refused(labels: Any, accepted: bool) -> None:
    """Labels that do not give one class index per output row broadcast into an accuracy
    above 100 % (or a raw torch error); they are a ShapeError, the model untouched."""
    model = net()
    before = buffers(model)
    held = [(x, labels(x.shape[0])) for x in data(2, seed=9, shift=3.0)]
    if accepted:
        flat = [(x, y[:, 0]) for x, y in held]
        got = recalibrate(net(), data(12, shift=3.0), held_out=held, apply=False)
        want = recalibrate(net(), data(12, shift=3.0), held_out=flat, apply=False)
        assert (got.accuracy_before, got.accuracy_after) == (
            want.accuracy_before,
            want.accuracy_after,
        )
        assert got.accuracy_after is not None and 0 <= got.accuracy_after <= 1
        return
    with pytest.raises(ShapeError, match=r"held-out labels: expected shape \[8\] class indices"):
        recalibrate(model, data(12, shift=3.0), held_out=held)
    assert all(torch.equal(v, before[k]) for k, v in buffers(model).items())


def test_a_layer_without_running_statistics_is_left_out_unless_it_is_asked_for() -> None:
    """``layers=None`` leaves out a ``track_running_stats=False`` layer, as a frozen one, and
    says so (it refused the whole model, and with it every triggered recalibration); naming it
    in ``layers=`` is an error; a model with no layer left to recalibrate is refused."""
    model = net()
    model[1] = nn.BatchNorm2d(6, track_running_stats=False)  # normalizes by batch, always
    before = buffers(model)
    for asked in (["1", "8"], "*"):
        with pytest.raises(ConfigError, match=r"'1' has none \(track_running_stats=False\)") as e:
            recalibrate(model, data(4), layers=asked)
        assert e.value.argument == "layers" and e.value.value == asked
    assert all(torch.equal(v, before[k]) for k, v in buffers(model).items())
    result = recalibrate(model, data(4))
    assert result.status == "applied"
    assert [u.name for u in result.updates] == ["5", "8"]
    assert result.left_out == {"1": "no running statistics (track_running_stats=False)"}
    assert result.summary()["left_out"] == result.left_out
    assert recalibrate(model, data(4), layers=["5", "8"]).left_out == {}
    alone = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ConfigError, match=r"'0' \(no running statistics.*no other") as e:
        recalibrate(alone, data(4))
    assert e.value.argument == "model"


def test_held_out_data_the_model_cannot_take_is_a_shape_error() -> None:
    model = net()
    before = buffers(model)
    with pytest.raises(ShapeError, match=r"held-out data.*\(8, 4, 5, 5\)"):
        recalibrate(model, data(12), held_out=[torch.randn(8, 4, 5, 5)])
    assert all(torch.equal(v, before[k]) for k, v in buffers(model).items())


def test_held_out_judgement_applies_only_improvements() -> None:
    model = net()
    shifted = data(12, shift=3.0)  # production drifted: recalibrating on it helps on it
    labelled = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in data(4, seed=9, shift=3.0)]
    good = recalibrate(model, shifted, held_out=labelled)
    assert good.improved is True
    assert good.status == "applied"
    assert good.kl_after is not None and good.kl_before is not None
    assert good.kl_after < good.kl_before
    assert good.accuracy_before is not None and good.accuracy_after is not None
    bad = recalibrate(model, data(12, shift=-6.0), held_out=labelled)  # the wrong data
    assert bad.improved is False
    assert bad.status == "rejected"
    after_good = model.get_submodule("1").running_mean.clone()
    assert torch.equal(model.get_submodule("1").running_mean, after_good)


def test_bad_input_leaves_the_model_untouched() -> None:
    model = net()
    before = buffers(model)
    with pytest.raises(NotEnoughDataError, match="saw 8 samples but needs at least 16"):
        recalibrate(model, data(1))
    with pytest.raises(ShapeError, match=r"recalibration data.*needs forward=") as info:
        recalibrate(model, [torch.randn(8, 4, 5, 5)])
    assert "(8, 4, 5, 5)" in str(info.value)
    with pytest.raises(ShapeError, match="0-dim"):
        recalibrate(model, [torch.tensor(1.0)])
    with pytest.raises(NoBatchNormError):
        recalibrate(nn.Linear(3, 3), data(2))
    with pytest.raises(ValueError, match="method"):
        recalibrate(model, data(2), method="magic")  # type: ignore[arg-type]
    for k, v in buffers(model).items():
        assert torch.equal(v, before[k]), k


class _Branches(nn.Module):
    """Two BatchNorm branches; ``forward`` uses only the first."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.BatchNorm2d(3)
        self.unused = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)  # type: ignore[no-any-return]


def test_a_layer_the_data_never_reaches_is_named_and_nothing_changes() -> None:
    model = _Branches().eval()
    before = buffers(model)
    with pytest.raises(bnwatch.BnwatchError, match=r"'unused' received no data.*layers="):
        recalibrate(model, data(4))
    assert all(torch.equal(v, before[k]) for k, v in buffers(model).items())
    result = recalibrate(model, data(4), layers="used", apply=True)  # what the error suggests
    assert [u.name for u in result.updates] == ["used"]


def test_is_exported_at_the_top_level() -> None:
    assert bnwatch.recalibrate is recalibrate


def held_out_shards() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Two labelled held-out shards for recalibration on ``data(12, shift=3.0)``: the first
    looks like that data (judged alone, the result is applied), the second does not
    (judged alone, rejected)."""
    return [
        [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in data(2, seed=9, shift=shift)]
        for shift in (3.0, -6.0)
    ]


def _run_ranks(tmp_path: Path, world: int = 2) -> list[dict[str, Any]]:
    """Run ``distributed_worker.py`` on ``world`` gloo ranks; what each rank saved."""
    out = tmp_path / "rank{}.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = ROOT / "tests" / "recalibration" / "distributed_worker.py"
    init = f"file://{tmp_path / 'init'}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), init, str(rank), str(world), str(out).format(rank)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=240)  # a rank left waiting would hang here
            assert p.returncode == 0, stdout + stderr
    finally:
        for p in procs:
            p.kill()
    return [torch.load(str(out).format(r), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed missing")
    return _run_ranks(tmp_path_factory.mktemp("distributed"))


def _assert_identical_and_single(states: list[dict[str, torch.Tensor]], data_: Any) -> None:
    single = net()
    recalibrate(single, data_, apply=True)
    for key, value in states[0].items():
        for other in states[1:]:
            assert torch.equal(value, other[key]), key  # bitwise identical on every rank
        torch.testing.assert_close(value, single.state_dict()[key], rtol=1e-6, atol=1e-7)


def test_distributed_ranks_end_identical_and_equal_to_one_process(
    ranks: list[dict[str, Any]],
) -> None:
    _assert_identical_and_single([r["shards"] for r in ranks], data(12))


def test_distributed_ranks_with_an_empty_shard_end_identical(ranks: list[dict[str, Any]]) -> None:
    _assert_identical_and_single([r["uneven"] for r in ranks], data(12))


def test_distributed_ranks_judge_the_merged_held_out_data_alike(
    ranks: list[dict[str, Any]],
) -> None:
    shards = held_out_shards()
    alone = [recalibrate(net(), data(12, shift=3.0), held_out=s).status for s in shards]
    assert alone == ["applied", "rejected"]  # judged on its own shard, each rank would differ
    union = recalibrate(net(), data(12, shift=3.0), held_out=shards[0] + shards[1])
    judged = [r["judged"] for r in ranks]
    for j in judged:
        assert j["status"] == union.status
        assert j["accuracy_before"] == union.accuracy_before
        assert j["accuracy_after"] == union.accuracy_after
        assert j["kl_before"] == pytest.approx(union.kl_before, rel=1e-9)
        assert j["kl_after"] == pytest.approx(union.kl_after, rel=1e-9)
    for key, value in judged[0]["buffers"].items():
        assert torch.equal(value, judged[1]["buffers"][key]), key


def test_a_rank_that_fails_stops_every_rank_and_changes_nothing(
    ranks: list[dict[str, Any]],
) -> None:
    first, last = ranks[0], ranks[-1]
    assert last["failed"]["type"] == "ShapeError"
    assert first["failed"]["type"] == "RankFailedError"
    assert first["failed"]["rank"] == len(ranks) - 1
    assert "ShapeError" in first["failed"]["message"]
    assert all(r["failed_untouched"] for r in ranks)


def test_a_rank_interrupted_stops_every_rank_at_once(ranks: list[dict[str, Any]]) -> None:
    """A KeyboardInterrupt is no Exception: the interrupted rank used to skip the exchange,
    leaving the others waiting for it until the process group's timeout (30 minutes)."""
    first, last = ranks[0], ranks[-1]
    assert last["interrupted"] == {"type": "KeyboardInterrupt", "rank": len(ranks) - 1}
    assert first["interrupted"]["type"] == "RankFailedError"
    assert first["interrupted"]["rank"] == len(ranks) - 1
    assert "KeyboardInterrupt" in first["interrupted"]["message"]
    assert all(r["interrupted_untouched"] for r in ranks)


def test_a_rank_whose_arguments_are_refused_stops_every_rank_at_once(
    ranks: list[dict[str, Any]],
) -> None:
    """Arguments were checked before the first exchange: a rank that refused its data raised
    alone, and the others waited for it until the process group's timeout."""
    first, last = ranks[0], ranks[-1]
    assert last["bad_argument"]["type"] == "ConfigError"
    assert "data='NoneType' is invalid" in last["bad_argument"]["message"]
    assert first["bad_argument"]["type"] == "RankFailedError"
    assert first["bad_argument"]["rank"] == len(ranks) - 1
    assert "ConfigError: data='NoneType'" in first["bad_argument"]["message"]
    for r in ranks:
        assert r["bad_argument"]["seconds"] < 30  # the worker's process group waits 60 s
        assert r["held_out_some"]["type"] == "ConfigError"  # every rank judges, or none
        assert "held_out=" in r["held_out_some"]["message"]


def test_ranks_count_their_samples_together(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:  # 6 samples each: 12 in all, fewer than min_samples=16 on every rank
        assert r["too_few"]["type"] == "NotEnoughDataError"
        assert r["too_few"]["seen"] == 12


def mlp(seed: int = 0) -> Any:
    """BatchNorm1d on ``[N, C]``: batch statistics need two samples or more."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4)).eval()


def rows(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def test_a_single_sample_batch_joins_the_next_one_in_precise() -> None:
    x = rows(17)
    model = mlp()
    recalibrate(model, [x[:8], x[8:9], x[9:]], apply=True)  # a loader's odd batch of one
    want = population_reference(mlp(), [x[:8], x[8:]])
    torch.testing.assert_close(model[1].running_mean.double(), torch.from_numpy(want["1"][0]))
    torch.testing.assert_close(model[1].running_var.double(), torch.from_numpy(want["1"][1]))
    # num_samples leaving one sample of a batch: that sample is not used
    cut = recalibrate(mlp(), [x[:8], x[8:16], x[16:]], num_samples=9, min_samples=2)
    assert cut.samples == 8
    # a last batch of one: left out too
    assert recalibrate(mlp(), [x[:16], x[16:]], apply=False).samples == 16


def test_one_tensor_of_samples_runs_in_batches() -> None:
    x = rows(150)
    whole = recalibrate(mlp(), x, held_out=rows(70, seed=4), apply=False)
    split = recalibrate(mlp(), list(x.split(64)), held_out=list(rows(70, seed=4).split(64)))
    assert whole.samples == 150 and whole.kl_before is not None
    assert whole.kl_before == split.kl_before and whole.kl_after == split.kl_after
    for a, b in zip(whole.updates, split.updates, strict=True):
        assert torch.equal(a.new_mean, b.new_mean) and torch.equal(a.new_var, b.new_var)


class _Twice(nn.Module):
    """One BatchNorm layer reached twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + self.bn(x * 2)  # type: ignore[no-any-return]


def test_mix_weighs_by_model_inputs_when_a_layer_is_reached_twice() -> None:
    model: Any = _Twice().eval()
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0)) + 5
    result = recalibrate(model, [x], method="mix", prior_strength=16, apply=True)
    assert result.updates[0].samples == 32  # 32 inputs, though the layer saw 64 rows
    both = torch.cat([x, 2 * x]).double()
    w = 16 / (16 + 32)
    want_mean = w * 0.0 + (1 - w) * both.mean(0)
    torch.testing.assert_close(model.bn.running_mean.double(), want_mean, rtol=1e-5, atol=1e-6)


def test_a_model_in_train_mode_is_left_as_it_was() -> None:
    model = net()
    model.train()
    before = buffers(model)
    held = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in data(2, seed=9)]
    for kwargs in ({"layers": "5"}, {"held_out": held}, {"layers": "5", "held_out": held}):
        recalibrate(model, data(4), apply=False, **kwargs)  # type: ignore[arg-type]
        for k, v in buffers(model).items():  # the layers left out normalize by batch, too
            assert torch.equal(v, before[k]), (kwargs, k)
        assert model.training and all(m.training for m in model.modules())


def test_a_served_model_recalibrated_in_place_serves_unchanged_until_applied() -> None:
    """A thread serves the watched model while it is recalibrated: its answers stay those of
    the current statistics (the passes switched the shared layers to batch statistics), the
    new statistics are those of the data alone (served batches fed them), and the monitor
    raises no flag -- the passes run on a copy; only apply() touches the live model."""
    model = net()
    x = data(1, seed=7)[0]
    with torch.no_grad():
        want = model(x)
    quiet = recalibrate(net(), data(12, shift=2.0), apply=False)
    served, differed = [0], [0]
    stop, started = threading.Event(), threading.Event()

    def serve() -> None:
        with torch.no_grad():
            while not stop.is_set():
                differed[0] += int(not torch.equal(model(x), want))
                served[0] += 1
                started.set()

    with bnwatch.watch(model, overhead_budget=None, window_seconds=None, name="net") as mon:
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            assert started.wait(10)
            result = recalibrate(model, data(12, shift=2.0), apply=False)
        finally:
            stop.set()
            thread.join(10)
        reports = mon.flush()
    assert served[0] > 0 and differed[0] == 0
    assert not any(r.running_stats_mutated or r.batch_stat_mode for r in reports.values())
    for ours, alone in zip(result.updates, quiet.updates, strict=True):
        assert torch.equal(ours.new_mean, alone.new_mean)
        assert torch.equal(ours.new_var, alone.new_var)
    assert result.model is model  # bound to the live model: apply() writes there
    result.apply()
    assert torch.equal(buffers(model)["1.running_mean"], quiet.updates[0].new_mean)


def test_recalibrating_a_watched_model_in_place() -> None:
    model = net()
    with bnwatch.watch(
        model, keep_inputs=64, overhead_budget=None, window_seconds=None, name="net"
    ) as mon:
        with torch.no_grad():
            for x in data(4):
                model(x)
        kept = mon.inputs()
        assert kept is not None
        mon.flush()
        result = recalibrate(model, data(8, shift=2.0), held_out=data(2, seed=5, shift=2.0))
        assert result.status == "applied"
        assert mon.flush() == {}  # the passes were not production traffic
        after = mon.inputs()
        assert after is not None and torch.equal(after, kept)  # nor replaced the kept inputs
        with torch.no_grad():
            for x in data(4, shift=2.0):
                model(x)
        reports = mon.flush()
        # adopted: the new statistics are the gap's reference, not a mutation
        assert reports and not any(r.running_stats_mutated for r in reports.values())
        assert all(r.n_samples == 32 for r in reports.values())
        result.rollback()
        with torch.no_grad():
            model(data(1)[0])
        assert not any(r.running_stats_mutated for r in mon.flush().values())
    assert mon.stats().hook_errors == {}


def test_a_watched_model_is_recalibrated_with_its_own_hooks_and_without_the_monitors() -> None:
    """A model whose own forward pre-hook is part of what it serves (input preprocessing) is
    measured and judged with it whether or not monitors watch it -- the copy a watched model
    is recalibrated on dropped every hook, so its statistics were those of inputs it never
    sees -- while no monitor's hook (of either monitor) is copied."""
    seen: list[int] = []

    def make() -> Any:
        model = net()
        model.register_forward_pre_hook(lambda m, args: (args[0] * 3.0 - 1.0,))
        model[4].register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
        return model

    held = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in data(2, seed=9, shift=2.0)]
    alone = recalibrate(make(), data(6, shift=2.0), held_out=held, apply=False)
    model = make()
    with (
        bnwatch.watch(model, window_seconds=None, name="net") as mon,
        bnwatch.watch(model, window_seconds=None, name="net", version="2") as other,
    ):
        copied = hook_free_copy(model)
        hooks = [
            h
            for m in copied.modules()
            for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
        ]
        assert len(hooks) == 2  # the model's own two, none of the monitors'
        assert not copied._forward_pre_hooks_with_kwargs  # the root pre-hook's, gone with it
        seen.clear()
        watched = recalibrate(model, data(6, shift=2.0), held_out=held, apply=False)
        assert seen  # the model's forward hook ran on the copy
        assert mon.flush() == {} and other.flush() == {}
    for a, b in zip(alone.updates, watched.updates, strict=True):
        assert torch.equal(a.new_mean, b.new_mean) and torch.equal(a.new_var, b.new_var), a.name
    assert (watched.kl_before, watched.kl_after) == (alone.kl_before, alone.kl_after)
    assert watched.accuracy_after == alone.accuracy_after
    assert len(model._forward_pre_hooks) == 1  # the live model keeps its own hook


def test_the_progress_bar_ends_at_the_samples_used(capsys: pytest.CaptureFixture[str]) -> None:
    """With fewer samples than ``num_samples`` the bar ended at, say, 24/8192."""
    recalibrate(net(), data(3), num_samples=8192, progress=True, apply=False)
    bar = capsys.readouterr().err
    assert "8192" not in bar and "24/24" in bar.rsplit("\r", 1)[-1]  # a list: known at once
    recalibrate(net(), iter(data(3)), num_samples=8192, progress=True, apply=False)
    assert "24/24" in capsys.readouterr().err.rsplit("\r", 1)[-1]  # closed at what it saw


@pytest.mark.parametrize("method", ["precise", "mix"])
def test_data_without_finite_values_is_refused_and_the_model_left_untouched(
    method: str,
) -> None:
    """All-NaN inputs are excluded from the statistics: a count of 0 must not become running
    statistics of mean 0 and variance 0 (the model would divide by sqrt(eps))."""
    from bnwatch.errors import NonFiniteDataError

    model = net()
    before = buffers(model)
    nan = [torch.full((8, 3, 5, 5), float("nan")) for _ in range(4)]
    with pytest.raises(NonFiniteDataError, match=r"layer '1' received fewer than 2 finite") as e:
        recalibrate(model, nan, method=method, apply=True)  # type: ignore[arg-type]
    assert e.value.layer == "1" and e.value.channels == list(range(6)) and e.value.finite == 0
    for k, v in buffers(model).items():
        assert torch.equal(v, before[k]), k


def test_a_channel_without_finite_values_is_named() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    xs = data(4)
    for x in xs:
        x[:, 1] = float("inf")
    from bnwatch.errors import NonFiniteDataError

    with pytest.raises(NonFiniteDataError, match=r"layer '0' .* in 1 channel \(1; the fewest: 0\)"):
        recalibrate(model, xs)
    # finite batches among non-finite ones are enough: those are measured
    mixed = [*data(4), torch.full((8, 3, 5, 5), float("nan"))]
    assert recalibrate(model, mixed).status == "applied"


def test_a_failed_save_leaves_the_previous_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``save`` writes a temporary file and renames it: a write that fails midway (a full
    disk) neither truncates the previous buffers nor leaves the temporary file behind, and is
    an OSError naming the file."""
    out = tmp_path / "bn.pt"
    result = recalibrate(net(), data(4), apply=False)
    result.save(out)
    good = out.read_bytes()
    assert torch.load(out, weights_only=True).keys() == result.state_dict().keys()

    def failing(obj: object, f: str) -> None:
        Path(f).write_bytes(good[:100])  # torch's writer got this far
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError, match=r"could not write .*bn\.pt: \[enforce fail"):
        result.save(out)
    assert out.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["bn.pt"]
