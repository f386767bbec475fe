"""Anchors: the chain head exported outside the database, so truncation or a rewrite is caught later.

A chain verifies on its own only up to its newest row: deleting the newest rows, or rewriting every hash
after a change, leaves a valid chain (see :mod:`service.audit.chain`). An anchor records the head
(``head_id``, ``head_hash``, the row's ``created_at``) and when it was taken, as one JSON line; with a key it
carries ``hmac_sha256``, the HMAC-SHA256 of the canonical JSON of the other fields, so an anchor file that
sits next to the database cannot be forged by someone who can rewrite the database but lacks the key.

:class:`AnchorExporter` (started by the service when ``anchor_interval_s`` > 0) appends an anchor line to
``anchor_file`` (if set) and logs it, every interval. :func:`verify_anchor` checks a line against the
database: its signature (when a key is given), then :func:`service.audit.chain.verify` with the head hash
as ``anchor`` (the same check as ``GET /audit/verify?anchor=``), and that the row holding the hash still
has the anchored id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from service.audit.chain import VerifyResult, canonical_json, utc_iso, verify
from service.audit.db import translate_errors
from service.audit.tables import AuditRecord

__all__ = ["AnchorCheck", "AnchorExporter", "export_anchor", "read_anchor", "sign", "verify_anchor"]

log = logging.getLogger(__name__)

SIGNATURE_FIELD = "hmac_sha256"


def sign(document: dict[str, Any], key: str) -> str:
    """HMAC-SHA256 (hex) of the canonical JSON of ``document`` without its signature field."""
    body = {name: value for name, value in document.items() if name != SIGNATURE_FIELD}
    return hmac.new(key.encode(), canonical_json(body).encode("ascii"), hashlib.sha256).hexdigest()


def read_anchor(engine: sa.Engine, *, key: str | None = None) -> dict[str, Any]:
    """The current head of the chain as an anchor document (signed when ``key`` is given)."""
    with translate_errors("read the chain head"), engine.connect() as connection:
        row = connection.execute(
            sa.select(AuditRecord.id, AuditRecord.row_hash, AuditRecord.created_at)
            .order_by(AuditRecord.id.desc())
            .limit(1)
        ).first()
    document: dict[str, Any] = {
        "head_id": None if row is None else int(row.id),
        "head_hash": None if row is None else str(row.row_hash),
        "head_created_at": None if row is None else utc_iso(row.created_at),
        "exported_at": utc_iso(datetime.now(UTC)),
    }
    if key:
        document[SIGNATURE_FIELD] = sign(document, key)
    return document


def export_anchor(engine: sa.Engine, *, path: Path | None = None, key: str | None = None) -> dict[str, Any]:
    """Read the head, append it as one JSON line to ``path`` (fsynced) if given, and log it."""
    document = read_anchor(engine, key=key)
    line = canonical_json(document)
    if path is not None:
        with open(path, "a", encoding="ascii") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    log.info("audit chain anchor %s", line)
    return document


@dataclass(frozen=True)
class AnchorCheck:
    """Outcome of :func:`verify_anchor`."""

    ok: bool
    reason: str | None
    signed: bool
    chain: VerifyResult | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reason": self.reason,
            "signed": self.signed,
            "chain": None if self.chain is None else self.chain.to_dict(),
        }


def verify_anchor(engine: sa.Engine, line: str, *, key: str | None = None) -> AnchorCheck:
    """Check an exported anchor line against the database (see the module docstring)."""
    try:
        document = json.loads(line)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        return AnchorCheck(ok=False, reason=f"not an anchor line: {error}", signed=False, chain=None)
    signature = document.get(SIGNATURE_FIELD)
    if key:
        if not isinstance(signature, str):
            return AnchorCheck(
                ok=False, reason="the anchor is not signed but a key is given", signed=False, chain=None
            )
        if not hmac.compare_digest(signature, sign(document, key)):
            return AnchorCheck(
                ok=False,
                reason="bad signature: the anchor was altered or signed with another key",
                signed=True,
                chain=None,
            )
    head_hash, head_id = document.get("head_hash"), document.get("head_id")
    result = verify(engine, anchor=head_hash) if isinstance(head_hash, str) else verify(engine)
    if not result.ok:
        return AnchorCheck(ok=False, reason=result.reason, signed=bool(key), chain=result)
    if isinstance(head_hash, str):
        with translate_errors("look up the anchored row"), engine.connect() as connection:
            found = connection.execute(
                sa.select(AuditRecord.id).where(AuditRecord.row_hash == head_hash)
            ).scalar_one_or_none()
        if found != head_id:
            return AnchorCheck(
                ok=False,
                reason=f"the anchored hash is on row {found}, not on the anchored row {head_id}",
                signed=bool(key),
                chain=result,
            )
    return AnchorCheck(ok=True, reason=None, signed=bool(key), chain=result)


class AnchorExporter:
    """Exports an anchor every ``interval_s`` seconds from a daemon thread until :meth:`stop`."""

    def __init__(
        self, engine: sa.Engine, *, interval_s: float, path: Path | None = None, key: str | None = None
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"anchor interval must be > 0 seconds, got {interval_s}")
        self.engine = engine
        self.interval_s = interval_s
        self.path = path
        self.key = key
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cxr-anchor-export", daemon=True)

    def start(self) -> AnchorExporter:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                export_anchor(self.engine, path=self.path, key=self.key)
            except Exception as error:  # a database outage or a full disk: keep trying, say so
                log.warning("audit chain anchor not exported: %s: %s", type(error).__name__, error)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
