"""``cxr-drift db``: migrate the audit database with the Alembic revisions in ``migrations/``.

    cxr-drift db upgrade [--revision head] [--database-url URL]
    cxr-drift db downgrade [--revision base] [--database-url URL]
    cxr-drift db current [--database-url URL]

The URL defaults to ``CXR_DRIFT_DATABASE_URL``.
"""

from __future__ import annotations

import argparse

from cli.options import add_database_url, database_url
from core.errors import UsageError
from service.audit import db

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="db_action", metavar="ACTION", required=True)
    up = actions.add_parser("upgrade", help="migrate to a newer revision (default: the newest)")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    add_database_url(up)
    down = actions.add_parser("downgrade", help="migrate back (default: to an empty schema)")
    down.add_argument("--revision", default="base", help="target revision (default: base, empty schema)")
    add_database_url(down)
    current = actions.add_parser("current", help="print the revision the database is at, and the newest")
    add_database_url(current)


def run(args: argparse.Namespace) -> int:
    url = database_url(args)
    try:
        if args.db_action == "upgrade":
            db.upgrade(url, args.revision)
            print(f"audit database upgraded to {args.revision}")
        elif args.db_action == "downgrade":
            db.downgrade(url, args.revision)
            print(f"audit database downgraded to {args.revision}")
        elif args.db_action == "current":
            engine = db.make_engine(url)
            try:
                current = db.current_revision(engine)
            finally:
                engine.dispose()
            print(f"current: {current or '(empty: not migrated)'}  newest: {db.head_revision()}")
        else:
            raise UsageError(
                f"unknown db action {args.db_action!r}; valid options: upgrade, downgrade, current"
            )
    except db.DatabaseUnavailable as error:
        raise OSError(str(error)) from error
    return 0
