"""Engine setup and schema migrations for the job log.

SQLite (the default) runs in WAL mode so readers never block the writer, with a busy
timeout, and every transaction that may write starts with ``BEGIN IMMEDIATE``: a deferred
transaction that reads and then writes fails at once with "database is locked" when another
writer got in between, whatever the timeout, while an immediate one waits its turn.
PostgreSQL needs none of this. The schema is managed by Alembic and upgraded at startup.
The SQLite file holds patient identifiers, so it is made readable by the service user only
(0600); SQLite gives its -wal and -shm files the database file's permissions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")


def create_db_engine(url: str, busy_timeout_ms: int = 30000) -> Engine:
    """An engine for ``url``; for SQLite, creates the parent folder and sets the pragmas."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, future=True)
    database = url.split("///", 1)[1] if "///" in url else ""
    if database and database != ":memory:":
        _private_file(Path(database))
    engine = create_engine(
        url,
        # Autocommit at the driver level: SQLAlchemy's "begin" event below issues the BEGIN.
        connect_args={"isolation_level": None, "check_same_thread": False, "timeout": 30},
        pool_size=20,
        max_overflow=20,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a crash of the process (kill -9); only a
        # power loss can drop the last commits, and the spool's fsynced files are then
        # re-indexed at startup (spool.reconcile), so no acknowledged instance is lost.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get("read_only"):
            connection.exec_driver_sql("BEGIN")  # a WAL reader: blocks no one
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _private_file(path: Path) -> None:
    """Create the SQLite file (and its folder) if missing, owner-only; make an existing
    file, -wal and -shm owner-only too (files of older versions were world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists() and file.stat().st_mode & 0o077:
            file.chmod(0o600)


def read_only(engine: Engine) -> Engine:
    """The same engine for transactions that only read.

    On SQLite they begin deferred, so they never hold the write lock (in WAL mode they see
    a snapshot and block no writer); elsewhere the option changes nothing.
    """
    return engine.execution_options(read_only=True)


# The key of the PostgreSQL advisory lock that serialises migrations across nodes.
MIGRATION_LOCK = 0x41494E4F44450001


class SchemaTooNewError(RuntimeError):
    """The job log was migrated by a newer version of the node than this one."""


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent).

    On PostgreSQL, nodes starting together take turns: the migration runs under a
    transaction-scoped advisory lock, so the first migrates and the others find the schema
    at head once it commits. A schema at a revision this node does not know (migrated by a
    newer version) raises :class:`SchemaTooNewError` naming both revisions.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    scripts = ScriptDirectory.from_config(config)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        current = MigrationContext.configure(connection).get_current_heads()
        for revision in current:
            try:
                scripts.get_revision(revision)
            except (CommandError, ResolutionError):
                raise SchemaTooNewError(
                    f"the job log's schema is at revision {revision}, newer than this node "
                    f"knows (its newest is {scripts.get_current_head()}); upgrade the node"
                ) from None
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values usable after commit (rows are passed between stages)."""
    return sessionmaker(engine, expire_on_commit=False)
