"""MonitorExporter: a Sink that exports every closed window, in one process and in many."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, Histogram, generate_latest

import bnwatch
from bnwatch.errors import ConfigError
from bnwatch.export import names
from bnwatch.export.monitor import MULTIPROCESS_MODES, MonitorExporter, _observe_many
from bnwatch.export.store import StoreCollector
from bnwatch.schema import WindowRecord
from bnwatch.sink import MemorySink, Sink
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.export.helpers import (
    ROOT,
    binary,
    check_exposition,
    check_metrics,
    samples,
    scrape,
)
from tests.store.helpers import batches, record_windows, small_cnn


@pytest.fixture(scope="module")
def records() -> list[WindowRecord]:
    return record_windows(3)


@pytest.fixture
def exporter() -> Iterator[MonitorExporter]:
    exp = MonitorExporter(MemorySink(), registry=CollectorRegistry())
    yield exp
    exp.close()


def layer(record: WindowRecord, name: str) -> dict[str, str]:
    return {"model": record.model, "version": record.version, "layer": name}


def test_it_is_a_sink_that_forwards_every_window(
    exporter: MonitorExporter, records: list[WindowRecord]
) -> None:
    assert isinstance(exporter, Sink)
    for r in records:
        exporter.write(r)
    assert isinstance(exporter.inner, MemorySink)
    assert exporter.inner.windows == records
    assert exporter.dropped == 0
    assert MonitorExporter().dropped == 0  # export only


def test_exports_what_the_store_collector_exports(
    tmp_path: Path, exporter: MonitorExporter, records: list[WindowRecord]
) -> None:
    """Same windows, same samples: the in-process exporter and the store's collector agree on
    every name, label set and value (counters' _created and the store-only families aside)."""
    for r in records:
        exporter.write(r)
    engine = engine_for(f"sqlite:///{tmp_path / 'store.db'}")
    repo = Repository(engine)
    repo.write_windows(records)
    from_store = CollectorRegistry()
    from_store.register(StoreCollector(repo))
    store = samples(check_metrics(from_store))
    monitor = samples(check_metrics(exporter.registry))
    skip = {spec.name for spec in names.STORE_ONLY}
    store = {k: v for k, v in store.items() if k[0] not in skip}
    monitor = {k: v for k, v in monitor.items() if not k[0].endswith("_created")}
    assert monitor.keys() == store.keys()
    for key, value in store.items():
        assert monitor[key] == pytest.approx(value, rel=1e-9, abs=1e-6), key
    assert len({k[0] for k in monitor}) > 25
    engine.dispose()


def test_the_thresholds_in_a_monitors_account_are_not_exported(
    tmp_path: Path, exporter: MonitorExporter, records: list[WindowRecord]
) -> None:
    """A window's account names its DriftConfig (``drift_<field>``): configuration, not a
    measurement -- neither exporter turns those keys into series, nor trips over them."""
    assert all(k in r.monitor for r in records for k in ("drift_alpha", "drift_min_shift"))
    for r in records:
        exporter.write(r)
    engine = engine_for(f"sqlite:///{tmp_path / 'store.db'}")
    Repository(engine).write_windows(records)
    from_store = CollectorRegistry()
    from_store.register(StoreCollector(Repository(engine)))
    for registry in (exporter.registry, from_store):
        text = generate_latest(registry).decode()
        assert "bnwatch_monitor_overhead_ratio{" in text
        for field in ("alpha", "channel_fdr", "min_shift", "min_log_ratio", "warmup"):
            assert field not in text
    assert exporter.dropped == 0
    engine.dispose()


def test_exposition_is_promtool_clean(
    exporter: MonitorExporter, records: list[WindowRecord]
) -> None:
    binary("promtool")  # skip (fail in CI) without it, visibly
    for r in records:
        exporter.write(r)
    assert "bnwatch_batch_size_bucket{" in check_metrics(exporter.registry)


def test_undefined_values_are_removed_in_one_process(
    exporter: MonitorExporter, records: list[WindowRecord]
) -> None:
    labels = layer(records[0], "4")
    exporter.write(records[1])
    p_value = exporter.registry.get_sample_value("bnwatch_layer_drift_p_value", labels)
    assert p_value == pytest.approx(records[1].reports["4"].p_value)
    exporter.write(records[0])  # warming up: no drift metrics
    assert exporter.registry.get_sample_value("bnwatch_layer_drift_p_value", labels) is None
    kl = exporter.registry.get_sample_value("bnwatch_layer_kl_mean", labels)
    assert kl == pytest.approx(records[0].reports["4"].kl_mean)


def test_monitor_counters_add_what_is_new_in_the_monitors_running_totals(
    exporter: MonitorExporter, records: list[WindowRecord]
) -> None:
    template = records[0]
    reported = [(0, 0), (2, 1), (5, 1), (1, 0)]  # the last: a restarted monitor
    for dropped, errors in reported:
        monitor = {**template.monitor, "windows_dropped": dropped, "hook_errors": errors}
        exporter.write(dataclasses.replace(template, monitor=monitor))
    labels = {"model": "cnn", "version": "1", "source": template.source}
    registry = exporter.registry
    assert registry.get_sample_value("bnwatch_monitor_windows_dropped_total", labels) == 6
    assert registry.get_sample_value("bnwatch_monitor_hook_errors_total", labels) == 1
    ratio = registry.get_sample_value("bnwatch_monitor_overhead_ratio", labels)
    assert ratio == pytest.approx(template.monitor["overhead_ratio"])
    end = registry.get_sample_value("bnwatch_source_last_window_end_timestamp_seconds", labels)
    assert end == pytest.approx(template.end.timestamp())


def test_a_failing_export_never_keeps_a_window_from_its_sink(
    exporter: MonitorExporter, records: list[WindowRecord], caplog: pytest.LogCaptureFixture
) -> None:
    bad = dataclasses.replace(records[0], monitor={"windows_dropped": "many"})  # type: ignore[dict-item]
    with caplog.at_level(logging.ERROR, logger="bnwatch.export"):
        exporter.write(bad)
        exporter.write(bad)
    assert isinstance(exporter.inner, MemorySink)
    assert exporter.inner.windows == [bad, bad]
    assert len(caplog.records) == 1  # logged once


def test_bulk_observation_equals_one_observe_per_batch() -> None:
    registry = CollectorRegistry()
    hist = Histogram("h", "h", ["k"], registry=registry, buckets=(1, 4, 16, math.inf))
    for size, count in ((1, 3), (3, 1000), (4, 2), (17, 5)):
        _observe_many(hist.labels("bulk"), size, count)
        for _ in range(count):
            hist.labels("loop").observe(size)
    text = generate_latest(registry).decode()
    got = {k: v for k, v in samples(text).items() if ("k", "bulk") in k[1]}
    for (name, labels), value in got.items():
        loop = frozenset({*(labels - {("k", "bulk")}), ("k", "loop")})
        if not name.endswith("_created"):
            assert samples(text)[(name, loop)] == value, name
    assert registry.get_sample_value("h_count", {"k": "bulk"}) == 1010


def test_serve_exposes_the_metrics_and_close_stops_it(records: list[WindowRecord]) -> None:
    inner = MemorySink()
    exporter = MonitorExporter(inner)
    exporter.write(records[-1])
    server = exporter.serve(0)
    assert server is not None
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    text = scrape(url)
    kl = samples(text)[("bnwatch_layer_kl_mean", frozenset(layer(records[-1], "4").items()))]
    assert kl == pytest.approx(records[-1].reports["4"].kl_mean)
    with pytest.raises(OSError, match="in use"):
        MonitorExporter().serve(server.server_port)  # one process: a taken port is an error
    exporter.close()
    with pytest.raises(urllib.error.URLError):
        scrape(url)


def test_a_watched_model_exports_through_the_exporter() -> None:
    net = small_cnn()
    exporter = MonitorExporter(MemorySink())
    with (
        bnwatch.watch(
            net, name="cnn", version="1", store=exporter, window_seconds=None, overhead_budget=None
        ) as mon,
        torch.inference_mode(),
    ):
        for x in batches(5):
            net(x)
        mon.flush()
    labels = {"model": "cnn", "version": "1", "layer": "4"}
    assert exporter.registry.get_sample_value("bnwatch_batches_total", labels) == 5
    assert exporter.registry.get_sample_value("bnwatch_samples_total", labels) == 20
    assert exporter.registry.get_sample_value("bnwatch_batch_size_sum", labels) == 20
    check_metrics(exporter.registry)


def test_multiprocess_mode_must_be_chosen_before_prometheus_client_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = (
        "import os, prometheus_client\n"
        f"os.environ['PROMETHEUS_MULTIPROC_DIR'] = {str(tmp_path)!r}\n"
        "from bnwatch.export.monitor import MonitorExporter\n"
        "MonitorExporter()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and "PROMETHEUS_MULTIPROC_DIR" in result.stderr
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(ConfigError):  # this process imported it without the variable
        MonitorExporter()


def test_every_gauge_has_a_multiprocess_mode() -> None:
    gauges = {s.name for s in names.ALL_METRICS if s.type == "gauge"}
    not_a_monitors = {spec.name for spec in (*names.STORE_ONLY, *names.SERVICE_ONLY)}
    assert set(MULTIPROCESS_MODES) == gauges - not_a_monitors


def test_multiprocess_aggregates_two_writer_processes(tmp_path: Path) -> None:
    """Two processes export windows of one model; a third serves the aggregate.

    Counters sum over both; layer gauges are the most recent window (the second writer's),
    and fall back to the first writer's once the second is marked dead; the layer's last
    window end is the max over both, dead or alive; the dead writer's source gauges vanish
    but its counters stay."""
    first = record_windows(2, seed=1, source="worker:1")
    second = record_windows(3, seed=2, source="worker:2")
    second = [
        dataclasses.replace(r, monitor={**r.monitor, "windows_dropped": float(i)})
        for i, r in enumerate(second)
    ]
    paths = []
    for i, recs in enumerate((first, second)):
        path = tmp_path / f"records{i}.pkl"
        path.write_bytes(pickle.dumps(recs))
        paths.append(str(path))
    mpdir = tmp_path / "multiproc"
    mpdir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mpdir)}
    result = subprocess.run(
        [sys.executable, "-m", "tests.export.multiprocess_worker", "serve", *paths],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["sibling_serve"] is None
    assert len(set(out["pids"])) == 2
    for text in (out["before"], out["after"]):
        check_exposition(text)
    before, after = samples(out["before"]), samples(out["after"])

    def value(got: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
              **labels: str) -> float | None:  # fmt: skip
        return got.get((name, frozenset(labels.items())))

    for name in ("1", "4", "7"):
        lab = layer(first[0], name)
        for got in (before, after):
            samples_total = sum(r.reports[name].stats.samples_seen for r in first + second)
            assert value(got, "bnwatch_samples_total", **lab) == samples_total
            assert value(got, "bnwatch_windows_total", **lab) == 5
            assert value(got, "bnwatch_batch_size_count", **lab) == 20
            assert value(got, "bnwatch_batch_size_sum", **lab) == 80
            end = value(got, "bnwatch_layer_last_window_end_timestamp_seconds", **lab)
            assert end == pytest.approx(second[-1].end.timestamp())
        kl_before = value(before, "bnwatch_layer_kl_mean", **lab)
        assert kl_before == pytest.approx(second[-1].reports[name].kl_mean)
        kl_after = value(after, "bnwatch_layer_kl_mean", **lab)
        assert kl_after == pytest.approx(first[-1].reports[name].kl_mean)
    src1 = {"model": "cnn", "version": "1", "source": "worker:1"}
    src2 = {**src1, "source": "worker:2"}
    overhead = "bnwatch_monitor_overhead_ratio"
    assert value(before, overhead, **src2) == pytest.approx(second[-1].monitor["overhead_ratio"])
    assert value(after, overhead, **src2) is None  # the dead worker's gauge is gone
    assert value(after, overhead, **src1) == pytest.approx(first[-1].monitor["overhead_ratio"])
    last_end = "bnwatch_source_last_window_end_timestamp_seconds"
    assert value(after, last_end, **src2) is None
    assert value(after, last_end, **src1) == pytest.approx(first[-1].end.timestamp())
    for got in (before, after):
        assert value(got, "bnwatch_monitor_windows_dropped_total", **src2) == 2
        assert value(got, "bnwatch_monitor_windows_dropped_total", **src1) == 0


def test_watch_serves_its_metrics_on_a_port() -> None:
    import urllib.request

    import torch

    from tests.store.helpers import batches, small_cnn

    net = small_cnn()
    mon = bnwatch.watch(
        net, name="cnn", version="1", window_seconds=None, overhead_budget=None, metrics_port=0
    )
    with torch.no_grad():
        for x in batches(3):
            net(x)
    mon.flush()
    (url,) = mon.sink.urls  # type: ignore[attr-defined]
    assert url.startswith("http://127.0.0.1:")
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'bnwatch_samples_total{layer="1",model="cnn",version="1"} 12.0' in text
    mon.close()


def test_watch_serves_its_metrics_on_the_address_asked() -> None:
    import urllib.request

    from tests.store.helpers import small_cnn

    # 127.0.0.1 by default; the address asked otherwise ("0.0.0.0" in production; another
    # loopback address here, which no other host can reach either)
    mon = bnwatch.watch(small_cnn(), window_seconds=None, metrics_port=0, metrics_addr="127.0.0.2")
    try:
        (url,) = mon.sink.urls  # type: ignore[attr-defined]
        assert url.startswith("http://127.0.0.2:")
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
    finally:
        mon.close()
    with pytest.raises(ConfigError, match="metrics_addr"):
        bnwatch.watch(small_cnn(), window_seconds=None, metrics_port=0, metrics_addr="")


def test_watch_on_a_metrics_port_in_use_says_what_to_do() -> None:
    """Several worker processes each watching with one metrics_port: the second one's plain
    ``Address already in use`` did not say that multi-process mode shares one endpoint."""
    import socket

    from tests.store.helpers import small_cnn

    net = small_cnn()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use") as info:
            bnwatch.watch(net, window_seconds=None, metrics_port=port)
    assert "PROMETHEUS_MULTIPROC_DIR" in str(info.value) and "metrics_port" in str(info.value)
    assert not any(m._forward_pre_hooks for m in net.modules())  # nothing left attached


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def test_watch_run_again_on_a_fixed_metrics_port_takes_the_port_over() -> None:
    """A notebook cell or a reloaded module runs ``watch(..., metrics_port=P)`` again: the old
    monitor held P, so the new exporter's bind failed (blaming another program) and the old
    monitor stayed open.  The new monitor now serves on P, and its counters go on."""
    net = small_cnn()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    kwargs = dict(name="cnn", version="1", window_seconds=None, overhead_budget=None)
    first = bnwatch.watch(net, metrics_port=port, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        net(next(iter(batches(1))))
    first.flush()
    assert 'bnwatch_windows_total{layer="1",model="cnn",version="1"} 1.0' in _scrape(url)
    second = bnwatch.watch(net, metrics_port=port, **kwargs)  # type: ignore[arg-type]
    try:
        assert first.closed and not first.sink.serving(port)  # type: ignore[attr-defined]
        assert second.sink.urls == [url]  # type: ignore[attr-defined]
        with torch.no_grad():
            net(next(iter(batches(1))))
        second.flush()
        assert 'bnwatch_windows_total{layer="1",model="cnn",version="1"} 2.0' in _scrape(url)
    finally:
        second.close()
    with pytest.raises(urllib.error.URLError):  # closing the new one stops the server
        _scrape(url)


def test_watch_on_a_port_an_open_monitor_serves_says_so() -> None:
    """Another model's open monitor of this process on the port: the error names it, not
    "another program"; nothing of the failed watch() stays attached."""
    port = _free_port()
    other = bnwatch.watch(small_cnn(), name="a", window_seconds=None, metrics_port=port)
    net = small_cnn()
    try:
        with pytest.raises(OSError, match="in use by an open monitor of this process"):
            bnwatch.watch(net, name="b", window_seconds=None, metrics_port=port)
        assert not any(m._forward_pre_hooks for m in net.modules())
        assert other.sink.serving(port)  # type: ignore[attr-defined]
    finally:
        other.close()


def test_a_successor_shares_its_predecessors_metrics() -> None:
    first = MonitorExporter()
    with pytest.raises(ValueError, match="exclusive"):
        MonitorExporter(registry=CollectorRegistry(), succeeding=first)
    second = MonitorExporter(succeeding=first)
    assert second.registry is first.registry and second._samples is first._samples
