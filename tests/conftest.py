"""Shared test configuration and the database fixtures.

Every store test runs on SQLite and on the real PostgreSQL.  PostgreSQL comes from
``BNWATCH_TEST_POSTGRES_URL`` (``make test`` sets it to the local server); each test gets a
fresh database, dropped afterwards.  Without the variable the PostgreSQL cases are skipped --
except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

if os.environ.get("PYTEST_XDIST_WORKER"):
    # xdist already runs one worker per core (make test: -n auto); torch's and numpy's thread
    # pools on top would oversubscribe the cores (measured: the capture and recalibration tests
    # took 108 s instead of 90 s on 2 cores).  Set before anything imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import sqlalchemy as sa
from hypothesis import settings

settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


PG_ENV = "BNWATCH_TEST_POSTGRES_URL"


def postgres_admin_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        message = f"{PG_ENV} is not set: cannot run the PostgreSQL store tests"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI requires them)")
        pytest.skip(message)
    return url


def _admin_engine() -> sa.Engine:
    admin_url = sa.make_url(postgres_admin_url()).set(drivername="postgresql+psycopg")
    return sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")


@contextmanager
def _database(admin: sa.Engine, template: str | None = None) -> Iterator[str]:
    """A new database (a copy of ``template``, else empty), dropped afterwards: its URL."""
    name = f"bnwatch_test_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"{copy}'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    admin = _admin_engine()
    try:
        with _database(admin) as url:
            yield url
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def _postgres_schema_template() -> Iterator[str]:
    """A database at the current schema, made once per test process, that
    :func:`migrated_postgres_url` copies: copying takes 50 ms where migrating an empty database
    takes 150-250 ms, and 400 tests start from one."""
    from bnwatch.store.migrate import engine_for

    admin = _admin_engine()
    try:
        with _database(admin) as url:
            engine_for(url).dispose()  # a template must have no connections
            name = sa.make_url(url).database
            assert name is not None
            yield name
    finally:
        admin.dispose()


@pytest.fixture
def migrated_postgres_url(_postgres_schema_template: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, at the current schema (what opening an empty
    one with ``engine_for`` would make first)."""
    admin = _admin_engine()
    try:
        with _database(admin, template=_postgres_schema_template) as url:
            yield url
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'bnwatch.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A database of each kind at the current schema, for tests that open it with
    ``engine_for`` first anyway: PostgreSQL's is copied from a template (4x faster than
    migrating an empty one), SQLite's is created when opened (as fast)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'bnwatch.db'}"
    url: str = request.getfixturevalue("migrated_postgres_url")
    return url
