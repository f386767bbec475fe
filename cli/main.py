"""The ``cxr-drift`` command: one entry point, one module per subcommand, imported only when used.

Every command module (``cli/<command>.py``) exposes ``configure_parser(parser)`` and ``run(args) -> int``.
A :class:`core.errors.DomainError` (bad input, bad artifact, bad usage) or an ``OSError`` about a path the
user gave is printed as one line on stderr with exit code 2 (usage) or 1; any other exception is a bug and
keeps its traceback. ``--debug`` (or ``CXR_DRIFT_DEBUG=1``) shows the traceback of a domain error too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from core.errors import DomainError, UsageError

__all__ = ["COMMANDS", "build_parser", "main"]


# command -> (module, one-line help). Modules are imported lazily so `cxr-drift --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("cli.synth", "generate a synthetic chest X-ray dataset (ImageFolder + masks + manifest.csv)"),
    "train": ("cli.train", "two-stage training (transfer, then fine-tuning) and export of a model pair"),
    "export": ("cli.export", "export a trained model pair to the artifact folder (ONNX + manifest)"),
    "calibrate": ("cli.calibrate", "learn drift thresholds from a reference split and store them"),
    "seal": ("cli.seal", "check or (re-)seal a model pair's manifest after reviewing it"),
    "study": (
        "cli.study",
        "offline drift study over model pairs and a data split: tables, statistics, plots",
    ),
    "serve": ("cli.serve", "run the API server"),
    "demo": ("cli.demo", "synthetic data + demo model pairs for all architectures, then serve"),
    "keys": ("cli.keys", "create, list and revoke API keys"),
    "reload": (
        "cli.reload",
        "ask a running service to rescan its model pairs (load new, replace changed, retire removed)",
    ),
    "db": ("cli.db", "migrate the audit database (upgrade, downgrade, current)"),
    "openapi": ("cli.openapi", "write the service's OpenAPI document"),
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, and where to read more), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="cxr-drift",
        description="Train chest X-ray model pairs (transfer, fine-tuned) and serve their predictions with "
        "semantic-drift audits.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_OneLineParser)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            importlib.import_module(module_name).configure_parser(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in args_list if not a.startswith("-")), None)
    selected = selected if selected in COMMANDS else None
    debug = "--debug" in args_list or os.environ.get("CXR_DRIFT_DEBUG") == "1"
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not debug:  # Alembic announces each of its plugins at INFO; its migration lines stay
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    try:
        parser = build_parser(selected)
        try:
            args = parser.parse_args(args_list)
        except SystemExit as exc:  # --help (0) or a usage error (2, already printed as one line)
            return int(exc.code or 0)
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("cxr-drift: interrupted", file=sys.stderr)
        return 130
    except (DomainError, OSError) as exc:
        # OSError: a path the user named is missing, unreadable or unwritable (the message names it)
        if debug:
            raise
        print(f"cxr-drift: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
