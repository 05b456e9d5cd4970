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


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    admin_url = sa.make_url(postgres_admin_url()).set(drivername="postgresql+psycopg")
    name = f"bnwatch_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'bnwatch.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
