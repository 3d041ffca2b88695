"""Schema migrations of the metadata database (Alembic), SQLite and PostgreSQL alike.

The revisions live in :mod:`emix_core.store.migrations.versions`. A hub created before
migrations existed (its tables made by ``create_all``, no ``alembic_version``) is
stamped at the first revision, then upgraded in place. On PostgreSQL a migration holds
an advisory lock, so hub instances starting together migrate one after the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import OperationalError

from emix_core.errors import ConfigError

FIRST = "0001"
#: ``pg_advisory_xact_lock`` key held while migrating (the bytes of "emix-mig").
MIGRATION_LOCK = 0x656D69782D6D6967


def _config(conn: Connection | None) -> Config:
    config = Config()
    config.set_main_option("script_location", "emix_core.store:migrations")
    config.attributes["connection"] = conn
    return config


def head() -> str:
    """The newest revision this version of emix knows."""
    newest = ScriptDirectory.from_config(_config(None)).get_current_head()
    assert newest is not None, "emix ships its migrations"
    return newest


def current(engine: Engine) -> str | None:
    """The revision the database is at (``None``: empty, or made before migrations)."""
    with _reaching(engine), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _reaching(engine: Engine) -> Iterator[None]:
    """Say which database does not answer (without its password), not a traceback."""
    try:
        yield
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0][:300]
        url = engine.url.render_as_string(hide_password=True)
        raise ConfigError(f"the database {url} does not answer: {reason}") from None


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision`` (default: newest); return the revision reached."""
    with _reaching(engine), engine.begin() as conn:
        _lock(conn)
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and "facilities" in tables:
            command.stamp(_config(conn), FIRST)  # made by emix 0.1's create_all
        if MigrationContext.configure(conn).get_current_revision() != head() or revision != "head":
            command.upgrade(_config(conn), revision)
    return current(engine)


def downgrade(engine: Engine, revision: str) -> str | None:
    """Take the schema back to ``revision`` (``base``: no tables at all)."""
    if revision != "base":
        known = {s.revision for s in ScriptDirectory.from_config(_config(None)).walk_revisions()}
        if revision not in known:
            raise ConfigError(f"unknown schema revision {revision!r}; known: {sorted(known)}")
    with _reaching(engine), engine.begin() as conn:
        _lock(conn)
        command.downgrade(_config(conn), revision)
    return current(engine)
