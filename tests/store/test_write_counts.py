"""What the background writer counts as written is what the store stored; and a value longer
than its column is refused before writing, on SQLite as on PostgreSQL."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import sqlalchemy as sa

from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository, UnstorableWindowError
from bnwatch.store.writer import StoreSink
from tests.store.helpers import record_windows


def test_the_writer_counts_duplicates_apart_from_windows_written(migrated_db_url: str) -> None:
    # one window twice in a batch and three re-deliveries were counted written: 13 "written"
    # while 9 were stored
    records = record_windows(9)
    engine = engine_for(migrated_db_url)
    try:
        Repository(engine).write_windows(records[:3])  # stored before: re-delivered below
        sink = StoreSink(migrated_db_url, engine=engine, batch_size=64)
        for record in [*records[3:], records[3], *records[:3]]:
            sink.write(record)
        assert sink.flush(30)
        stats = sink.stats()
        sink.close()
        assert (stats.written, stats.duplicates, stats.rejected, stats.dropped) == (6, 4, 0, 0)
        with engine.connect() as conn:
            uids = conn.execute(
                sa.select(sa.func.count(sa.distinct(sa.text("uid")))).select_from(
                    sa.table("windows")
                )
            ).scalar_one()
        assert uids == 9
    finally:
        engine.dispose()


def test_store_windows_tells_windows_from_rows(migrated_db_url: str) -> None:
    records = record_windows(2)
    engine = engine_for(migrated_db_url)
    try:
        repo = Repository(engine)
        done = repo.store_windows([records[0], records[0], records[1]])
        assert (done.windows, done.duplicates, done.rows) == (2, 1, 6)
        again = repo.store_windows(records)
        assert (again.windows, again.duplicates, again.rows) == (0, 2, 0)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("change", "field", "limit"),
    [
        ({"model": "m" * 300}, "model", 200),
        ({"version": "v" * 201}, "version", 200),
        ({"source": "s" * 201}, "source", 200),
        ({"uid": "u" * 33}, "uid", 32),
    ],
)
def test_a_value_longer_than_its_column_is_refused_before_writing(
    migrated_db_url: str, change: dict[str, Any], field: str, limit: int
) -> None:
    # SQLite stored a 300-character model name that PostgreSQL refuses: a store held what
    # the other could not, and the README says such a value is rejected
    record = dataclasses.replace(record_windows(1)[0], **change)
    engine = engine_for(migrated_db_url)
    try:
        repo = Repository(engine)
        with pytest.raises(UnstorableWindowError) as err:
            repo.write_windows([record_windows(1, seed=1)[0], record])
        assert (err.value.index, err.value.field) == (1, field)
        assert f"at most {limit}" in str(err.value) and "shorten" in str(err.value)
        with engine.connect() as conn:  # nothing written, not even the first record
            assert conn.execute(sa.text("SELECT count(*) FROM models")).scalar_one() == 0
    finally:
        engine.dispose()


def test_a_layer_name_longer_than_its_column_is_refused(migrated_db_url: str) -> None:
    record = record_windows(1)[0]
    report = next(iter(record.reports.values()))
    long = "x" * 501
    renamed = dataclasses.replace(
        record,
        reports={
            long: dataclasses.replace(report, layer=long),
            **dict(list(record.reports.items())[1:]),
        },
    )
    engine = engine_for(migrated_db_url)
    try:
        with pytest.raises(UnstorableWindowError) as err:
            Repository(engine).write_windows([renamed])
        assert err.value.field == f"layers.{long}"
        assert "layer name is 501 characters long; the store holds at most 500" in str(err.value)
    finally:
        engine.dispose()


def test_the_writer_rejects_a_window_with_a_long_model_name(migrated_db_url: str) -> None:
    records = record_windows(3)
    long = dataclasses.replace(records[1], model="m" * 300)
    sink = StoreSink(migrated_db_url)
    for record in [records[0], long, records[2]]:
        sink.write(record)
    assert sink.flush(30)
    stats = sink.stats()
    sink.close()
    assert (stats.written, stats.rejected) == (2, 1)
    assert stats.last_error is not None and "model name is 300 characters long" in stats.last_error
