"""Database engines and schema migrations for the audit database (SQLite or PostgreSQL).

The engine is built by the caller (the app's lifespan, a CLI command, a test), never at import. SQLite is
the embedded default and is configured for durability: WAL journal, ``synchronous=FULL``, foreign keys on,
and a busy timeout so concurrent writers wait instead of failing. PostgreSQL is reached through psycopg 3
(``postgresql+psycopg://``). Migrations are the Alembic revisions in ``migrations/`` at the repository root
(override with ``CXR_DRIFT_MIGRATIONS_DIR``); ``migrations/env.py`` takes the URL from the caller.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc

from core.errors import ConfigError

__all__ = [
    "DatabaseUnavailable",
    "check_writable",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "migrations_dir",
    "stored_json",
    "translate_errors",
    "upgrade",
]

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 10
# Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE (takes the write lock at once).
SQLITE_IMMEDIATE = "cxr_drift_sqlite_immediate"
# Alembic's `context`/`op` are module-level proxies: one migration at a time per process. Between
# processes (replicas), migrations/env.py serialises on the database.
_ALEMBIC_LOCK = threading.Lock()


class DatabaseUnavailable(RuntimeError):
    """The audit database cannot be reached or written; the web layer answers 503.

    ``str(error)`` is the detailed reason for the log (it may name the host, port and user); ``public`` is a
    generic reason that can be shown to anyone (no hosts, ports, credentials or driver messages).
    """

    def __init__(self, message: str, *, public: str = "unreachable, stalled or not writable") -> None:
        super().__init__(message)
        self.public = public


@contextmanager
def translate_errors(action: str) -> Iterator[None]:
    """Turn connection/operational failures of the DB driver into :class:`DatabaseUnavailable`."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError, exc.TimeoutError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise DatabaseUnavailable(f"audit database unavailable while trying to {action}: {reason}") from error


def stored_json(value: Any) -> str:
    """The exact text written to the JSON columns (``json.dumps`` with its defaults, on both databases).

    Verification (``service.audit.chain.verify``) requires a stored JSON text to be exactly this function
    of its parsed value, so the bytes SQL reads (``json_extract``, ``->>``) are the bytes that are hashed.
    """
    return json.dumps(value)


def _install_sqlite_pragmas(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so that BEGIN is ours (deferred or IMMEDIATE).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        immediate = connection.get_execution_options().get(SQLITE_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str) -> sa.Engine:
    """Engine for ``url`` (``sqlite:///path.db`` or ``postgresql+psycopg://user@host/db``), pre-ping on."""
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        engine = sa.create_engine(
            parsed, pool_pre_ping=True, connect_args=connect_args, json_serializer=stored_json
        )
        _install_sqlite_pragmas(engine)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            raise ConfigError(
                f"PostgreSQL URLs must use the psycopg 3 driver ('postgresql+psycopg://...'), "
                f"got driver {parsed.get_driver_name()!r} in {parsed.render_as_string(hide_password=True)}"
            )
        # Without a connect timeout an unreachable server (packets dropped) holds every request for the
        # OS's TCP timeout (minutes) instead of answering 503; a timeout in the URL wins.
        connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    raise ConfigError(
        f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
        "expected one of 'sqlite:///PATH' or 'postgresql+psycopg://USER@HOST/DB'"
    )


def migrations_dir() -> Path:
    """The Alembic scripts: ``$CXR_DRIFT_MIGRATIONS_DIR`` or ``migrations/`` at the repository root."""
    configured = os.environ.get("CXR_DRIFT_MIGRATIONS_DIR")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "migrations"
    if not (path / "env.py").is_file():
        raise FileNotFoundError(
            f"Alembic migrations not found: expected {path}/env.py (set CXR_DRIFT_MIGRATIONS_DIR)"
        )
    return path


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    # Passed as an attribute, not as sqlalchemy.url: ConfigParser would interpolate '%' in encoded URLs.
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (default: the newest)."""
    from alembic import command

    with _ALEMBIC_LOCK, translate_errors("upgrade the schema"):
        command.upgrade(_alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Take the database at ``url`` back to ``revision`` (default: empty schema)."""
    from alembic import command

    with _ALEMBIC_LOCK, translate_errors("downgrade the schema"):
        command.downgrade(_alembic_config(url), revision)


def head_revision() -> str | None:
    """The newest revision in the migration scripts (read once per scripts folder)."""
    return _head_revision(migrations_dir())


@functools.lru_cache(maxsize=4)
def _head_revision(scripts: Path) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(scripts)).get_current_head()


def current_revision(engine: sa.Engine) -> str | None:
    """The Alembic revision stamped in the database (None for an unmigrated database)."""
    from alembic.runtime.migration import MigrationContext

    with translate_errors("read the schema revision"), engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_writable(engine: sa.Engine) -> None:
    """Raise :class:`DatabaseUnavailable` with a reason unless the audit tables can be written now.

    Checks, in one transaction that is rolled back: the server accepts a write transaction (SQLite: the
    write lock can be taken with ``BEGIN IMMEDIATE``; PostgreSQL: not a read-only standby or session), and
    the schema is migrated to the newest revision.
    """
    backend = engine.dialect.name
    with translate_errors("check that it is writable"), engine.connect() as connection:
        if backend == "sqlite":
            connection.execution_options(**{SQLITE_IMMEDIATE: True})
        with connection.begin() as transaction:
            if backend == "postgresql":
                if connection.exec_driver_sql("SELECT pg_is_in_recovery()").scalar():
                    raise DatabaseUnavailable(
                        "audit database is a read-only standby (pg_is_in_recovery)", public="read-only"
                    )
                if connection.exec_driver_sql("SHOW transaction_read_only").scalar() == "on":
                    raise DatabaseUnavailable(
                        "audit database session is read-only (transaction_read_only)", public="read-only"
                    )
            if not sa.inspect(connection).has_table("audit_records"):
                raise DatabaseUnavailable(
                    "audit database has no audit tables: run 'cxr-drift db upgrade' "
                    "(or 'alembic upgrade head')",
                    public="not migrated",
                )
            transaction.rollback()
    try:
        head = head_revision()
    except FileNotFoundError:
        return
    current = current_revision(engine)
    if current != head:
        raise DatabaseUnavailable(
            f"audit database schema is at revision {current!r}, expected {head!r}: run 'cxr-drift db upgrade'",
            public="not migrated to the newest schema revision",
        )
