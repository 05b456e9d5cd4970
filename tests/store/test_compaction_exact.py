"""Compaction under concurrency and late windows: two compactions at once take turns, a late
window that was never stored is kept (and merged into its bucket's rollup next time), a
re-delivery of a merged one is refused, and a bucket's windows stream through compaction
instead of a day of them being loaded at once."""

from __future__ import annotations

import dataclasses
import threading
import tracemalloc
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from bnwatch.schema import WindowRecord, as_utc
from bnwatch.store import repository, rollup
from bnwatch.store.migrate import downgrade, engine_for, upgrade
from bnwatch.store.models import CompactedWindow, Window
from bnwatch.store.repository import Repository
from bnwatch.store.rollup import compact
from tests.store.helpers import record_windows, small_cnn

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
HOUR = NOW - timedelta(days=2, hours=3)  # 09:00 two days ago: a whole bucket, compacted
ALL_WARM = 10**6  # every window a warm-up one: one rollup per layer and bucket, not two


def at(record: WindowRecord, start: datetime, uid: str | None = None) -> WindowRecord:
    return dataclasses.replace(
        record, start=start, end=start + timedelta(minutes=10), uid=uid or record.uid
    )


def hourly(engine: sa.Engine) -> rollup.CompactResult:
    return compact(engine, older_than=timedelta(days=1), resolution=timedelta(hours=1), now=NOW)


def samples(repo: Repository) -> int:
    """The samples stored for the first layer, whatever the resolution of their rows."""
    layer = repo.layers("cnn", "1")[0].name
    return sum(w.n_samples for w in repo.windows("cnn", "1", layer=layer))


def rows_per_layer(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(sa.func.count()).select_from(Window).group_by(Window.layer_id)
            ).scalars()
        )


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    engine = engine_for(db_url)
    yield Repository(engine)
    engine.dispose()


def pause_after_reading(monkeypatch: pytest.MonkeyPatch, thread: str) -> threading.Event:
    """Make compaction in the thread named ``thread`` wait, after it read a bucket's windows
    and before it replaces them, until the returned event's ``resume`` is set; ``read`` is
    set once it got there."""
    read, resume = threading.Event(), threading.Event()
    real = repository._decided

    def paused(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == thread and not read.is_set():
            read.set()
            resume.wait(10)
        return real(*args, **kwargs)

    # the merge reads the name where it is called from
    monkeypatch.setattr(repository, "_decided", paused)
    monkeypatch.setattr(rollup, "_decided", paused, raising=False)
    read.resume = resume  # type: ignore[attr-defined]
    return read


def test_two_compactions_with_a_window_stored_between_their_reads_count_it_once(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reads its windows; a window of the same hour is stored; B reads them and the window,
    # merges and commits; A then deleted nothing (B had) and inserted its rollup beside B's:
    # PostgreSQL counted the hour twice (488 samples instead of 248 in the review), SQLite
    # lost the window (B's rollups took the ids A then deleted)
    records = record_windows(4, seed=3, warmup_samples=ALL_WARM)
    repo.write_windows([at(r, HOUR + timedelta(minutes=10 * i)) for i, r in enumerate(records[:3])])
    late = at(records[3], HOUR + timedelta(minutes=40), uid="stored-between-the-reads")
    expected = samples(repo) + late.reports[repo.layers("cnn", "1")[0].name].n_samples
    read = pause_after_reading(monkeypatch, "A")
    results: dict[str, Any] = {}

    def run(name: str, job: Any) -> None:
        try:
            results[name] = job()
        except Exception as err:  # asserted below
            results[name] = err

    a = threading.Thread(target=run, args=("A", lambda: hourly(repo.engine)), name="A")
    a.start()
    assert read.wait(30)
    # the window and B in threads of their own: with compactions taking turns, B waits for A
    # (and on SQLite so does the window: A holds the file's write lock)
    window = threading.Thread(
        target=run, args=("window", lambda: repo.write_windows([late])), name="window"
    )
    window.start()
    b = threading.Thread(target=run, args=("B", lambda: hourly(repo.engine)), name="B")
    window.join(1.0)
    b.start()
    b.join(1.5)
    read.resume.set()  # type: ignore[attr-defined]
    for t in (a, window, b):
        t.join(60)
        assert not t.is_alive()
    assert not any(isinstance(r, Exception) for r in results.values()), results
    assert results["window"] == 3
    assert samples(repo) == expected
    hourly(repo.engine)  # whatever was left raw joins the hour's rollup
    assert samples(repo) == expected
    assert rows_per_layer(repo.engine) == [1, 1, 1]


def test_a_compaction_whose_windows_vanished_meanwhile_rolls_back(
    migrated_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a second guard, for a deleter that takes no compaction lock (retention, an older
    # bnwatch): the rows deleted must be the rows read, or nothing is kept
    # imported here: on code without it this test fails, and the others still run
    from bnwatch.store.rollup import CompactionRaceError

    engine = engine_for(migrated_postgres_url)
    try:
        repo = Repository(engine)
        records = record_windows(3, seed=4, warmup_samples=ALL_WARM)
        repo.write_windows([at(r, HOUR + timedelta(minutes=10 * i)) for i, r in enumerate(records)])
        before = samples(repo)
        read = pause_after_reading(monkeypatch, "A")
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append(hourly(engine))
            except Exception as err:  # asserted below
                outcome.append(err)

        a = threading.Thread(target=run, name="A")
        a.start()
        assert read.wait(30)
        with engine.begin() as conn:
            conn.execute(sa.delete(Window).where(Window.uid == records[0].uid))
        gone = before - samples(repo)
        read.resume.set()  # type: ignore[attr-defined]
        a.join(60)
        assert isinstance(outcome[0], CompactionRaceError), outcome
        assert "run `bnwatch db compact` again" in str(outcome[0])
        assert samples(repo) == before - gone  # rolled back: the other windows still raw
        assert repo.window_count(resolution_seconds=0.0) == 6
        hourly(engine)
        assert samples(repo) == before - gone
    finally:
        engine.dispose()


def test_a_late_window_never_stored_is_kept_and_merged_into_its_rollup(
    repo: Repository,
) -> None:
    # spooled during an outage and delivered after its hour was compacted: its end falls in
    # the rollup, and it was taken for a re-delivery and dropped (write_windows returned 0)
    records = record_windows(4, seed=5, warmup_samples=ALL_WARM)
    old = [at(r, HOUR + timedelta(minutes=10 * i)) for i, r in enumerate(records[:3])]
    repo.write_windows(old)
    before = samples(repo)
    assert hourly(repo.engine).windows_created == 3
    late = at(records[3], HOUR + timedelta(minutes=30), uid="late-never-stored")
    assert repo.write_windows([late]) == 3
    per_window = samples(repo) - before
    assert per_window > 0
    # the windows merged are still refused when delivered again
    assert repo.write_windows(old) == 0
    assert repo.write_windows([late]) == 0
    # the next compaction merges the late window into the hour's rollup, not beside it
    result = hourly(repo.engine)
    assert (result.windows_merged, result.windows_created) == (6, 3)
    assert rows_per_layer(repo.engine) == [1, 1, 1]
    assert samples(repo) == before + per_window
    assert repo.write_windows([late, *old]) == 0
    with repo.engine.connect() as conn:
        uids = set(conn.execute(sa.select(CompactedWindow.uid)).scalars())
        marked = set(conn.execute(sa.select(Window.merged_uids)).scalars())
    assert uids == {r.uid for r in old} | {late.uid}
    assert marked == {True}


def test_a_rollup_made_before_uids_were_recorded_refuses_what_ends_in_it(
    repo: Repository,
) -> None:
    # rollups made before migration 0011 left no uids: the old rule stays for them, so that a
    # re-delivery of a window merged into one is not counted twice
    records = record_windows(4, seed=6, warmup_samples=ALL_WARM)
    old = [at(r, HOUR + timedelta(minutes=10 * i)) for i, r in enumerate(records[:3])]
    repo.write_windows(old)
    hourly(repo.engine)
    with repo.engine.begin() as conn:  # as 0011 leaves an older rollup
        conn.execute(sa.delete(CompactedWindow))
        conn.execute(sa.update(Window).values(merged_uids=False))
    before = samples(repo)
    assert repo.write_windows(old) == 0
    late = at(records[3], HOUR + timedelta(minutes=30), uid="late-after-an-old-rollup")
    assert repo.write_windows([late]) == 0  # the price of not knowing
    assert samples(repo) == before
    # past the rollup, or from another source, a window is new
    other = dataclasses.replace(late, uid="other-source", source="replica:2")
    after = at(records[3], HOUR + timedelta(hours=1), uid="after-the-rollup")
    assert repo.write_windows([other, after]) == 6


def test_coarser_rollups_and_retention_keep_the_uids_with_their_rollup(
    repo: Repository,
) -> None:
    records = record_windows(3, seed=7, warmup_samples=ALL_WARM)
    old = [at(r, HOUR + timedelta(minutes=10 * i)) for i, r in enumerate(records)]
    repo.write_windows(old)
    hourly(repo.engine)
    day = compact(repo.engine, older_than=timedelta(days=1), resolution=timedelta(days=1), now=NOW)
    assert day.windows_created == 3
    with repo.engine.connect() as conn:
        ends = set(conn.execute(sa.select(CompactedWindow.end)).scalars())
    assert {as_utc(e) for e in ends} == {datetime(2026, 5, 31, tzinfo=timezone.utc)}
    assert repo.write_windows(old) == 0  # refused: merged into the day's rollup
    compact(
        repo.engine,
        older_than=timedelta(days=1),
        resolution=timedelta(days=1),
        drop_older_than=timedelta(days=1),
        now=NOW,
    )
    with repo.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(CompactedWindow)).scalar() == 0


def test_0011_upgrades_and_downgrades_keeping_the_rollups(db_url: str) -> None:
    engine = engine_for(db_url)
    try:
        repo = Repository(engine)
        repo.write_windows(
            [
                at(r, HOUR + timedelta(minutes=10 * i))
                for i, r in enumerate(record_windows(3, warmup_samples=ALL_WARM))
            ]
        )
        hourly(engine)
        before = samples(repo)
        downgrade(engine, "0010")
        tables = sa.inspect(engine).get_table_names()
        columns = {c["name"] for c in sa.inspect(engine).get_columns("windows")}
        assert "compacted_windows" not in tables and "merged_uids" not in columns
        upgrade(engine)
        engine.dispose()
        with engine.connect() as conn:
            marked = set(conn.execute(sa.select(Window.merged_uids)).scalars())
        assert marked == {False}  # a rollup whose uids were not recorded
        assert samples(repo) == before
    finally:
        engine.dispose()


def test_a_bucket_streams_through_compaction(repo: Repository) -> None:
    # a day of a model's windows was loaded at once -- ORM rows, blobs and decoded
    # statistics of 24 buckets -- before anything was merged (1.3 GB of blobs: 3.8 GB of
    # memory); they stream now, each merged into its bucket's group as it comes
    record = record_windows(1, model=small_cnn(width=256), seed=8, warmup_samples=ALL_WARM)[0]
    windows = [
        at(record, HOUR - timedelta(hours=h) + timedelta(minutes=m), uid=f"w{h}-{m}")
        for h in range(6)
        for m in range(0, 60, 2)
    ]
    for i in range(0, len(windows), 30):
        repo.write_windows(windows[i : i + 30])
    with repo.engine.connect() as conn:
        blobs = conn.execute(
            sa.select(
                sa.func.sum(sa.func.length(Window.moments) + sa.func.length(Window.reservoir))
            )
        ).scalar_one()
    tracemalloc.start()
    try:
        result = hourly(repo.engine)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.windows_merged == 540  # 180 windows of 3 layers
    assert peak < 0.4 * blobs, (peak, blobs)
