"""The store benchmark runs end to end and its windows have ResNet-50's BatchNorm layers.

Timings are never asserted: the smoke run checks that every path stored every window (rows
= windows × layers) and that the byte ratios are sensible numbers.  SQLite always runs;
PostgreSQL runs when ``BNWATCH_TEST_POSTGRES_URL`` is set (the benchmark creates and drops
its own database there) and is skipped otherwise -- except in CI, where it fails.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import torch

from bnwatch.sink import QUEUE_BYTES, WindowQueue
from bnwatch.store.migrate import engine_for

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import overhead, store  # noqa: E402

PG_ENV = "BNWATCH_TEST_POSTGRES_URL"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _postgres_admin_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        message = f"{PG_ENV} is not set: cannot run the store benchmark on PostgreSQL"
        if _in_ci():
            pytest.fail(message + " (CI requires it)")
        pytest.skip(message)
    return url


def test_layers_are_resnet50_batchnorm_layers() -> None:
    layers = store.resnet50_bn_layers()
    assert len(layers) == store.RESNET50_BN_LAYERS == 53
    assert sum(layer.channels for layer in layers) == store.RESNET50_BN_CHANNELS == 26_560
    model = overhead.resnet50()
    expected = [
        (name, module.num_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
    ]
    assert [(layer.name, layer.channels) for layer in layers] == expected
    assert {layer.side for layer in layers} == {112, 56, 28, 14, 7}


def test_records_are_fresh_windows_over_prebuilt_reports() -> None:
    layers = store.resnet50_bn_layers()[:3]
    reports = store.build_reports(layers, variants=2, seed=1)
    assert [list(r) for r in reports] == [[layer.name for layer in layers]] * 2
    for report_set in reports:
        for layer, report in zip(layers, report_set.values(), strict=True):
            assert report.channels == layer.channels
            assert report.n_samples == store.SAMPLES_PER_WINDOW
            assert report.baseline == "warmup"
            assert math.isfinite(report.p_value)
            assert math.isfinite(report.gap_p_value)
    factory = store.RecordFactory(reports)
    records = factory.make(4)
    assert len({r.uid for r in records}) == 4
    assert len({r.start for r in records}) == 4
    assert records[0].reports is records[2].reports is reports[0]
    assert records[1].reports is reports[1]


def test_the_writers_queue_holds_a_whole_round_of_resnet50_windows() -> None:
    """The benchmark writes a round in one burst; the default queue bound (256 MiB, about 46
    ResNet-50 windows) would drop part of the default 96, so its writers get a bound that
    holds the round -- checked with the queue the writer uses."""
    reports = store.build_reports(store.resnet50_bn_layers(), variants=1)
    records = store.RecordFactory(reports).make(store.DEFAULT_RECORDS + 1)
    assert sum(r.nbytes for r in records) > QUEUE_BYTES
    q = WindowQueue(1000, store.burst_bytes(records))
    for record in records:
        q.put_nowait(record)
    assert q.qsize() == len(records)


def _check_smoke(results: dict[str, Any], backends: list[str], json_path: Path, table: str) -> None:
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))
    meta = results["meta"]
    assert (meta["bn_layers"], meta["bn_channels"]) == (53, 26_560)
    assert meta["raw_bytes_per_window"] == 13 * 8 * 26_560
    assert 0 < meta["encoded_bytes_per_window"] < meta["raw_bytes_per_window"]
    # reservoirs of 2 float32 rows per layer (watch's default for ResNet-50): reported apart
    assert meta["reservoir_rows"] == 2
    assert meta["reservoir_bytes_per_window"] > 2 * 4 * 26_560
    rows = results["results"]
    paths = [
        (store.REPOSITORY, 1, 1),
        (store.REPOSITORY, 2, 1),
        (store.WRITER, 2, 1),
        (store.DRIVER, 2, 1),
    ]
    # PostgreSQL only: 2 replica processes at once (the smoke run's cap), and the pglz row
    compared = {"sqlite": [], "postgresql": [(store.REPLICAS, 2, 2), (store.PGLZ, 2, 1)]}
    assert [(r["backend"], r["path"], r["batch"], r["processes"]) for r in rows] == [
        (backend, *path) for backend in backends for path in paths + compared[backend]
    ]
    for row in rows:
        assert row["windows"] == 2
        assert row["complete"]
        assert row["dropped_or_rejected"] == 0
        assert row["rows_stored"] == row["rows_expected"] == 2 * 53
        assert math.isfinite(row["windows_per_s"]) and row["windows_per_s"] > 0
        assert math.isfinite(row["bytes_ratio"]) and row["bytes_ratio"] > 0
        assert math.isfinite(row["stored_bytes_per_window"])
        assert row["stored_bytes"] > 0
        assert row["reservoir_bytes_per_window"] == meta["reservoir_bytes_per_window"]
        assert row["statistics_bytes_per_window"] + row["reservoir_bytes_per_window"] == (
            pytest.approx(row["stored_bytes_per_window"])
        )
        assert row["bytes_ratio"] == pytest.approx(
            row["statistics_bytes_per_window"] / row["raw_bytes_per_window"]
        )
        assert (row["target_windows_per_s"] is not None) == (row["backend"] == "postgresql")
    for backend in backends:  # every row is also a share of its backend's driver ceiling
        mine = [r for r in rows if r["backend"] == backend]
        (driver,) = [r for r in mine if r["path"] == store.DRIVER]
        assert driver["driver_ratio"] == 1.0
        for row in mine:
            assert row["driver_ratio"] == pytest.approx(
                row["windows_per_s"] / driver["windows_per_s"]
            )
    for backend in backends:
        assert backend in table
    assert ("2 replicas" in table) == ("postgresql" in backends)


def test_smoke_run_on_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "store.json"
    results = store.main(["--smoke", "--quiet", "--backends", "sqlite", "--json", str(out)])
    _check_smoke(results, ["sqlite"], out, capsys.readouterr().out)


def test_smoke_run_on_postgresql(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    admin_url = _postgres_admin_url()
    out = tmp_path / "store.json"
    backends = ["--backends", "sqlite", "postgresql", "--postgres-url", admin_url]
    results = store.main(["--smoke", "--quiet", *backends, "--json", str(out)])
    _check_smoke(results, ["sqlite", "postgresql"], out, capsys.readouterr().out)
    database = results["meta"]["databases"]["postgresql"]
    assert database.startswith("bnwatch_bench_")
    engine = sa.create_engine(sa.make_url(admin_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            left = conn.execute(
                sa.text("SELECT count(*) FROM pg_database WHERE datname = :name"),
                {"name": database},
            ).scalar_one()
    finally:
        engine.dispose()
    assert left == 0, f"the benchmark left its database {database} behind"


def test_replicas_are_counted_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    """``--replicas`` sets the processes of the PostgreSQL row (0 skips it, the smoke run caps
    it at 2); a negative count is refused with what is expected."""
    assert store.parse_args([]).replicas == store.DEFAULT_REPLICAS == 4
    assert store.parse_args(["--replicas", "0"]).replicas == 0
    assert store.parse_args(["--smoke"]).replicas == 2
    with pytest.raises(SystemExit) as exit_info:
        store.parse_args(["--replicas", "-1"])
    assert exit_info.value.code == 2
    assert "--replicas must be >= 0, got -1" in capsys.readouterr().err


def test_the_pglz_row_writes_with_the_storage_before_migration_0006() -> None:
    """The ``pglz`` row sets the array columns 0006 made ``EXTERNAL`` back to ``EXTENDED``
    (pglz) while it writes, on the head schema, and restores them after."""
    admin = _postgres_admin_url()

    def storage(meter: store.Meter) -> dict[tuple[str, str], str]:
        with meter.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT c.relname, a.attname, a.attstorage FROM pg_attribute a "
                    "JOIN pg_class c ON c.oid = a.attrelid "
                    "WHERE c.relname IN ('windows', 'refs') "
                    "AND a.attname IN ('moments', 'reservoir', 'mean_var')"
                )
            ).all()
        return {(table, column): kind for table, column, kind in rows}

    with store.postgres_database(admin) as url:
        engine = engine_for(url)  # the head schema
        engine.dispose()
        meter = store.Meter("postgresql", url, None)
        try:
            head = storage(meter)
            assert len(head) == 5 and set(head.values()) == {"e"}  # EXTERNAL
            with meter.pglz_storage():
                compressed = {k for k, kind in storage(meter).items() if kind == "x"}  # EXTENDED
            # windows.moments was EXTERNAL from 0001 on: 0006 changed the other four
            assert compressed == {("windows", "reservoir")} | {
                ("refs", c) for c in ("mean_var", "moments", "reservoir")
            }
            assert storage(meter) == head
        finally:
            meter.engine.dispose()
