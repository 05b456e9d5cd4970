"""Writing and reading windows: exact round trips, merges, idempotence, rejection."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnwatch
from bnwatch.codec import encode_moments
from bnwatch.errors import BnwatchError, ConfigError
from bnwatch.schema import WindowRecord
from bnwatch.sink import MemorySink
from bnwatch.stats import Reservoir
from bnwatch.store import repository
from bnwatch.store.engine import create_engine
from bnwatch.store.migrate import engine_for
from bnwatch.store.models import Window
from bnwatch.store.repository import (
    ChannelMismatchError,
    Repository,
    UnstorableWindowError,
    _insert_claimed,
    moments_equal,
    window_row,
)
from tests.store.helpers import batches, record_windows, renamed, small_cnn, wide_cnn


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    engine = engine_for(db_url)
    yield Repository(engine)
    engine.dispose()


def test_windows_round_trip_bit_for_bit(repo: Repository) -> None:
    records = record_windows(3)
    assert repo.write_windows(records) == 9
    stored = repo.windows("cnn", "1", with_stats=True)
    assert [w.layer for w in stored] == ["1"] * 3 + ["4"] * 3 + ["7"] * 3
    for w in stored:
        rec = next(r for r in records if abs((r.end - w.end).total_seconds()) < 1e-6)
        report = rec.reports[w.layer]
        assert w.stats is not None
        assert moments_equal(w.stats.moments, report.stats.moments)
        assert w.stats.batch_sizes == report.stats.batch_sizes
        assert w.n_samples == report.n_samples == 16
        assert w.gap == report.gap
        assert w.drifted == report.drifted
        for name in ("kl_mean", "d_rms", "log_r_rms", "gap_p_value", "frac_gap"):
            assert getattr(w, name) == pytest.approx(getattr(report, name), rel=1e-12, nan_ok=True)
        assert w.source == "test:1"
        assert w.start == rec.start
    layers = repo.layers("cnn", "1")
    assert [(lr.name, lr.kind, lr.channels, lr.depth) for lr in layers] == [
        ("1", "BatchNorm2d", 6, 0),
        ("4", "BatchNorm2d", 4, 1),
        ("7", "BatchNorm1d", 5, 2),
    ]
    (model,) = repo.models()
    assert (model.name, model.version, model.layers, model.windows) == ("cnn", "1", 3, 9)
    latest = repo.latest_windows("cnn", "1")
    assert [w.end for w in latest] == [records[-1].end] * 3


def test_redelivered_windows_are_stored_once(repo: Repository) -> None:
    records = record_windows(2)
    assert repo.write_windows(records) == 6
    assert repo.write_windows(records) == 0
    assert repo.write_windows([renamed(records[0])]) == 3
    assert repo.window_count() == 9


def test_rows_that_exist_after_all_are_skipped_not_copied_twice(repo: Repository) -> None:
    """A claimed window's other rows go in by binary COPY on PostgreSQL, which has no ON
    CONFLICT: should one exist after all, the savepoint is rolled back and the rows go in one
    by one, skipping it -- the new rows are stored, nothing twice, nothing fails."""
    old, new = record_windows(2)
    assert repo.write_windows([old]) == 3
    (model,) = repo.models()
    layer_ids = {layer.name: layer.id for layer in repo.layers("cnn", "1")}
    rows = [
        window_row(record, report, model.id, layer_ids[name], None, None)
        for record in (old, new)
        for name, report in record.reports.items()
    ]
    table: sa.Table = Window.__table__  # type: ignore[assignment]
    with repo.engine.begin() as conn:
        assert _insert_claimed(conn, table, lambda: iter(rows)) == 3
    assert repo.window_count() == 6
    with repo.engine.begin() as conn:  # rows that all exist: none, and no error
        assert _insert_claimed(conn, table, lambda: iter(rows[3:])) == 0
        assert _insert_claimed(conn, table, lambda: iter([])) == 0
    stored = repo.windows("cnn", "1", with_stats=True)
    assert sorted(w.end for w in stored) == sorted([old.end] * 3 + [new.end] * 3)
    for w in stored:
        rec = old if w.end == old.end else new
        assert w.stats is not None
        assert moments_equal(w.stats.moments, rec.reports[w.layer].stats.moments)


def test_a_row_that_cannot_be_made_midway_leaves_nothing_of_the_batch(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are made while the batch is being sent: should making one fail (here: encoding the
    third window's last layer), the error propagates and nothing of the batch is stored."""
    records = record_windows(3)
    calls = {"n": 0}

    def fails_on_the_ninth(moments: Any) -> bytes:
        calls["n"] += 1
        if calls["n"] == 9:  # 3 first rows, then the others: the 9th is the last one
            raise MemoryError("no room for the blob")
        return encode_moments(moments)

    monkeypatch.setattr("bnwatch.store.repository.encode_moments", fails_on_the_ninth)
    with pytest.raises(MemoryError, match="no room"):
        repo.write_windows(records)
    monkeypatch.undo()
    assert repo.window_count() == 0
    assert repo.write_windows(records) == 9


def test_a_batch_is_encoded_a_few_rows_at_a_time(repo: Repository) -> None:
    """A batch never holds all its encoded rows: PostgreSQL's COPY sends each row as it is
    made, SQLite inserts about a megabyte of rows at a time.  With 24 windows of a
    4,096-channel layer (11.8 MB encoded), Python's peak stays under a quarter of them (it
    was all of them and more before)."""
    import tracemalloc

    first, *records = record_windows(25, model=wide_cnn(), name="wide")
    encoded = sum(
        len(row["moments"]) + len(row["reservoir"] or b"")
        for record in records
        for row in [window_row(record, record.reports["3"], 0, 0, None, None)]
    )
    repo.write_windows([first])  # as a running monitor: ids and references known
    tracemalloc.start()
    try:
        assert repo.write_windows(records) == 48
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < encoded / 4, (peak, encoded)


def test_postgresql_inserts_copied_rows_while_the_client_still_sends(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stores each row of the COPY as it arrives, while the client makes the next
    (a binary COPY would otherwise hold up to 1,000 rows in the server's memory and insert
    none before the last had been sent: the two never worked at once).  Seen from a second
    connection: while the sixth wide row of the COPY is being made, the ``windows`` table has
    already grown (before ``COPY_ROW_BY_ROW`` it grew only after the last row)."""
    first, *records = record_windows(9, model=wide_cnn(), name="wide")
    engine = engine_for(postgres_url)
    watcher = engine_for(postgres_url)
    repo = Repository(engine)
    repo.write_windows([first])

    def stored_bytes() -> int:
        with watcher.connect() as conn:
            return int(
                conn.execute(sa.text("SELECT pg_total_relation_size('windows')")).scalar_one()
            )

    seen: dict[str, int] = {}
    made = window_row

    def watched(record: Any, report: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if report.channels == 4096:
            seen["wide"] = seen.get("wide", 0) + 1
            if seen["wide"] == 1:
                seen["before"] = stored_bytes()
            elif seen["wide"] == 6:
                deadline = time.monotonic() + 10.0
                while stored_bytes() <= seen["before"] and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen["during"] = stored_bytes()
        return made(record, report, *args, **kwargs)

    monkeypatch.setattr(repository, "window_row", watched)
    try:
        assert repo.write_windows(records) == 16
    finally:
        engine.dispose()
        watcher.dispose()
    assert seen["wide"] == 8
    assert seen["during"] > seen["before"], seen


def test_a_refused_copy_falls_back_to_insert_and_says_so_once(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Should PostgreSQL refuse COPY (here: as it does under row-level security), the savepoint
    is rolled back and the rows go in by INSERT: every window stored once, a warning once."""
    import psycopg

    def refuse(conn: object, cursor: object, table: str, columns: object) -> dict[str, int]:
        raise psycopg.errors.FeatureNotSupported("COPY FROM not supported with row-level security")

    engine = engine_for(postgres_url)
    repo = Repository(engine)
    monkeypatch.setattr(repository, "_column_oids", refuse)
    monkeypatch.setattr(repository, "_COPY_REFUSED", set())
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        assert repo.write_windows(record_windows(2)) == 6
        assert repo.write_windows(record_windows(2)) == 6
    assert repo.window_count() == 12
    warnings = [r.getMessage() for r in caplog.records if "refused COPY" in r.getMessage()]
    assert len(warnings) == 1 and "row-level security" in warnings[0]
    engine.dispose()


def test_a_server_refusing_the_copy_where_gets_the_rows_by_insert(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that cannot run ``COPY_ROW_BY_ROW`` (``COPY ... WHERE`` came in PostgreSQL 12;
    here a clause this server rejects stands in) refuses the COPY: the rows go in by INSERT."""
    engine = engine_for(postgres_url)
    repo = Repository(engine)
    monkeypatch.setattr(repository, "COPY_ROW_BY_ROW", "WHERE bnwatch_no_such_function()")
    monkeypatch.setattr(repository, "_COPY_REFUSED", set())
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        assert repo.write_windows(record_windows(2)) == 6
    assert repo.window_count() == 6
    warnings = [r.getMessage() for r in caplog.records if "refused COPY" in r.getMessage()]
    assert len(warnings) == 1 and "bnwatch_no_such_function" in warnings[0]
    engine.dispose()


def test_a_connection_lost_mid_copy_raises_sqlalchemys_error_and_writes_nothing(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the store writer retries is a SQLAlchemy error: the server ending the connection in
    the middle of the COPY (the savepoint's rollback then fails) arrives as one, nothing of the
    batch is stored, and the next write goes through on a new connection."""

    def die(conn: object, cursor: Any, table: str, columns: object) -> dict[str, int]:
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        raise AssertionError("the backend survived")

    engine = engine_for(postgres_url)
    repo = Repository(engine)
    monkeypatch.setattr(repository, "_column_oids", die)
    with pytest.raises(sa.exc.OperationalError):
        repo.write_windows(record_windows(1))
    monkeypatch.undo()
    assert repo.window_count() == 0
    assert repo.write_windows(record_windows(1)) == 3
    engine.dispose()


def test_times_read_back_in_utc_whatever_the_databases_time_zone(postgres_url: str) -> None:
    # psycopg answers timestamptz in the session's TimeZone: the dashboard printed New York
    # wall time labelled "UTC", and tables mixed -05:00 with the heatmaps' UTC
    name = sa.make_url(postgres_url).database
    with create_engine(postgres_url).connect() as conn:
        conn.execute(sa.text(f"ALTER DATABASE \"{name}\" SET timezone TO 'America/New_York'"))
        conn.commit()
    engine = engine_for(postgres_url)
    try:
        repo = Repository(engine)
        records = record_windows(1)
        repo.write_windows(records)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SHOW timezone")).scalar_one() == "America/New_York"
        (source,) = repo.sources()
        for when in (
            *(w.end for w in repo.latest_windows("cnn", "1")),
            *(w.start for w in repo.windows("cnn", "1")),
            source.last_window_end,
            source.first_seen,
        ):
            assert when.tzinfo is timezone.utc
        assert source.last_window_end == records[0].end
    finally:
        engine.dispose()


def test_naive_times_are_utc_whatever_the_databases_time_zone(postgres_url: str) -> None:
    # a naive bound went to PostgreSQL as it was, which read it in the session's time zone:
    # New York's, 4 or 5 hours off the UTC the report then printed -- the range selected nothing
    name = sa.make_url(postgres_url).database
    with create_engine(postgres_url).connect() as conn:
        conn.execute(sa.text(f"ALTER DATABASE \"{name}\" SET timezone TO 'America/New_York'"))
        conn.commit()
    engine = engine_for(postgres_url)
    try:
        repo = Repository(engine)
        records = record_windows(3)
        repo.write_windows(records)
        second = records[1].end.replace(tzinfo=None)  # naive, UTC
        later = second + timedelta(hours=1)
        assert len(repo.windows("cnn", "1", start=second, end=later)) == 6
        assert len(repo.windows("cnn", "1", end=second)) == 3
        pooled = repo.production_reservoir("cnn", "1", "4", start=second)
        assert (pooled.windows, pooled.start) == (2, records[1].start)
    finally:
        engine.dispose()


def test_time_bounds_with_any_offset_select_the_same_windows(repo: Repository) -> None:
    # SQLite compares the stored UTC text: a bound written with +02:00 selected nothing there
    records = record_windows(3)
    repo.write_windows(records)
    first, second, _ = sorted(r.end for r in records)
    later = first + timedelta(hours=1)
    plus2 = timezone(timedelta(hours=2))
    for tz in (timezone.utc, plus2):
        assert len(repo.windows("cnn", "1", start=first.astimezone(tz), end=later)) == 9
        assert len(repo.windows("cnn", "1", start=second.astimezone(tz), end=later)) == 6
        assert len(repo.windows("cnn", "1", start=first, end=second.astimezone(tz))) == 3


def test_concurrent_profiles_get_distinct_versions(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two profile uploads at once both counted a layer's references before either inserted,
    # and both became its version 1: "the newest profile" was ambiguous.  Each writer waits,
    # after counting, for the other (at most 1 s): serialized, the wait times out.
    records = record_windows(2)
    repo.write_windows(records[:1])  # the model version and its layers exist
    profiles = [
        bnwatch.profile(small_cnn(seed), batches(2, seed=seed), name="cnn", version="1")
        for seed in (1, 2)
    ]
    barrier = threading.Barrier(2, timeout=1)
    insert = repository._insert_ignore

    def counted_then_insert(conn: Any, table: Any, rows: Any) -> Any:
        if table.name == "refs":
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
        return insert(conn, table, rows)

    monkeypatch.setattr(repository, "_insert_ignore", counted_then_insert)
    writers = [
        threading.Thread(target=Repository(repo.engine).write_profile, args=(p,)) for p in profiles
    ]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    with repo.engine.connect() as conn:
        versions = conn.execute(
            sa.text("SELECT layer_id, version FROM refs WHERE kind = 'profile'")
        ).all()
    assert len(versions) == 2 * len(records[0].reports)
    assert len(set(versions)) == len(versions)  # no (layer, version) twice


def test_one_layers_merged_windows_are_judged_as_among_all_layers(repo: Repository) -> None:
    # the cross-layer level is alpha / L: asked for one layer, L was 1, and this layer's gap
    # (p between alpha / 3 = 3.3e-4 and alpha) was flagged with ?layer=0 and not without
    torch.manual_seed(17)
    first = torch.nn.BatchNorm1d(8)
    net = torch.nn.Sequential(first, torch.nn.BatchNorm1d(8), torch.nn.BatchNorm1d(8)).eval()
    assert first.running_mean is not None
    with torch.no_grad():
        first.running_mean[0] = 0.19  # channel 0 of the first layer is a little off
    sink = MemorySink()
    mon = bnwatch.watch(
        net, name="m", version="17", store=sink, window_seconds=None, overhead_budget=None
    )
    with torch.no_grad():
        for _ in range(3):
            for _ in range(4):
                net(torch.randn(32, 8))
            mon.flush()
    mon.close()
    repo.write_windows(sink.windows)
    every = {w.layer: w for w in repo.windows("m", "17", resolution=86400)}
    assert sorted(every) == ["0", "1", "2"]
    for name, merged in every.items():
        (one,) = repo.windows("m", "17", layer=name, resolution=86400)
        assert (one.gap, one.drifted) == (merged.gap, merged.drifted)
        assert one.gap_p_value == merged.gap_p_value
    assert 3.3e-4 < every["0"].gap_p_value < 1e-3 and not every["0"].gap  # the case above


def test_references_are_stored_once_and_versioned(repo: Repository) -> None:
    repo.write_windows(record_windows(5))
    with repo.engine.connect() as conn:
        refs = conn.execute(
            sa.text("SELECT kind, count(*) FROM refs GROUP BY kind ORDER BY kind")
        ).all()
    # one running reference per layer; the warm-up baseline of each layer once it was ready
    assert dict(refs) == {"running": 3, "warmup": 3}


def test_a_channel_mismatch_rejects_the_whole_batch(repo: Repository) -> None:
    good = record_windows(1)
    repo.write_windows(good)
    other = record_windows(1, model=small_cnn(width=9), source="test:2")  # layer '1': 9 channels
    fresh = renamed(good[0])
    with pytest.raises(ChannelMismatchError) as info:
        repo.write_windows([fresh, other[0]])
    err = info.value
    assert (err.layer, err.stored, err.found) == ("1", 6, 9)
    assert "layer '1' of cnn@1 has 6 channels in the store but the window has 9" in str(err)
    assert err.index == 1  # type: ignore[attr-defined]
    assert repo.window_count() == 3  # nothing of the rejected batch was written


M = 2**31 - 1


def with_batch_sizes(record: WindowRecord, sizes: dict[int, int]) -> WindowRecord:
    """A copy (fresh uid) whose second layer measured batches of ``sizes``."""
    name = list(record.reports)[1]
    report = record.reports[name]
    n = sum(sizes.values())
    stats = dataclasses.replace(report.stats, batch_sizes=sizes, n_batches=n, batches_seen=n)
    reports = {**record.reports, name: dataclasses.replace(report, stats=stats)}
    return renamed(record, reports=reports)


def at(record: WindowRecord, start: str, end: str) -> WindowRecord:
    return renamed(record, start=datetime.fromisoformat(start), end=datetime.fromisoformat(end))


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (
            lambda r: with_batch_sizes(r, {M: M}),  # each fits; 2**62 samples in all do not
            "layers.4.batch_sizes",
            "layers.4.batch_sizes: the measured batches hold 4611686014132420609 samples "
            "(sum of size x count), more than the 2147483647 one window may hold",
        ),
        (
            lambda r: at(r, "0001-01-01T00:00:00+00:00", "0001-01-01T00:01:00+00:00"),
            "start",
            "start must be from 1970-01-02T00:00:00+00:00 to before 2100-01-01T00:00:00+00:00: "
            "0001-01-01T00:00:00+00:00 is out of range",
        ),
        (
            lambda r: at(r, "2099-12-31T23:00:00+00:00", "2100-01-01T00:00:00+00:00"),
            "end",
            "end must be from 1970-01-02T00:00:00+00:00 to before 2100-01-01T00:00:00+00:00: "
            "2100-01-01T00:00:00+00:00 is out of range",
        ),
    ],
    ids=["measured samples", "year 1", "year 2100"],
)
def test_a_window_the_store_cannot_hold_is_refused_before_anything_is_written(
    repo: Repository, change: Any, field: str, words: str
) -> None:
    """A window of 2**31-1 batches of 2**31-1 samples overflowed layer_totals.measured_samples
    (PostgreSQL: every later window of the layer failed; SQLite: the total became a float);
    windows stamped in year 1 or 9999 were stored and then broke merged reads and
    compaction.  Windows written directly (a StoreSink) are held to the wire's rules."""
    good = record_windows(2)
    repo.write_windows(good[:1])
    totals = repo.totals()
    bad = change(good[1])
    with pytest.raises(UnstorableWindowError) as info:
        repo.write_windows([renamed(good[1]), bad])
    err = info.value
    assert isinstance(err, BnwatchError)
    assert (err.index, err.field, err.uid) == (1, field, bad.uid)
    assert str(err) == f"window {bad.uid} of cnn@1: {words}"
    assert repo.window_count() == 3  # nothing of the batch was written
    assert repo.totals() == totals


def test_windows_at_the_bounds_of_time_merge_into_one_whole_range_and_the_right_hours(
    repo: Repository,
) -> None:
    """The earliest and (nearly) the latest times a window may have: the whole range is one
    merged window (with the first bounds, a window ending on the epoch fell outside it), and a
    window a microsecond past an hour is in that hour (past 2**32 s, float seconds lost it)."""
    first, middle, last = record_windows(3)
    stored = [
        at(first, "1970-01-02T00:00:00+00:00", "1970-01-02T00:00:00+00:00"),
        middle,
        at(last, "2099-12-31T23:00:00+00:00", "2099-12-31T23:00:00.000001+00:00"),
    ]
    repo.write_windows(stored)
    samples = sum(r.reports["4"].n_samples for r in stored)
    ((whole,), hourly) = repo.layer_reports_at("cnn", "1", "4", resolutions=[None, 3600])
    assert whole[1].n_samples == samples
    latest, report = hourly[-1]
    assert latest.start == datetime(2099, 12, 31, 23, tzinfo=timezone.utc)
    assert latest.end == datetime(2100, 1, 1, tzinfo=timezone.utc)
    assert report.n_samples == stored[2].reports["4"].n_samples


def test_the_largest_measured_samples_a_window_may_hold_are_stored_exactly(
    repo: Repository,
) -> None:
    record = with_batch_sizes(record_windows(1)[0], {M - 1: 1, 1: 1})  # 2**31-1 samples
    repo.write_windows([record, with_batch_sizes(record, {M: 1})])
    (totals,) = [t for t in repo.totals() if t.layer == "4"]
    assert totals.measured_samples == 2 * M
    assert isinstance(totals.measured_samples, int)  # not a float, on SQLite either
    buckets: dict[int | None, int] = {b: 0 for b in (2, 4, 8, 16, 32, 64, 128, 256)}
    assert dict(totals.batch_size_buckets) == {**buckets, 1: 1, None: 2}


def test_time_range_and_exact_merges_to_a_coarser_resolution(repo: Repository) -> None:
    """Merging stored windows gives what one window over all the data gives."""
    net = small_cnn()
    records = record_windows(4, model=net, warmup_samples=10**6)
    repo.write_windows(records)
    one = bnwatch.watch(
        net,
        name="cnn",
        version="1",
        window_seconds=None,
        overhead_budget=None,
        config=bnwatch.DriftConfig(warmup_samples=10**6, min_samples=4),
    )
    with torch.inference_mode():
        for x in batches(16, seed=0):
            net(x)
    whole = one.flush()
    one.close()
    merged = repo.windows("cnn", "1", resolution=timedelta(days=3650))
    assert len(merged) == 3
    for w in merged:
        ref = whole[w.layer]
        assert w.merged_from == 4
        assert w.stats is not None
        for a, b in zip(w.stats.moments.as_arrays(), ref.stats.moments.as_arrays(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * float(np.max(np.abs(b)) or 1))
        assert w.n_samples == 64
        assert w.gap_p_value == pytest.approx(ref.gap_p_value, rel=1e-6)
        assert w.kl_mean == pytest.approx(ref.kl_mean, rel=1e-9)
        assert w.gap == ref.gap
    middle = repo.windows("cnn", "1", layer="4", start=records[1].end, end=records[3].end)
    assert [w.end for w in middle] == [records[1].end, records[2].end]


def test_unknown_model_is_a_key_error(repo: Repository) -> None:
    with pytest.raises(KeyError, match="no model nope@1"):
        repo.layers("nope", "1")


@pytest.mark.parametrize(
    "url",
    [
        "nonsense",
        "mysql://u@h/db",
        "sqlite://",
        "sqlite:///:memory:",  # each thread (writer, service, alerts) had its own empty one
        "sqlite:///file:x?mode=memory&cache=shared&uri=true",
        "postgresql+nodriver://x",
        42,
    ],
)
def test_unusable_store_urls_fail_at_watch(url: object) -> None:
    with pytest.raises(ConfigError) as info:
        bnwatch.watch(small_cnn(), store=url)  # type: ignore[arg-type]
    assert info.value.argument == "store"


def test_a_sqlite_file_in_a_missing_folder_fails_at_watch(tmp_path: Path) -> None:
    # accepted before: the writer thread then retried "unable to open database file" until
    # close() gave up 30 s later and dropped the window
    missing = tmp_path / "no" / "such"
    with pytest.raises(ConfigError, match=f"{missing} does not: create it first"):
        bnwatch.watch(small_cnn(), store=f"sqlite:///{missing / 'bnwatch.db'}")
    assert not missing.parent.exists()


def test_a_missing_driver_fails_at_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    # accepted before: each window then logged a traceback from the writer thread
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError, match=r"psycopg: missing.*pip install \"psycopg\[binary\]\""):
        bnwatch.watch(small_cnn(), store="postgresql://bnwatch@db.invalid/bnwatch")


def test_the_query_layer_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import bnwatch.store.repository, bnwatch.store.writer, bnwatch.store.rollup\n"
        "import bnwatch.store.migrate\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_a_profile_is_stored_and_loaded_back(db_url: str) -> None:
    net = small_cnn()
    prof = bnwatch.profile(
        net, batches(10, seed=3), name="cnn", version="2", store=db_url, reservoir_size=16
    )
    engine = engine_for(db_url)
    repo = Repository(engine)
    back = repo.load_profile("cnn", "2")
    assert back is not None
    assert list(back.layers) == list(prof.layers)
    for name, lp in prof.layers.items():
        lb = back.layers[name]
        assert moments_equal(lp.stats.moments, lb.stats.moments)
        np.testing.assert_array_equal(lp.reservoir.rows, lb.reservoir.rows)
        assert lb.reservoir.seen == lp.reservoir.seen == 40
        assert lb.stats.batch_sizes == lp.stats.batch_sizes
    # storing the same profile again stores nothing new; the loaded one serves as a reference
    repo.write_profile(prof)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM refs")).scalar_one() == 3
    engine.dispose()
    mon = bnwatch.watch(net, reference=back, window_seconds=None, overhead_budget=None)
    with torch.inference_mode():
        for x in batches(4, seed=4):
            net(x)
    assert all(r.baseline == "profile" for r in mon.flush().values())
    mon.close()


def test_totals_and_sources_count_each_window_once(repo: Repository) -> None:
    records = record_windows(3, source="replica-a") + record_windows(2, seed=5, source="replica-b")
    repo.write_windows(records)
    repo.write_windows(records[:2])  # re-delivered: no double counting
    totals = {t.layer: t for t in repo.totals()}
    assert set(totals) == {"1", "4", "7"}
    for t in totals.values():
        assert (t.windows, t.samples, t.batches) == (5, 80, 20)
        assert dict(t.batch_size_buckets)[4] == 20
        assert sum(n for _, n in t.batch_size_buckets) == 20
    sources = {s.source: s for s in repo.sources()}
    assert sources["replica-a"].windows == 3
    assert sources["replica-b"].windows == 2
    assert sources["replica-a"].last_window_end == records[2].end
    assert sources["replica-a"].overhead_ratio is not None
    latest = repo.latest_metrics()
    assert [w.layer for w in latest] == ["1", "4", "7"]
    assert all(w.end == max(r.end for r in records) for w in latest)


def wide_windows(repo: Repository, count: int, channels: int = 1024) -> list[np.ndarray]:
    """One watched window of a ``channels``-wide layer ``0`` (model wide@1), then ``count``
    copies of its row with reservoirs of 8 random rows of 32 samples each, whose first column
    is the window's number (1, 2, ...); returns every stored window's reservoir rows."""
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(channels)).eval()
    sink = MemorySink()
    with (
        bnwatch.watch(
            net, name="wide", version="1", store=sink, window_seconds=None, overhead_budget=None
        ) as mon,
        torch.inference_mode(),
    ):
        net(torch.randn(16, channels))
        mon.flush()
    repo.write_windows(sink.windows)
    rng = np.random.default_rng(0)
    with repo.engine.begin() as conn:
        (row,) = conn.execute(sa.select(Window.__table__)).mappings().all()
        stored = repository.reservoir_from(row["reservoir"], row["reservoir_seen"], 8)
        kept = [stored.rows]
        copies = []
        for i in range(1, count + 1):
            rows = rng.standard_normal((8, channels)).astype(np.float32)
            rows[:, 0] = i
            kept.append(rows)
            copy = {k: v for k, v in row.items() if k != "id"}
            copy["uid"] = f"copy-{i}"
            copy["end"] = row["end"] + timedelta(seconds=i)
            copies.append(
                {**copy, **repository.reservoir_columns(Reservoir.from_rows(rows, 32, 8))}
            )
        conn.execute(sa.insert(Window), copies)
    return kept


def test_a_long_range_is_pooled_in_bounded_memory(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every chunk's pooled reservoir was kept until the end: 417 MiB for 39,872 windows of a
    256-channel layer (where 5,000 rows take 5 MiB).  Now the pool and one chunk."""
    import tracemalloc

    kept = wide_windows(repo, 200)
    monkeypatch.setattr(repository, "POOL_CHUNK", 4)  # 50 chunks of 4 windows

    def pooled() -> repository.StoredReservoir:
        return repo.production_reservoir("wide", "1", "0", max_rows=64)

    pooled()  # statements compiled and cached
    tracemalloc.start()
    try:
        result = pooled()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 50 chunks kept 32 rows of 4 kB each (peak 7.3 MB); the pool and a chunk: 0.9 MB
    assert peak < 2_000_000, peak
    assert (result.windows, result.reservoir.seen) == (201, 16 + 200 * 32)
    # as many rows as one merge of them all keeps, each row once, whole
    whole = [Reservoir.from_rows(k, 16 if i == 0 else 32, 8) for i, k in enumerate(kept)]
    assert result.reservoir.rows.shape == Reservoir.merge_all(whole, capacity=64).rows.shape
    union = {r.tobytes() for k in kept for r in k}
    rows = [r.tobytes() for r in result.reservoir.rows]
    assert len(set(rows)) == len(rows) and set(rows) <= union


def ids(window: int, n: int) -> np.ndarray:
    """``n`` rows that say which window (first column) and which row (second) they are."""
    return np.stack([np.full(n, window, dtype=np.float32), np.arange(n, dtype=np.float32)], axis=1)


def drawn(reservoirs: list[Reservoir], chunk: int, capacity: int, seed: int) -> Reservoir:
    """:class:`repository._Systematic`'s pool of ``reservoirs``, ``chunk`` at a time."""
    total = sum(r.seen for r in reservoirs)
    size = Reservoir.merge_all(reservoirs, capacity=capacity).rows.shape[0]
    draw = repository._Systematic(size, total, seed)
    for i in range(0, len(reservoirs), chunk):
        draw.add(reservoirs[i : i + chunk])
    return draw.reservoir(2, capacity)


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 8), st.integers(0, 200)), min_size=1, max_size=30),
    chunk=st.integers(1, 8),
    capacity=st.integers(1, 300),
    seed=st.integers(0, 2**31),
)
def test_pooling_a_chunk_at_a_time_keeps_the_sample_of_one_merge(
    sizes: list[tuple[int, int]], chunk: int, capacity: int, seed: int
) -> None:
    """Merging each chunk into the pool so far rounded the pool's size down merge after merge
    (a third of these ranges kept fewer rows than one merge of them all, down to 13 of 34)."""
    parts = []
    for w, (keep, n) in enumerate(sizes):
        r = Reservoir(keep, 2, seed=seed + w)
        r.add(ids(w, n))
        parts.append(r)
    at_once = Reservoir.merge_all(parts, capacity=capacity, seed=seed)
    pooled = drawn(parts, chunk, capacity, seed)
    assert pooled.seen == at_once.seen == sum(n for _, n in sizes)
    chunks = -(-len(parts) // chunk)
    # at most a row fewer per chunk (a share rounded up past what its windows kept)
    assert at_once.rows.shape[0] - chunks <= pooled.rows.shape[0] <= at_once.rows.shape[0]
    rows = [tuple(r) for r in pooled.rows.tolist()]
    assert len(set(rows)) == len(rows)
    assert set(rows) <= {tuple(r) for p in parts for r in p.rows.tolist()}
    if chunks == 1:  # one chunk: the rows of one merge, bit for bit
        np.testing.assert_array_equal(pooled.rows, at_once.rows)


def test_pooling_a_chunk_at_a_time_includes_every_sample_with_the_same_chance() -> None:
    """Windows of unequal sizes, 3 at a time: each window is in the pool as often as its
    share of the samples says (20 rows of 795 samples)."""
    sizes = [40, 10, 120, 25, 60, 200, 15, 90, 30, 150, 50, 5]
    hits = np.zeros(len(sizes))
    runs = 600
    for seed in range(runs):
        parts = []
        for w, n in enumerate(sizes):
            r = Reservoir(8, 2, seed=seed * 100 + w)
            r.add(ids(w, n))
            parts.append(r)
        pooled = drawn(parts, 3, 20, seed)
        assert pooled.rows.shape[0] == 20
        hits += np.bincount(pooled.rows[:, 0].astype(int), minlength=len(sizes))
    expected = runs * 20 * np.array(sizes) / sum(sizes)
    assert np.all(np.abs(hits - expected) < 5 * np.sqrt(expected)), hits / expected
