"""The background writer: non-blocking, batched, retried, drained on close, never silent."""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
)

import bnwatch
from bnwatch.schema import WindowRecord
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository, WrittenWindows, moments_equal
from bnwatch.store.writer import StoreSink, WriterStats
from tests.store.helpers import batches, record_windows, renamed, small_cnn


def stored(url: str) -> int:
    engine = engine_for(url)
    try:
        return Repository(engine).window_count()
    finally:
        engine.dispose()


def wait_for(condition, timeout: float = 60.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_watch_with_a_database_url_stores_every_window(db_url: str) -> None:
    net = small_cnn()
    mon = bnwatch.watch(
        net, name="cnn", version="1", store=db_url, window_seconds=None, overhead_budget=None
    )
    with torch.inference_mode():
        for i, x in enumerate(batches(20)):
            net(x)
            if i % 4 == 3:
                mon.flush()
    mon.close()
    assert stored(db_url) == 5 * 3
    assert mon.stats().windows_dropped == 0
    sink = mon.sink
    assert isinstance(sink, StoreSink)
    assert sink.stats().written == 5


@pytest.mark.parametrize("metrics", [False, True])
def test_one_sink_shared_by_several_monitors_closes_with_the_last(
    db_url: str, metrics: bool
) -> None:
    """One database writer for every model of a process: closing the first monitor closed
    the sink under the others, whose later windows were dropped.  Each monitor (or the
    metrics exporter in front of it) releases the sink; the last one closes it."""
    sink = StoreSink(db_url)
    nets = [small_cnn(seed) for seed in range(3)]
    port: dict[str, int | None] = {"metrics_port": 0 if metrics else None}
    mons = [
        bnwatch.watch(
            net,
            name=f"m{i}",
            version="1",
            store=sink,
            window_seconds=None,
            overhead_budget=None,
            **port,  # type: ignore[arg-type]
        )
        for i, net in enumerate(nets)
    ]
    xs = batches(3)
    with torch.inference_mode():
        for net in nets:
            net(xs[0])
        mons[0].close()
        for net in nets[1:]:
            net(xs[1])
        mons[1].flush()
        # a watch() that fails does not close the sink the others write to
        with pytest.raises(bnwatch.ConfigError, match="window_seconds"):
            bnwatch.watch(small_cnn(), name="bad", store=sink, window_seconds=-1, **port)  # type: ignore[arg-type]
        with socket.socket() as taken:  # nor one whose metrics server cannot start
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            with pytest.raises(OSError, match="in use"):
                bnwatch.watch(small_cnn(), store=sink, metrics_port=taken.getsockname()[1])
        mons[1].close()
        nets[2](xs[2])
    mons[2].close()
    assert sink.stats().dropped == 0 and sink.stats().written == 3  # a window per monitor
    assert [m.stats().windows_dropped for m in mons] == [0, 0, 0]
    assert stored(db_url) == 3 * 3  # three layers each
    sink.write(renamed(record_windows(1)[0]))  # the last monitor closed it
    assert sink.dropped == 1


def test_close_drains_the_queue(db_url: str) -> None:
    records = record_windows(1)
    sink = StoreSink(db_url, batch_size=7)
    for _ in range(120):
        sink.write(renamed(records[0]))
    sink.close(timeout=60)
    assert sink.stats().written == 120
    assert sink.dropped == 0
    assert stored(db_url) == 360


def test_write_never_blocks_and_a_full_queue_drops_and_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    records = record_windows(1)
    sink = StoreSink("postgresql://nobody@127.0.0.1:1/none", queue_size=10, retry_initial=5.0)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        for _ in range(50):
            sink.write(renamed(records[0]))
    assert time.perf_counter() - started < 1.0  # generous: the database is never touched here
    assert sink.dropped >= 30  # 10 queued and at most 10 more taken into the batch in hand
    assert any("queue is full" in r.getMessage() for r in caplog.records)
    sink.close(timeout=0.5)
    stats = sink.stats()
    assert stats.dropped == 50  # the undelivered ones are counted too, never silently lost
    assert stats.written == 0
    assert stats.failures >= 1


def test_a_queue_past_its_bytes_drops_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    """The queue is bounded by the bytes its windows hold as well as by their number (wide
    models: a ResNet-50 window is 5.5 MB): here 4 windows' worth while the database is away."""
    (record,) = record_windows(1)
    sink = StoreSink(
        "postgresql://nobody@127.0.0.1:1/none",
        queue_bytes=4 * record.nbytes,
        batch_size=1,
        retry_initial=5.0,
    )
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        for _ in range(50):
            sink.write(renamed(record))
    assert sink.dropped in (45, 46)  # 4 queued, and the one in hand unless not yet taken
    assert any("MiB of windows" in r.getMessage() for r in caplog.records)
    sink.close(timeout=0.5)
    assert sink.stats().dropped == 50


def test_a_database_down_at_start_is_retried_until_it_comes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a folder where the file should be: SQLite cannot open it ("unable to open database
    # file") until it is gone.  (A missing folder is refused at once: a mistyped path.)
    blocked = tmp_path / "bnwatch.db"
    blocked.mkdir()
    url = f"sqlite:///{blocked}"
    records = record_windows(3)
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        sink = StoreSink(url, retry_initial=0.05, retry_max=0.2)
        for r in records:
            sink.write(r)
        assert wait_for(lambda: sink.stats().failures >= 2)
    # an error that waits on someone's fix is an ERROR saying what it is
    said = [r for r in caplog.records if "cannot store windows" in r.getMessage()]
    assert said[0].levelno == logging.ERROR
    assert "unable to open database file: the path must be a file" in said[0].getMessage()
    blocked.rmdir()  # the "database" comes up
    assert wait_for(lambda: sink.stats().written == 3)
    sink.close()
    assert stored(url) == 9


def test_postgres_created_late_and_connections_killed_mid_run(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    admin = sa.create_engine(
        sa.make_url(postgres_url).set(database="postgres", drivername="postgresql+psycopg"),
        isolation_level="AUTOCOMMIT",
    )
    name = sa.make_url(postgres_url).database
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    records = record_windows(1)
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        sink = StoreSink(postgres_url, retry_initial=0.05, retry_max=0.2, batch_size=4)
        for _ in range(20):
            sink.write(renamed(records[0]))
        assert wait_for(lambda: sink.stats().failures >= 1)
    said = [r for r in caplog.records if "cannot store windows" in r.getMessage()]
    assert said[0].levelno == logging.ERROR
    assert "create that database, or fix the URL's database name" in said[0].getMessage()
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    assert wait_for(lambda: sink.stats().written == 20)
    # the server drops every connection of the writer: it reconnects and goes on
    with admin.connect() as conn:
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )
        )
    for _ in range(20):
        sink.write(renamed(records[0]))
    sink.close(timeout=60)
    admin.dispose()
    assert sink.stats().written == 40
    assert sink.dropped == 0
    assert stored(postgres_url) == 120


def test_a_rejected_window_is_counted_and_the_rest_stored(db_url: str) -> None:
    good = record_windows(2)
    bad = record_windows(1, model=small_cnn(width=9))
    sink = StoreSink(db_url)
    sink.write(good[0])
    assert sink.flush()
    sink.write(bad[0])
    sink.write(good[1])
    sink.close()
    stats = sink.stats()
    assert (stats.written, stats.rejected) == (2, 1)
    assert "has 6 channels in the store but the window has 9" in (stats.last_error or "")
    assert stored(db_url) == 6


def test_a_window_rejected_mid_stream_takes_only_itself_out(db_url: str) -> None:
    """Whichever batch the rejected window lands in, the others of the stream are stored,
    each with its own statistics."""
    good = record_windows(7)
    bad = record_windows(1, model=small_cnn(width=9))[0]
    sink = StoreSink(db_url, batch_size=2)
    sink.write(good[0])
    assert sink.flush()  # the model and its layers exist before the bad window comes
    for record in [*good[1:4], bad, *good[4:]]:
        sink.write(record)
    sink.close()
    stats = sink.stats()
    assert (stats.written, stats.rejected, stats.dropped) == (7, 1, 0)
    engine = engine_for(db_url)
    try:
        repo = Repository(engine)
        assert repo.window_count() == 21
        for w in repo.windows("cnn", "1", with_stats=True):
            (sent,) = [r for r in good if r.end == w.end]
            assert w.stats is not None
            assert moments_equal(w.stats.moments, sent.reports[w.layer].stats.moments)
    finally:
        engine.dispose()


# -- windows the database refuses for good, and windows written after close() -----------------


def stored_uids(url: str) -> dict[str, int]:
    """Each stored window's uid and how many layer rows it has."""
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT uid, count(*) FROM windows GROUP BY uid")).all()
        return {str(uid): int(n) for uid, n in rows}
    finally:
        engine.dispose()


def settled(sink: StoreSink) -> Callable[[], bool]:
    """Every window written is stored, rejected or dropped -- or the sink is retrying what it
    should not (three failed attempts in a row): a test then fails at once, not at a timeout."""
    return lambda: sink.flush(timeout=0.05) or sink.stats().failures >= 3


def write_settled(url: str, stream: Sequence[WindowRecord], batch_size: int) -> WriterStats:
    """Write ``stream`` through a fast-retrying sink, wait until it settled, close it; its
    stats before the close."""
    sink = StoreSink(url, batch_size=batch_size, retry_initial=0.05, retry_max=0.2)
    for record in stream:
        sink.write(record)
    assert wait_for(settled(sink))
    stats = sink.stats()
    sink.close()
    return stats


def poisoning(
    monkeypatch: pytest.MonkeyPatch, error: type[DBAPIError], poisoned: set[str]
) -> list[int]:
    """Make the repository refuse, the way the database does (``error``, every time), any
    batch holding a window whose uid is in ``poisoned``; returns the sizes of the batches
    attempted."""
    attempts: list[int] = []
    store_windows = Repository.store_windows  # what the sink calls

    def refusing(self: Repository, records: Sequence[WindowRecord]) -> WrittenWindows:
        attempts.append(len(records))
        if any(r.uid in poisoned for r in records):
            raise error("INSERT INTO windows ...", None, Exception("the value does not fit"))
        return store_windows(self, records)

    monkeypatch.setattr(Repository, "store_windows", refusing)
    return attempts


@pytest.mark.parametrize("error", [DataError, IntegrityError])
def test_a_window_the_database_refuses_for_good_is_rejected_and_the_rest_stored(
    db_url: str,
    error: type[DBAPIError],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refused window was retried forever: every later window queued behind it and was
    dropped at close().  Now it is rejected (counted, logged with its uid) and every other
    window of its batch and of the stream is stored."""
    good = record_windows(10)
    bad = [renamed(good[0]), renamed(good[1])]
    attempts = poisoning(monkeypatch, error, {r.uid for r in bad})
    stream = [*good[:2], bad[0], *good[2:6], bad[1], *good[6:]]
    with caplog.at_level(logging.ERROR, logger="bnwatch"):
        stats = write_settled(db_url, stream, batch_size=4)
    assert (stats.written, stats.rejected, stats.dropped, stats.failures) == (10, 2, 0, 0)
    assert stats.last_error == "Exception: the value does not fit"
    assert stored_uids(db_url) == {r.uid: 3 for r in good}
    for record in bad:  # one error per refused window, naming it and the database's message
        (message,) = [m for m in caplog.messages if record.uid in m]
        assert "cnn@1" in message and "the value does not fit" in message
    assert len(attempts) < 20  # bisected: 3 batches and about 2 log2(4) attempts per refusal


def test_windows_the_store_cannot_hold_are_rejected_before_any_row_is_written(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A window written through the StoreSink is held to the wire's rules: one whose batches
    hold more samples than a window may (2**31-1 batches of 2**31-1: on PostgreSQL the running
    total overflowed, on SQLite it silently became a float) or stamped outside [1970-01-02, 2100)
    is rejected, with the rule it breaks, and its neighbours are stored whole."""
    good = record_windows(4)
    first = good[0].reports["4"]
    m = 2**31 - 1
    stats = dataclasses.replace(first.stats, batch_sizes={m: m}, n_batches=m, batches_seen=m)
    reports = {**good[0].reports, "4": dataclasses.replace(first, stats=stats)}
    huge = renamed(good[0], reports=reports)
    ancient = renamed(
        good[0],
        start=datetime(1, 1, 1, tzinfo=timezone.utc),
        end=datetime(1, 1, 1, 0, 1, tzinfo=timezone.utc),
    )
    stream = [good[0], huge, good[1], ancient, *good[2:]]
    with caplog.at_level(logging.ERROR, logger="bnwatch"):
        stats_ = write_settled(db_url, stream, batch_size=8)
    assert (stats_.written, stats_.rejected, stats_.dropped, stats_.failures) == (4, 2, 0, 0)
    assert stored_uids(db_url) == {r.uid: 3 for r in good}
    (message,) = [m for m in caplog.messages if huge.uid in m]
    assert "layers.4.batch_sizes: the measured batches hold 4611686014132420609 samples" in message
    (message,) = [m for m in caplog.messages if ancient.uid in m]
    assert "start must be from 1970-01-02T00:00:00+00:00" in message
    engine = engine_for(db_url)
    try:
        totals = {t.layer: t for t in Repository(engine).totals()}
    finally:
        engine.dispose()
    assert totals["4"].windows == 4
    assert totals["4"].measured_samples == 4 * 16  # four windows of four batches of four


@pytest.mark.parametrize("error", [OperationalError, InterfaceError, ProgrammingError])
def test_a_database_error_that_is_not_the_windows_fault_is_retried(
    tmp_path: Path, error: type[DBAPIError], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connection lost, database locked, a missing table or privilege: the database's state,
    which time or an operator fixes -- retried, nothing rejected."""
    url = f"sqlite:///{tmp_path / 'bnwatch.db'}"
    records = record_windows(3)
    failing = [True]
    store_windows = Repository.store_windows  # what the sink calls

    def flaky(self: Repository, records: Sequence[WindowRecord]) -> WrittenWindows:
        if failing[0]:
            raise error("INSERT INTO windows ...", None, Exception("the database is away"))
        return store_windows(self, records)

    monkeypatch.setattr(Repository, "store_windows", flaky)
    sink = StoreSink(url, retry_initial=0.05, retry_max=0.2)
    for record in records:
        sink.write(record)
    assert wait_for(lambda: sink.stats().failures >= 2)
    failing[0] = False
    assert wait_for(lambda: sink.stats().written == 3)
    sink.close()
    stats = sink.stats()
    assert (stats.written, stats.rejected, stats.dropped, stats.failures) == (3, 0, 0, 0)


def test_windows_postgresql_refuses_are_rejected_whole_and_the_rest_stored(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Refusals: a model name longer than VARCHAR(200) (PostgreSQL's StringDataRightTruncation
    before the store checked lengths: now refused before writing, as on SQLite) and a real one,
    a count of non-finite values past what the column holds (NumericValueOutOfRange; 2**63 is
    past BIGINT too), the latter in a window of a new model, refused once its model and layer
    rows are in: the transaction leaves none of them behind.  The windows around them are
    stored whole."""
    good = record_windows(6)
    long_name = renamed(good[0], model="m" * 201)
    overflow = record_windows(1, seed=1, name="overflowing")[0]
    first = next(iter(overflow.reports.values()))  # its row is INSERTed (later ones: COPY)
    first.stats.moments.nonfinite[0] = 2.0**63
    stream = [good[0], long_name, *good[1:4], overflow, *good[4:]]
    with caplog.at_level(logging.ERROR, logger="bnwatch"):
        stats = write_settled(postgres_url, stream, batch_size=8)
    assert (stats.written, stats.rejected, stats.dropped, stats.failures) == (6, 2, 0, 0)
    assert stored_uids(postgres_url) == {r.uid: 3 for r in good}
    for record, error in [(long_name, "model name is 201 characters"), (overflow, "OutOfRange")]:
        (message,) = [m for m in caplog.messages if record.uid in m]
        assert error in message
    engine = engine_for(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT name FROM models")).scalars().all() == ["cnn"]
    finally:
        engine.dispose()


def test_a_window_written_after_close_is_dropped_and_counted(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A sink shared by two monitors is closed by the first one's close(): the other's windows
    were queued for a thread that had exited -- neither stored nor counted -- and flush()
    waited out its timeout."""
    records = record_windows(3)
    sink = StoreSink(db_url)
    sink.write(records[0])
    sink.close()
    with caplog.at_level(logging.WARNING, logger="bnwatch"):
        sink.write(records[1])
        sink.write(records[2])
    stats = sink.stats()
    assert (stats.written, stats.queued, stats.dropped) == (1, 0, 2)
    assert any("the sink is closed" in m for m in caplog.messages)
    assert sink.flush(timeout=5)
    sink.close()  # idempotent
    assert stored(db_url) == 3


def test_windows_in_hand_when_close_gives_up_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The batch the writer held when close()'s timeout expired (the database away) was
    counted as dropped without a word; only what was still queued was logged."""
    records = record_windows(1)
    sink = StoreSink("postgresql://nobody@127.0.0.1:1/none", batch_size=10, retry_initial=5.0)
    for _ in range(3):
        sink.write(renamed(records[0]))
    assert wait_for(lambda: sink.stats().failures >= 1)  # one or more of them in hand
    with caplog.at_level(logging.ERROR, logger="bnwatch"):
        sink.close(timeout=0.2)
    assert sink.stats().dropped == 3
    said = [
        re.match(r"bnwatch: (\d+) window\(s\) could not be stored in postgresql://", m)
        for m in caplog.messages
        if "before close() timed out" in m
    ]
    assert sum(int(m.group(1)) for m in said if m is not None) == 3


def test_flush_after_a_close_that_gave_up_returns_at_once() -> None:
    """close() counts what it could not deliver as dropped; flush() then has nothing to wait
    for (the windows close() took out of the queue were never marked done)."""
    records = record_windows(1)
    sink = StoreSink("postgresql://nobody@127.0.0.1:1/none", batch_size=1, retry_initial=5.0)
    for _ in range(5):
        sink.write(renamed(records[0]))
    sink.close(timeout=0.2)
    assert sink.stats().dropped == 5
    assert sink.flush(timeout=5)
