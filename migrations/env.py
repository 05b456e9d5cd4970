"""Alembic environment for bnwatch.

Run through ``bnwatch db upgrade`` (which passes its engine in ``config.attributes``) or with
the ``alembic`` command line: ``alembic -x url=sqlite:///bnwatch.db upgrade head``.  With
``--sql`` (offline mode) nothing connects: the URL only names the dialect whose SQL is printed.
"""

from __future__ import annotations

from alembic import context

from bnwatch.store.engine import DEFAULT_URL, create_engine, parse_url
from bnwatch.store.models import Base

config = context.config
target_metadata = Base.metadata


def command_line_url() -> str:
    url: str = context.get_x_argument(as_dictionary=True).get("url", DEFAULT_URL)
    return url


def run_migrations_offline() -> None:
    """Print the SQL of the migrations (``alembic upgrade ... --sql``), values inlined."""
    url = parse_url(command_line_url(), argument="-x url")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.get_backend_name() == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        engine = create_engine(command_line_url())
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # batch migrations recreate tables; SQLite would refuse to drop referenced ones
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
            # one transaction holding the write lock from before the revision is read: pysqlite
            # runs DDL outside any transaction of its own, so a migration could be left half
            # done, and two processes creating one database interleaved their tables and both
            # failed.  The second now waits, then finds the schema there and runs nothing.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=sqlite,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations()
