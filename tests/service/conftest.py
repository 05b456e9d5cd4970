"""Service tests run on SQLite and PostgreSQL (``db_url`` below): each gets an app around an
engine on a fresh database, and a TestClient that returns 500s instead of raising them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from bnwatch.service import Settings, create_app
from bnwatch.store.migrate import engine_for
from tests.service.helpers import TOKEN


@pytest.fixture
def db_url(migrated_db_url: str) -> str:
    """A database of each kind, at the current schema (every app here would migrate an empty
    one first)."""
    return migrated_db_url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = engine_for(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def make_app(engine: Engine) -> Callable[..., FastAPI]:
    """``make_app(**settings_changes, on_stored=...)`` -> an app on the test's database."""

    def make(*, on_stored: Any = None, **changes: Any) -> FastAPI:
        settings = Settings(database_url=str(engine.url), api_token=TOKEN).with_changes(**changes)
        return create_app(settings, engine=engine, on_stored=on_stored)

    return make


@pytest.fixture
def app(make_app: Callable[..., FastAPI]) -> FastAPI:
    return make_app()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
