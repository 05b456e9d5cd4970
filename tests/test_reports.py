"""Evidently drift reports: drift injected in 3 of 20 channels is reported in exactly those;
no drift reports none (the Bonferroni threshold holds the false-alarm rate); every channel's
p-value is scipy's K-S test, while Evidently plots only the ``plots`` smallest; HTML and JSON
files; ``bnwatch report`` end to end; errors that say what to do."""

from __future__ import annotations

import html.parser
import itertools
import json
import math
import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from torch import nn

import bnwatch
from bnwatch.capture import accumulator
from bnwatch.cli import REPORT_PLOTS, main
from bnwatch.drift import DriftConfig, Reference, assess_layer, decide
from bnwatch.errors import ConfigError
from bnwatch.reports import (
    PLOTS,
    TABLE_COLUMNS,
    DriftReport,
    ReportError,
    channel_columns,
    channel_list,
    drift_report,
    per_channel_threshold,
)
from bnwatch.schema import LayerProfile, Profile, WindowRecord
from bnwatch.stats import DEFAULT_RESERVOIR, ChannelMoments, LayerStats, Reservoir
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import NoReservoirError, Repository

CHANNELS = 20
SHIFTED = [4, 11, 17]
SHIFT = 0.75
"""Shift of the drifted channels, in per-sample standard deviations."""
T0 = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
CONFIG = DriftConfig(min_samples=4)


# -- a store seeded without torch (deterministic) ----------------------------------------------
def stats_of(rows: np.ndarray, reservoir: Reservoir | None) -> LayerStats:
    n = rows.shape[0]
    return LayerStats(
        moments=ChannelMoments.from_rows(rows),
        batch_sizes={8: n // 8},
        n_batches=n // 8,
        batches_seen=n // 8,
        samples_seen=n,
        reservoir=reservoir,
    )


def profile_of(rows: np.ndarray, *, seed: int, name: str = "m", version: str = "1") -> Profile:
    res = Reservoir(512, rows.shape[1], seed=seed)
    res.add(rows)
    layer = LayerProfile(
        layer="bn",
        kind="BatchNorm1d",
        eps=1e-5,
        stats=stats_of(rows, None),
        reservoir=res,
        running_mean=None,
        running_var=None,
    )
    return Profile(name=name, version=version, created=T0, layers={"bn": layer})


def windows_of(
    data: np.ndarray,
    *,
    seed: int,
    per_window: int = 64,
    reservoir: int = 32,
    baseline: list[str] | None = None,
    name: str = "m",
    version: str = "1",
) -> list[WindowRecord]:
    """One-minute windows of ``per_window`` samples of ``data``, each keeping ``reservoir``."""
    channels = data.shape[1]
    running = Reference.running(np.zeros(channels), np.ones(channels))
    out = []
    for i in range(data.shape[0] // per_window):
        rows = data[i * per_window : (i + 1) * per_window]
        res = None
        if reservoir:
            res = Reservoir(reservoir, channels, seed=seed * 1000 + i)
            res.add(rows)
        report = assess_layer(
            "bn",
            "BatchNorm1d",
            stats_of(rows, res),
            eps=1e-5,
            running=running,
            baseline=None,
            baseline_kind=baseline[i] if baseline else "warming_up",
            running_stats_mutated=False,
            config=CONFIG,
        )
        start = T0 + timedelta(minutes=i)
        out.append(
            WindowRecord(
                model=name,
                version=version,
                source="test",
                start=start,
                end=start + timedelta(minutes=1),
                reports=decide({"bn": report}, CONFIG),
                uid=f"{name}-{version}-{seed}-{i}",
            )
        )
    return out


def seeded_store(url: str, *, seed: int, shift: float) -> Repository:
    """A reference profile of 2000 samples (512 kept) and 20 production windows of 64 samples
    (32 kept each), channels ``SHIFTED`` moved by ``shift`` standard deviations."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 2.0, CHANNELS)
    sd = rng.uniform(0.5, 2.0, CHANNELS)
    reference = mu + sd * rng.standard_normal((2000, CHANNELS))
    production = mu + sd * rng.standard_normal((20 * 64, CHANNELS))
    production[:, SHIFTED] += shift * sd[SHIFTED]
    repo = Repository(engine_for(url))
    repo.write_profile(profile_of(reference, seed=seed))
    repo.write_windows(windows_of(production, seed=seed))
    return repo


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bnwatch.db'}"


@pytest.fixture
def drifted(sqlite_url: str) -> Iterator[Repository]:
    repo = seeded_store(sqlite_url, seed=0, shift=SHIFT)
    yield repo
    repo.engine.dispose()


# -- the acceptance test -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drift_in_3_of_20_channels_is_reported_in_exactly_those(tmp_path: Path, seed: int) -> None:
    repo = seeded_store(f"sqlite:///{tmp_path / 'db.sqlite'}", seed=seed, shift=SHIFT)
    try:
        report = drift_report(repo, model="m", version="1", layer="bn")
    finally:
        repo.engine.dispose()
    assert report.drifted_channels == SHIFTED
    assert (report.reference_rows, report.current_rows) == (512, 640)
    assert (report.reference_kind, report.current_windows) == ("profile", 20)
    assert report.threshold == pytest.approx(0.05 / 20)
    table = report.table
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert list(table["channel"]) == list(range(CHANNELS))
    assert list(table["column"]) == channel_columns(CHANNELS)
    assert set(table["stattest"]) == {"K-S p_value"}
    assert list(table.loc[table["drifted"], "channel"]) == SHIFTED
    assert (table["p_value"] <= table["threshold"]).tolist() == table["drifted"].tolist()
    assert table.loc[SHIFTED, "shift_sd"].between(0.4, 1.1).all()


def test_no_drift_is_reported_as_none(tmp_path: Path) -> None:
    """Bonferroni keeps any false alarm among 20 channels at <= 5 % per report: over five
    null stores at most one may flag a channel (P(>= 2 of 5) = 2.3 % at the bound)."""
    flagged = []
    for seed in range(10, 15):
        repo = seeded_store(f"sqlite:///{tmp_path / f'null{seed}.db'}", seed=seed, shift=0.0)
        try:
            report = drift_report(repo, model="m", version="1", layer="bn")
        finally:
            repo.engine.dispose()
        assert report.table["p_value"].notna().all()
        flagged.append(report.drifted_channels)
    assert sum(bool(f) for f in flagged) <= 1, flagged


def test_the_per_channel_threshold_holds_the_family_wise_rate() -> None:
    """What the report's description claims, checked with scipy's K-S test (the one Evidently
    runs): with 20 undrifted channels, p <= 0.05 per channel flags some channel in
    1 - 0.95^20 = 64 % of comparisons; p <= 0.05 / 20 in at most 5 %."""
    rng = np.random.default_rng(7)
    trials = 400
    any_plain = any_bonferroni = 0
    threshold = per_channel_threshold(0.05, CHANNELS)
    for _ in range(trials):
        ref = rng.standard_normal((512, CHANNELS))
        cur = rng.standard_normal((640, CHANNELS))
        p = np.array([scipy_stats.ks_2samp(ref[:, c], cur[:, c]).pvalue for c in range(CHANNELS)])
        any_plain += bool((p <= 0.05).any())
        any_bonferroni += bool((p <= threshold).any())
    assert any_plain / trials == pytest.approx(1 - 0.95**20, abs=0.08)
    assert any_bonferroni / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


# -- outputs -------------------------------------------------------------------------------------
class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.ids.update(v for k, v in attrs if k == "id" and v)


def test_html_and_json_are_written_atomically_and_parse(
    drifted: Repository, tmp_path: Path
) -> None:
    report = drift_report(drifted, model="m", version="1", layer="bn")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")
    json_path = report.save(out / "report.json")
    html_path = report.save(out / "report.HTML")
    assert sorted(p.name for p in out.iterdir()) == ["report.HTML", "report.json"]  # no temps

    doc = json.loads(json_path.read_text())
    ours = doc["bnwatch"]
    assert ours["drifted_channels"] == SHIFTED
    assert (ours["model"], ours["version"], ours["layer"]) == ("m", "1", "bn")
    assert ours["correction"] == "bonferroni" and ours["threshold"] == pytest.approx(0.0025)
    assert "Bonferroni" in ours["description"]
    assert len(ours["table"]) == CHANNELS
    assert [row["channel"] for row in ours["table"] if row["drifted"]] == SHIFTED
    values = {
        m["config"]["column"]: m["value"]
        for m in doc["evidently"]["metrics"]
        if "column" in m["config"]
    }
    assert sorted(values) == channel_columns(CHANNELS)
    for row in ours["table"]:
        assert values[row["column"]] == pytest.approx(row["p_value"])

    text = html_path.read_text()
    parser = _Tags()
    parser.feed(text)
    assert {"html", "body", "script"} <= parser.tags
    assert "bnwatch-summary" in parser.ids
    assert "Drifted channels (3 of 20):</strong> 4, 11, 17" in text
    assert "Bonferroni" in text


def _evidently_values(report: DriftReport) -> dict[str, float]:
    """The p-value per column of Evidently's own report (its snapshot)."""
    if report.snapshot is None:
        return {}
    return {
        m["config"]["column"]: m["value"]
        for m in report.snapshot.dict()["metrics"]
        if "column" in m["config"]
    }


@pytest.mark.parametrize("plots", [5, 0, None])
def test_every_channel_is_tested_and_evidently_plots_the_smallest_p_values(
    drifted: Repository, tmp_path: Path, plots: int | None
) -> None:
    """A wide layer: Evidently's report covers the ``plots`` channels with the smallest
    p-values; every channel's p-value is scipy's two-sample K-S test on the finite rows, and
    equals Evidently's where it plots; drifted channels do not depend on ``plots``."""
    report = drift_report(drifted, model="m", version="1", layer="bn", plots=plots)
    ref = drifted.reference_reservoir("m", "1", "bn").reservoir.rows
    cur = drifted.production_reservoir("m", "1", "bn").reservoir.rows
    expected = [scipy_stats.ks_2samp(ref[:, c], cur[:, c]).pvalue for c in range(CHANNELS)]
    table = report.table
    np.testing.assert_allclose(table["p_value"], expected, rtol=1e-12)
    assert report.drifted_channels == SHIFTED

    shown = CHANNELS if plots is None else plots
    smallest = sorted(np.argsort(expected, kind="stable")[:shown].tolist())
    assert report.plotted_channels == smallest
    assert set(SHIFTED) <= set(smallest) or shown < len(SHIFTED)
    values = _evidently_values(report)
    assert sorted(values) == [channel_columns(CHANNELS)[c] for c in smallest]
    for c in smallest:
        assert values[table.loc[c, "column"]] == table.loc[c, "p_value"]
    assert (report.snapshot is None) == (shown == 0)

    doc = json.loads(report.json())
    assert doc["bnwatch"]["plotted_channels"] == smallest
    assert len(doc["bnwatch"]["table"]) == CHANNELS
    text = report.html()
    parser = _Tags()
    parser.feed(text)
    assert "bnwatch-summary" in parser.ids
    assert ("bnwatch-unplotted" in parser.ids) == (shown < CHANNELS)
    if 0 < shown < CHANNELS:
        assert f"the {shown} channels with the smallest p-values, of {CHANNELS}" in text
    if shown < CHANNELS:
        assert ("No channel is plotted.  The other 20:" in text) == (shown == 0)
        assert text.count("<tr><td>") == CHANNELS - shown  # one row per channel not plotted


def test_bad_suffix_and_alpha_are_config_errors(drifted: Repository, tmp_path: Path) -> None:
    report = drift_report(drifted, model="m", version="1", layer="bn", alpha=0.01)
    assert report.threshold == pytest.approx(0.01 / 20)
    with pytest.raises(ConfigError, match=r"\.html or \.json"):
        report.save(tmp_path / "report.pdf")
    assert not list(tmp_path.glob("report*"))
    with pytest.raises(ConfigError, match="alpha"):
        drift_report(drifted, model="m", version="1", layer="bn", alpha=1.5)
    with pytest.raises(ConfigError, match="plots"):
        drift_report(drifted, model="m", version="1", layer="bn", plots=-1)
    with pytest.raises(ConfigError, match="after start"):
        drift_report(drifted, model="m", version="1", layer="bn", start=T0, end=T0)


def test_the_range_selects_the_production_windows(drifted: Repository) -> None:
    report = drift_report(
        drifted,
        model="m",
        version="1",
        layer="bn",
        start=T0 + timedelta(minutes=5),
        end=T0 + timedelta(minutes=10),
    )
    assert report.current_windows == 5  # ends at minutes 5, 6, 7, 8, 9
    assert report.current_rows == 5 * 32
    assert report.start == T0 + timedelta(minutes=5)


def test_unknown_model_and_layer_list_what_exists(drifted: Repository) -> None:
    with pytest.raises(ReportError, match=r"no model m@9 in the store; models: m@1"):
        drift_report(drifted, model="m", version="9", layer="bn")
    with pytest.raises(ReportError, match=r"no layer 'conv' in m@1; layers: bn"):
        drift_report(drifted, model="m", version="1", layer="conv")


def test_without_profile_the_warmup_windows_are_the_reference(sqlite_url: str) -> None:
    rng = np.random.default_rng(3)
    data = rng.standard_normal((30 * 64, CHANNELS))
    data[10 * 64 :, SHIFTED] += 1.0  # production changes after the 10 warm-up windows
    kinds = ["warming_up"] * 10 + ["warmup"] * 20
    repo = Repository(engine_for(sqlite_url))
    try:
        repo.write_windows(windows_of(data, seed=3, baseline=kinds))
        report = drift_report(repo, model="m", version="1", layer="bn", alpha=0.01)
    finally:
        repo.engine.dispose()
    assert report.reference_kind == "warmup"
    assert (report.reference_rows, report.current_rows) == (320, 640)
    assert report.current_windows == 20  # the warm-up windows are not compared with themselves
    assert report.drifted_channels == SHIFTED


def test_no_reservoir_says_what_to_do(sqlite_url: str) -> None:
    rng = np.random.default_rng(4)
    repo = Repository(engine_for(sqlite_url))
    try:
        repo.write_windows(windows_of(rng.standard_normal((128, 3)), seed=4, reservoir=0))
        with pytest.raises(NoReservoirError, match=r"record a reference profile"):
            drift_report(repo, model="m", version="1", layer="bn")
        repo.write_profile(profile_of(rng.standard_normal((64, 3)), seed=4))
        with pytest.raises(NoReservoirError, match=r"watch with bnwatch\.watch\(\.\.\., reservoir"):
            drift_report(repo, model="m", version="1", layer="bn")
    finally:
        repo.engine.dispose()


def test_a_channel_without_finite_values_is_not_tested(sqlite_url: str) -> None:
    rng = np.random.default_rng(5)
    prod = rng.standard_normal((128, 3))
    prod[:, 1] = np.nan
    repo = Repository(engine_for(sqlite_url))
    try:
        repo.write_profile(profile_of(rng.standard_normal((256, 3)), seed=5))
        repo.write_windows(windows_of(prod, seed=5))
        report = drift_report(repo, model="m", version="1", layer="bn")
    finally:
        repo.engine.dispose()
    assert math.isnan(report.table.loc[1, "p_value"])
    assert not report.table.loc[1, "drifted"]
    assert report.table["p_value"].drop(index=1).notna().all()
    assert report.untested_channels == [1]
    assert json.loads(report.json())["bnwatch"]["untested_channels"] == [1]  # NaN as null
    assert "<strong>Untested channels (1 of 3):</strong> 1 -- no finite value" in report.html()


def test_cli_a_layer_without_finite_production_values_says_nothing_was_tested(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every production value NaN: "0 of 3 channels drifted (none)", and "no channel is
    plotted (--plots 0)" although --plots was not given."""
    rng = np.random.default_rng(6)
    repo = Repository(engine_for(sqlite_url))
    try:
        repo.write_profile(profile_of(rng.standard_normal((256, 3)), seed=6))
        repo.write_windows(windows_of(np.full((128, 3), np.nan), seed=6))
    finally:
        repo.engine.dispose()
    out = tmp_path / "r.json"
    what = ["--db", sqlite_url, "--model", "m", "--version", "1", "--layer", "bn"]
    assert main(["report", *what, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 of 3 channels drifted (none), 3 untested;" in printed
    assert "3 of 3 channels untested (0, 1, 2): no finite value on both sides" in printed
    assert "no channel is plotted: no channel has finite values on both sides" in printed
    assert "--plots" not in printed
    summary = json.loads(out.read_text())["bnwatch"]
    assert (summary["untested_channels"], summary["plotted_channels"]) == ([0, 1, 2], [])


# -- the command line ----------------------------------------------------------------------------
def test_cli_end_to_end_with_a_watched_model(
    sqlite_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real profile and monitor (BatchNorm1d: the per-sample means are the inputs), stored
    by the background writer; ``bnwatch report`` writes both formats."""
    # the monitor's reservoirs keep 8 of each window's 64 rows, drawn from fresh entropy:
    # seeded here, so that the 7 unshifted channels' tests at alpha 0.001 cannot raise a
    # false alarm once in a few hundred runs (100 seeds measured: none did)
    seeds = itertools.count()
    monkeypatch.setattr(
        accumulator,
        "random",
        SimpleNamespace(
            Random=lambda seed=None: random.Random(next(seeds) if seed is None else seed)
        ),
    )
    net = nn.Sequential(nn.BatchNorm1d(8)).eval()
    gen = torch.Generator().manual_seed(0)
    clean = [torch.randn(64, 8, generator=gen) for _ in range(8)]
    bnwatch.profile(net, clean, name="tiny", version="1", store=sqlite_url)
    shifted = [torch.randn(64, 8, generator=gen) for _ in range(10)]
    for x in shifted:
        x[:, 2] += 1.5
    with (
        bnwatch.watch(
            net,
            name="tiny",
            version="1",
            store=sqlite_url,
            window_seconds=None,
            overhead_budget=None,
        ) as mon,
        torch.inference_mode(),
    ):
        for x in shifted:
            net(x)
            mon.flush()
    for out in (tmp_path / "r.html", tmp_path / "r.json"):
        where = ["--db", sqlite_url, "--model", "tiny", "--version", "1", "--layer", "0"]
        span = ["--from", "2000-01-01", "--to", "2999-01-01T00:00:00Z"]
        code = main(["report", *where, *span, "--alpha", "0.001", "--out", str(out)])
        assert code == 0
        printed = capsys.readouterr().out
        assert "1 of 8 channels drifted (2)" in printed
        assert f"{10 * DEFAULT_RESERVOIR} production rows from 10 windows" in printed
        assert f"wrote {out}" in printed
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["bnwatch"]["drifted_channels"] == [2]
    assert doc["bnwatch"]["reference"] == {"kind": "profile", "rows": 512}
    assert "bnwatch-summary" in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope", "--version", "1", "--layer", "bn"], "no model nope@1 in the store"),
        (["--model", "m", "--version", "1", "--layer", "x"], "layers: bn"),
        (
            ["--model", "m", "--version", "1", "--layer", "bn", "--out", "r.txt"],
            "--out='r.txt' is invalid: expected a file name ending in .html or .json",
        ),
        (
            ["--model", "m", "--version", "1", "--layer", "bn", "--from", "2030-01-01"],
            "there is no window of layer 'bn' of m@1 ending at or after 2030-01-01",
        ),
        (  # found before the report is computed, naming the directory, not a temporary file
            ["--model", "m", "--version", "1", "--layer", "bn", "--out", "nodir/r.html"],
            "a file in an existing directory",
        ),
        (
            [
                "--model",
                "m",
                "--version",
                "1",
                "--layer",
                "bn",
                "--from",
                "2030-01-02",
                "--to",
                "2030-01-01",
            ],
            "--to='2030-01-01T00:00:00+00:00' is invalid: expected a time after --from",
        ),
    ],
)
def test_cli_errors_exit_1_without_traceback(
    drifted: Repository,
    sqlite_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    out = ["--out", str(tmp_path / "r.html")] if "--out" not in args else []
    code = main(["report", "--db", sqlite_url, *args, *out])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("bnwatch report: error: ")
    assert message in err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("r.*"))


def test_cli_refuses_an_out_that_is_a_directory(
    drifted: Repository, sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found before the report is computed, naming --out (the rename failed only after)."""
    directory = tmp_path / "reports.html"
    directory.mkdir()
    what = ["--db", sqlite_url, "--model", "m", "--version", "1", "--layer", "bn"]
    assert main(["report", *what, "--out", str(directory)]) == 1
    err = capsys.readouterr().err
    assert f"--out='{directory}' is invalid: expected a file name, not an existing directory" in err
    assert "Traceback" not in err and not list(directory.iterdir())


def test_cli_plots_option(
    drifted: Repository, sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--plots N`` plots N channels and says so; ``all`` every one; its default is the
    library's; a bad value exits 2 and says what is expected."""
    assert REPORT_PLOTS == PLOTS
    what = ["--db", sqlite_url, "--model", "m", "--version", "1", "--layer", "bn"]
    for plots, shown in (("3", 3), ("all", CHANNELS)):
        out = tmp_path / f"r{plots}.json"
        assert main(["report", *what, "--plots", plots, "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert len(json.loads(out.read_text())["bnwatch"]["plotted_channels"]) == shown
        assert ("smallest p-values (--plots)" in printed) == (shown < CHANNELS)
    for bad in ("-1", "many"):
        with pytest.raises(SystemExit) as info:
            main(["report", *what, "--plots", bad, "--out", str(tmp_path / "x.html")])
        assert info.value.code == 2
        assert "expected a number of channels >= 0 or 'all'" in capsys.readouterr().err


@pytest.mark.parametrize("alpha", ["2", "0", "1", "-0.1", "nan", "often"])
def test_cli_alpha_out_of_range_is_a_usage_error(
    alpha: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused as --alpha by argparse (exit 2), before any database is opened."""
    db = f"sqlite:///{tmp_path / 'none.db'}"
    what = ["--db", db, "--model", "m", "--version", "1", "--layer", "bn"]
    with pytest.raises(SystemExit) as info:
        main(["report", *what, "--alpha", alpha, "--out", str(tmp_path / "r.html")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --alpha: expected a number between 0 and 1, got '{alpha}'" in err
    assert not list(tmp_path.iterdir())


def test_channel_lists_are_cut_for_terminals_not_for_reports() -> None:
    assert channel_list([]) == "none"
    assert channel_list([4, 11, 17]) == "4, 11, 17"
    assert channel_list([4, 11, 17], limit=3) == "4, 11, 17"
    assert channel_list(list(range(1000)), limit=2) == "0, 1 and 998 more"
    assert channel_list(list(range(30))) == ", ".join(str(c) for c in range(30))


def test_cli_names_at_most_20_drifted_channels(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A wide layer where every channel drifted: the terminal line names 20 and counts the
    rest; the JSON lists all."""
    rng = np.random.default_rng(3)
    wide = 48
    repo = Repository(engine_for(sqlite_url))
    try:
        repo.write_profile(profile_of(rng.standard_normal((512, wide)), seed=3))
        repo.write_windows(windows_of(rng.standard_normal((640, wide)) + 2.0, seed=3))
    finally:
        repo.engine.dispose()
    out = tmp_path / "wide.json"
    what = ["--db", sqlite_url, "--model", "m", "--version", "1", "--layer", "bn"]
    assert main(["report", *what, "--plots", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    listed = ", ".join(str(c) for c in range(20))
    assert f"{wide} of {wide} channels drifted ({listed} and {wide - 20} more)" in printed
    assert json.loads(out.read_text())["bnwatch"]["drifted_channels"] == list(range(wide))


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--from", "yesterday", "expected an ISO-8601 time"),
        # in UTC past the calendar's ends: an OverflowError traceback before
        ("--to", "9999-12-31T23:59:59-05:00", "out of the years a time can hold in UTC"),
        ("--from", "0001-01-01T00:00+01:00", "out of the years a time can hold in UTC"),
    ],
)
def test_cli_rejects_a_bad_time(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    what = ["--model", "m", "--version", "1", "--layer", "bn", "--out", "r.html"]
    with pytest.raises(SystemExit) as info:
        main(["report", *what, flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and flag in err
