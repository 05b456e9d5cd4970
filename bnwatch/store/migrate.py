"""Alembic migrations, run programmatically (``bnwatch db upgrade|downgrade``)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import SQLAlchemyError

from bnwatch.store.engine import SchemaError, create_engine, parse_url, redacted

logger = logging.getLogger("bnwatch")


def migrations_dir() -> Path:
    """The Alembic environment: ``migrations/`` of the source tree, or the packaged copy."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "migrations", here.parents[1] / "_migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise SchemaError("bnwatch's migrations are missing from this installation")


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    script = ScriptDirectory(str(migrations_dir()))
    head = script.get_current_head()
    if head is None:  # pragma: no cover - the package ships revisions
        raise SchemaError("no migration revisions found")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None`` for a database without bnwatch tables)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str = "-1") -> None:
    command.downgrade(alembic_config(engine), revision)


@functools.cache
def known_revisions() -> frozenset[str]:
    """The revisions of this bnwatch's migrations (read once: they ship with the code)."""
    script = ScriptDirectory(str(migrations_dir()))
    return frozenset(rev.revision for rev in script.walk_revisions())


def is_known_revision(current: str | None) -> bool:
    """Whether a database at ``current`` is one this bnwatch can read or migrate: ``None`` (no
    bnwatch schema yet) or one of its revisions.  Else a newer bnwatch migrated it -- or the
    ``alembic_version`` table there is another application's."""
    return current is None or current in known_revisions()


def check_known_revision(engine: Engine, current: str | None) -> None:
    """Raise :class:`SchemaError` when the database is at ``current``, a revision this
    bnwatch's migrations do not contain (:func:`is_known_revision`): neither reading it nor
    migrating it (Alembic cannot locate the revision to start from) can work.  Either a newer
    bnwatch wrote it -- upgrading bnwatch is the fix -- or another application keeps its
    Alembic revision in the same ``alembic_version`` table -- bnwatch needs a database or a
    schema of its own."""
    if is_known_revision(current):
        return
    raise SchemaError(
        f"{redacted(engine.url)} is at schema revision {current}, which this bnwatch version "
        "does not know: either a newer bnwatch migrated it -- upgrade bnwatch -- or its "
        "alembic_version table is another application's -- give bnwatch a database of its "
        "own, or a schema (PostgreSQL: CREATE SCHEMA bnwatch, and add "
        "?options=-csearch_path%3Dbnwatch to the URL)"
    )


def ensure_schema(engine: Engine, *, create: bool = True) -> None:
    """Make sure the database has the current schema.

    An empty database is migrated to the current schema (when ``create``); a database behind
    or ahead of this bnwatch version raises :class:`SchemaError` saying what to do.
    """
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    where = redacted(engine.url)
    if current is None:
        if not create:
            raise SchemaError(
                f"{where} has no bnwatch schema: run `bnwatch db upgrade --db {where}`"
            )
        logger.info("bnwatch: creating the schema in %s (revision %s)", where, head)
        try:
            upgrade(engine)
        except SQLAlchemyError:
            # two processes opening one empty database (the workers of `bnwatch serve`, a
            # monitor and a profile): the migration runs in one transaction, so the loser's
            # fails ("already exists") once the winner's committed -- and then the schema is
            # there, complete
            if current_revision(engine) != head:
                raise
            logger.info("bnwatch: %s was given the schema by another process meanwhile", where)
        return
    check_known_revision(engine, current)
    raise SchemaError(
        f"{where} is at schema revision {current} but this bnwatch needs {head}: "
        f"run `bnwatch db upgrade --db {where}`"
    )


def engine_for(url: str | URL, *, create: bool = True, argument: str = "store") -> Engine:
    """An engine whose database has the current schema (see :func:`ensure_schema`).

    With ``create=False`` (readers) nothing is created: a SQLite file that does not exist is a
    :class:`SchemaError` too -- opening it would leave an empty file at a mistyped path.
    """
    if create:
        engine = create_engine(url, argument=argument)
    else:
        engine = existing_engine(url, argument=argument)
    ensure_schema(engine, create=create)
    return engine


def existing_engine(url: str | URL, *, argument: str = "store") -> Engine:
    """An engine for a database that must exist already, whatever its schema (readers,
    ``bnwatch db current|downgrade``): a SQLite file that does not exist is a
    :class:`SchemaError` -- opening it would leave an empty file at a mistyped path."""
    parsed = parse_url(url, argument=argument)
    file = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if file and not Path(file).exists():  # parse_url refused in-memory ones
        raise SchemaError(
            f"there is no database file {file!r} yet: watch a model with store="
            f"{redacted(parsed)!r}, run `bnwatch demo`, or `bnwatch db upgrade --db "
            f"{redacted(parsed)}`"
        )
    return create_engine(url, argument=argument)
