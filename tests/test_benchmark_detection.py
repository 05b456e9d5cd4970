"""The detection benchmark runs end to end, its baselines compute what they claim, and its
numbers are sane.

Detection rates are only checked for sanity (a strong corruption is detected by bnwatch, clean
windows rarely alarm); timings are never asserted.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import detection as bench  # noqa: E402
from bnwatch.demo import digits  # noqa: E402


def test_corruptions_have_five_severities_and_keep_the_first_three() -> None:
    from benchmarks import recalibration

    x = digits.load_splits(0, (0.5, 0.0)).prod_x[:32]
    assert len(bench.corruptions()) >= 10
    for five, three in zip(bench.corruptions(), recalibration.CORRUPTIONS, strict=True):
        assert five.severities[:3] == three.severities
        assert len(five.severities) == 5
        for param in five.severities:
            y = five.apply(x, param, torch.Generator().manual_seed(0))
            assert y.shape == x.shape and torch.isfinite(y).all(), five.name
            assert float(y.min()) >= -1e-6 and float(y.max()) <= 1 + 1e-6, five.name


def test_partition_and_draw_keep_reference_and_window_apart() -> None:
    held = torch.arange(99, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    reference, pool = bench.partition(held, g)
    assert len(reference) + len(pool) == 99
    assert not set(reference.tolist()) & set(pool.tolist())
    window = bench.draw(pool, 30, g)
    assert len(set(window.tolist())) == 30  # without replacement
    assert set(window.tolist()) <= set(pool.tolist())


def test_bbsd_is_bonferroni_over_per_class_ks_tests() -> None:
    rng = np.random.default_rng(0)
    ref = rng.dirichlet(np.ones(10), size=200)
    for shift in (0.0, 0.4):
        window = rng.dirichlet(np.ones(10) + shift * np.arange(10), size=40)
        p = [stats.ks_2samp(ref[:, k], window[:, k]).pvalue for k in range(10)]
        assert bench.bbsd_ks(ref, window) == (min(p) <= 0.05 / 10)


def test_distinct_per_column_matches_pandas() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, size=(50, 6)) / 4.0
    a[:, 0] = 0.0
    frame = bench.pixel_frame(a)
    np.testing.assert_array_equal(bench.distinct_per_column(a), frame.nunique().to_numpy())


def _evidently_windows() -> tuple[np.ndarray, list[np.ndarray]]:
    """Reference pixels with constant (always-0) columns, and windows that test every branch of
    Evidently's default test choice: K-S, chi-square, the Z-test and constant columns."""
    held = digits.load_splits(0, (0.5, 0.0)).prod_x
    reference, pool = bench.partition(held, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    by_name = {c.name: c for c in bench.corruptions()}
    windows = [
        bench.draw(pool, 64, g),
        by_name["impulse_noise"].apply(bench.draw(pool, 16, g), 0.1, g),
        by_name["brightness"].apply(bench.draw(pool, 32, g), 0.14, g),
    ]
    return bench.pixels(reference), [bench.pixels(w) for w in windows]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Evidently: chi-square with f_exp 0
def test_fast_evidently_decision_uses_evidentlys_own_column_tests() -> None:
    from evidently.legacy.calculations.stattests.registry import get_stattest
    from evidently.legacy.core import ColumnType

    reference, windows = _evidently_windows()
    assert (reference.std(axis=0) == 0).any(), "the digits have constant background pixels"
    fast = bench.EvidentlyDrift(reference)
    for window in windows:
        ref, cur = bench.pixel_frame(reference), bench.pixel_frame(window)
        drifted = 0
        for column in ref.columns:
            test = get_stattest(ref[column], cur[column], ColumnType.Numerical, None)
            drifted += bool(test(ref[column], cur[column], ColumnType.Numerical, None).drifted)
        assert fast.drifted_columns(window) == drifted
        assert fast(window) == (drifted / 64 >= 0.5)


def test_fast_evidently_decision_equals_the_report() -> None:
    reference, windows = _evidently_windows()
    fast = bench.EvidentlyDrift(reference)
    window = windows[1]  # impulse noise: K-S, chi-square and Z-test columns
    drift, columns = bench.evidently_report(reference, window)
    assert fast.drifted_columns(window) == columns
    assert fast(window) == drift


def test_smoke_run_reports_every_cell_with_sane_rates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "detection.json"
    results = bench.main(["--smoke", "--quiet", "--json", str(out)])
    printed = capsys.readouterr().out

    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    meta = results["meta"]
    assert meta["smoke"] is True
    assert meta["train_images"] + meta["held_out_images"] == 1797
    assert meta["reference_images"] + meta["test_pool_images"] == meta["held_out_images"]
    assert 0.5 < meta["clean_accuracy"] <= 1.0
    detectors = list(bench.DETECTORS)
    assert meta["detectors"] == detectors

    clean = results["clean"]
    assert [row["n"] for row in clean] == list(bench.SMOKE_SIZES)
    for row in clean:
        for d in detectors:
            lo, hi = row["ci95"][d]
            assert 0.0 <= lo <= row["rates"][d] <= hi <= 1.0
            assert row["rates"][d] == row["alarms"][d] / row["windows"]
        assert row["rates"]["bnwatch"] <= 0.05  # alpha = 1e-3 per window
    assert all(d in printed for d in detectors)

    cells = results["cells"]
    assert {(c["corruption"], c["severity"], c["n"]) for c in cells} == {
        (name, s, n)
        for name in bench.SMOKE_CORRUPTIONS
        for s in bench.SMOKE_SEVERITIES
        for n in bench.SMOKE_SIZES
    }
    for c in cells:
        for d in detectors:
            assert 0.0 <= c["rates"][d] <= 1.0
            assert c["detected"][d] <= c["windows"]
    strong = [c for c in cells if c["corruption"] == "contrast" and c["severity"] == 5]
    assert strong and all(c["rates"]["bnwatch"] == 1.0 for c in strong)

    for name, by_severity in results["accuracy"].items():
        assert name in printed
        for acc in by_severity.values():
            assert 0.0 <= acc["accuracy"] <= 1.0
            assert math.isclose(acc["lost"], meta["clean_accuracy"] - acc["accuracy"])
    for d in detectors:
        for label, n in results["smallest_n"][d].items():
            assert label.startswith("sev")
            assert n is None or n in bench.SMOKE_SIZES
    assert set(results["targets"]) == {
        "false_alarms_at_most_1pct",
        "detects_90pct_at_sev3_n64",
        "fewer_samples_than_both_baselines",
    }
    assert results["evidently_checks"] == []
    assert "ok" in printed or "MISS" in printed
