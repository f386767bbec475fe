"""``cxr-drift openapi --out PATH [--check]``: write the service's OpenAPI document (or check it is current).

The document is rendered deterministically (sorted keys, two-space indent, trailing newline) so that the
committed ``openapi/openapi.json`` changes only when the API does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.errors import UsageError
from service.app.openapi import openapi_document, render

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", type=Path, required=True, help="where to write the document (e.g. openapi/openapi.json)"
    )
    p.add_argument(
        "--check", action="store_true", help="do not write; fail if PATH differs from the app's schema"
    )


def run(args: argparse.Namespace) -> int:
    text = render(openapi_document())
    out: Path = args.out
    if args.check:
        if not out.is_file():
            raise UsageError(f"{out} does not exist; run: cxr-drift openapi --out {out}")
        if out.read_text(encoding="utf-8") != text:
            raise UsageError(
                f"{out} is out of date with the app's schema; run: cxr-drift openapi --out {out}"
            )
        print(f"{out} is up to date")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(text)} bytes)")
    return 0
