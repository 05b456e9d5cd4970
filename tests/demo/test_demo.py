"""The demo scenario, end to end: clean traffic raises no drift alarm but shows the
train/inference gap; drifted traffic opens the drift alert, whose trigger recalibrates the live
model (applied, accuracy recovers); a layer left in ``train()`` with batches of 2 opens the
small-batch alerts; recalibrating on clean data closes the gap; the monitor's Prometheus
endpoint answers; and the database left behind is what the dashboard reads.

One quick run (a few seconds) is shared by most tests of this module; a few others run the
demo again (re-run in the same directory, another database, a bnwatch service, no output
directory)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from bnwatch import ConfigError, Profile
from bnwatch.cli import main
from bnwatch.demo import DemoResult, DemoStoreError, run_demo
from bnwatch.demo.digits import DigitsCNN, make_model
from bnwatch.demo.run import (
    DATABASE_FILE,
    DRIFT_PASSES,
    KEEP_INPUTS,
    LINE_WIDTH,
    MODEL_NAME,
    ORPHAN_AGE_SECONDS,
    TRAIN_MODE_LAYER,
    WINDOWS_PER_PASS,
    _prepare_out_dir,
    remove_orphans,
)
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository

LAYERS = ("bn1", "bn2", "bn3", "head_bn")
SMALL_BATCH_KINDS = {"batch_stat_mode", "running_stats_mutated", "small_batch_mismatch"}
FILES = {"model.pt", "profile.npz", "reports.json", DATABASE_FILE}


@dataclass(frozen=True)
class Run:
    result: DemoResult
    output: str
    out_dir: Path

    @property
    def url(self) -> str:
        return f"sqlite:///{(self.out_dir / DATABASE_FILE).resolve()}"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out_dir = tmp_path_factory.mktemp("demo") / "out"
    stream = io.StringIO()
    result = run_demo(out_dir, seed=0, quick=True, stream=stream, progress=False)
    return Run(result, stream.getvalue(), out_dir)


def describe(result: DemoResult, phase: str) -> str:
    """The layer-level numbers of one phase's windows, for assertion messages."""
    return "\n".join(
        f"window {w.index} {name}: n={r.n_samples} p_value={r.p_value:.3g} "
        f"frac_drifted={r.frac_drifted:.3f} drift_d_rms={r.drift_d_rms:.3f} gap={r.gap}"
        for w in result.phase(phase).windows
        for name, r in w.reports.items()
    )


def opened(result: DemoResult, phase: str) -> set[tuple[str, str | None]]:
    return {(a.kind, a.layer) for a in result.alerts if a.action == "opened" and a.phase == phase}


# --------------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------------
def test_phases_and_windows(run: Run) -> None:
    result = run.result
    assert [p.name for p in result.phases] == ["clean", "drift", "train-mode"]
    assert [len(p.windows) for p in result.phases] == [
        WINDOWS_PER_PASS,
        WINDOWS_PER_PASS * DRIFT_PASSES,
        WINDOWS_PER_PASS,
    ]
    assert result.layers == LAYERS
    assert sum(result.split_sizes) == 1797
    for phase in result.phases:
        assert [w.index for w in phase.windows] == list(range(1, len(phase.windows) + 1))
        for window in phase.windows:
            assert list(window.reports) == list(LAYERS)
            for report in window.reports.values():
                # overhead_budget=None: every image of the window is measured by every layer
                assert report.n_samples == window.n_images
                assert report.baseline == "profile"


def test_model_learns(run: Run) -> None:
    assert run.result.validation_accuracy > 0.9
    assert run.result.phase("clean").accuracy > 0.9


def test_clean_traffic_has_no_drift_but_a_train_inference_gap(run: Run) -> None:
    clean = run.result.phase("clean")
    assert clean.layers_where("drifted", any_window=True) == [], describe(run.result, "clean")
    assert 1 in clean.batch_sizes  # single images are part of clean production traffic
    for flag in ("batch_stat_mode", "running_stats_mutated", "small_batch_mismatch"):
        assert clean.layers_where(flag, any_window=True) == []
    # the running statistics were averaged over shifted training images, not clean ones
    assert clean.layers_where("gap", any_window=True), describe(run.result, "clean")
    assert opened(run.result, "clean") == set()


def test_drift_opens_the_alert_whose_trigger_recalibrates_and_recovers_accuracy(run: Run) -> None:
    result = run.result
    drift = result.phase("drift")
    first_pass = drift.windows[:WINDOWS_PER_PASS]
    for window in first_pass:
        assert all(r.drifted for r in window.reports.values()), describe(result, "drift")
    assert {kind for kind, _ in opened(result, "drift")} == {"drift"}
    assert {a.window for a in result.alerts if a.phase == "drift"} >= {WINDOWS_PER_PASS}

    recalibration = result.recalibration
    assert recalibration is not None
    assert recalibration.status == "applied", recalibration.outcome
    assert recalibration.recorded and recalibration.id == 1
    assert (recalibration.phase, recalibration.window) == ("drift", WINDOWS_PER_PASS)
    assert recalibration.alert is not None and recalibration.alert.kind == "drift"
    # judged on a held-out quarter of the kept (drifted) inputs
    assert recalibration.outcome["samples"] == KEEP_INPUTS * 3 // 4
    assert recalibration.outcome["kl_after"] < recalibration.outcome["kl_before"]

    before, after = result.drift_accuracy
    assert before < result.phase("clean").accuracy - 0.3
    assert after > 0.9 and after > before + 0.3
    # the recalibrated statistics fit the drifted traffic: the gap is gone after it
    for window in drift.windows[WINDOWS_PER_PASS:]:
        assert not any(r.gap for r in window.reports.values()), describe(result, "drift")


def test_a_layer_left_in_train_mode_opens_the_small_batch_alerts(run: Run) -> None:
    result = run.result
    phase = result.phase("train-mode")
    assert phase.train_mode_layers == (TRAIN_MODE_LAYER,)
    assert phase.batch_sizes == (2,)
    for flag in ("batch_stat_mode", "running_stats_mutated", "small_batch_mismatch"):
        assert phase.layers_where(flag, any_window=True) == [TRAIN_MODE_LAYER]
        assert phase.layers_where(flag) == [TRAIN_MODE_LAYER]
    small_batch = {(kind, layer) for kind, layer in opened(result, "train-mode")} & {
        (kind, TRAIN_MODE_LAYER) for kind in SMALL_BATCH_KINDS
    }
    assert {kind for kind, _ in small_batch} == SMALL_BATCH_KINDS
    when = {a.kind: a.window for a in result.alerts if a.phase == "train-mode"}
    assert when["batch_stat_mode"] == when["running_stats_mutated"] == 1  # open_after=1
    assert when["small_batch_mismatch"] == 2  # open_after=2
    assert phase.accuracy < result.drift_accuracy[1] - 0.05


def test_recalibrating_on_clean_data_closes_the_gap(run: Run) -> None:
    clean = run.result.clean_recalibration
    assert clean.result.status == "applied"
    assert clean.gap_layers("before"), "the augmented model shows no gap to close"
    assert clean.gap_layers("after") == []
    for name in LAYERS:
        assert clean.after[name].d_rms < clean.before[name].d_rms / 2, name
    assert clean.accuracy_after > 0.9


def test_the_prometheus_endpoint_answered_while_the_demo_ran(run: Run) -> None:
    result = run.result
    assert result.metrics_url.startswith("http://127.0.0.1:")
    assert result.metrics_url.endswith("/metrics")
    assert len(result.metrics_sample) == len(LAYERS)
    for layer, line in zip(LAYERS, result.metrics_sample, strict=True):
        assert line.startswith("bnwatch_layer_drifted{")
        assert f'layer="{layer}"' in line and f'model="{MODEL_NAME}"' in line
        assert line.endswith(" 1.0")  # scraped when the drift alert opened
    assert f"Prometheus, one scrape of {result.metrics_url}" in run.output
    with pytest.raises(urllib.error.URLError):  # served while the demo ran, not after
        urllib.request.urlopen(result.metrics_url, timeout=5)


# --------------------------------------------------------------------------------------------
# What it leaves behind
# --------------------------------------------------------------------------------------------
def test_the_database_holds_the_windows_alerts_and_the_applied_recalibration(run: Run) -> None:
    engine = engine_for(run.url, create=False)
    try:
        repo = Repository(engine)
        (model,) = repo.models()
        assert (model.name, model.version) == (MODEL_NAME, "seed-0")
        assert model.windows == run.result.windows * len(LAYERS)
        assert run.result.layer_windows_stored == model.windows
        profile = repo.load_profile(model.name, model.version)
        assert profile is not None and list(profile.layers) == list(LAYERS)

        alerts = repo.alerts(model=model.name, version=model.version)
        kinds = {(a.kind, a.layer) for a in alerts}
        assert ("drift", "bn1") in kinds
        assert {(kind, TRAIN_MODE_LAYER) for kind in SMALL_BATCH_KINDS} <= kinds
        still_open = {(a.kind, a.layer) for a in alerts if a.state == "open"}
        assert ("small_batch_mismatch", TRAIN_MODE_LAYER) in still_open
        assert any(kind == "drift" for kind, _ in still_open)  # the camera is still new

        (recalibration,) = repo.recalibrations(model=model.name, version=model.version)
        assert recalibration.status == "applied"
        trigger = next(a for a in alerts if a.id == recalibration.alert_id)
        assert trigger.kind == "drift"
        assert recalibration.outcome is not None
        assert recalibration.outcome["improved"] is True
    finally:
        engine.dispose()


def test_the_dashboard_reads_the_result(run: Run) -> None:
    import data  # the dashboard's data layer (pytest's pythonpath has dashboard/)

    data.clear()
    try:
        models = data.models(run.url)
        (row,) = models.to_dict("records")
        assert (row["name"], row["version"], row["status"]) == (MODEL_NAME, "seed-0", "alert")
        assert "drift" in row["alert_kinds"] and "small_batch_mismatch" in row["alert_kinds"]
        alerts = data.alerts(run.url, MODEL_NAME, "seed-0")
        assert {"drift", "small_batch_mismatch"} <= set(alerts["kind"])
        recalibrations = data.recalibrations(run.url, MODEL_NAME, "seed-0")
        assert list(recalibrations["status"]) == ["applied"]
    finally:
        data.repository(run.url).engine.dispose()
        data.repository.clear()
        data.clear()


def test_files_are_written_and_readable(run: Run) -> None:
    # the database was built under a temporary name: nothing else is left behind
    assert {p.name for p in run.out_dir.iterdir()} == FILES
    assert run.result.files == tuple(
        run.out_dir / name for name in ("model.pt", "profile.npz", "reports.json")
    )
    model = make_model(0)
    model.load_state_dict(torch.load(run.out_dir / "model.pt", weights_only=True))
    assert isinstance(model, DigitsCNN)
    # the returned model is the trained one again: eval() everywhere, and the running
    # statistics production recalibrated and overwrote are restored
    assert not any(m.training for m in run.result.model.modules())
    for name, value in model.state_dict().items():
        assert torch.equal(run.result.model.state_dict()[name], value), name
    profile = Profile.load(run.out_dir / "profile.npz")
    assert list(profile.layers) == list(LAYERS)
    doc = json.loads((run.out_dir / "reports.json").read_text())
    assert [p["name"] for p in doc["phases"]] == [p.name for p in run.result.phases]
    assert [len(p["windows"]) for p in doc["phases"]] == [3, 6, 3]
    assert doc["recalibration"]["status"] == "applied"
    assert doc["clean_recalibration"]["gap_after"] == []
    assert {a["kind"] for a in doc["alerts"]} >= {"drift", "small_batch_mismatch"}


def test_output_tells_the_story_within_100_columns(run: Run) -> None:
    lines = run.output.splitlines()
    # only lines naming the output directory may be longer (they print the user's path)
    too_wide = [line for line in lines if len(line) > LINE_WIDTH and str(run.out_dir) not in line]
    assert not too_wide
    assert sum(line.startswith("window  images") for line in lines) == len(run.result.phases)
    assert "        ! alert opened: drift on bn1, bn2, bn3, head_bn" in lines
    assert "        ! recalibration 1 triggered by the drift alert on bn1: applied" in lines
    assert f"        ! alert opened: small_batch_mismatch on {TRAIN_MODE_LAYER}" in lines
    assert "[4/4] recalibrate: the trained model on clean training + validation images" in lines
    assert "summary" in lines
    before, after = run.result.drift_accuracy
    assert f"               accuracy on the drifted images {before:.1%} -> {after:.1%}" in lines
    assert lines[-1] == f"dashboard      bnwatch dashboard --db {run.url}"
    assert run.result.dashboard_command == f"bnwatch dashboard --db {run.url}"


def _comparable(text: str) -> list[str]:
    """The printout without what differs between runs: timings and the metrics port."""
    return [
        line
        for line in text.splitlines()
        if not line.rstrip().endswith((" s", " s)")) and "127.0.0.1:" not in line
    ]


def test_rerun_through_the_cli_replaces_everything_and_is_deterministic(
    run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (run.out_dir / "reports.json").read_text()
    assert main(["demo", "--quick", "--seed", "0", "--out", str(run.out_dir)]) == 0
    out = capsys.readouterr().out
    assert {p.name for p in run.out_dir.iterdir()} == FILES
    # same seed, same numbers: the reports are identical and so is the printout
    assert (run.out_dir / "reports.json").read_text() == before
    assert _comparable(out) == _comparable(run.output)
    # the database was replaced, not appended to
    engine = engine_for(run.url, create=False)
    try:
        repo = Repository(engine)
        (model,) = repo.models()
        assert model.windows == run.result.windows * len(LAYERS)
        assert [r.id for r in repo.recalibrations()] == [1]
    finally:
        engine.dispose()


def test_store_in_another_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    out_dir = tmp_path / "out"
    assert main(["demo", "--quick", "--out", str(out_dir), "--store", other]) == 0
    out = capsys.readouterr().out
    assert {p.name for p in out_dir.iterdir()} == FILES - {DATABASE_FILE}
    assert f"dashboard      bnwatch dashboard --db {other}" in out.splitlines()
    engine = engine_for(other, create=False)
    try:
        repo = Repository(engine)
        (model,) = repo.models()
        # a store of the user's: a new, time-stamped version per run
        assert model.name == MODEL_NAME and model.version.startswith("seed-0-")
        assert repo.load_profile(model.name, model.version) is not None
        kinds = {a.kind for a in repo.alerts()}
        assert {"drift", "small_batch_mismatch"} <= kinds
        assert [r.status for r in repo.recalibrations()] == ["applied"]
    finally:
        engine.dispose()


def test_store_in_a_bnwatch_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.service.helpers import TOKEN, serve

    monkeypatch.setenv("BNWATCH_API_TOKEN", TOKEN)
    monkeypatch.setenv("BNWATCH_SPOOL_DIR", str(tmp_path / "spool"))
    served = f"sqlite:///{tmp_path / 'served.db'}"
    with serve(served, tmp_path / "serve.log") as server:
        stream = io.StringIO()
        result = run_demo(
            tmp_path / "out", quick=True, store=server.url, stream=stream, progress=False
        )
    output = stream.getvalue()
    assert result.store == server.url and result.profile_stored
    assert "samples per layer, uploaded to the service" in output
    # the service evaluated the alerts; the demo read them back from its API
    assert {kind for kind, _ in opened(result, "drift")} == {"drift"}
    assert {kind for kind, _ in opened(result, "train-mode")} >= SMALL_BATCH_KINDS
    # a service cannot run the trigger: the demo did, and says it is not recorded
    recalibration = result.recalibration
    assert recalibration is not None and recalibration.status == "applied"
    assert not recalibration.recorded and recalibration.id is None
    assert "(not recorded: a bnwatch service records only what its webhook triggers start)" in (
        output
    )
    assert result.drift_accuracy[1] > 0.9
    assert result.dashboard_command is None
    assert {p.name for p in (tmp_path / "out").iterdir()} == FILES - {DATABASE_FILE}
    engine = engine_for(served, create=False)
    try:
        repo = Repository(engine)
        (model,) = repo.models()
        assert model.windows == result.windows * len(LAYERS) == result.layer_windows_stored
        # the profile went up whole (POST /api/v1/profiles): its reservoir is the drift
        # reports' reference, exactly the demo's profile
        for layer in LAYERS:
            kept = repo.reference_reservoir(model.name, model.version, layer)
            assert kept.kind == "profile"
            np.testing.assert_array_equal(
                kept.reservoir.rows, result.profile.layers[layer].reservoir.rows
            )
        assert repo.recalibrations() == []
    finally:
        engine.dispose()


def test_without_out_dir_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    result = run_demo(None, seed=1, quick=True, stream=io.StringIO(), progress=False)
    assert result.files == ()
    assert result.store is None and result.dashboard_command is None
    assert result.recalibration is not None  # the temporary database had the alerts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary database is gone


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(ConfigError, match="seed"):
        run_demo(None, seed=seed, quick=True)  # type: ignore[arg-type]


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("")
    with pytest.raises(ConfigError, match="out_dir"):
        run_demo(target, quick=True)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_files_a_killed_demo_left_are_removed_on_the_next_run(tmp_path: Path) -> None:
    """kill -9 skips every ``finally``: the next demo in that directory removes what the dead
    one left -- but never a file of a live process, nor a fresh one (another machine's demo
    writing to a shared directory), nor anything that is not a demo temporary."""
    dead, live = _dead_pid(), os.getppid()
    left = [
        f".{DATABASE_FILE}.{dead}.0123abcd.tmp",
        f".{DATABASE_FILE}.{dead}.0123abcd.tmp-wal",
        f".{DATABASE_FILE}.{dead}.0123abcd.tmp-shm",
        f".model.pt.{dead}.89abcdef.tmp",
    ]
    kept_old = [f".{DATABASE_FILE}.{live}.0123abcd.tmp", ".notes.tmp", f".x.{dead}.nothex12.tmp"]
    fresh = f".reports.json.{dead}.fedcba98.tmp"
    old = time.time() - 2 * ORPHAN_AGE_SECONDS
    for name in [*left, *kept_old, fresh]:
        (tmp_path / name).write_bytes(b"partial")
    for name in [*left, *kept_old]:
        os.utime(tmp_path / name, (old, old))
    (tmp_path / DATABASE_FILE).write_bytes(b"a finished run's database")

    removed = remove_orphans(tmp_path)

    assert sorted(p.name for p in removed) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept_old, fresh, DATABASE_FILE])
    # the demo runs it when it prepares its output directory
    (tmp_path / left[0]).write_bytes(b"partial")
    os.utime(tmp_path / left[0], (old, old))
    assert _prepare_out_dir(tmp_path) == tmp_path
    assert not (tmp_path / left[0]).exists()


@pytest.mark.parametrize("store", ["", "not a url", "mysql://host/db"])
def test_bad_store_fails_before_training(store: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="store"):
        run_demo(tmp_path, quick=True, store=store)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_service_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.service.helpers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DemoStoreError, match="cannot reach the bnwatch service"):
        run_demo(tmp_path / "a", quick=True, store=url, stream=io.StringIO())
    assert main(["demo", "--quick", "--out", str(tmp_path / "b"), "--store", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"bnwatch demo: error: cannot reach the bnwatch service at {url}")


def test_missing_scikit_learn_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bnwatch demo: error: the demo needs scikit-learn")
    assert "pip install 'bnwatch[demo]'" in err
    assert list(tmp_path.iterdir()) == []  # no half-built database left behind
