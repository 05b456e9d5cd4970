"""The recalibration benchmark runs end to end, keeps recalibration and evaluation data apart,
and its fvcore PreciseBN estimates what it should.

Timings and accuracies are never asserted: the smoke run only checks that every case and
configuration was run and reported with finite numbers.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bnwatch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import recalibration as bench  # noqa: E402


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16, 3),
        nn.BatchNorm1d(3),
    ).eval()


def test_corruptions_keep_shape_and_range() -> None:
    x = torch.rand(5, 1, 8, 8)
    for corruption in bench.CORRUPTIONS:
        assert corruption.family in bench.FAMILIES
        for param in corruption.severities:
            y = corruption.apply(x, param, torch.Generator().manual_seed(0))
            assert y.shape == x.shape, corruption.name
            assert torch.isfinite(y).all(), corruption.name
            assert float(y.min()) >= -1e-6 and float(y.max()) <= 1 + 1e-6, corruption.name
            assert not torch.equal(y, x), corruption.name


def test_folds_are_disjoint_and_pools_exclude_their_fold() -> None:
    folds, pools = bench.make_folds(100, seed=3)
    assert sorted(torch.cat(folds).tolist()) == list(range(100))
    for fold, pool in zip(folds, pools, strict=True):
        assert not set(fold.tolist()) & set(pool.tolist())
        assert len(fold) + len(pool) == 100


def test_fvcore_precise_bn_pools_the_population_statistics() -> None:
    model = _net()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 1, 4, 4, generator=g) * 2 + 1 for n in (8, 3, 13)]
    reference = copy.deepcopy(model)
    seen: list[torch.Tensor] = []
    bn = reference[1]
    bn.train()
    bn.register_forward_pre_hook(lambda m, a: seen.append(a[0].double()))
    reference[5].train()
    with torch.no_grad():
        for x in batches:
            reference(x)
    flat = torch.cat(seen).transpose(0, 1).reshape(4, -1)

    bench.fvcore_precise_bn(model, batches)
    assert not model.training
    assert model[1].momentum == 0.1
    assert not model[1]._forward_pre_hooks
    torch.testing.assert_close(model[1].running_mean.double(), flat.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        model[1].running_var.double(), flat.var(1, unbiased=False), rtol=1e-4, atol=1e-6
    )


def test_fvcore_update_bn_stats_wants_every_batch() -> None:
    model = _net()
    model.train()
    with pytest.raises(RuntimeError, match="expected 5 batches"):
        bench.fvcore_update_bn_stats(model, [torch.randn(4, 1, 4, 4)], num_iters=5)


def test_recovered_share() -> None:
    assert bench.recovered(0.9, 0.8, 1.0) == pytest.approx(0.5)
    assert bench.recovered(0.7, 0.8, 1.0) == pytest.approx(-0.5)
    assert bench.recovered(0.9, 1.0, 1.0) is None


def test_smoke_run_reports_every_case_and_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "recalibration.json"
    results = bench.main(["--smoke", "--quiet", "--json", str(out)])
    printed = capsys.readouterr().out

    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    meta = results["meta"]
    assert meta["smoke"] is True
    assert 0.0 < meta["clean_accuracy"] <= 1.0
    assert meta["train_images"] + meta["test_images"] == 1797

    mains = ["precise 512", "fvcore 512", "mix n=16", "mix n=64"]
    cases = results["cases"]
    assert [(c["corruption"], c["severity"]) for c in cases] == [
        (name, s) for name in bench.SMOKE_CORRUPTIONS for s in (1, 2, 3)
    ]
    for case in cases:
        assert case["corruption"] in printed
        assert 0.0 <= case["corrupt"] <= 1.0
        assert case["lost"] == pytest.approx(case["clean"] - case["corrupt"])
        assert set(mains) <= set(case["methods"])
        for name in mains:
            m = case["methods"][name]
            assert 0.0 <= m["accuracy"] <= 1.0, name
            assert m["recalibrations"] >= bench.FOLDS, name
            if case["lost"] > 0:
                assert math.isfinite(m["recovered"]), name
            else:
                assert m["recovered"] is None

    summary = results["summary"]
    assert list(summary) == mains
    for name, s in summary.items():
        assert name in printed
        assert s["cases"] == sum(c["lost"] > 0 for c in cases)
        for key in ("mean_recovered", "median_recovered", "pooled_recovered", "mean_accuracy"):
            assert math.isfinite(s[key]), (name, key)
        assert isinstance(s["meets_target"], bool)
    assert results["ablations"] == {}

    timing = results["timing"]
    assert {(t["config"], t["batch"]) for t in timing} == {
        (c, b) for c in ("bnwatch precise", "fvcore PreciseBN") for b in bench.TIMING_BATCHES
    }
    for t in timing:
        assert t["rounds"] == 2
        for key in ("ms_median", "ms_p25", "ms_p75", "ratio"):
            assert math.isfinite(t[key]) and t[key] > 0, (t["config"], key)
    gap = results["statistics_gap"]
    assert gap["max_mean_diff_in_sd"] < 1e-3  # the same estimator, up to rounding
    assert gap["max_var_rel_diff"] < 1e-2  # biased (fvcore) vs unbiased (bnwatch) variance
    assert "MISS" in printed or "ok" in printed


def test_labelled_bound_lowers_the_loss_and_leaves_the_model_clean() -> None:
    model = _net()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 1, 4, 4, generator=g) * 2 + 1
    y = torch.randint(0, 3, (48,), generator=g)
    bnwatch_model = copy.deepcopy(model)
    bnwatch.recalibrate(bnwatch_model, [x], num_samples=48, apply=True, progress=False)
    with torch.no_grad():
        start = float(torch.nn.functional.cross_entropy(bnwatch_model(x), y))
    weights = {k: v.clone() for k, v in model.named_parameters()}

    bench.fit_statistics_with_labels(model, x, y, steps=50, lr=0.05)
    with torch.no_grad():
        fitted = float(torch.nn.functional.cross_entropy(model(x), y))
    assert fitted < start
    assert not model.training
    for name, p in model.named_parameters():
        assert p.requires_grad, name
        assert torch.equal(p, weights[name]), name  # only the statistics moved
    for m in (model[1], model[5]):
        assert not m._forward_hooks
        assert bool((bench._buffer(m, "var") >= 0).all())
        assert not bench._buffer(m, "mean").requires_grad


def _run(means: dict[str, float | None], cases: list[tuple[float, float, float]]) -> dict[str, Any]:
    """A seed's results as :func:`bench.run_seed` returns them, reduced to what
    :func:`bench.across_seeds` reads: ``cases`` are (corrupt, lost, precise accuracy)."""
    return {
        "summary": {
            name: {"mean_recovered": m, "per_family": {"noise": m, "photometric": None}}
            for name, m in means.items()
        },
        "cases": [
            {"corrupt": c, "lost": lost, "methods": {"precise 512": {"accuracy": a}}}
            for c, lost, a in cases
        ],
        "timing": [
            {"config": "bnwatch precise", "batch": b, "ratio": 1.0 + b / 1000}
            for b in bench.TIMING_BATCHES
        ],
    }


def test_across_seeds_summarizes_every_seed() -> None:
    runs = {
        0: _run({"precise 512": 0.5}, [(0.8, 0.2, 0.9), (0.5, 0.4, 0.6)]),
        3: _run({"precise 512": 0.7}, [(0.6, 0.3, 0.9), (0.9, 0.0, 0.9)]),
    }
    across = bench.across_seeds(runs)
    c = across["configs"]["precise 512"]
    assert c["per_seed"] == [0.5, 0.7]
    assert c["mean"] == pytest.approx(0.6)
    assert (c["min"], c["max"]) == (0.5, 0.7)
    assert c["pooled"] == pytest.approx((0.1 + 0.1 + 0.3) / (0.2 + 0.4 + 0.3))  # lost > 0 only
    assert c["meets_target"] is True
    assert c["per_family"] == {"noise": pytest.approx(0.6), "photometric": None, "geometric": None}
    assert across["timing"] == {str(b): [1.0 + b / 1000] * 2 for b in bench.TIMING_BATCHES}
    assert c["of_bound"] is None  # no labelled bound was run
    table = bench.format_across_seeds(across, [0, 3])
    assert "seed 0" in table and "seed 3" in table
    assert "precise 512" in table and " ok " in table
    assert "of bound" not in table


def test_across_seeds_gives_each_configuration_as_a_share_of_the_labelled_bound() -> None:
    """With the bound run, every configuration's mean is also given as a share of the bound's
    mean: how much of what the statistics can recover at all a configuration recovers."""
    runs = {
        0: _run({"precise 512": 0.5, bench.BOUND: 0.6}, [(0.8, 0.2, 0.9)]),
        1: _run({"precise 512": 0.4, bench.BOUND: 0.7}, [(0.8, 0.2, 0.9)]),
    }
    for run in runs.values():
        for case in run["cases"]:
            case["methods"][bench.BOUND] = case["methods"]["precise 512"]
    across = bench.across_seeds(runs)
    assert across["configs"]["precise 512"]["of_bound"] == pytest.approx(0.45 / 0.65)
    assert across["configs"][bench.BOUND]["of_bound"] == pytest.approx(1.0)
    table = bench.format_across_seeds(across, [0, 1])
    header = next(line for line in table.splitlines() if line.startswith("configuration"))
    row = next(line for line in table.splitlines() if line.startswith("precise 512"))
    assert "of bound" in header
    assert f"{100 * 0.45 / 0.65:.1f}%" in row


def test_several_seeds_run_one_after_the_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "seeds.json"
    args = ["--smoke", "--quiet", "--corruptions", "contrast", "--seed", "0", "1"]
    results = bench.main([*args, "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert list(results["seeds"]) == ["0", "1"]
    for seed, run in results["seeds"].items():
        assert run["meta"]["seed"] == int(seed)
        assert [c["corruption"] for c in run["cases"]] == ["contrast"] * 3
    for name, c in results["across_seeds"]["configs"].items():
        per_seed = [run["summary"][name]["mean_recovered"] for run in results["seeds"].values()]
        assert c["per_seed"] == per_seed
        assert c["mean"] == pytest.approx(sum(per_seed) / 2)
    assert "across 2 seeds" in printed
