"""Database engines and schema migrations for the audit database (SQLite or PostgreSQL).

The engine is built by the caller (the app's lifespan, a CLI command, a test), never at import. SQLite is
the embedded default and is configured for durability: WAL journal, ``synchronous=FULL``, foreign keys on,
and a busy timeout so concurrent writers wait instead of failing. PostgreSQL is reached through psycopg 3
(``postgresql+psycopg://``). Migrations are the Alembic revisions in ``migrations/`` at the repository root
(override with ``CXR_DRIFT_MIGRATIONS_DIR``); ``migrations/env.py`` takes the URL from the caller.
"""

from __future__ import annotations

import contextvars
import functools
import heapq
import itertools
import json
import logging
import math
import os
import re
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc

from core.errors import ConfigError

__all__ = [
    "DatabaseUnavailable",
    "DbTimeouts",
    "check_writable",
    "client_deadline",
    "current_revision",
    "downgrade",
    "grant_service_role",
    "head_revision",
    "legacy_stored_json",
    "make_engine",
    "migrations_dir",
    "read_bound",
    "source_url",
    "stored_json",
    "timeouts_of",
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
    """The exact text written to the JSON columns: canonical JSON (sorted keys, no whitespace, ASCII, no NaN).

    It is the text the row hash covers (``service.audit.chain.canonical_json`` of a JSON value), so
    verification hashes the stored bytes as they are. Verification requires a stored JSON text to be exactly
    this function, or :func:`legacy_stored_json`, of its parsed value, so the bytes SQL reads
    (``json_extract``, ``->>``) are the bytes that are hashed.
    """
    return _CANONICAL_JSON.encode(value)


# json.dumps with these arguments, without building an encoder per call (verification calls it per row)
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def legacy_stored_json(value: Any) -> str:
    """The text rows written before canonical storage hold (``json.dumps`` with its defaults)."""
    return json.dumps(value)


def _install_sqlite_pragmas(engine: sa.Engine, *, busy_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so that BEGIN is ours (deferred or IMMEDIATE).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        immediate = connection.get_execution_options().get(SQLITE_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@dataclass(frozen=True)
class DbTimeouts:
    """Time limits on everything the service does with the database (seconds).

    ``timeout_s`` bounds one operation of a request (an append with its chain lock, a key lookup, the
    readiness check): it is the pool checkout wait, the connect timeout, PostgreSQL's ``lock_timeout`` (the
    chain lock is a lock), and, for appends, ``statement_timeout``, ``idle_in_transaction_session_timeout``
    and the server-side commit deadline. ``read_timeout_s`` bounds the audit reads (summaries, listings,
    verification, a CSV export from its first to its last row) and is the session's ``statement_timeout``.
    Both are also enforced on the client: a connection held longer than its bound is aborted (its socket
    shut down) by a watchdog, because a stalled server (stopped process, network partition) answers
    nothing, so no server-side timeout can fire and a blocked read has no timeout of its own.
    """

    timeout_s: float = 5.0
    read_timeout_s: float = 120.0


def make_engine(url: str, timeouts: DbTimeouts | None = None) -> sa.Engine:
    """Engine for ``url`` (``sqlite:///path.db`` or ``postgresql+psycopg://user@host/db``).

    ``timeouts`` (the service passes its settings) bound every checkout of a connection; without them
    (migrations, CLI, tests) operations are unbounded apart from the connect and busy timeouts.
    """
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    engine = _make_engine(parsed, backend, timeouts)
    _ENGINE_URLS[engine] = url.render_as_string(hide_password=False) if isinstance(url, sa.URL) else str(url)
    return engine


def source_url(engine: sa.Engine) -> str:
    """The URL :func:`make_engine` was given for ``engine`` (options and password included: what another
    process needs to open the same database), else the engine's own."""
    return _ENGINE_URLS.get(engine) or engine.url.render_as_string(hide_password=False)


def _make_engine(parsed: sa.URL, backend: str, timeouts: DbTimeouts | None) -> sa.Engine:
    if backend == "sqlite":
        busy_s = timeouts.timeout_s if timeouts is not None else SQLITE_BUSY_TIMEOUT_MS / 1000
        engine = sa.create_engine(
            parsed,
            pool_pre_ping=True,
            pool_timeout=timeouts.timeout_s if timeouts is not None else 30.0,
            connect_args={"timeout": busy_s, "check_same_thread": False},
            json_serializer=stored_json,
        )
        _install_sqlite_pragmas(engine, busy_ms=int(busy_s * 1000))
        _install_watchdog(engine, timeouts, ping=False)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            raise ConfigError(
                f"PostgreSQL URLs must use the psycopg 3 driver ('postgresql+psycopg://...'), "
                f"got driver {parsed.get_driver_name()!r} in {parsed.render_as_string(hide_password=True)}"
            )
        # Without a connect timeout an unreachable server (packets dropped) holds every request for the
        # OS's TCP timeout (minutes) instead of answering 503; a timeout in the URL wins.
        connect_timeout = PG_CONNECT_TIMEOUT_S if timeouts is None else max(1, math.ceil(timeouts.timeout_s))
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = connect_timeout
        if timeouts is not None:
            # TCP keepalives and a TCP user timeout end a connection whose peer vanished (partition);
            # server-side limits abort what the server is doing when the client has given up.
            connect_args.update(
                keepalives=1,
                keepalives_idle=max(1, math.ceil(timeouts.timeout_s)),
                keepalives_interval=1,
                keepalives_count=3,
                tcp_user_timeout=int(timeouts.timeout_s * 1000),
            )
            limits = (
                f"-c statement_timeout={int(timeouts.read_timeout_s * 1000)} "
                f"-c lock_timeout={int(timeouts.timeout_s * 1000)}"
            )
            given = parsed.query.get("options")
            given_text = " ".join(given) if isinstance(given, tuple) else given
            connect_args["options"] = f"{given_text} {limits}" if given_text else limits
            parsed = parsed.difference_update_query(["options"])
        engine = sa.create_engine(
            parsed,
            # the watchdog's checkout listener pings instead (so the ping itself is bounded)
            pool_pre_ping=timeouts is None,
            pool_timeout=timeouts.timeout_s if timeouts is not None else 30.0,
            connect_args=connect_args,
            json_serializer=stored_json,
        )
        _install_watchdog(engine, timeouts, ping=True)
        return engine
    raise ConfigError(
        f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: "
        "expected one of 'sqlite:///PATH' or 'postgresql+psycopg://USER@HOST/DB'"
    )


# ------------------------------------------------------------------------------- client-side deadlines

_ENGINE_TIMEOUTS: weakref.WeakKeyDictionary[sa.Engine, DbTimeouts] = weakref.WeakKeyDictionary()
_ENGINE_URLS: weakref.WeakKeyDictionary[sa.Engine, str] = weakref.WeakKeyDictionary()
# the bound for connections checked out in this context (None: the engine's timeout_s)
_CHECKOUT_BOUND: contextvars.ContextVar[float | None] = contextvars.ContextVar("cxr_db_bound", default=None)


def timeouts_of(engine: sa.Engine) -> DbTimeouts | None:
    """The time limits ``engine`` was made with (None: unbounded)."""
    return _ENGINE_TIMEOUTS.get(engine)


@contextmanager
def read_bound(engine: sa.Engine) -> Iterator[None]:
    """Connections checked out inside get the engine's ``read_timeout_s`` instead of ``timeout_s``."""
    limits = timeouts_of(engine)
    token = _CHECKOUT_BOUND.set(limits.read_timeout_s if limits is not None else None)
    try:
        yield
    finally:
        _CHECKOUT_BOUND.reset(token)


def client_deadline(connection: sa.Connection) -> float | None:
    """When (epoch seconds) the watchdog aborts ``connection``; None if it is not watched."""
    entry = connection.connection.info.get(_WATCH_KEY)
    return None if entry is None else float(entry["wall_deadline"])


def _abort_connection(dbapi_connection: Any) -> None:
    """Make a blocked call on ``dbapi_connection`` return with an error, from another thread."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.interrupt()
        return
    # psycopg: shut the socket down (not close: the descriptor stays owned by the connection). A blocked
    # read returns at once and the driver reports a lost connection, which SQLAlchemy invalidates.
    fd = dbapi_connection.pgconn.socket
    duplicate = socket.socket(fileno=os.dup(fd))
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    finally:
        duplicate.close()


class _Watchdog:
    """One thread that aborts connections held past their deadline (a heap of deadlines)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, Any]] = []
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, entry: dict[str, Any]) -> None:
        with self._lock:
            earliest = self._heap[0][0] if self._heap else math.inf
            heapq.heappush(self._heap, (deadline, next(self._counter), entry))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cxr-db-watchdog", daemon=True)
                self._thread.start()
            if deadline < earliest:  # otherwise the thread wakes up early enough already
                self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._heap:
                    self._lock.wait()
                deadline, _, entry = self._heap[0]
                now = time.monotonic()
                if deadline > now and not entry["done"]:
                    self._lock.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                if entry["done"]:
                    continue
                # under the lock: a checkin (release) cannot slip in and hand the connection to another
                # request before the abort lands
                entry["fired"] = True
                try:
                    _abort_connection(entry["dbapi"])
                except Exception as error:  # the connection may have closed meanwhile
                    log.debug("aborting a database connection failed: %s", error)
            log.warning(
                "audit database operation exceeded its %.1f s bound: its connection was aborted",
                entry["bound"],
            )

    def release(self, entry: dict[str, Any]) -> None:
        with self._lock:
            entry["done"] = True
            entry["dbapi"] = None  # the heap keeps the entry until its deadline: not the connection


_WATCHDOG = _Watchdog()
_WATCH_KEY = "cxr_watch"


def _install_watchdog(engine: sa.Engine, timeouts: DbTimeouts | None, *, ping: bool) -> None:
    if timeouts is None:
        return
    _ENGINE_TIMEOUTS[engine] = timeouts

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        bound = _CHECKOUT_BOUND.get() or timeouts.timeout_s
        entry = {
            "dbapi": dbapi_connection,
            "bound": bound,
            "done": False,
            "fired": False,
            "wall_deadline": time.time() + bound,
        }
        record.info[_WATCH_KEY] = entry
        _WATCHDOG.watch(time.monotonic() + bound, entry)
        if ping:
            # pool_pre_ping's work, under the deadline: a dead pooled connection is replaced
            try:
                with dbapi_connection.cursor() as cursor:
                    cursor.execute("SELECT 1")  # as pool_pre_ping: the transaction it opens is the next one's
            except Exception as error:
                _WATCHDOG.release(entry)
                if entry["fired"]:
                    raise DatabaseUnavailable(
                        f"audit database did not answer within {bound:g} s", public="stalled (timed out)"
                    ) from error
                raise exc.DisconnectionError(f"stale pooled connection: {error}") from error

    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_connection: Any, record: Any) -> None:
        entry = record.info.pop(_WATCH_KEY, None)
        if entry is not None:
            _WATCHDOG.release(entry)

    @event.listens_for(engine, "invalidate")
    def _on_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
        entry = record.info.pop(_WATCH_KEY, None)
        if entry is not None:
            _WATCHDOG.release(entry)


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


# ------------------------------------------------------------------------------------- least privilege

SERVICE_ROLE_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# what the service does with each table: append and read the audit log and the model lifecycle events,
# keep the daily rollup (derived from the chained rows, not chained itself: service/audit/rollup.py check()
# recomputes it from them), read keys and the schema revision
SERVICE_GRANTS: tuple[tuple[str, str], ...] = (
    ("audit_records", "SELECT, INSERT"),
    ("audit_drift", "SELECT, INSERT"),
    ("audit_model_events", "SELECT, INSERT"),
    ("audit_rollup", "SELECT, INSERT, UPDATE"),
    ("audit_rollup_state", "SELECT, UPDATE"),
    ("api_keys", "SELECT"),
    ("alembic_version", "SELECT"),
)


def grant_service_role(url: str, role: str, *, password: str | None = None) -> None:
    """As the owner at ``url`` (PostgreSQL): let ``role`` do what the service needs and nothing more.

    Creates ``role`` (LOGIN, not superuser, no CREATEDB/CREATEROLE/REPLICATION/BYPASSRLS) if it does not
    exist, sets its password when given, and grants it USAGE on the current schema, SELECT and INSERT on
    the audit tables, USAGE on their id sequences and SELECT on ``api_keys`` and ``alembic_version``.
    It cannot UPDATE, DELETE or TRUNCATE, nor alter or drop the append-only triggers (only the owner can),
    nor ``SET session_replication_role`` (superuser only). The chain's advisory lock needs no grant.
    Refuses a role that is a superuser, bypasses row security or owns the tables.
    """
    if not SERVICE_ROLE_PATTERN.match(role):
        raise ConfigError(
            f"service role: expected a lower-case SQL identifier ([a-z_][a-z0-9_]*), got {role!r}"
        )
    engine = make_engine(url)
    try:
        if engine.dialect.name != "postgresql":
            raise ConfigError(
                "a service role needs PostgreSQL (SQLite has no roles: protect the file instead)"
            )
        with translate_errors("grant the service role"), engine.begin() as connection:
            found = connection.execute(
                sa.text("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = :role"), {"role": role}
            ).first()
            if found is None:
                connection.exec_driver_sql(
                    f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS'
                )
            elif found[0]:
                raise ConfigError(f"service role {role!r} is a superuser or bypasses row security: refusing")
            if password is not None:
                statement = connection.execute(
                    sa.text(
                        "SELECT format('ALTER ROLE %I PASSWORD %L', CAST(:role AS text), CAST(:password AS text))"
                    ),
                    {"role": role, "password": password},
                ).scalar_one()
                connection.exec_driver_sql(statement)
            owner = connection.execute(
                sa.text(
                    "SELECT tableowner FROM pg_tables WHERE tablename = 'audit_records' "
                    "AND schemaname = current_schema()"
                )
            ).scalar()
            if owner is None:
                raise ConfigError("no audit tables in the current schema: run 'cxr-drift db upgrade' first")
            if owner == role:
                raise ConfigError(f"service role {role!r} owns the audit tables: use a separate owner role")
            schema = connection.execute(sa.text("SELECT current_schema()")).scalar_one()
            connection.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
            for table, privileges in SERVICE_GRANTS:
                connection.exec_driver_sql(f'REVOKE ALL ON "{table}" FROM "{role}"')
                connection.exec_driver_sql(f'GRANT {privileges} ON "{table}" TO "{role}"')
            for table, _ in SERVICE_GRANTS:
                if not connection.execute(
                    sa.text(
                        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                        "AND table_name = :table AND column_name = 'id'"
                    ),
                    {"table": table},
                ).first():
                    continue
                sequence = connection.execute(
                    sa.text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": table}
                ).scalar()
                if sequence is not None:
                    connection.exec_driver_sql(f'GRANT USAGE ON SEQUENCE {sequence} TO "{role}"')
    finally:
        engine.dispose()
    log.info("service role %r granted SELECT/INSERT on the audit tables", role)
