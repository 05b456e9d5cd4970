"""Alembic migrations yield exactly the models' schema and keep data across up/down."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from bnwatch.cli import main
from bnwatch.store.engine import SchemaError, create_engine
from bnwatch.store.migrate import current_revision, downgrade, engine_for, head_revision, upgrade
from bnwatch.store.models import Base
from bnwatch.store.repository import Repository
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
    downgrade(engine)  # one revision back
    assert current_revision(engine) != head_revision()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM windows")).scalar_one() == before
    upgrade(engine)
    assert Repository(engine).window_count() == before
    assert len(Repository(engine).windows("cnn", "1", resolution=3600.0)) == 3
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
