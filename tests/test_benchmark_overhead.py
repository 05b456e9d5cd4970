"""The overhead benchmark runs end to end and its ResNet-50 is the real architecture.

Timings are never asserted: the smoke run only checks that every configuration was timed
and reported sensibly.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import overhead  # noqa: E402


def test_resnet50_has_the_batchnorm_layers_of_resnet50() -> None:
    model = overhead.resnet50()
    bns = overhead.batchnorm_layers(model)
    assert len(bns) == 53
    assert all(isinstance(bn, torch.nn.BatchNorm2d) for bn in bns)
    assert overhead.batchnorm_channels(model) == 26_560
    assert not model.training
    with torch.inference_mode():
        for n in (1, 2):
            assert model(torch.randn(n, 3, 64, 64)).shape == (n, 1000)


def test_twin_shares_weights_and_buffers() -> None:
    model = overhead.resnet50()
    copy = overhead.twin(model)
    assert copy is not model
    for (name, a), (_, b) in zip(
        model.state_dict().items(), copy.state_dict().items(), strict=True
    ):
        assert a.data_ptr() == b.data_ptr(), name
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), copy(x))


def test_unknown_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown configuration"):
        overhead.attach("nope", overhead.resnet50())


def test_mixture_quantile_weights_measured_forwards_by_their_share() -> None:
    seconds = [1.0, 1.0, 1.0, 2.0]
    measured = [False, False, False, True]
    assert overhead.mixture_quantile(seconds, measured, 0.5) == pytest.approx(1.25)
    assert overhead.mixture_quantile(seconds, [True] * 4, 0.5) == pytest.approx(1.0)


def test_smoke_run_reports_every_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "overhead.json"
    results = overhead.main(["--smoke", "--quiet", "--json", str(out)])
    table = capsys.readouterr().out

    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["meta"]["bn_layers"] == 53
    assert results["meta"]["bn_channels"] == 26_560
    rows = results["results"]
    batches = [8, 1]
    assert {(r["config"], r["batch"]) for r in rows} == {
        (config, batch) for config in overhead.CONFIGS for batch in batches
    }
    for row in rows:
        assert row["config"] in table
        assert row["forwards_timed"] == 2
        assert len(row["times_ms"]) == 2
        for key in ("ms_median", "ms_p25", "ms_p75", "ms_mean", "ratio"):
            assert math.isfinite(row[key]), (row["config"], key)
            assert row[key] > 0, (row["config"], key)
        assert all(math.isfinite(t) and t > 0 for t in row["times_ms"])
        watched = row["config"] in (overhead.BNWATCH_DEFAULT, overhead.BNWATCH_FULL)
        if watched:
            assert row["layers_reported"] == 53
            assert 0.0 <= row["measured_share"] <= 1.0
        else:
            assert row["measured_share"] is None
        if row["config"] == overhead.BNWATCH_FULL:
            assert row["measured_share"] == 1.0
            assert row["self_reported_overhead"] > 0
        if row["config"] == overhead.UNWATCHED:
            assert row["ratio"] == 1.0
    for config in overhead.CONFIGS:
        assert config in table
