"""Seeded databases for the dashboard tests, one per backend, shared by the whole session
(seeding runs a real model and the alert engine: seconds, not milliseconds)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import postgres_admin_url
from tests.dashboard.seed import Seeded, seed


@pytest.fixture(scope="session")
def _postgres_database() -> Iterator[str]:
    admin_url = sa.make_url(postgres_admin_url()).set(drivername="postgresql+psycopg")
    name = f"bnwatch_dash_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


_SEEDED: dict[str, Seeded] = {}
"""Each backend is seeded once per session (per pytest-xdist worker).  pytest sets a
parametrized session fixture up again whenever the tests it gets alternate between params
(as pytest-xdist's work stealing orders them), and seeding the same database twice doubles
its windows."""


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def seeded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """A database holding the seed story (tests/dashboard/seed.py)."""
    backend: str = request.param
    if backend not in _SEEDED:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('dash') / 'bnwatch.db'}"
        else:
            url = request.getfixturevalue("_postgres_database")
        _SEEDED[backend] = seed(url)
    return _SEEDED[backend]


@pytest.fixture(autouse=True)
def _main_module_kept() -> Iterator[None]:
    """Streamlit's ``AppTest`` runs the entry script as ``__main__`` and leaves it there: a
    process started by ``spawn`` later in the same pytest(-xdist) worker then ran the dashboard
    instead of its target (tests/store/test_migrations.py's two processes hung)."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture
def app_path() -> Path:
    return Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
