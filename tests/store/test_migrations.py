"""Alembic migrations yield exactly the models' schema and keep data across up/down."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.orm import Session

from bnwatch.alerts import AlertEngine
from bnwatch.cli import main
from bnwatch.drift import DriftConfig
from bnwatch.store.engine import SchemaError, create_engine
from bnwatch.store.migrate import current_revision, downgrade, engine_for, head_revision, upgrade
from bnwatch.store.models import Base
from bnwatch.store.repository import Repository, moments_equal
from bnwatch.store.rollup import compact
from tests.store.helpers import record_windows


def test_upgrade_head_yields_exactly_the_models(db_url: str) -> None:
    engine = create_engine(db_url)
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    engine.dispose()
    assert diff == []


def test_upgrade_downgrade_upgrade_keeps_data(db_url: str) -> None:
    engine = engine_for(db_url)  # an empty database gets the schema
    assert current_revision(engine) == head_revision()
    repo = Repository(engine)
    repo.write_windows(record_windows(3))
    before = repo.window_count()
    assert before == 9
    downgrade(engine, "0004")  # back past the storage setting and the reservoir columns
    assert current_revision(engine) == "0004"
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM windows")).scalar_one() == before
    upgrade(engine)
    assert Repository(engine).window_count() == before
    assert len(Repository(engine).windows("cnn", "1", resolution=3600.0)) == 3
    engine.dispose()


ARRAY_COLUMNS = {
    ("windows", "moments"),
    ("windows", "reservoir"),
    ("refs", "mean_var"),
    ("refs", "moments"),
    ("refs", "reservoir"),
}


def _storage(engine: sa.Engine) -> dict[tuple[str, str], str]:
    """``pg_attribute.attstorage`` of every bytea column bnwatch owns ('e' external, 'x'
    extended: compressed when it saves 25 %)."""
    query = sa.text(
        "SELECT c.relname, a.attname, a.attstorage FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND a.atttypid = 'bytea'::regtype "
        "AND a.attnum > 0 AND NOT a.attisdropped"
    )
    with engine.connect() as conn:
        return {(t, c): s for t, c, s in conn.execute(query)}


def test_postgres_stores_array_blobs_uncompressed(postgres_url: str) -> None:
    """Float statistics do not compress: pglz would spend a full pass on every value and keep
    nothing (0006), so the blobs are ``STORAGE EXTERNAL``; downgrading restores what 0001-0005
    made (the default, but ``windows.moments``, external since 0001)."""
    engine = engine_for(postgres_url)
    try:
        assert _storage(engine) == {key: "e" for key in ARRAY_COLUMNS}
        downgrade(engine, "0005")  # as 0001-0005 made them: windows.moments was external
        assert _storage(engine) == {
            key: "e" if key == ("windows", "moments") else "x" for key in ARRAY_COLUMNS
        }
        upgrade(engine)
        assert _storage(engine) == {key: "e" for key in ARRAY_COLUMNS}
        # windows read back bit for bit through the uncompressed columns
        repo = Repository(engine)
        records = record_windows(2)
        repo.write_windows(records)
        stored = repo.windows("cnn", "1", with_stats=True)
        assert len(stored) == 6
        for w in stored:
            (record,) = [r for r in records if r.end == w.end]
            sent = record.reports[w.layer].stats
            assert w.stats is not None
            assert moments_equal(w.stats.moments, sent.moments)
            assert sent.reservoir is not None and w.stats.reservoir is not None
            np.testing.assert_array_equal(w.stats.reservoir.rows, sent.reservoir.rows)
    finally:
        engine.dispose()


def test_0007_keeps_one_open_no_data_alert_and_refuses_a_second(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        upgrade(engine, "0006")
        with engine.begin() as conn:  # the model version, as 0006 stored it (today's
            # Repository writes columns of later revisions)
            conn.execute(
                sa.text(
                    "INSERT INTO models (id, name, version, created_at) VALUES (1, 'cnn', '1', :t)"
                ),
                {"t": datetime.now(timezone.utc)},
            )
        insert = sa.text(
            "INSERT INTO alerts (id, model_id, layer_id, kind, state, opened_at, last_seen_at, "
            "\"values\") VALUES (:id, 1, NULL, :kind, 'open', :now, :now, '{}')"
        )
        with engine.begin() as conn:  # what two racing evaluators left before 0007
            stamp = datetime.now(timezone.utc)
            for alert_id, kind in ((1, "no_data"), (2, "no_data"), (3, "no_data"), (4, "drift")):
                conn.execute(insert, {"id": alert_id, "kind": kind, "now": stamp})
        upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, state FROM alerts ORDER BY id")).all()
        states = {int(i): str(state) for i, state in rows}
        assert states == {1: "open", 2: "resolved", 3: "resolved", 4: "open"}
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(insert, {"id": 5, "kind": "no_data", "now": stamp})
        downgrade(engine, "0006")
        upgrade(engine)
    finally:
        engine.dispose()


def test_0008_adds_each_sources_thresholds_and_keeps_the_sources(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        upgrade(engine, "0007")
        (record,) = record_windows(1)
        stamp = record.end - timedelta(minutes=5)
        with engine.begin() as conn:  # a source as 0007 stored it
            conn.execute(
                sa.text(
                    "INSERT INTO models (id, name, version, created_at) VALUES (1, 'cnn', '1', :t)"
                ),
                {"t": stamp},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO sources (id, model_id, source, first_seen, last_window_end, "
                    "windows, overhead_ratio, windows_dropped, hook_errors) "
                    "VALUES (1, 1, :source, :t, :t, 7, 0.01, 0, 0)"
                ),
                {"source": record.source, "t": stamp},
            )
        upgrade(engine)
        repo = Repository(engine)
        (source,) = repo.sources()
        assert (source.windows, source.drift_config) == (7, None)  # it never reported any
        assert repo.drift_config("cnn", "1") is None
        repo.write_windows([record])
        assert repo.drift_config("cnn", "1") == DriftConfig(warmup_samples=16, min_samples=4)
        downgrade(engine, "0007")
        with engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("sources")}
            assert conn.execute(sa.text("SELECT windows FROM sources")).scalar_one() == 8
        assert "drift_config" not in columns
        upgrade(engine)
        (source,) = Repository(engine).sources()
        assert (source.windows, source.drift_config) == (8, None)  # until its next window
    finally:
        engine.dispose()


def test_0009_counts_the_windows_stored_before_totals_and_sources_existed(db_url: str) -> None:
    """A database upgraded from 0001-0003 had its windows counted nowhere: 0004 created the
    totals and sources empty.  As such a database: windows stored, their totals and sources
    rows gone (deleted at 0008); 0009 counts them as the writer would have."""
    engine = create_engine(db_url)
    try:
        upgrade(engine)
        repo = Repository(engine)
        records = record_windows(3)
        repo.write_windows(records)
        want_totals, want_sources = repo.totals(), repo.sources()
        downgrade(engine, "0008")
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM layer_totals"))
            conn.execute(sa.text("DELETE FROM sources"))
        upgrade(engine)
        repo = Repository(engine)
        assert repo.totals() == want_totals  # every counter and batch-size bucket
        (source,) = repo.sources()
        (want,) = want_sources
        assert (source.source, source.windows, source.last_window_end) == (
            want.source,
            3,
            want.last_window_end,
        )
        assert source.first_seen == min(r.start for r in records)
        repo.write_windows(record_windows(1, seed=9))  # and counting goes on from there
        assert repo.window_count() == 4 * len(records[0].reports)
        assert {t.layer: t.windows for t in repo.totals()} == {t.layer: 4 for t in want_totals}
        downgrade(engine, "0008")  # nothing to undo: the rows stay
        assert {t.layer: t.windows for t in Repository(engine).totals()} == {
            t.layer: 4 for t in want_totals
        }
    finally:
        engine.dispose()


def _alert_indexes(engine: sa.Engine) -> set[str]:
    return {str(ix["name"]) for ix in sa.inspect(engine).get_indexes("alerts")}


def test_0010_indexes_alerts_and_downgrades(db_url: str) -> None:
    """The alerts table had only partial indexes (of open alerts): 0010 adds one for the newest
    alert of each layer and kind and one for the list newest first; down and up again."""
    engine = engine_for(db_url)
    try:
        assert {"ix_alerts_newest", "ix_alerts_opened"} <= _alert_indexes(engine)
        downgrade(engine, "0009")
        assert not {"ix_alerts_newest", "ix_alerts_opened"} & _alert_indexes(engine)
        upgrade(engine)
        assert {"ix_alerts_newest", "ix_alerts_opened"} <= _alert_indexes(engine)
    finally:
        engine.dispose()


def test_postgres_reads_a_long_alert_history_by_its_indexes(postgres_url: str) -> None:
    """A year of alerts of one model version (here 24,000): the alert engine's look-up of the
    newest alert of each layer and kind, at every stored batch, read all of them (no index on
    ``model_id``), as did each page of ``GET /api/v1/alerts`` (sorted whole).  The plans of
    the statements the code runs now use 0010's indexes, and read no table in full."""
    engine = engine_for(postgres_url)
    try:
        repo = Repository(engine)
        repo.write_windows(record_windows(1))
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO alerts (model_id, layer_id, kind, state, opened_at, "
                    "last_seen_at, resolved_at, values) "
                    "SELECT l.model_id, l.id, k.kind, 'resolved', "
                    "now() - (g || ' minutes')::interval, now(), now(), "
                    "json_build_object('window_end', now()::text) "
                    "FROM layers l, (VALUES ('drift'), ('batch_stat_mode')) k(kind), "
                    "generate_series(1, 4000) g"
                )
            )
            conn.execute(sa.text("ANALYZE"))
            model_id = conn.execute(sa.text("SELECT id FROM models")).scalar_one()
        statements: list[tuple[str, Any]] = []

        def seen(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
            if "alerts" in statement:
                statements.append((statement, params))

        sa.event.listen(engine, "before_cursor_execute", seen)
        with Session(engine) as session:
            judged = AlertEngine._judged(session, model_id)
        page = repo.alert_page(model="cnn", limit=10)
        repo.alert_page(limit=10, after=page.next)
        sa.event.remove(engine, "before_cursor_execute", seen)
        assert len(judged) == 6 and len(page.alerts) == 10  # 3 layers x 2 kinds
        plans = []
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            for statement, params in statements:
                cursor = raw.cursor()
                cursor.execute("EXPLAIN " + statement, params)
                plans.append("\n".join(row[0] for row in cursor.fetchall()))
                cursor.close()
        assert len(plans) == 3  # the newest alerts (one statement); two pages
        assert "ix_alerts_newest" in plans[0]
        assert all("ix_alerts_opened" in plan for plan in plans[1:])
        assert not any("Seq Scan on alerts" in plan for plan in plans), plans
    finally:
        engine.dispose()


def test_a_window_counting_more_than_2_31_values_is_stored(db_url: str) -> None:
    # a convolution fed NaN input counts billions of non-finite elements within minutes:
    # PostgreSQL refused the row ("integer out of range") while SQLite stored it
    (record,) = record_windows(1)
    layer = next(iter(record.reports))
    big = 3 * 2**31
    report = record.reports[layer]
    moments = report.stats.moments
    nonfinite = moments.nonfinite.copy()
    nonfinite[0] = big
    stats = dataclasses.replace(
        report.stats, moments=dataclasses.replace(moments, nonfinite=nonfinite)
    )
    record = dataclasses.replace(
        record, reports={**record.reports, layer: dataclasses.replace(report, stats=stats)}
    )
    engine = engine_for(db_url)
    try:
        repo = Repository(engine)
        assert repo.write_windows([record]) == len(record.reports)
        with engine.connect() as conn:
            stored = conn.execute(sa.text("SELECT max(nonfinite) FROM windows")).scalar_one()
        assert stored == big
    finally:
        engine.dispose()


def _open_store(url: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        engine_for(url).dispose()
        results.put("ok")
    except Exception as err:  # reported to the test
        results.put(f"{type(err).__name__}: {err}")


def test_two_processes_opening_one_empty_database_both_get_the_schema(db_url: str) -> None:
    # two workers of `bnwatch serve` starting together: both ran the first migration, and one
    # failed ("table models already exists", "database is locked", a unique violation)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_open_store, args=(db_url, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["ok", "ok"]
    engine = create_engine(db_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_a_database_behind_says_to_upgrade(db_url: str) -> None:
    engine = create_engine(db_url)
    upgrade(engine, "0001")
    engine.dispose()
    with pytest.raises(SchemaError, match=r"run `bnwatch db upgrade --db"):
        engine_for(db_url)


def test_an_unknown_revision_says_bnwatch_is_too_old(db_url: str) -> None:
    engine = engine_for(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff'"))
    engine.dispose()
    with pytest.raises(SchemaError, match="newer bnwatch"):
        engine_for(db_url)


def test_an_empty_database_is_not_created_when_asked_not_to(db_url: str) -> None:
    url = sa.make_url(db_url)
    if url.get_backend_name() == "sqlite":  # not even the file: a reader at a mistyped path
        path = Path(str(url.database))
        assert not path.exists()
        with pytest.raises(SchemaError, match="there is no database file"):
            engine_for(db_url, create=False)
        assert not path.exists()
        path.touch()
    with pytest.raises(SchemaError, match="has no bnwatch schema"):
        engine_for(db_url, create=False)


def test_cli_upgrade_current_downgrade(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "upgrade", "--db", db_url]) == 0
    assert f"revision {head_revision()}" in capsys.readouterr().out
    assert main(["db", "current", "--db", db_url]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["db", "downgrade", "--db", db_url, "--revision", "base"]) == 0
    assert "revision none" in capsys.readouterr().out
    assert main(["db", "current", "--db", db_url]) == 0
    assert "behind: run `bnwatch db upgrade`" in capsys.readouterr().out


def test_cli_on_a_database_a_newer_bnwatch_wrote_says_to_upgrade_bnwatch(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`db current` said "behind: run `bnwatch db upgrade`" with exit 0, and `db upgrade` then
    failed with Alembic's "Can't locate revision identified by '0099'": each db command now
    says what `bnwatch alerts` says -- a newer bnwatch wrote it -- and leaves it as it is."""
    engine = engine_for(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    for action in ("current", "upgrade", "downgrade"):
        assert main(["db", action, "--db", db_url]) == 1
        err = capsys.readouterr().err
        assert err.startswith("bnwatch db: error: ")
        assert "is at schema revision 0099, which this bnwatch version does not know" in err
        assert "either a newer bnwatch migrated it -- upgrade bnwatch -- or" in err
        assert current_revision(engine) == "0099"
    engine.dispose()


def test_cli_current_and_downgrade_create_no_database_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped SQLite path: `db current` and `db downgrade` left an empty file there
    (downgrade then failed with "Relative revision -1 didn't produce 1 migrations").  Only
    `db upgrade` creates a database."""
    path = tmp_path / "typo.db"
    url = f"sqlite:///{path}"
    for action in ("current", "downgrade"):
        assert main(["db", action, "--db", url]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"bnwatch db: error: there is no database file '{path}' yet")
        assert not path.exists()
    assert main(["db", "upgrade", "--db", url]) == 0
    assert capsys.readouterr().out == f"{url}: schema at revision {head_revision()}\n"


def test_cli_downgrade_of_an_empty_database_has_nothing_to_do(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sa.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        Path(str(url.database)).touch()  # it exists, without bnwatch's tables
    assert main(["db", "downgrade", "--db", db_url]) == 0
    shown = url.render_as_string(hide_password=True)
    assert capsys.readouterr().out == f"{shown}: no bnwatch schema, nothing to downgrade\n"
    engine = create_engine(db_url)
    assert current_revision(engine) is None
    with engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == []
    engine.dispose()


ROOT = Path(__file__).resolve().parents[2]


def _alembic(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``alembic`` command line with the repository's alembic.ini, run in ``cwd``."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _offline_sql(cwd: Path, url: str, revisions: str) -> str:
    """``alembic upgrade <revisions> --sql``: the SQL, printed without connecting."""
    done = _alembic(cwd, "-x", f"url={url}", "upgrade", revisions, "--sql")
    assert done.returncode == 0, done.stderr
    return done.stdout


def _offline_url(db_url: str, tmp_path: Path) -> str:
    """A URL of ``db_url``'s dialect that cannot be connected to: offline mode must not."""
    if sa.make_url(db_url).get_backend_name() == "sqlite":
        return f"sqlite:///{tmp_path / 'never-created.db'}"
    return "postgresql://nobody@127.0.0.1:1/none"


def _apply_sql(db_url: str, sql: str) -> None:
    """Run a script of ``alembic --sql`` as a DBA would (sqlite3, psql)."""
    url = sa.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        with sqlite3.connect(str(url.database)) as conn:
            conn.executescript(sql)
        return
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute(sql.encode())


def test_alembic_command_line_works_from_any_directory(db_url: str, tmp_path: Path) -> None:
    """``script_location = migrations`` was relative to the working directory: from anywhere
    but the repository root the command line found no migrations."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _alembic(elsewhere, "-x", f"url={db_url}", "upgrade", "head")
    assert done.returncode == 0, done.stderr
    done = _alembic(elsewhere, "-x", f"url={db_url}", "current")
    assert done.returncode == 0, done.stderr
    assert f"{head_revision()} (head)" in done.stdout
    assert list(elsewhere.iterdir()) == []


def test_offline_sql_builds_the_schema_without_connecting(db_url: str, tmp_path: Path) -> None:
    """``alembic upgrade head --sql`` connected to the database even so, and crashed at 0009
    (``AttributeError: 'NoneType' object has no attribute 'scalars'``): the SQL it prints now
    gives an empty database exactly the schema that ``bnwatch db upgrade`` does."""
    offline = _offline_url(db_url, tmp_path)
    sql = _offline_sql(tmp_path, offline, "head")
    assert "Running upgrade 0008 -> 0009" in sql
    assert not (tmp_path / "never-created.db").exists()
    _apply_sql(db_url, sql)
    engine = create_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
        assert diff == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_0009_counts_a_compacted_window_once_per_bucket(
    db_url: str, mode: str, tmp_path: Path
) -> None:
    """0009 counted ``sources.windows`` as distinct uids, and a compacted bucket has one uid
    per layer: 10 windows of 3 layers compacted into one bucket were counted 3 times.  Now a
    raw window counts once whatever its layers, and a compacted bucket once per (start, end,
    resolution) -- how many windows it merged is not recorded; ``layer_totals.windows`` counts
    a layer's rows.  Offline, the printed SQL does the same."""
    engine = create_engine(db_url)
    try:
        upgrade(engine)
        repo = Repository(engine)
        repo.write_windows(record_windows(10, source="old:1"))
        now = datetime.now(timezone.utc) + timedelta(days=2)
        done = compact(
            engine, older_than=timedelta(hours=1), resolution=timedelta(hours=1), now=now
        )
        assert done.windows_merged == 30
        repo.write_windows(record_windows(2, seed=9, source="new:1"))  # raw, after compaction
        want = {t.layer: t for t in repo.totals()}
        with engine.connect() as conn:
            buckets = conn.execute(
                sa.text(
                    'SELECT count(*) FROM (SELECT DISTINCT start, "end", resolution_seconds '
                    "FROM windows WHERE resolution_seconds > 0) AS b"
                )
            ).scalar_one()
            # a compacted row per layer and bucket (two where the warm-up ends, if compaction
            # keeps warm-up windows apart): layer_totals counts rows, as for raw windows
            compacted: dict[str, int] = dict(
                conn.execute(
                    sa.text(
                        "SELECT layers.name, count(*) FROM windows JOIN layers "
                        "ON layers.id = windows.layer_id WHERE resolution_seconds > 0 "
                        "GROUP BY layers.name"
                    )
                ).all()
            )
        assert buckets in (1, 2)  # the ten windows may straddle an hour
        assert set(compacted) == set(want)
        downgrade(engine, "0008")
        with engine.begin() as conn:  # as a database upgraded from 0001-0003 would be
            conn.execute(sa.text("DELETE FROM layer_totals"))
            conn.execute(sa.text("DELETE FROM sources"))
        if mode == "online":
            upgrade(engine)
        else:
            sql = _offline_sql(tmp_path, _offline_url(db_url, tmp_path), "0008:0009")
            engine.dispose()
            _apply_sql(db_url, sql)
            assert current_revision(engine) == "0009"
        repo = Repository(engine)
        assert {s.source: s.windows for s in repo.sources()} == {"old:1": buckets, "new:1": 2}
        totals = {t.layer: t for t in repo.totals()}
        assert {name: t.windows for name, t in totals.items()} == {
            name: compacted[name] + 2 for name in want
        }
        # every other counter and batch-size bucket as the writer counted them
        assert {n: dataclasses.replace(t, windows=0) for n, t in totals.items()} == {
            n: dataclasses.replace(t, windows=0) for n, t in want.items()
        }
    finally:
        engine.dispose()


def test_a_postgres_database_another_alembic_app_uses_needs_a_schema_of_its_own(
    postgres_url: str,
) -> None:
    """Another application's revision in ``alembic_version`` was reported as "a newer bnwatch
    wrote it: upgrade bnwatch".  The message now names both causes and the remedy, which
    works: a schema of bnwatch's own through the URL's ``search_path``."""
    engine = sa.create_engine(sa.make_url(postgres_url).set(drivername="postgresql+psycopg"))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('3f2a9c1b7d4e')"))
    with pytest.raises(SchemaError) as refused:
        engine_for(postgres_url)
    message = str(refused.value)
    assert "is at schema revision 3f2a9c1b7d4e, which this bnwatch version does not know" in message
    assert "a newer bnwatch" in message and "upgrade bnwatch" in message
    assert "another application" in message
    assert "?options=-csearch_path%3Dbnwatch" in message
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA bnwatch"))
    own = engine_for(postgres_url + "?options=-csearch_path%3Dbnwatch")
    try:
        assert current_revision(own) == head_revision()
        Repository(own).write_windows(record_windows(1))
    finally:
        own.dispose()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
            ("3f2a9c1b7d4e",)
        ]
        tables = sa.inspect(conn).get_table_names(schema="bnwatch")
        assert {"alembic_version", "windows", "sources", "layer_totals"} <= set(tables)
        assert sa.inspect(conn).get_table_names(schema="public") == ["alembic_version"]
    engine.dispose()
