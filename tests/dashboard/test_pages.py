"""Every dashboard page under Streamlit's AppTest against a seeded database (SQLite and the
real PostgreSQL): no exception, the expected widgets and the values the seed implies."""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import torch
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

import bnwatch
import data
import ui
from bnwatch.drift import DriftConfig
from bnwatch.schema import WindowRecord
from bnwatch.sink import MemorySink
from bnwatch.store.engine import create_engine
from bnwatch.store.migrate import engine_for, upgrade
from bnwatch.store.repository import Repository
from tests.dashboard.seed import (
    CLEAN_WINDOWS,
    LAYERS,
    MODEL,
    SHIFT,
    VERSION,
    WINDOWS,
    Seeded,
    cnn,
    image_batch,
)
from tests.service.helpers import Monitor
from tests.store.helpers import record_windows

TIMEOUT = 60


@pytest.fixture
def app(seeded: Seeded, app_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AppTest]:
    monkeypatch.setenv(data.DATABASE_ENV, seeded.url)
    data.clear()
    at = AppTest.from_file(str(app_path), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    yield at
    data.clear()


def open_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_overview(app: AppTest) -> None:
    assert [t.value for t in app.title] == ["Overview"]
    assert metrics(app) == {"Model versions": "1", "With open alerts": "1", "Drifting now": "1"}
    models = app.dataframe[0].value
    assert list(models["name"]) == [MODEL]
    row = models.iloc[0]
    assert row["status"] == "alert"
    assert row["drifted_layers"] == len(LAYERS)
    assert row["windows"] == WINDOWS * len(LAYERS)  # one row per layer and window
    assert set(row["alert_kinds"].split(", ")) == {
        "drift",
        "batch_stat_mode",
        "running_stats_mutated",
    }
    # the sparkline: low while clean, high once drifted (one bucket per one-minute window)
    spark = row["drift"]
    assert len(spark) == WINDOWS
    assert max(spark[:CLEAN_WINDOWS]) < 0.3 < min(spark[CLEAN_WINDOWS:])
    opened = app.dataframe[1].value
    assert len(opened) == 5 and set(opened["model"]) == {MODEL}
    # the shared pickers
    assert app.sidebar.selectbox(key="model_version").value == (MODEL, VERSION)
    assert app.sidebar.selectbox(key="time_range").value == "last 24 hours"


def add_versions(url: str, first: int, count: int, now: datetime) -> None:
    """``count`` more model versions with windows of the last hours: every other one drifting,
    every third also a version whose drift is undefined at first (still warming up)."""
    repo = Repository(engine_for(url))
    for i in range(first, first + count):
        monitor = Monitor(model=f"m{i}", source="r1", seed=i, start=now - timedelta(hours=3))
        repo.write_windows(monitor.records(3 + i % 4, shift=1.0 if i % 2 else 0.0))
        if i % 3 == 0:
            begins = now - timedelta(hours=2)
            warm = record_windows(3, name=f"m{i}", version="warm", seed=i)
            repo.write_windows(
                [
                    dataclasses.replace(
                        r,
                        start=begins + timedelta(minutes=k),
                        end=begins + timedelta(minutes=k + 1),
                    )
                    for k, r in enumerate(warm)
                ]
            )
    repo.engine.dispose()


def overview_read_per_version(url: str, start: datetime | None) -> pd.DataFrame:
    """The Overview's drift sparkline and drifted layers of every version as it read them:
    a span, buckets and the latest windows, each version on its own."""
    rows = []
    for m in data.models(url).itertuples():
        found = data.span(url, m.name, m.version, start, None)
        spark = []
        if found is not None:
            frame = data.buckets(
                url, m.name, m.version, start, None, found.resolution, ("drift_d_rms",)
            )
            spark = data.sparkline(frame, "drift_d_rms")
        latest = data.latest(url, m.name, m.version)
        rows.append((spark, int(latest["drifted"].sum()) if len(latest) else 0))
    return pd.DataFrame(rows, columns=["drift", "drifted_layers"])


def test_the_overview_reads_every_version_in_a_fixed_number_of_queries(
    db_url: str, app_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Overview asked about each model version on its own (span, buckets, latest: about
    four queries apiece, 8 s cold for 300 versions on PostgreSQL).  It asks the same few
    questions however many versions there are, and shows what each version's reads say."""
    now = datetime.now(timezone.utc)
    add_versions(db_url, 0, 2, now)
    monkeypatch.setenv(data.DATABASE_ENV, db_url)
    data.clear()
    at = AppTest.from_file(str(app_path), default_timeout=TIMEOUT)
    at.run()  # opens the database (and checks its schema) once
    assert not at.exception, [e.value for e in at.exception]
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    engine = data.repository(db_url).engine
    sa.event.listen(engine, "before_cursor_execute", count)
    queries, versions = [], []
    try:
        for first, more in ((2, 0), (2, 4)):
            add_versions(db_url, first, more, now)
            data.clear()
            statements.clear()
            at.run()
            assert not at.exception, [e.value for e in at.exception]
            queries.append(len(statements))
            shown = at.dataframe[0].value
            versions.append(len(shown))
            read = overview_read_per_version(db_url, data.since(timedelta(days=1)))
            assert list(shown["drifted_layers"]) == list(read["drifted_layers"])
            assert 0 < sum(shown["drifted_layers"]) < sum(shown["layers"])
            for got, want in zip(shown["drift"], read["drift"], strict=True):
                assert np.array_equal(np.array(got, float), np.array(want, float), equal_nan=True)
            assert any(np.isnan(v).any() for v in map(np.array, shown["drift"]))
            assert metrics(at)["Drifting now"] == str(sum(shown["drifted_layers"] > 0))
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
        data.clear()
    assert versions == [3, 8] and queries[0] == queries[1]


def test_model_page(app: AppTest) -> None:
    at = open_page(app, "model")
    assert rendered(at.title[0].value) == f"Model {MODEL} @ {VERSION}"
    assert len(at.get("plotly_chart")) == 2  # heatmap and depth profile
    table = at.dataframe[0].value
    assert list(table.index) == list(LAYERS)  # depth order
    assert table["drifted"].all() and table["gap"].any()
    assert table.loc["4", "batch_stat_mode"]
    monitors = at.dataframe[1].value  # the one monitor of the story, as it reported itself
    assert list(monitors["source"]) == ["seed:1"]
    assert monitors.loc[0, "windows"] == WINDOWS and monitors.loc[0, "hook_errors"] == 0
    assert monitors.loc[0, "thresholds"] == data.config_text(DriftConfig())  # watched at those
    # another metric redraws without error
    at.selectbox(key="model_metric").set_value("frac_drifted").run()
    assert not at.exception


@pytest.mark.parametrize("seconds", [60, 180, 3600, None])
def test_buckets_aggregate_like_pandas_over_every_window(
    seeded: Seeded, seconds: int | None
) -> None:
    """The database's per-bucket aggregates equal pandas' over the raw rows."""
    names, rows = data.repository(seeded.url).metric_rows(MODEL, VERSION)
    raw = pd.DataFrame.from_records(rows, columns=list(names))
    ends = pd.to_datetime(raw["end"], utc=True).astype("int64") // 1000  # microseconds
    width = (seconds or 2**37) * 1_000_000
    raw["bucket"] = (ends - 1000) // width  # the bucket the end falls in
    raw["drifted"] = raw["drifted"].astype(int)
    expected = raw.groupby(["layer", "bucket"]).agg(
        windows=("end", "size"),
        samples=("n_samples", "sum"),
        max_drift_d_rms=("drift_d_rms", "max"),
        avg_drift_d_rms=("drift_d_rms", "mean"),
        max_drifted=("drifted", "max"),
        avg_drifted=("drifted", "mean"),
    )
    got = data.buckets(seeded.url, MODEL, VERSION, None, None, seconds, ("drift_d_rms", "drifted"))
    assert len(got) == len(expected)
    got = got.set_index("layer")
    for layer, group in expected.groupby(level="layer"):
        mine = got.loc[[layer]]
        assert list(mine["windows"]) == list(group["windows"])
        assert list(mine["samples"]) == list(group["samples"])
        for column in ("max_drift_d_rms", "avg_drift_d_rms", "max_drifted", "avg_drifted"):
            assert abs(mine[column].to_numpy() - group[column].to_numpy()).max() < 1e-9
    if seconds is not None:
        starts = pd.to_datetime(got["bucket_start"]).astype("int64") // 1000
        assert (starts % width == 0).all()
    table = data.heatmap(got.reset_index(), "drift_d_rms")
    if seconds is not None:
        assert list(table.index) == list(LAYERS)
        by_layer = raw.groupby("layer")["drift_d_rms"].max()
        assert abs(table.max(axis=1) - by_layer.reindex(table.index)).max() < 1e-12


def test_undefined_drift_is_shown_as_undefined_not_dropped_or_zero() -> None:
    # a baseline still warming up stores drift as NULL: the heatmap lost every such layer
    # (pivot_table drops all-NaN rows) and the sparkline drew 0, "no drift"
    times = pd.to_datetime(["2026-06-01 12:00", "2026-06-01 12:01"], utc=True)
    frame = pd.DataFrame(
        {
            "depth": [0, 0, 1, 1],
            "layer": ["bn1", "bn1", "bn2", "bn2"],
            "bucket_start": [times[0], times[1], times[0], times[1]],
            "max_drift_d_rms": [float("nan"), float("nan"), float("nan"), 0.7],
        }
    )
    table = data.heatmap(frame, "drift_d_rms")
    assert list(table.index) == ["bn1", "bn2"] and list(table.columns) == list(times)
    assert table.isna().to_numpy().tolist() == [[True, True], [True, False]]
    spark = data.sparkline(frame, "drift_d_rms")
    assert np.isnan(spark[0]) and spark[1] == 0.7


def test_layer_page(app: AppTest) -> None:
    at = open_page(app, "layer")
    assert at.title[0].value == "Layer"
    shown = metrics(at)
    assert shown["Channels"] == "8" and shown["Drifted (range)"] == "yes"
    assert len(at.get("plotly_chart")) == 3  # channel heatmap, means, stds
    top = at.dataframe[0].value
    assert len(top) == 8
    z = top["z (vs baseline)"].abs().to_numpy()
    assert (z[:-1] >= z[1:]).all()  # most drifting first
    at.main.selectbox[-1].set_value("7").run()  # the page's layer picker
    assert not at.exception and metrics(at)["Channels"] == str(6 * 36)
    at.radio[0].set_value("log_r").run()
    assert not at.exception


LOOSE = DriftConfig(min_shift=5.0, min_log_ratio=5.0)
"""Effect-size tolerances the seed's shift of 1.5 stays under (|d| about 1.3 in layer 1)."""


def _recorded(url: str, config: DriftConfig, source: str, windows: int) -> list[WindowRecord]:
    """Windows of the seed's CNN, profiled on clean data and watched at ``config`` on inputs
    shifted by ``SHIFT``, closed one minute apart until now."""
    g = torch.Generator().manual_seed(0)
    net = cnn()
    with torch.inference_mode():
        profile = bnwatch.profile(
            net, [image_batch(g, 32) for _ in range(16)], name="m", version="v"
        )
    sink = MemorySink()
    mon = bnwatch.watch(
        net,
        name="m",
        version="v",
        reference=profile,
        store=sink,
        window_seconds=None,
        overhead_budget=None,
        source=source,
        config=config,
    )
    with torch.inference_mode():
        for _ in range(windows):
            for size in (8, 32, 16):
                net(image_batch(g, size, SHIFT))
            mon.flush()
    mon.close()
    now = datetime.now(timezone.utc)
    return [
        dataclasses.replace(
            r,
            start=now - timedelta(minutes=windows - i),
            end=now - timedelta(minutes=windows - i - 1),
        )
        for i, r in enumerate(sink.windows)
    ]


def test_the_layer_page_judges_the_range_at_the_monitors_thresholds(
    db_url: str, app_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A monitor watching at loose tolerances stored windows that are not drifted; the page
    judged their merged range at the default thresholds and said "Drifted: yes"."""
    engine = engine_for(db_url)
    repo = Repository(engine)
    records = _recorded(db_url, LOOSE, "loose:1", 4)
    repo.write_windows(records)
    assert not any(r.reports["1"].drifted or r.reports["1"].gap for r in records)
    # at the default thresholds the same range is drifted (and off the running statistics)
    ((_, at_default),) = repo.layer_reports("m", "v", "1", resolution=None, config=DriftConfig())
    assert at_default.drifted and at_default.gap
    monkeypatch.setenv(data.DATABASE_ENV, db_url)
    data.clear()
    try:
        at = AppTest.from_file(str(app_path), default_timeout=TIMEOUT)
        at.run()
        at = open_page(at, "layer")
        shown = {m.label: m for m in at.metric}
        assert shown["Drifted (range)"].value == "no" and shown["Gap (range)"].value == "no"
        help_text = shown["Drifted (range)"].proto.help
        assert "at the monitors' DriftConfig" in help_text and "min_shift=5," in help_text
        assert "disagree" not in help_text
        # a second source, judged at the default thresholds, reported before the first's last
        other = _recorded(db_url, DriftConfig(), "default:1", 2)
        repo.write_windows(
            [dataclasses.replace(r, end=r.end - timedelta(minutes=1)) for r in other]
        )
        data.clear()
        at.run()
        shown = {m.label: m for m in at.metric}
        assert shown["Drifted (range)"].value == "no"  # the newest source's thresholds
        help_text = shown["Gap (range)"].proto.help
        assert "newest monitor's DriftConfig" in help_text and "min_shift=5," in help_text
        assert "sources disagree: 1 of 2" in help_text
        assert "(default:1)" in rendered(help_text)  # a source's name, escaped
    finally:
        data.clear()
        engine.dispose()


def test_thresholds_note_says_where_the_thresholds_came_from() -> None:
    default = ui.thresholds_note(data.Thresholds(DriftConfig(), False, 1, ()))
    assert default.startswith("at the default DriftConfig (alpha=0.001, ")
    assert "no monitor reported its thresholds" in default
    agreed = ui.thresholds_note(data.Thresholds(LOOSE, True, 2, ()))
    assert agreed.startswith("at the monitors' DriftConfig (") and "min_log_ratio=5," in agreed
    many = ui.thresholds_note(data.Thresholds(LOOSE, True, 6, ("a", "b", "c", "d", "e")))
    assert "5 of 6" in many and "(a, b, c, ...)" in many


def heatmap_spec(at: AppTest) -> dict[str, Any]:
    """The page's heatmap (its first chart) as Plotly receives it."""
    spec: dict[str, Any] = json.loads(at.get("plotly_chart")[0].proto.spec)
    return spec


def test_both_heatmaps_label_a_time_bucket_by_its_start(app: AppTest, seeded: Seeded) -> None:
    """The Model page labelled a bucket by its start and the Layer page by its end, so the
    same windows sat one bucket apart on the two pages; both now label it by its start (the
    axis says so), the start of the bucket its windows end in."""
    seconds = 60  # one-minute windows: one bucket each
    span = data.span(seeded.url, MODEL, VERSION, None)
    assert span is not None and span.resolution == seconds
    model = heatmap_spec(open_page(app, "model"))
    layer = heatmap_spec(open_page(app, "layer"))  # the first layer, "1"
    ends = [w.end for w in data.repository(seeded.url).windows(MODEL, VERSION, layer="1")]
    starts = sorted(
        {(pd.Timestamp(end) - pd.Timedelta(milliseconds=1)).floor("min") for end in ends}
    )
    assert len(starts) == WINDOWS
    assert list(pd.to_datetime(model["data"][0]["x"], utc=True)) == starts
    assert list(pd.to_datetime(layer["data"][0]["x"], utc=True)) == starts
    for page in (model, layer):
        assert page["layout"]["xaxis"]["title"]["text"] == "start of each 1 min bucket (UTC)"


def test_channel_view_matches_one_merged_window(seeded: Seeded) -> None:
    """The page's per-channel statistics are the exact merge of the stored windows."""
    repo = data.repository(seeded.url)
    view = data.channel_view(seeded.url, MODEL, VERSION, "1", None, None, 60)
    assert view is not None
    stored = repo.windows(MODEL, VERSION, layer="1", with_stats=True)
    merged = stored[0].stats
    assert merged is not None
    for w in stored[1:]:
        assert w.stats is not None
        merged = merged.merge(w.stats)
    m = merged.moments
    assert view.range_samples == m.n_samples == sum(w.n_samples for w in stored)
    pd.testing.assert_index_equal(pd.Index(view.mean), pd.Index(m.mean), exact=False)
    assert abs(view.std**2 - m.var).max() < 1e-9 * max(1.0, float(m.var.max()))
    assert view.d.shape == (WINDOWS, 8)  # one bucket per one-minute window


def test_batch_size_page(app: AppTest) -> None:
    at = open_page(app, "batch_size")
    shown = metrics(at)
    # per clean or drifted window batches of 1, 8, 32, 16; per train-mode window 24 of 2
    train_mode = 3
    regular = WINDOWS - train_mode
    assert shown["Batches"] == str(4 * regular + 24 * train_mode)
    assert shown["Samples"] == str(57 * regular + 48 * train_mode)
    assert [w.value for w in at.warning] == [
        "1 layer(s) normalized with batch statistics in this range."
    ]
    flagged = at.dataframe[0].value
    assert list(flagged.index) == ["4"] and flagged.loc["4", "batch_stat_mode"]
    curve = at.dataframe[1].value
    assert list(curve["batch_size"]) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert (curve["rms_d"].diff().dropna() <= 1e-12).all()  # noise falls with batch size
    assert len(at.get("plotly_chart")) == 2


def test_alerts_page_acknowledges_and_requests(app: AppTest, seeded: Seeded) -> None:
    at = open_page(app, "alerts")
    alerts = at.dataframe[0].value
    assert len(alerts) == 5 and set(alerts["state"]) == {"open"}
    recals = at.dataframe[1].value
    assert list(recals["status"]) == ["applied"]

    at.multiselect[1].set_value(["drift"]).run()  # filter by kind
    assert set(at.dataframe[0].value["kind"]) == {"drift"}

    target = int(alerts["id"].iloc[0])
    at.main.selectbox[-3].set_value(target)  # the acknowledge form's alert
    at.main.button[-2].click().run()  # "Acknowledge"
    assert not at.exception
    repo = data.repository(seeded.url)
    acked = {a.id for a in repo.alerts() if a.acknowledged_at is not None}
    assert target in acked

    at.main.button[-1].click().run()  # "Request recalibration" (method precise)
    assert not at.exception
    statuses = sorted(r.status for r in repo.recalibrations(model=MODEL, version=VERSION))
    assert statuses == ["applied", "pending"]
    # while it waits, the page names it instead of offering a second request
    waiting = repo.waiting_request(MODEL, VERSION)
    assert waiting is not None
    assert request_buttons(at) == []
    assert [f"#{waiting.id} " in i.value for i in at.info] == [True]


def request_buttons(at: AppTest) -> list[Any]:
    return [b for b in at.button if b.label == "Request recalibration"]


def test_a_request_while_another_waits_is_not_recorded_and_the_page_names_it(
    db_url: str, app_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two operators: this one's page offered the form before the other one's dashboard (another
    process, another cache) recorded a request.  Clicking records nothing; the page says which
    request waits and when it was asked."""
    engine = engine_for(db_url)
    repo = Repository(engine)
    repo.write_windows(Monitor().records(1))  # cnn@1, nothing requested
    monkeypatch.setenv(data.DATABASE_ENV, db_url)
    data.clear()
    try:
        at = AppTest.from_file(str(app_path), default_timeout=TIMEOUT)
        at.run()
        at = open_page(at, "alerts")
        (button,) = request_buttons(at)
        assert not [i for i in at.info if "waiting" in i.value]

        other = repo.request_recalibration("cnn", "1", method="mix").recalibration
        button.click().run()
        assert not at.exception
        (only,) = repo.recalibrations(model="cnn", version="1")
        assert (only.id, only.method) == (other.id, "mix")  # no second request
        assert request_buttons(at) == []
        (said,) = [i.value for i in at.info if "waiting" in i.value]
        assert f"Recalibration #{other.id} (mix)" in said
        assert ui.format_time(other.created_at) in said  # when it was asked

        repo.take_requested()  # the service sends it: the next request is recorded
        data.clear()  # (Refresh now)
        at.run()
        request_buttons(at)[0].click().run()
        assert not at.exception
        assert len(repo.recalibrations(model="cnn", version="1")) == 2
    finally:
        data.clear()
        engine.dispose()


def test_reports_page(app: AppTest) -> None:
    at = open_page(app, "reports")
    assert at.title[0].value == "Drift report"
    shown = metrics(at)
    assert int(shown["Reference samples"]) > 0 and int(shown["Production samples"]) > 0
    assert int(shown["Drifted channels"]) > 0  # the seed's shift moves every channel
    assert len(at.get("download_button")) == 2
    (frame,) = at.get("iframe")  # Evidently's page inline (st.iframe, not the deprecated
    assert "evidently" in frame.proto.srcdoc.lower()  # components.html)


def test_time_range_without_windows(app: AppTest) -> None:
    app.sidebar.selectbox(key="time_range").set_value("last hour").run()
    assert not app.exception
    at = open_page(app, "model")
    assert len(at.get("plotly_chart")) == 2


@pytest.mark.parametrize("kind", ["missing file", "empty schema", "outdated schema"])
def test_unusable_database_shows_how_to_start(
    kind: str, app_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'bnwatch.db'}"
    if kind == "empty schema":
        engine_for(url).dispose()
    elif kind == "outdated schema":
        engine = create_engine(url)
        upgrade(engine, "0001")
        engine.dispose()
    monkeypatch.setenv(data.DATABASE_ENV, url)
    at = AppTest.from_file(str(app_path), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "bnwatch demo" in text
    if kind == "empty schema":
        assert at.subheader[0].value == "No monitored models here yet"
    else:
        assert at.subheader[0].value == "Cannot read this database"
        hint = "bnwatch db upgrade" if kind == "outdated schema" else "no database file"
        assert hint in at.error[0].value
    if kind == "missing file":
        assert not (tmp_path / "bnwatch.db").exists()  # looking does not create it


def test_dashboard_never_imports_torch(app_path: Path) -> None:
    """The dashboard runs where torch is not installed (a separate process: no torch yet)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import data, ui; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code, str(app_path.parent)], check=True)
    assert sa  # the module's imports are used


def page_text(at: AppTest) -> str:
    """Everything the app sent to draw the page (every element's protobuf, as text)."""

    def walk(node: Any) -> Iterator[str]:
        proto = getattr(node, "proto", None)
        if proto is not None:
            yield str(proto)
        for child in getattr(node, "children", {}).values():
            yield from walk(child)

    return "\n".join([*walk(at.main), *walk(at.sidebar)])


def test_an_unreadable_database_keeps_its_password_hidden(
    app_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide redacted the URL in its text but put it in clear into its code sample."""
    secret = "S3cretPassw0rd"
    url = f"postgresql+psycopg://postgres:{secret}@127.0.0.1:1/bnwatch"  # nothing listens
    monkeypatch.setenv(data.DATABASE_ENV, url)
    at = AppTest.from_file(str(app_path), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    assert at.subheader[0].value == "Cannot read this database"
    assert secret not in page_text(at)
    guide = " ".join(m.value for m in at.markdown)
    shown = "postgresql+psycopg://postgres:***@127.0.0.1:1/bnwatch"
    assert f'store="{shown}")  # the password is hidden: put it back in place of ***' in guide


def layer_box(at: AppTest) -> Any:
    """The page's layer picker (its last select box: the sidebar's come first)."""
    box = at.main.selectbox[-1]
    assert box.label == "Layer"
    return box


def test_the_layer_picker_takes_every_choice_and_keeps_it_across_pages(app: AppTest) -> None:
    """Unkeyed, the picker's id followed its index (the last choice): every second choice went
    to the box that was gone and the page stayed on the previous layer."""
    at = open_page(app, "layer")
    channels = {"1": "8", "4": "6", "7": str(6 * 36)}
    for layer in ("4", "7", "1", "4"):
        layer_box(at).set_value(layer).run()
        assert not at.exception
        assert layer_box(at).value == layer
        assert metrics(at)["Channels"] == channels[layer]
    layer_box(at).set_value("7").run()
    for page in ("batch_size", "reports", "model", "layer"):  # the choice holds across pages
        open_page(at, page)
        if page != "model":
            assert layer_box(at).value == "7"
    assert metrics(at)["Channels"] == channels["7"]


@pytest.fixture
def excluded(db_url: str, app_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AppTest]:
    """The seed's CNN profiled (every layer recorded) and watched without its first layer
    (``exclude="1"``): five windows of layers 4 and 7, batches of 16, none of layer 1."""
    g = torch.Generator().manual_seed(0)
    net = cnn()
    with torch.inference_mode():
        profile = bnwatch.profile(
            net, [image_batch(g, 32) for _ in range(8)], name="m", version="v", store=db_url
        )
        mon = bnwatch.watch(
            net,
            name="m",
            version="v",
            reference=profile,
            store=db_url,
            exclude="1",
            window_seconds=None,
            overhead_budget=None,
        )
        for _ in range(5):
            net(image_batch(g, 16))
            mon.flush()
        mon.close()
    monkeypatch.setenv(data.DATABASE_ENV, db_url)
    data.clear()
    at = AppTest.from_file(str(app_path), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    yield at
    data.clear()


def test_reads_do_not_assume_every_stored_layer_has_windows(excluded: AppTest, db_url: str) -> None:
    """Batch sizes were read from the first layer only ("no measured batches"), and the
    latest windows numbered their depth 0, 1, ... whatever layers had none."""
    assert list(data.layers(db_url, "m", "v")["layer"]) == list(LAYERS)
    assert dict(data.window_counts(db_url, "m", "v", None)) == {"4": 5, "7": 5}
    counts = data.batch_size_counts(db_url, "m", "v", None)
    assert counts.to_dict("records") == [{"batch_size": 16, "batches": 5, "samples": 80}]
    latest = data.latest(db_url, "m", "v")
    stored = data.layers(db_url, "m", "v").set_index("layer")["depth"]
    assert list(latest.index) == ["4", "7"]
    assert dict(latest["depth"]) == {"4": stored["4"], "7": stored["7"]} == {"4": 1, "7": 2}


@pytest.mark.parametrize("page", ["layer", "batch_size", "reports"])
def test_a_layer_without_windows_is_not_the_default_and_says_so(
    excluded: AppTest, page: str
) -> None:
    """The pickers started at the first layer, which had no windows, and the pages then said
    the version "has no windows yet (a reference profile, perhaps)"."""
    at = open_page(excluded, page)
    picker = layer_box(at)
    assert picker.value == "4"  # the first layer with windows
    assert picker.options[0].endswith(", no windows in this range)")
    assert not [i for i in at.info if "no windows" in i.value]
    if page == "batch_size":
        assert metrics(at)["Batches"] == "5" and metrics(at)["Samples"] == "80"
    picker.set_value("1").run()
    assert not at.exception
    (said,) = [i.value for i in at.info if "no windows" in i.value]
    assert said.startswith("Layer 1 of m @ v has no windows, other layers have:")
    assert "exclude=" in said and "yet" not in said


MARKDOWN_NAMES = (
    r"2025*06*01 `rc` \_x <i>",
    "# m :a: $x$ :red[y] [l](http://x) &amp; ~~s~~",
    "- v:smile: <b>b</b> 1. ** __u__ | a | ``",
    "1. first",
    "> quoted\n= line",
)


def rendered(markdown: str) -> str:
    """The text a browser shows of Streamlit Markdown (CommonMark: markdown-it-py, which the
    dev tools install through rich); any tag -- emphasis, code, a link, a heading, a list --
    means a name turned into markup, and fails."""
    out = MarkdownIt("commonmark").render(markdown).strip()
    assert out.startswith("<p>") and out.endswith("</p>"), out
    assert "<" not in out[3:-4], out
    return html.unescape(out[3:-4])


@pytest.mark.parametrize("name", MARKDOWN_NAMES)
def test_escaped_markdown_renders_as_typed(name: str) -> None:
    flat = " ".join(name.splitlines())
    assert rendered(ui.escape_markdown(name)) == flat
    assert rendered(f"Model {ui.escape_markdown(name)} @ x") == f"Model {flat} @ x"
    code = MarkdownIt("commonmark").renderInline(f"run {ui.code_span(name)} now")
    assert code == f"run <code>{html.escape(flat, quote=False)}</code> now"


def test_names_with_markdown_characters_show_as_typed(
    db_url: str, app_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version ``2025*06*01 `rc` \\_x <i>`` (bnwatch.watch accepts it) was shown as
    ``20250601 rc _x <i>``, in italics and code, in the Model page's title and messages."""
    model, version = "my_model_v2", MARKDOWN_NAMES[0]
    engine = engine_for(db_url)
    Repository(engine).write_windows(Monitor(model=model, version=version).records(1))
    monkeypatch.setenv(data.DATABASE_ENV, db_url)
    data.clear()
    try:
        at = AppTest.from_file(str(app_path), default_timeout=TIMEOUT)
        at.run()
        at = open_page(at, "model")
        assert rendered(at.title[0].value) == f"Model {model} @ {version}"
        (said,) = at.info  # its one window is older than the default range, last 24 hours
        assert rendered(said.value).startswith(f"{model} @ {version} has no windows in the ")
        at = open_page(at, "alerts")
        assert rendered(at.success[0].value) == f"{model} @ {version} has never raised an alert."
    finally:
        data.clear()
        engine.dispose()


def test_the_reports_page_names_untested_channels(
    app_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A channel without a finite production value was counted among the clean ones ("No
    channel drifted." when it was the only other one)."""
    from tests.test_reports import profile_of, windows_of

    url = f"sqlite:///{tmp_path / 'bnwatch.db'}"
    rng = np.random.default_rng(3)
    production = rng.standard_normal((128, 3))
    production[:, 0] += 3.0  # drifted
    production[:, 1] = np.nan  # untested
    repo = Repository(engine_for(url))
    try:
        repo.write_profile(profile_of(rng.standard_normal((256, 3)), seed=3))
        records = windows_of(production, seed=3)
        recent = datetime.now(timezone.utc) - timedelta(hours=1) - records[-1].end  # last 24 h
        repo.write_windows(
            [dataclasses.replace(r, start=r.start + recent, end=r.end + recent) for r in records]
        )
    finally:
        repo.engine.dispose()
    monkeypatch.setenv(data.DATABASE_ENV, url)
    data.clear()
    try:
        at = AppTest.from_file(str(app_path), default_timeout=TIMEOUT)
        at.run()
        at = open_page(at, "reports")
        assert metrics(at)["Drifted channels"] == "1"
        assert [w.value for w in at.warning] == ["Drifted channels: 0"]
        (untested,) = [i.value for i in at.info if "Untested" in i.value]
        assert untested.startswith("Untested channels (1 of 3): 1 ")
        assert not at.success
    finally:
        data.clear()


def _sidebar_only() -> None:
    import streamlit as st

    import ui

    st.write(ui.sidebar("sqlite:///unused.db", st.session_state["models"]).model)


def test_the_chosen_model_version_stays_chosen_when_the_list_reorders() -> None:
    """The picker kept a position in a list ordered by activity: once the other model
    version stored a window, the pages showed it while the picker still named the chosen one
    (and acknowledging or requesting acted on it)."""
    models = pd.DataFrame({"name": ["a", "b"], "version": ["1", "1"]})
    at = AppTest.from_function(_sidebar_only, default_timeout=TIMEOUT)
    at.session_state["models"] = models
    at.run()
    picker = at.sidebar.selectbox(key="model_version")
    assert picker.options == ["a @ 1", "b @ 1"]
    picker.set_value(("b", "1")).run()
    assert at.markdown[0].value == "b"
    at.session_state["models"] = models.iloc[::-1]  # b reported since: it comes first
    at.run()
    assert at.sidebar.selectbox(key="model_version").options == ["b @ 1", "a @ 1"]
    assert at.markdown[0].value == "b"
    assert not at.exception
