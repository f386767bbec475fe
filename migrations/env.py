"""Alembic environment: the URL and the table metadata come from the application.

URL, first found: ``config.attributes["database_url"]`` (set by ``service.audit.db.upgrade``), the
``CXR_DRIFT_DATABASE_URL`` environment variable, ``sqlalchemy.url`` in alembic.ini.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text

from service.audit.db import SQLITE_IMMEDIATE, make_engine
from service.audit.tables import metadata

config = context.config

# Only the alembic CLI (which has an ini file) configures logging; programmatic callers keep theirs,
# and `alembic -x configure_logger=false ...` (tests) opts out.
wants_logging = context.get_x_argument(as_dictionary=True).get("configure_logger", "true") != "false"
if config.config_file_name is not None and wants_logging:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata
MIGRATION_LOCK_KEY = 0x0C58_D41F_7A12


def database_url() -> str:
    url = (
        config.attributes.get("database_url")
        or os.environ.get("CXR_DRIFT_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise RuntimeError(
            "no database URL: set CXR_DRIFT_DATABASE_URL (e.g. sqlite:///audit.db or "
            "postgresql+psycopg://USER@HOST/DB) or pass --database-url"
        )
    return str(url)


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            # Replicas that migrate on start must not race: serialise migrations on the database itself
            # (PostgreSQL: a transaction-scoped advisory lock; SQLite: the write lock, BEGIN IMMEDIATE).
            if connection.dialect.name == "sqlite":
                connection.execution_options(**{SQLITE_IMMEDIATE: True})
            # SQLite runs DDL in transactions too (pysqlite's own transaction handling is off, see
            # service.audit.db): one transaction for the whole run, so a refused step leaves nothing behind.
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                compare_type=True,
                transactional_ddl=True,
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                    )
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
