"""``cxr-drift keys``: create, list and revoke the API keys kept in the audit database.

    cxr-drift keys create --role audit [--name NAME] [--database-url URL]
    cxr-drift keys list [--database-url URL]
    cxr-drift keys revoke NAME [--database-url URL]

The URL defaults to ``CXR_DRIFT_DATABASE_URL``. The plaintext key is printed once, on stdout.
"""

from __future__ import annotations

import argparse
import secrets

from cli.options import add_database_url, database_url
from core.errors import UsageError
from service.app.keys import ROLES, create_key, list_keys, revoke_key
from service.audit.db import DatabaseUnavailable, make_engine

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="keys_action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument(
        "--role", required=True, choices=ROLES, help="what the key may do (admin: everything)"
    )
    create.add_argument("--name", default=None, help="unique name of the key (default: <role>-<random>)")
    add_database_url(create)
    listing = actions.add_parser("list", help="list keys (names, roles, dates; never the keys)")
    add_database_url(listing)
    revoke = actions.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name", help="name of the key to revoke")
    add_database_url(revoke)


def run(args: argparse.Namespace) -> int:
    engine = make_engine(database_url(args))
    try:
        if args.keys_action == "create":
            name = args.name or f"{args.role}-{secrets.token_hex(4)}"
            key = create_key(engine, name=name, role=args.role)
            print(f"created API key {name!r} with role {args.role!r}; it is shown only now:")
            print(key)
        elif args.keys_action == "list":
            keys = list_keys(engine)
            if not keys:
                print("no API keys")
            for item in keys:
                created = item.created_at.isoformat() if item.created_at else "-"
                status = f"revoked {item.revoked_at.isoformat()}" if item.revoked_at else "active"
                print(f"{item.name}\t{item.role}\t{created}\t{status}")
        elif args.keys_action == "revoke":
            revoke_key(engine, name=args.name)
            print(f"revoked API key {args.name!r}")
        else:  # argparse makes the action required; this guards direct callers
            raise UsageError(f"unknown keys action {args.keys_action!r}; valid options: create, list, revoke")
    except DatabaseUnavailable as error:
        raise OSError(str(error)) from error
    finally:
        engine.dispose()
    return 0
