"""StoreCollector on a real SQLite and PostgreSQL store: every value against the windows."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.registry import DuplicateTimeseries

import bnwatch
from bnwatch.alerts import AlertConfig, AlertEngine, Rule
from bnwatch.errors import ConfigError
from bnwatch.export import names
from bnwatch.export.store import StoreCollector
from bnwatch.schema import BATCH_SIZE_BUCKETS, LayerReport, WindowRecord
from bnwatch.sink import MemorySink
from bnwatch.store.engine import create_engine
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.export.helpers import T0, at_minute, binary, check_metrics, with_layers
from tests.store.helpers import batches, record_windows, small_cnn


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    engine = engine_for(db_url)
    yield Repository(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def records() -> list[WindowRecord]:
    """Three windows of a small CNN (the first one warming up the drift baseline)."""
    return record_windows(3)


def registry_of(repo: Repository) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(StoreCollector(repo))
    return registry


def layer(record: WindowRecord, name: str) -> dict[str, str]:
    return {"model": record.model, "version": record.version, "layer": name}


def reference_value(spec: names.MetricSpec, report: LayerReport) -> float | None:
    """The reference for a layer gauge, read off the report independently of the exporter."""
    noise = report.observed_batch_noise
    raw: Any
    if spec.field == "batch_noise_d":
        raw = noise.rms_d if noise else None
    elif spec.field == "batch_noise_log_r":
        raw = noise.rms_log_r if noise else None
    else:
        raw = getattr(report, spec.field or "")
    value = None if raw is None else float(raw)
    return value if value is not None and math.isfinite(value) else None


def test_layer_gauges_are_the_latest_windows_metrics(
    repo: Repository, records: list[WindowRecord]
) -> None:
    repo.write_windows(records)
    registry = registry_of(repo)
    latest = records[-1]
    for name, report in latest.reports.items():
        labels = layer(latest, name)
        for spec in names.LAYER_GAUGES:
            expected = reference_value(spec, report)
            got = registry.get_sample_value(spec.name, labels)
            assert expected is not None, spec.name  # this window defines every metric
            assert got == pytest.approx(expected, rel=1e-12), spec.name
        end = registry.get_sample_value(names.LAYER_LAST_WINDOW_END.name, labels)
        assert end == pytest.approx(latest.end.timestamp(), abs=1e-3)
    assert registry.get_sample_value("bnwatch_layer_drifted", layer(latest, "4")) in (0.0, 1.0)
    assert registry.get_sample_value(names.STORE_UP.name) == 1.0
    check_metrics(registry)


def test_undefined_metrics_are_omitted_not_nan(
    repo: Repository, records: list[WindowRecord]
) -> None:
    """The first window warms up the drift baseline: drift metrics are NULL, so absent."""
    repo.write_windows(records[:1])
    registry = registry_of(repo)
    labels = layer(records[0], "4")
    assert math.isnan(records[0].reports["4"].p_value)
    for name in ("bnwatch_layer_drift_p_value", "bnwatch_layer_drift_mean_shift_rms"):
        assert registry.get_sample_value(name, labels) is None
    assert registry.get_sample_value("bnwatch_layer_kl_mean", labels) is not None
    text = check_metrics(registry)
    assert not [line for line in text.splitlines() if line.endswith("NaN")]


def test_counters_and_histogram_are_the_store_totals(
    repo: Repository, records: list[WindowRecord]
) -> None:
    repo.write_windows(records)
    repo.write_windows(records[:1])  # a redelivered window is counted once
    registry = registry_of(repo)
    for name in records[0].reports:
        labels = layer(records[0], name)
        reports = [r.reports[name] for r in records]
        samples = sum(r.stats.samples_seen for r in reports)
        batches_seen = sum(r.stats.batches_seen for r in reports)
        assert registry.get_sample_value("bnwatch_windows_total", labels) == len(records)
        assert registry.get_sample_value("bnwatch_samples_total", labels) == samples
        assert registry.get_sample_value("bnwatch_batches_total", labels) == batches_seen
        assert registry.get_sample_value("bnwatch_nonfinite_values_total", labels) == 0
        sizes: Counter[int] = Counter()
        for r in reports:
            sizes.update(r.stats.batch_sizes)
        for bound in (*BATCH_SIZE_BUCKETS, math.inf):
            expected = sum(c for size, c in sizes.items() if size <= bound)
            le = "+Inf" if bound == math.inf else f"{float(bound)}"
            got = registry.get_sample_value("bnwatch_batch_size_bucket", {**labels, "le": le})
            assert got == expected, le
        assert registry.get_sample_value("bnwatch_batch_size_count", labels) == batches_seen
        exact_sum = sum(size * c for size, c in sizes.items())
        assert registry.get_sample_value("bnwatch_batch_size_sum", labels) == exact_sum
    check_metrics(registry)


def test_histogram_covers_the_measured_batches_when_batches_were_sampled(
    repo: Repository,
) -> None:
    """With sample_every=2 only half the batches have a recorded size: the histogram counts
    the measured batches (_count = the +Inf bucket, as it must be) and sums their sizes."""
    net = small_cnn()
    sink = MemorySink()
    mon = bnwatch.watch(
        net, name="cnn", version="1", store=sink, window_seconds=None, overhead_budget=None,
        sample_every=2,
    )  # fmt: skip
    for x in batches(8):
        net(x)
    mon.close()
    repo.write_windows(sink.windows)
    registry = registry_of(repo)
    labels = {"model": "cnn", "version": "1", "layer": "4"}
    assert registry.get_sample_value("bnwatch_batches_total", labels) == 8
    assert registry.get_sample_value("bnwatch_batch_size_count", labels) == 4
    assert registry.get_sample_value("bnwatch_batch_size_bucket", {**labels, "le": "+Inf"}) == 4
    assert registry.get_sample_value("bnwatch_batch_size_sum", labels) == 4 * 4  # 4 batches of 4
    check_metrics(registry)


def test_monitor_metrics_are_each_sources_latest_account(
    repo: Repository, records: list[WindowRecord]
) -> None:
    other = [
        at_minute(r, i, source="replica:2", monitor={**r.monitor, "windows_dropped": 3.0 + i})
        for i, r in enumerate(records[:2])
    ]
    repo.write_windows([*records, *other])
    registry = CollectorRegistry()  # the records are of today, the other replica's of T0
    registry.register(StoreCollector(repo, source_ttl=timedelta(days=100 * 365)))
    mine = {"model": "cnn", "version": "1", "source": "test:1"}
    theirs = {**mine, "source": "replica:2"}
    last = records[-1]
    assert registry.get_sample_value("bnwatch_monitor_overhead_ratio", mine) == pytest.approx(
        last.monitor["overhead_ratio"]
    )
    assert registry.get_sample_value("bnwatch_monitor_hook_errors_total", mine) == 0
    assert registry.get_sample_value("bnwatch_monitor_windows_dropped_total", theirs) == 4
    end = registry.get_sample_value("bnwatch_source_last_window_end_timestamp_seconds", theirs)
    assert end == pytest.approx((T0 + timedelta(minutes=2)).timestamp())
    check_metrics(registry)


def test_a_retired_source_leaves_the_export_and_the_store(
    repo: Repository, records: list[WindowRecord]
) -> None:
    # fifty restarts: each replica reports under a new host:pid for a minute, a day apart
    restarts = [
        at_minute(records[0], i * 24 * 60, source=f"replica:{i}", monitor=records[0].monitor)
        for i in range(50)
    ]
    repo.write_windows(restarts)

    def exported(registry: CollectorRegistry) -> set[str]:
        name = "bnwatch_source_last_window_end_timestamp_seconds"
        return {s.labels["source"] for m in registry.collect() for s in m.samples if s.name == name}

    # the sources of the last day of the version's windows, not all fifty
    assert exported(registry_of(repo)) == {"replica:48", "replica:49"}
    week = CollectorRegistry()
    week.register(StoreCollector(repo, source_ttl=timedelta(days=7)))
    assert exported(week) == {f"replica:{i}" for i in range(42, 50)}
    # retention drops the windows and, with them, the sources that have none left
    last_end = restarts[-1].end
    result = bnwatch_compact(repo, now=last_end + timedelta(days=1), drop=timedelta(days=3))
    assert result.windows_dropped == 47 * len(records[0].reports)  # one row per layer
    assert [s.source for s in repo.sources()] == ["replica:47", "replica:48", "replica:49"]
    with pytest.raises(ConfigError, match="source_ttl"):
        StoreCollector(repo, source_ttl=timedelta(0))


def bnwatch_compact(repo: Repository, *, now: Any, drop: timedelta) -> Any:
    from bnwatch.store.rollup import compact

    return compact(
        repo.engine,
        older_than=timedelta(days=3650),
        resolution=timedelta(hours=1),
        drop_older_than=drop,
        now=now,
    )


def test_alerts_active_counts_open_alerts_and_zero_fills_every_kind(
    repo: Repository, records: list[WindowRecord]
) -> None:
    template = records[-1]
    drifted = with_layers(template, {"1": {"drifted": True}, "4": {"drifted": True}})
    windows = [at_minute(drifted, i) for i in range(2)]
    # cnn@2's window ends with cnn@1's last: neither replaced the other
    other_version = at_minute(template, 1, version="2")
    repo.write_windows([*windows, other_version])
    engine = AlertEngine(AlertConfig(drift=Rule(open_after=2, resolve_after=2)))
    engine.evaluate(repo, "cnn", "1", now=windows[-1].end)
    engine.check_silence(repo, now=T0 + timedelta(days=1))  # both versions went silent
    assert {(a.version, a.kind) for a in repo.alerts(state="open")} == {
        ("1", "drift"),
        ("1", "no_data"),
        ("2", "no_data"),
    }
    registry = registry_of(repo)

    def active(version: str, kind: str) -> float | None:
        labels = {"model": "cnn", "version": version, "kind": kind}
        return registry.get_sample_value("bnwatch_alerts_active", labels)

    assert active("1", "drift") == 2  # two layers drifted
    assert active("1", "no_data") == 1
    assert active("2", "no_data") == 1
    for kind in names.ALERT_KINDS:
        if kind not in ("drift", "no_data"):
            assert active("1", kind) == 0
        if kind != "no_data":
            assert active("2", kind) == 0
    check_metrics(registry)


def test_recalibrations_are_counted_per_status_and_the_oldest_pending_dated(
    repo: Repository, records: list[WindowRecord]
) -> None:
    repo.write_windows([records[0], at_minute(records[0], 0, version="2")])
    first = repo.start_recalibration("cnn", "1", method="precise")
    second = repo.start_recalibration("cnn", "1", method="mix")
    done = repo.start_recalibration("cnn", "1", method="precise")
    repo.finish_recalibration(done, status="failed", outcome={"error": "x"})
    registry = registry_of(repo)

    def count(version: str, status: str) -> float | None:
        labels = {"model": "cnn", "version": version, "status": status}
        return registry.get_sample_value("bnwatch_recalibrations", labels)

    assert [count("1", s) for s in names.RECALIBRATION_STATUSES] == [2, 0, 0, 1, 0]
    assert [count("2", s) for s in names.RECALIBRATION_STATUSES] == [0] * 5  # zero-filled
    oldest = registry.get_sample_value(
        names.RECALIBRATION_OLDEST_PENDING.name, {"model": "cnn", "version": "1"}
    )
    assert oldest == repo.recalibration(first).created_at.timestamp()
    assert (
        registry.get_sample_value(
            names.RECALIBRATION_OLDEST_PENDING.name, {"model": "cnn", "version": "2"}
        )
        is None
    )  # absent, not 0: nothing pending
    for rid in (first, second):
        repo.finish_recalibration(rid, status="rejected", outcome={})
    assert count("1", "pending") == 0 and count("1", "rejected") == 2
    check_metrics(registry)


def test_an_empty_store_exports_only_that_it_is_up(repo: Repository) -> None:
    registry = registry_of(repo)
    text = check_metrics(registry)
    assert registry.get_sample_value("bnwatch_store_up") == 1.0
    assert "bnwatch_layer_kl_mean{" not in text


def test_a_store_error_yields_store_up_zero_and_recovers(
    db_url: str, records: list[WindowRecord], caplog: pytest.LogCaptureFixture
) -> None:
    """A database without the schema (migrations not run) fails every read; the scrape still
    succeeds with bnwatch_store_up 0, and comes back once the schema is there."""
    engine = create_engine(db_url)  # no schema created
    collector = StoreCollector(Repository(engine))
    registry = CollectorRegistry()
    registry.register(collector)
    with caplog.at_level("WARNING", logger="bnwatch.export"):
        for _ in range(3):
            assert registry.get_sample_value("bnwatch_store_up") == 0.0
    assert len([r for r in caplog.records if "reading the store failed" in r.message]) == 1
    text = check_metrics(registry)
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        "bnwatch_store_up 0.0"
    ]
    Repository(engine_for(db_url)).write_windows(records)
    assert registry.get_sample_value("bnwatch_store_up") == 1.0
    assert registry.get_sample_value("bnwatch_windows_total", layer(records[0], "1")) == 3
    engine.dispose()


def test_an_unreachable_database_yields_store_up_zero() -> None:
    engine = create_engine("postgresql://postgres@127.0.0.1:9/none?connect_timeout=2")
    registry = CollectorRegistry()
    registry.register(StoreCollector(Repository(engine)))  # describe() never touches the store
    assert registry.get_sample_value("bnwatch_store_up") == 0.0
    engine.dispose()


def test_a_scrape_is_one_query_per_read_and_decodes_no_channel_arrays(
    repo: Repository, records: list[WindowRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.write_windows(records)
    registry = registry_of(repo)
    registry.get_sample_value("bnwatch_store_up")  # connect once

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a scrape decoded per-channel arrays")

    import bnwatch.store.repository as repository

    monkeypatch.setattr(repository, "decode_moments", forbidden)
    monkeypatch.setattr(repository, "decode_arrays", forbidden)
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    sa.event.listen(repo.engine, "before_cursor_execute", count)
    try:
        assert registry.get_sample_value("bnwatch_store_up") == 1.0
    finally:
        sa.event.remove(repo.engine, "before_cursor_execute", count)
    assert len(statements) == 5, statements


def test_describe_names_every_family_so_duplicates_are_refused(repo: Repository) -> None:
    registry = registry_of(repo)
    with pytest.raises(DuplicateTimeseries):
        registry.register(StoreCollector(repo))
    described = {m.name for m in StoreCollector(repo).describe()}
    assert "bnwatch_samples" in described  # counter families drop _total
    restricted = registry.restricted_registry(["bnwatch_store_up"])
    assert [m.name for m in restricted.collect()] == ["bnwatch_store_up"]


def test_exposition_is_promtool_clean(repo: Repository, records: list[WindowRecord]) -> None:
    binary("promtool")  # skip (fail in CI) without it, visibly
    repo.write_windows(records)
    text = check_metrics(registry_of(repo))
    assert "bnwatch_layer_kl_mean{" in text
