"""Options that several commands share (not a command itself)."""

from __future__ import annotations

import argparse
import os

from core.errors import ConfigError

__all__ = ["DATABASE_URL_ENV", "add_database_url", "database_url"]

DATABASE_URL_ENV = "CXR_DRIFT_DATABASE_URL"


def add_database_url(parser: argparse.ArgumentParser) -> None:
    """Add ``--database-url`` (default: the environment variable)."""
    parser.add_argument(
        "--database-url",
        default=None,
        help=f"SQLAlchemy URL of the audit database (default: ${DATABASE_URL_ENV})",
    )


def database_url(args: argparse.Namespace) -> str:
    """``--database-url``, else the environment; neither is a :class:`ConfigError` saying how to give one."""
    url = args.database_url or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise ConfigError(
            f"no database URL: pass --database-url or set {DATABASE_URL_ENV} "
            "(e.g. sqlite:///audit.db or postgresql+psycopg://USER@HOST/DB)"
        )
    return str(url)
