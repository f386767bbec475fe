"""``cxr-drift reload``: ask a running service to rescan its artifacts folder (``POST /admin/models/reload``).

    cxr-drift reload [--url http://127.0.0.1:8000] [--reason TEXT]

The admin key comes from ``CXR_DRIFT_API_KEY`` (or ``--key-env NAME``: the variable to read it from), never
from the command line (it would show in the process list and the shell history). New folders are verified
and loaded, removed ones retired, changed ones replaced; each change is a lifecycle record in the audit
chain under the key's name, with the reason. Prints what changed; exit code 1 if the service refused.
"""

from __future__ import annotations

import argparse
import json
import os

import httpx

from core.errors import ConfigError, DomainError

__all__ = ["configure_parser", "run"]

KEY_ENV = "CXR_DRIFT_API_KEY"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the service (default http://127.0.0.1:8000)"
    )
    p.add_argument("--reason", default=None, help="why (kept in the lifecycle records)")
    p.add_argument(
        "--key-env", default=KEY_ENV, help=f"environment variable holding an admin key (default {KEY_ENV})"
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait (loading verifies every file)"
    )
    p.add_argument("--json", action="store_true", help="print the service's answer as JSON")


def run(args: argparse.Namespace) -> int:
    key = os.environ.get(args.key_env)
    if not key:
        raise ConfigError(
            f"no API key: set {args.key_env} to an admin key (cxr-drift keys create --role admin)"
        )
    url = args.url.rstrip("/") + "/admin/models/reload"
    body = {"reason": args.reason} if args.reason is not None else None
    try:
        response = httpx.post(url, json=body, headers={"X-API-Key": key}, timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise DomainError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": {"message": response.text[:500]}}
    if response.status_code != 200:
        message = answer.get("error", {}).get("message", response.reason_phrase)
        raise DomainError(f"reload refused ({response.status_code}): {message}")
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    for field in ("loaded", "replaced", "retired", "unchanged"):
        print(f"{field:>9}: {', '.join(answer[field]) or '-'}")
    for failed in answer["failed"]:
        print(f"   failed: {failed['name']}: {failed['reason']}")
    print(f"   events: {', '.join(map(str, answer['event_ids'])) or '-'} (GET /audit/model-events)")
    return 0
