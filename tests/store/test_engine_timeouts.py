"""PostgreSQL engines bound their connection attempts and their waits for the pool: psycopg's
default is to wait 130 s for a server that accepted the connection and says nothing, and
after a network stall the pool stayed full of such attempts -- ``/healthz`` said the database
was unreachable two minutes after it was back."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bnwatch.service.routes.health import HEALTH_TIMEOUT_SECONDS
from bnwatch.store.engine import (
    PG_CONNECT_TIMEOUT_SECONDS,
    PG_TCP_SETTINGS,
    POOL_TIMEOUT_SECONDS,
    create_engine,
)


class _StopError(Exception):
    """Raised instead of connecting: the test only wanted the parameters."""


def connect_params(engine: Engine) -> dict[str, Any]:
    """The keyword arguments ``engine`` gives the driver's connect (nothing is connected)."""
    seen: dict[str, Any] = {}

    def capture(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        seen.update(cparams)
        raise _StopError

    sa.event.listen(engine, "do_connect", capture)
    with pytest.raises(_StopError):
        engine.connect()
    engine.dispose()
    return seen


@pytest.fixture(autouse=True)
def _no_libpq_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)


def test_postgresql_engines_time_out_connection_attempts() -> None:
    assert PG_CONNECT_TIMEOUT_SECONDS < HEALTH_TIMEOUT_SECONDS
    engine = create_engine("postgresql://bnwatch@db.invalid/bnwatch")
    assert connect_params(engine)["connect_timeout"] == PG_CONNECT_TIMEOUT_SECONDS
    assert engine.pool.timeout() == POOL_TIMEOUT_SECONDS  # type: ignore[attr-defined]


def test_a_timeout_the_user_chose_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    in_url = create_engine("postgresql://bnwatch@db.invalid/bnwatch?connect_timeout=17")
    assert connect_params(in_url)["connect_timeout"] == "17"
    given = create_engine(
        "postgresql://bnwatch@db.invalid/bnwatch",
        connect_args={"connect_timeout": 9, "application_name": "x"},
        pool_timeout=2.0,
    )
    params = connect_params(given)
    assert (params["connect_timeout"], params["application_name"]) == (9, "x")
    assert given.pool.timeout() == 2.0  # type: ignore[attr-defined]
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "20")  # libpq's variable, which psycopg reads
    assert "connect_timeout" not in connect_params(create_engine("postgresql://h.invalid/db"))


def test_sqlite_engines_are_left_alone(tmp_path: Any) -> None:
    params = connect_params(create_engine(f"sqlite:///{tmp_path / 'x.db'}"))
    assert "connect_timeout" not in params
    assert not params.keys() & PG_TCP_SETTINGS.keys()


def test_tcp_settings_the_user_chose_are_kept() -> None:
    in_url = connect_params(
        create_engine("postgresql://bnwatch@db.invalid/bnwatch?keepalives_idle=300")
    )
    assert in_url["keepalives_idle"] == "300"
    assert in_url["tcp_user_timeout"] == PG_TCP_SETTINGS["tcp_user_timeout"]
    given = connect_params(
        create_engine("postgresql://db.invalid/db", connect_args={"tcp_user_timeout": 0})
    )
    assert given["tcp_user_timeout"] == 0
    assert given["keepalives_count"] == PG_TCP_SETTINGS["keepalives_count"]


def test_postgresql_connections_find_a_dead_path(postgres_url: str) -> None:
    """The settings reach the connection's socket: a pooled connection whose network path died
    silently fails in about a minute (idle) or 30 s (a statement sent) instead of hanging the
    first statement on it -- pool_pre_ping's too -- for the kernel's 15 minutes."""
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            sock = socket.socket(fileno=os.dup(dbapi.fileno()))
            try:
                options = {
                    "keepalives": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    "keepalives_idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    "keepalives_interval": sock.getsockopt(
                        socket.IPPROTO_TCP, socket.TCP_KEEPINTVL
                    ),
                    "keepalives_count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    "tcp_user_timeout": sock.getsockopt(
                        socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT
                    ),
                }
            finally:
                sock.close()
    finally:
        engine.dispose()
    assert options == PG_TCP_SETTINGS


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A local port that accepts connections and never answers (a stalled server, a
    half-open network path)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for s in [*held, server]:
            s.close()


def test_a_server_that_never_answers_fails_the_connection_in_seconds() -> None:
    with blackhole() as port:
        engine = create_engine(f"postgresql://bnwatch@127.0.0.1:{port}/bnwatch")
        outcome: list[BaseException | None] = []

        def connect() -> None:
            try:
                engine.connect().close()
                outcome.append(None)
            except BaseException as err:  # the test below asserts which
                outcome.append(err)

        began = time.monotonic()
        attempt = threading.Thread(target=connect, daemon=True)  # left behind if it hangs
        attempt.start()
        attempt.join(PG_CONNECT_TIMEOUT_SECONDS + 5)
        took = time.monotonic() - began
        assert not attempt.is_alive(), f"the connection attempt still hangs after {took:.0f} s"
        assert isinstance(outcome[0], sa.exc.OperationalError)
        assert "timeout" in str(outcome[0]).lower()
        assert PG_CONNECT_TIMEOUT_SECONDS - 0.5 <= took < PG_CONNECT_TIMEOUT_SECONDS + 2
        engine.dispose()
