"""Rollups merge exactly; retention deletes; both are safe to re-run."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import torch

import bnwatch
from bnwatch.cli import main
from bnwatch.schema import WindowRecord
from bnwatch.store import repository, rollup
from bnwatch.store.migrate import engine_for
from bnwatch.store.models import Window
from bnwatch.store.repository import NoReservoirError, Repository
from bnwatch.store.rollup import compact
from tests.store.helpers import batches, record_windows, small_cnn

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def at(record: WindowRecord, start: datetime, minutes: float = 10) -> WindowRecord:
    return dataclasses.replace(record, start=start, end=start + timedelta(minutes=minutes))


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    engine = engine_for(db_url)
    yield Repository(engine)
    engine.dispose()


def test_compacted_window_equals_the_one_window_computation(repo: Repository) -> None:
    net = small_cnn()
    config = bnwatch.DriftConfig(warmup_samples=10**6, min_samples=4)
    records = record_windows(6, model=net, warmup_samples=10**6)
    hour = NOW - timedelta(days=2, hours=3)  # 09:00 two days ago: one whole hour bucket
    old = [at(r, hour + timedelta(minutes=10 * i)) for i, r in enumerate(records)]
    recent = record_windows(2, seed=9)  # now-ish: must stay raw
    repo.write_windows(old + [dataclasses.replace(r, start=NOW, end=NOW) for r in recent])

    result = compact(
        repo.engine,
        older_than=timedelta(days=1),
        resolution=timedelta(hours=1),
        now=NOW,
        config=config,
    )
    assert (result.windows_merged, result.windows_created) == (18, 3)

    one = bnwatch.watch(
        net, name="cnn", version="1", window_seconds=None, overhead_budget=None, config=config
    )
    with torch.inference_mode():
        for x in batches(24, seed=0):
            net(x)
    whole = one.flush()
    one.close()

    rolled = [w for w in repo.windows("cnn", "1", with_stats=True) if w.resolution_seconds == 3600]
    assert len(rolled) == 3
    for w in rolled:
        ref = whole[w.layer]
        assert w.stats is not None
        for a, b in zip(w.stats.moments.as_arrays(), ref.stats.moments.as_arrays(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * float(np.max(np.abs(b)) or 1))
        assert (w.start, w.end) == (hour, hour + timedelta(hours=1))
        assert w.n_samples == 96
        assert w.n_batches == 24
        assert w.gap == ref.gap
        assert w.gap_p_value == pytest.approx(ref.gap_p_value, rel=1e-6)
        assert w.d_rms == pytest.approx(ref.d_rms, rel=1e-9)
    assert repo.window_count(resolution_seconds=0.0) == 6  # the recent windows stay raw

    again = compact(
        repo.engine,
        older_than=timedelta(days=1),
        resolution=timedelta(hours=1),
        now=NOW,
        config=config,
    )
    assert (again.windows_merged, again.windows_created) == (0, 0)


def test_compaction_judges_at_the_thresholds_the_monitor_reported(repo: Repository) -> None:
    """Without a config, rolled-up windows are decided at the thresholds their monitor used
    (they were re-judged at the default, which flags this untrained CNN's gap)."""
    loose = bnwatch.DriftConfig(min_shift=50.0, min_log_ratio=50.0, min_samples=4)
    records = record_windows(3, config=loose)
    hour = NOW - timedelta(days=2, hours=3)
    repo.write_windows([at(r, hour + timedelta(minutes=10 * i)) for i, r in enumerate(records)])
    assert not any(r.gap for rec in records for r in rec.reports.values())
    at_default = repo.windows("cnn", "1", resolution=3600.0, config=bnwatch.DriftConfig())
    assert any(w.gap for w in at_default)  # what compaction stored before
    result = compact(
        repo.engine, older_than=timedelta(days=1), resolution=timedelta(hours=1), now=NOW
    )
    assert (result.windows_merged, result.windows_created) == (9, 3)
    rolled = repo.windows("cnn", "1")
    assert [w.resolution_seconds for w in rolled] == [3600.0] * 3
    assert not any(w.gap or w.drifted for w in rolled)


def test_only_whole_buckets_before_the_cutoff_are_compacted(repo: Repository) -> None:
    records = record_windows(4, warmup_samples=10**6)  # all warm-up: one window per bucket
    cutoff_hour = (NOW - timedelta(days=1)).replace(minute=0)
    spans = [
        cutoff_hour - timedelta(minutes=20),
        cutoff_hour - timedelta(minutes=10),
        cutoff_hour + timedelta(minutes=5),
        cutoff_hour + timedelta(minutes=15),
    ]
    repo.write_windows([at(r, s, minutes=5) for r, s in zip(records, spans, strict=True)])
    result = compact(
        repo.engine, older_than=timedelta(days=1), resolution=timedelta(hours=1), now=NOW
    )
    assert (result.windows_merged, result.windows_created) == (6, 3)
    assert repo.window_count(resolution_seconds=0.0) == 6


def test_compaction_keeps_the_warm_up_windows_apart(repo: Repository) -> None:
    """The bucket where the warm-up ends was merged into one window labelled as its last
    window was: the warm-up windows in it left the report's reference and joined its
    production sample (every warm-up window in it: no reference at all)."""
    records = record_windows(4)  # the first window is the warm-up, the others production
    assert [r.reports["1"].baseline for r in records] == ["warming_up"] + ["warmup"] * 3
    hour = NOW - timedelta(days=2, hours=3)
    starts = [
        hour,
        hour + timedelta(minutes=20),
        hour + timedelta(minutes=70),
        hour + timedelta(minutes=80),
    ]
    repo.write_windows([at(r, s) for r, s in zip(records, starts, strict=True)])
    ref = repo.reference_reservoir("cnn", "1", "4")
    prod = repo.production_reservoir("cnn", "1", "4", after_warmup=True)
    assert (ref.kind, ref.reservoir.seen, prod.reservoir.seen) == ("warmup", 16, 48)

    result = compact(
        repo.engine, older_than=timedelta(days=1), resolution=timedelta(hours=1), now=NOW
    )
    # per layer: the first hour's warm-up window and production window, then the second hour
    assert (result.windows_merged, result.windows_created) == (12, 9)
    rolled = repo.windows("cnn", "1", layer="4")
    assert sorted((w.start, w.baseline, w.n_samples) for w in rolled) == [
        (hour, "warming_up", 16),
        (hour, "warmup", 16),
        (hour + timedelta(hours=1), "warmup", 32),
    ]
    assert all(w.resolution_seconds == 3600.0 for w in rolled)
    ref = repo.reference_reservoir("cnn", "1", "4")
    prod = repo.production_reservoir("cnn", "1", "4", after_warmup=True)
    assert (ref.kind, ref.reservoir.seen, prod.reservoir.seen) == ("warmup", 16, 48)
    # reads merging to a resolution still give one window per bucket, of all its samples
    hourly = repo.windows("cnn", "1", layer="4", resolution=3600)
    assert [(w.start, w.n_samples) for w in hourly] == [(hour, 32), (hour + timedelta(hours=1), 32)]
    ((whole, _),) = repo.layer_reports("cnn", "1", "4", resolution=None)
    assert whole.n_samples == 64
    # a store compacted before (or whose warm-up retention deleted) has none left: say so
    with repo.engine.begin() as conn:
        conn.execute(sa.delete(Window).where(Window.baseline == "warming_up"))
    with pytest.raises(NoReservoirError, match="no warm-up window is left in the store"):
        repo.reference_reservoir("cnn", "1", "4")


def test_a_naive_now_is_utc(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """``now.timestamp()`` of a naive ``now`` is local time: in New York the cutoff moved 4
    hours on (June), and windows newer than ``older_than`` were compacted."""
    records = record_windows(2, warmup_samples=10**6)
    cutoff_hour = (NOW - timedelta(days=1)).replace(minute=0)
    ends = [cutoff_hour - timedelta(minutes=20), cutoff_hour + timedelta(hours=2)]
    repo.write_windows([at(r, s, minutes=5) for r, s in zip(records, ends, strict=True)])
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        result = compact(
            repo.engine,
            older_than=timedelta(days=1),
            resolution=timedelta(hours=1),
            now=NOW.replace(tzinfo=None),
        )
    finally:
        monkeypatch.undo()
        time.tzset()
    assert (result.windows_merged, result.windows_created) == (3, 3)
    assert repo.window_count(resolution_seconds=0.0) == 3


def test_retention_drops_old_windows(repo: Repository) -> None:
    records = record_windows(3)
    ages = [timedelta(days=100), timedelta(days=95), timedelta(days=1)]
    repo.write_windows([at(r, NOW - a) for r, a in zip(records, ages, strict=True)])
    result = compact(
        repo.engine,
        older_than=timedelta(days=7),
        resolution=timedelta(hours=1),
        drop_older_than=timedelta(days=90),
        now=NOW,
    )
    assert result.windows_dropped == 6
    assert repo.window_count() == 3


def test_a_window_redelivered_after_compaction_is_not_stored_again(repo: Repository) -> None:
    # a spooled batch whose answer was lost, sent again after a restart: its raw rows are
    # gone (merged), so the uid lookup alone stored it a second time -- samples counted twice
    three_days = timedelta(days=3)
    records = [
        dataclasses.replace(r, start=r.start - three_days, end=r.end - three_days)
        for r in record_windows(3)
    ]
    later = dataclasses.replace(
        records[-1], uid="a-new-one", start=records[-1].end, end=records[-1].end + timedelta(1)
    )
    assert repo.write_windows(records) == 9

    def samples() -> int:
        return sum(w.n_samples for w in repo.windows("cnn", "1", resolution=86400 * 30))

    before = samples()
    result = compact(repo.engine, older_than=timedelta(days=1), resolution=timedelta(hours=1))
    assert result.windows_merged == 9
    assert repo.write_windows(records) == 0
    assert samples() == before
    assert [t.windows for t in repo.totals()] == [3, 3, 3]
    # a window of another source, or past the rolled-up span, is new
    other = dataclasses.replace(records[0], uid="other-source", source="replica:2")
    assert repo.write_windows([other, later]) == 6


def test_a_rolled_up_uid_fits_its_column_however_large_the_ids() -> None:
    from bnwatch.store.rollup import rollup_uid

    # a day of minute windows on layer 1001 of a store past 10**9 rows: 33 characters written
    # out, which PostgreSQL's VARCHAR(32) refused (and every later compaction with it)
    ids = list(range(10**9 + 1, 10**9 + 1441))
    uid = rollup_uid(86400.0, 20454, 1001, ids)
    assert len(uid) == 32 and uid.startswith("r")
    assert uid == rollup_uid(86400, 20454, 1001, ids[::-1])  # what was merged, not the order
    assert uid != rollup_uid(86400.0, 20454, 1001, ids[1:])
    assert uid != rollup_uid(3600.0, 20454, 1001, ids)


def test_cli_compact(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    engine = engine_for(db_url)
    records = record_windows(3)
    old = datetime.now(timezone.utc) - timedelta(days=3)
    Repository(engine).write_windows(
        [at(r, old + timedelta(minutes=i)) for i, r in enumerate(records)]
    )
    engine.dispose()
    assert (
        main(
            [
                "db",
                "compact",
                "--db",
                db_url,
                "--older-than",
                "1d",
                "--resolution",
                "1h",
                "--drop-older-than",
                "90d",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "compacted 9 windows into" in out
    assert "dropped 0" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("yesterday", "expected a duration > 0 like 45s, 30m, 1h, 1d or 2w"),
        ("0s", "expected a duration > 0 like 45s"),
        ("infd", "expected a duration of at most 100 years, got 'infd'"),  # was a traceback
        ("1e12d", "expected a duration of at most 100 years"),
        ("9000000d", "expected a duration of at most 100 years"),  # overflowed now - it
    ],
)
def test_cli_rejects_bad_durations(
    capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["db", "compact", "--older-than", text])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_windows_stored_before_times_were_bounded_merge_and_compact(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows stamped in year 1 and year 9999 (stored before the store bounded window times)
    broke hourly reads ("year 10000 is out of range") and compaction ("year 0 is out of
    range"): bucket boundaries outside Python's datetimes are clamped to them.  Compaction
    skips the two thousand years between an ancient window and the others instead of walking
    them a day at a time."""
    monkeypatch.setattr(repository, "check_storable", lambda records: None)
    first, second, third = record_windows(3)
    ancient = at(first, datetime(1, 1, 1, tzinfo=timezone.utc), minutes=1)
    future = at(second, datetime(9999, 12, 31, 23, tzinfo=timezone.utc), minutes=30)
    old = at(third, NOW - timedelta(days=2, hours=3))
    repo.write_windows([ancient, future, old])
    hourly = repo.windows("cnn", "1", resolution=3600)
    assert [(w.start, w.end) for w in hourly if w.layer == "1"] == [
        (datetime(1, 1, 1, tzinfo=timezone.utc), datetime(1, 1, 1, 1, tzinfo=timezone.utc)),
        (old.start.replace(minute=0), old.start.replace(minute=0) + timedelta(hours=1)),
        (future.start, datetime.max.replace(tzinfo=timezone.utc)),  # clamped
    ]
    names, rows = repo.metric_buckets("cnn", "1", seconds=3600, columns=("kl_mean",))
    starts = sorted(r[names.index("bucket_start")] for r in rows if r[0] == "1")
    assert starts[1:] == [old.start.replace(minute=0), future.start]
    assert starts[0] <= datetime(1, 1, 1, 1, tzinfo=timezone.utc)  # clamped to year 1

    chunks: list[float] = []
    compact_chunk = rollup._compact_chunk

    def counted(*args: Any) -> tuple[int, int]:
        chunks.append(args[2])
        return compact_chunk(*args)

    monkeypatch.setattr(rollup, "_compact_chunk", counted)
    result = compact(
        repo.engine, older_than=timedelta(days=1), resolution=timedelta(hours=1), now=NOW
    )
    assert (result.windows_merged, result.windows_created) == (6, 6)
    assert len(chunks) == 2  # the chunk of year 1, then the one of two days ago
    after = repo.windows("cnn", "1")
    assert sorted(w.resolution_seconds for w in after) == [0.0] * 3 + [3600.0] * 6
    assert min(w.start for w in after) == datetime(1, 1, 1, tzinfo=timezone.utc)


def test_the_latest_window_of_a_split_bucket_is_the_judged_one(repo: Repository) -> None:
    """Both halves of a split bucket end together, and the warm-up half (inserted second) was
    every layer's latest window: the dashboard's overview said "gap" instead of "drift", and
    the exporter and ``/windows/latest`` served it."""
    records = record_windows(2)  # a warm-up window, then a judged one
    hour = NOW - timedelta(days=2, hours=3)
    starts = [hour, hour + timedelta(minutes=20)]
    repo.write_windows([at(r, s) for r, s in zip(records, starts, strict=True)])
    compact(repo.engine, older_than=timedelta(days=1), resolution=timedelta(hours=1), now=NOW)
    assert sorted(w.baseline for w in repo.windows("cnn", "1", layer="4")) == [
        "warming_up",
        "warmup",
    ]
    assert {w.baseline for w in repo.latest_windows("cnn", "1")} == {"warmup"}
    assert {w.baseline for w in repo.latest_metrics()} == {"warmup"}
