"""Database URLs, engines and the schema-version check.

SQLite (the embedded default, ``sqlite:///bnwatch.db``) runs in WAL mode with a busy timeout,
so several processes can write one file; PostgreSQL (``postgresql+psycopg://...``; a bare
``postgresql://`` uses psycopg 3) is the production store.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import ArgumentError

from bnwatch.errors import BnwatchError, ConfigError

SUPPORTED = ("sqlite", "postgresql")
DEFAULT_URL = "sqlite:///bnwatch.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_SECONDS = 3
"""How long a PostgreSQL connection attempt may take (libpq's ``connect_timeout``, per address
tried), unless the URL (``?connect_timeout=``) or ``$PGCONNECT_TIMEOUT`` says otherwise.
psycopg's own default is 130 s: after a network stall the pool stayed full of attempts to a
server that no longer answered them, and the service reported the database unreachable for
two minutes after it was back.  Shorter than the health check's 5 s
(``bnwatch.service.routes.health.HEALTH_TIMEOUT_SECONDS``), so that ``/healthz`` tells an
unreachable database from a slow one."""
PG_TCP_SETTINGS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
"""libpq's TCP settings for PostgreSQL connections, each unless the URL or ``connect_args``
sets it.  A pooled connection whose path died silently (a NAT or load balancer forgetting an
idle connection, a failover, a conntrack flush) otherwise hangs the first statement sent on it
-- ``pool_pre_ping``'s too -- until the kernel gives up, about 15 minutes by default; the
service's four ingest threads each held one, and every ingest waited behind them while reads,
on fresh connections, worked.  Keepalives (a probe after 30 s idle, three more 10 s apart)
find a dead idle connection within a minute and keep NAT entries alive; ``tcp_user_timeout``
(ms) fails a statement whose bytes go unacknowledged for 30 s.  Neither limits how long a
query may run on a server that answers."""
POOL_TIMEOUT_SECONDS = 10.0
"""How long a PostgreSQL read or write waits for a pooled connection before it fails (the
service answers 503 with ``Retry-After``): SQLAlchemy's default is 30 s."""


class SchemaError(BnwatchError, RuntimeError):
    """The database schema is not the one this bnwatch version expects."""


def parse_url(url: str | URL, *, argument: str = "store") -> URL:
    """Validate a database URL; raises :class:`ConfigError` naming ``argument`` if unusable."""
    try:
        parsed = sa.make_url(url)
    except (ArgumentError, ValueError, TypeError) as err:
        raise ConfigError(
            argument, url, "a database URL such as sqlite:///bnwatch.db or postgresql://host/db"
        ) from err
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED:
        raise ConfigError(
            argument,
            url,
            f"a SQLite or PostgreSQL URL (sqlite:///path.db, postgresql://...); {backend!r} "
            "is not supported",
        )
    if backend == "postgresql" and parsed.get_driver_name() in ("psycopg2", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        dialect = parsed.get_dialect()
    except Exception as err:  # sqlalchemy.exc.NoSuchModuleError
        raise ConfigError(
            argument,
            url,
            f"a URL whose driver is installed ({parsed.drivername!r} is not: for PostgreSQL "
            "use postgresql:// or postgresql+psycopg://)",
        ) from err
    try:
        # the driver module itself: SQLAlchemy imports it only at the first connection, which
        # for a monitor is its writer thread's, after watch() has returned
        dialect.import_dbapi()
    except ImportError as err:
        raise ConfigError(
            argument,
            url,
            f"a URL whose driver is installed ({err.name or err}: missing; for PostgreSQL "
            'pip install "psycopg[binary]", which bnwatch depends on)',
        ) from err
    if backend == "sqlite" and (
        parsed.database in (None, "", ":memory:")
        or parsed.query.get("mode") == "memory"
        or str(parsed.database).startswith("file::memory:")
    ):
        # an in-memory database lives in one connection: every thread of the writer, the
        # service and the alert engine would see its own empty one, and all is lost at exit
        raise ConfigError(argument, url, "a SQLite file path, e.g. sqlite:///bnwatch.db")
    if backend == "sqlite" and not str(parsed.database).startswith("file:"):
        folder = os.path.dirname(os.path.abspath(str(parsed.database)))
        if not os.path.isdir(folder):  # SQLite says only "unable to open database file"
            raise ConfigError(
                argument,
                redacted(parsed),
                f"a SQLite file in a folder that exists ({folder} does not: create it first)",
            )
    return parsed


def redacted(url: str | URL) -> str:
    """The URL with its password hidden, for logs and messages."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return "<invalid url>"


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _journal_mode_wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _journal_mode_wal(cursor: Any) -> None:
    """Switch the file to WAL, waiting up to the busy timeout for another process's write.

    A new database becomes WAL with its first write; while another process is making it (two
    workers creating the schema at once), switching answers "database is locked" at once,
    without the busy handler's wait -- so the wait is here, polling until that write commits
    and the file is WAL already (then the pragma changes nothing and needs no lock).
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def create_engine(url: str | URL, *, argument: str = "store", **kwargs: Any) -> Engine:
    """An engine for a supported URL (SQLite: WAL, busy timeout, foreign keys; PostgreSQL:
    connections checked before use, attempts bounded by :data:`PG_CONNECT_TIMEOUT_SECONDS`,
    dead connections found by :data:`PG_TCP_SETTINGS`, waits for a pooled one bounded by
    :data:`POOL_TIMEOUT_SECONDS`)."""
    parsed = parse_url(url, argument=argument)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(
            parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs
        )
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_timeout", POOL_TIMEOUT_SECONDS)
    connect_args = dict(kwargs.pop("connect_args", None) or {})
    if not (
        "connect_timeout" in parsed.query
        or "connect_timeout" in connect_args
        or os.environ.get("PGCONNECT_TIMEOUT", "").strip()
    ):  # a timeout the user chose is theirs
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_SECONDS
    for key, value in PG_TCP_SETTINGS.items():
        if key not in parsed.query:
            connect_args.setdefault(key, value)
    return sa.create_engine(parsed, connect_args=connect_args, **kwargs)


def lock_for_writing(conn: Connection) -> None:
    """On SQLite, take the file's write lock now (``BEGIN IMMEDIATE``, waiting up to the busy
    timeout) unless this connection's transaction has begun already.  pysqlite begins a
    transaction only at the first write, so two processes reading and then writing (check,
    then insert) could both pass the check.  Elsewhere nothing: PostgreSQL callers lock rows."""
    if conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
        conn.exec_driver_sql("BEGIN IMMEDIATE")
