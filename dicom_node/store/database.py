"""Database engine and schema migrations.

One engine per process, made here. SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed transaction
survives a crash of the process; after a power loss the last commits may be missing from the database, but every
acknowledged file is fsynced in the spool and :func:`dicom_node.store.spool.reconcile_spool` puts its row back at
start-up. Writers take the lock at ``BEGIN IMMEDIATE`` so two writers never deadlock on a lock upgrade.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

LOGGER = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def utcnow() -> dt.datetime:
    """Current UTC time as a naive datetime (how every timestamp in the database is stored)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself (pysqlite's own BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """Create the process's engine for ``url`` (SQLite or PostgreSQL).

    Parameters
    ----------
    url : str
        SQLAlchemy URL, e.g. ``sqlite:////srv/dicom-node/dicom-node.sqlite3`` or
        ``postgresql+psycopg://node@db/dicom_node``.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, pool_size=20, max_overflow=20, pool_timeout=60)
        _configure_sqlite(engine)
    else:
        engine = create_engine(url, pool_size=20, max_overflow=10, pool_pre_ping=True)
    return engine


def _alembic_config(connection: Connection) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig  # noqa: PLC0415 - alembic (~0.2 s) only to migrate

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest version (creates it in an empty database).

    An older database is upgraded in place by the Alembic migrations shipped with the package.
    """
    from alembic import command  # noqa: PLC0415 - alembic (~0.2 s) only to migrate

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Several processes of a scaled-out site start together: one migrates, the others wait for it.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7770001)")
        command.upgrade(_alembic_config(connection), "head")


def schema_version(engine: Engine) -> str | None:
    """Return the Alembic revision the database is at, or ``None`` for an empty database."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        row = connection.exec_driver_sql("SELECT version_num FROM alembic_version").first()
        return row[0] if row else None


def schema_head() -> str:
    """The newest schema revision this package ships (what :func:`migrate` brings a database to)."""
    from alembic.config import Config as AlembicConfig  # noqa: PLC0415 - alembic (~0.2 s) only to migrate
    from alembic.script import ScriptDirectory  # noqa: PLC0415 - alembic (~0.2 s) only to migrate

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head
