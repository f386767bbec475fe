"""``cxr-drift db``: migrate the audit database with the Alembic revisions in ``migrations/``.

    cxr-drift db upgrade [--revision head] [--database-url URL]
    cxr-drift db downgrade [--revision base] [--database-url URL]
    cxr-drift db current [--database-url URL]
    cxr-drift db grant --role NAME [--database-url URL]
    cxr-drift db anchor [--out FILE] [--database-url URL]
    cxr-drift db verify-anchor FILE [--database-url URL]
    cxr-drift db rollup [--check] [--database-url URL]

The URL defaults to ``CXR_DRIFT_DATABASE_URL``. PostgreSQL least privilege: run these as the owner of the
tables; ``grant`` creates (if needed) the role the service connects as and lets it only INSERT and SELECT
the audit tables (password from ``CXR_DRIFT_SERVICE_ROLE_PASSWORD`` if set). ``upgrade`` does the same
for ``CXR_DRIFT_SERVICE_ROLE`` when that is set (the compose file's one-shot ``migrate`` service).
``anchor`` prints (and appends to FILE) the chain head as a JSON line, ``verify-anchor`` checks the last
line of FILE against the database (exit 1 if it does not hold); both sign/check with ``CXR_DRIFT_ANCHOR_KEY``
when it is set. ``rollup`` adds the records after the rollup's watermark to it (service/audit/rollup.py
``catch_up``; summaries also do it when the tail grows long); ``--check`` then recomputes the rollup from the
rows and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.options import add_database_url, database_url
from core.errors import UsageError
from service.app.settings import get_settings
from service.audit import anchor, db, rollup
from service.audit.chain import canonical_json

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
    grant = actions.add_parser(
        "grant", help="PostgreSQL: create/grant the service role (INSERT and SELECT on the audit tables only)"
    )
    grant.add_argument("--role", default=None, help="role name (default: $CXR_DRIFT_SERVICE_ROLE)")
    add_database_url(grant)
    anchor = actions.add_parser("anchor", help="print the chain head as a (signed) JSON anchor line")
    anchor.add_argument("--out", type=Path, default=None, help="also append the line to this file")
    add_database_url(anchor)
    check = actions.add_parser("verify-anchor", help="check the last anchor line of FILE against the chain")
    check.add_argument("file", type=Path, help="a file of anchor lines (the service's anchor_file)")
    add_database_url(check)
    rolled = actions.add_parser("rollup", help="catch the summary rollup up to the newest record")
    rolled.add_argument(
        "--check", action="store_true", help="then compare it with the rows (exit 1 on a difference)"
    )
    add_database_url(rolled)


def _rollup(url: str, check: bool) -> int:
    engine = db.make_engine(url)
    try:
        covered = rollup.catch_up(engine)
        with engine.connect() as connection:
            mark = rollup.watermark(connection)
        print(f"rollup: {covered} record(s) added, watermark {mark}")
        if not check:
            return 0
        problems = rollup.check(engine)
    finally:
        engine.dispose()
    for problem in problems:
        print(problem)
    print(f"rollup check: {len(problems)} difference(s)")
    return 1 if problems else 0


def _grant(url: str, role: str | None) -> None:
    settings = get_settings()
    role = role or settings.service_role
    if not role:
        raise UsageError("no service role: pass --role NAME or set CXR_DRIFT_SERVICE_ROLE")
    password = settings.service_role_password
    db.grant_service_role(url, role, password=password.get_secret_value() if password else None)
    print(f"service role {role!r}: SELECT and INSERT on the audit tables, nothing more")


def _anchor(url: str, args: argparse.Namespace) -> int:
    secret = get_settings().anchor_key
    key = secret.get_secret_value() if secret is not None else None
    engine = db.make_engine(url)
    try:
        if args.db_action == "anchor":
            print(canonical_json(anchor.export_anchor(engine, path=args.out, key=key)))
            return 0
        lines = [line for line in args.file.read_text(encoding="ascii").splitlines() if line.strip()]
        if not lines:
            raise UsageError(f"{args.file}: no anchor line")
        result = anchor.verify_anchor(engine, lines[-1], key=key)
    finally:
        engine.dispose()
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.ok else 1


def run(args: argparse.Namespace) -> int:
    url = database_url(args)
    try:
        if args.db_action == "upgrade":
            db.upgrade(url, args.revision)
            print(f"audit database upgraded to {args.revision}")
            if get_settings().service_role:
                _grant(url, None)
        elif args.db_action == "grant":
            _grant(url, args.role)
        elif args.db_action == "rollup":
            return _rollup(url, args.check)
        elif args.db_action in ("anchor", "verify-anchor"):
            return _anchor(url, args)
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
                f"unknown db action {args.db_action!r}; valid options: upgrade, downgrade, current, grant, anchor, verify-anchor, rollup"
            )
    except db.DatabaseUnavailable as error:
        raise OSError(str(error)) from error
    return 0
