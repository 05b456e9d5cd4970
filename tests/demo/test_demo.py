"""The demo scenario: clean traffic raises no drift alarm, corrupted traffic does, and a layer
left in ``train()`` with batches of 2 is reported as batch-statistics mode with mutated running
statistics.  One quick run (a few seconds) is shared by the tests of this module."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bnwatch import ConfigError, Profile
from bnwatch.cli import main
from bnwatch.demo import DemoResult, run_demo
from bnwatch.demo.digits import DigitsCNN, make_model
from bnwatch.demo.run import LINE_WIDTH, TRAIN_MODE_LAYER

CORRUPTED = ("noise", "contrast", "blur")


@dataclass(frozen=True)
class Run:
    result: DemoResult
    output: str
    out_dir: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out_dir = tmp_path_factory.mktemp("demo") / "out"
    stream = io.StringIO()
    result = run_demo(out_dir, seed=0, quick=True, stream=stream)
    return Run(result, stream.getvalue(), out_dir)


def describe(run: Run, phase: str) -> str:
    """The layer-level numbers of one phase, for assertion messages."""
    return "\n".join(
        f"{name}: n={r.n_samples} p_value={r.p_value:.3g} frac_drifted={r.frac_drifted:.3f} "
        f"drift_d_rms={r.drift_d_rms:.3f} drift_log_r_rms={r.drift_log_r_rms:.3f}"
        for name, r in run.result.phase(phase).reports.items()
    )


def test_phases_and_layers(run: Run) -> None:
    result = run.result
    assert [p.name for p in result.phases] == ["clean", *CORRUPTED, "train-mode"]
    assert result.layers == ("bn1", "bn2", "bn3", "head_bn")
    assert sum(result.split_sizes) == 1797
    for phase in result.phases:
        assert list(phase.reports) == list(result.layers)
        for report in phase.reports.values():
            # overhead_budget=None: every image of the phase is measured by every layer
            assert report.n_samples == phase.n_images
            assert report.baseline == "profile"


def test_model_learns(run: Run) -> None:
    assert run.result.validation_accuracy > 0.9
    assert run.result.phase("clean").accuracy > 0.9


def test_clean_phase_has_no_drift(run: Run) -> None:
    clean = run.result.phase("clean")
    assert clean.layers_where("drifted") == [], describe(run, "clean")
    assert 1 in clean.batch_sizes  # single images are part of clean production traffic
    for flag in ("batch_stat_mode", "running_stats_mutated", "small_batch_mismatch"):
        assert clean.layers_where(flag) == []


@pytest.mark.parametrize("name", CORRUPTED)
def test_corrupted_phases_drift_and_hurt_accuracy(run: Run, name: str) -> None:
    phase = run.result.phase(name)
    assert phase.layers_where("drifted"), describe(run, name)
    assert phase.accuracy < run.result.phase("clean").accuracy - 0.05
    assert phase.layers_where("batch_stat_mode") == []


def test_train_mode_phase_reports_the_layer_left_in_train_mode(run: Run) -> None:
    phase = run.result.phase("train-mode")
    assert phase.train_mode_layers == (TRAIN_MODE_LAYER,)
    assert phase.batch_sizes == (2,)
    assert phase.layers_where("batch_stat_mode") == [TRAIN_MODE_LAYER]
    assert phase.layers_where("running_stats_mutated") == [TRAIN_MODE_LAYER]
    assert phase.layers_where("small_batch_mismatch") == [TRAIN_MODE_LAYER]
    assert phase.accuracy < run.result.phase("clean").accuracy - 0.05


def test_output_has_a_table_per_phase_within_100_columns(run: Run) -> None:
    lines = run.output.splitlines()
    # only the line naming the output directory may be longer (it prints the user's path)
    too_wide = [line for line in lines if len(line) > LINE_WIDTH and str(run.out_dir) not in line]
    assert not too_wide
    assert sum(line.startswith("layer ") for line in lines) == len(run.result.phases)
    assert sum(line.startswith("=> drift in ") for line in lines) == len(run.result.phases)
    assert "=> drift in 0/4 layers" in run.output  # the clean phase
    for phase in run.result.phases:
        assert f"accuracy {phase.accuracy:.1%}" in run.output


def test_files_are_written_and_readable(run: Run) -> None:
    assert {p.name for p in run.out_dir.iterdir()} == {
        "model.pt",
        "profile.npz",
        "reports.json",
        "bnwatch.db",
    }
    assert run.result.files == tuple(
        run.out_dir / name for name in ("model.pt", "profile.npz", "reports.json")
    )
    model = make_model(0)
    model.load_state_dict(torch.load(run.out_dir / "model.pt", weights_only=True))
    assert isinstance(model, DigitsCNN)
    # the returned model is the trained one again: eval() everywhere, and the running
    # statistics the train-mode phase overwrote are restored
    assert not any(m.training for m in run.result.model.modules())
    for name, value in model.state_dict().items():
        assert torch.equal(run.result.model.state_dict()[name], value), name
    profile = Profile.load(run.out_dir / "profile.npz")
    assert list(profile.layers) == list(run.result.layers)
    doc = json.loads((run.out_dir / "reports.json").read_text())
    assert [p["name"] for p in doc["phases"]] == [p.name for p in run.result.phases]
    clean_layers = doc["phases"][0]["layers"]
    assert [r["drifted"] for r in clean_layers] == [False] * 4


def test_rerun_through_the_cli_is_safe_and_deterministic(
    run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (run.out_dir / "reports.json").read_text()
    assert main(["demo", "--quick", "--seed", "0", "--out", str(run.out_dir)]) == 0
    out = capsys.readouterr().out
    assert {p.name for p in run.out_dir.iterdir()} == {
        "model.pt",
        "profile.npz",
        "reports.json",
        "bnwatch.db",
    }
    # same seed, same numbers: the reports are identical and so is the printout (but timings)
    assert (run.out_dir / "reports.json").read_text() == before

    def tables(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.rstrip().endswith(" s")]

    assert tables(out) == tables(run.output)


def test_without_out_dir_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_demo(None, seed=1, quick=True, stream=io.StringIO())
    assert result.files == ()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(ConfigError, match="seed"):
        run_demo(None, seed=seed, quick=True)  # type: ignore[arg-type]


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("")
    with pytest.raises(ConfigError, match="out_dir"):
        run_demo(target, quick=True)


def test_missing_scikit_learn_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bnwatch demo: error: the demo needs scikit-learn")
    assert "pip install 'bnwatch[demo]'" in err


def test_every_window_and_the_profile_are_in_the_database(run: Run) -> None:
    from bnwatch.store.migrate import engine_for
    from bnwatch.store.repository import Repository

    engine = engine_for(f"sqlite:///{run.out_dir / 'bnwatch.db'}", create=False)
    repo = Repository(engine)
    (model,) = repo.models()
    layers = len(run.result.phases[0].reports)
    assert model.windows == len(run.result.phases) * layers
    profile = repo.load_profile(model.name, model.version)
    assert profile is not None
    assert len(profile.layers) == layers
    latest = repo.latest_windows(model.name, model.version)
    assert {w.layer for w in latest if w.batch_stat_mode} == set(
        run.result.phases[-1].train_mode_layers
    )
    engine.dispose()
