"""Model lifecycle records: each load, replacement and retirement of a model pair, hash-chained.

``audit_model_events`` is a second hash chain beside the records' chain, built the same way
(service/audit/chain.py: canonical JSON, SHA-256, ``GENESIS_HASH`` for the first row):

    row_hash = SHA-256( canonical_json({"event": content, "prev_hash": prev_hash}) )

where ``content`` is every column except ``id``, ``prev_hash`` and ``row_hash``. Each event is anchored in
the records' chain: ``records_head_id``/``records_head_hash`` are the newest audit record when the event was
written (under the same lock that serialises record appends), so an event cannot be moved before or after
the requests it governs, and :func:`verify_events` checks that the anchored record still has that hash. The
records themselves name the version that answered (``audit_drift.model_digest``), which a ``load`` or
``replace`` event introduced. ``GET /audit/verify`` walks both chains.

Events: ``load`` (a name starts serving a digest), ``replace`` (a served name changes digest; the old one in
``previous_digest``), ``retire`` (a name stops serving). ``api_key_name`` is who asked (NULL: the service
itself, e.g. at start-up), ``reason`` the free text they gave.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import func

from service.audit.chain import CHAIN_LOCK_KEY, GENESIS_HASH, canonical_json, utc_iso
from service.audit.db import SQLITE_IMMEDIATE, translate_errors
from service.audit.tables import AuditModelEvent, AuditRecord

__all__ = [
    "EVENT_CONTENT",
    "EVENT_KINDS",
    "EventResult",
    "ModelEvent",
    "append_event",
    "compute_event_hash",
    "list_events",
    "verify_events",
]

log = logging.getLogger(__name__)

EventKind = Literal["load", "replace", "retire"]
EVENT_KINDS: tuple[str, ...] = ("load", "replace", "retire")
EVENT_CONTENT: tuple[str, ...] = (
    "created_at",
    "event",
    "model",
    "model_architecture",
    "model_digest",
    "previous_digest",
    "api_key_name",
    "reason",
    "records_head_id",
    "records_head_hash",
)
MAX_REASON = 2000


@dataclass(frozen=True)
class ModelEvent:
    """One lifecycle event as the registry reports it."""

    event: str
    model: str
    model_architecture: str
    model_digest: str
    previous_digest: str | None = None
    api_key_name: str | None = None
    reason: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class EventResult:
    id: int
    row_hash: str
    prev_hash: str


def compute_event_hash(event: Mapping[str, Any], prev_hash: str) -> str:
    """SHA-256 (hex) of an event's content and ``prev_hash``."""
    content = {name: event[name] for name in EVENT_CONTENT}
    document = canonical_json({"event": content, "prev_hash": prev_hash})
    return hashlib.sha256(document.encode("ascii")).hexdigest()


def _values(event: ModelEvent) -> dict[str, Any]:
    if event.event not in EVENT_KINDS:
        raise ValueError(f"model event: expected one of {', '.join(EVENT_KINDS)}, got {event.event!r}")
    if event.created_at.tzinfo is None:
        raise ValueError(f"model event: created_at must be timezone-aware, got {event.created_at}")
    reason = event.reason
    if reason is not None and len(reason) > MAX_REASON:
        raise ValueError(f"model event: reason is longer than {MAX_REASON} characters")
    return {
        "created_at": event.created_at.astimezone(UTC),
        "event": event.event,
        "model": event.model,
        "model_architecture": event.model_architecture,
        "model_digest": event.model_digest,
        "previous_digest": event.previous_digest,
        "api_key_name": event.api_key_name,
        "reason": reason,
    }


def append_event(engine: sa.Engine, event: ModelEvent) -> EventResult:
    """Write ``event`` chained to the newest event and anchored at the newest audit record (one transaction,
    under the lock that serialises record appends)."""
    values = _values(event)
    dialect = engine.dialect.name
    with translate_errors("append a model lifecycle record"), engine.connect() as connection:
        if dialect == "sqlite":
            connection.execution_options(**{SQLITE_IMMEDIATE: True})
        with connection.begin():
            if dialect == "postgresql":
                connection.execute(sa.select(func.pg_advisory_xact_lock(CHAIN_LOCK_KEY)))
            head = connection.execute(
                sa.select(AuditRecord.id, AuditRecord.row_hash).order_by(AuditRecord.id.desc()).limit(1)
            ).first()
            values["records_head_id"] = None if head is None else int(head[0])
            values["records_head_hash"] = None if head is None else str(head[1])
            last = connection.execute(
                sa.select(AuditModelEvent.row_hash).order_by(AuditModelEvent.id.desc()).limit(1)
            ).scalar_one_or_none()
            prev_hash = last or GENESIS_HASH
            row_hash = compute_event_hash(values, prev_hash)
            event_id = connection.execute(
                sa.insert(AuditModelEvent)
                .values(**values, prev_hash=prev_hash, row_hash=row_hash)
                .returning(AuditModelEvent.id)
            ).scalar_one()
    log.info(
        "model event %s %s %s... recorded: id=%d", event.event, event.model, event.model_digest[:12], event_id
    )
    return EventResult(id=int(event_id), row_hash=row_hash, prev_hash=prev_hash)


@dataclass(frozen=True)
class EventsVerifyResult:
    ok: bool
    checked: int
    first_bad_id: int | None = None
    reason: str | None = None
    head_id: int | None = None
    head_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_created(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"created_at: expected a timestamp, got {type(value).__name__}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def verify_events(engine: sa.Engine, *, batch_size: int = 1000) -> EventsVerifyResult:
    """Walk the lifecycle chain in id order, recompute every hash and check every anchor; stop at the first
    bad event (broken link, content hash mismatch, unreadable row, or an anchor whose record no longer has
    the recorded hash)."""
    columns = [c.name for c in AuditModelEvent.__table__.columns]
    raw_created = sa.type_coerce(AuditModelEvent.created_at, sa.String).label("created_at")
    selected = [raw_created if name == "created_at" else getattr(AuditModelEvent, name) for name in columns]
    statement = (
        sa.select(*selected, AuditRecord.row_hash.label("anchor_hash"))
        .outerjoin(AuditRecord, AuditRecord.id == AuditModelEvent.records_head_id)
        .order_by(AuditModelEvent.id)
    )
    checked = 0
    expected_prev = GENESIS_HASH
    head_id: int | None = None

    def bad(event_id: int, reason: str) -> EventsVerifyResult:
        return EventsVerifyResult(
            ok=False,
            checked=checked,
            first_bad_id=event_id,
            reason=reason,
            head_id=head_id,
            head_hash=None if head_id is None else expected_prev,
        )

    with translate_errors("verify the model lifecycle chain"), engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=batch_size).execute(statement)
        for row in result.mappings():
            event_id = int(row["id"])
            if row["prev_hash"] != expected_prev:
                return bad(
                    event_id,
                    f"broken link: prev_hash {str(row['prev_hash'])[:12]}... does not match the previous "
                    f"event's row_hash {expected_prev[:12]}... (an event before it was deleted or inserted)",
                )
            try:
                values = {name: row[name] for name in EVENT_CONTENT}
                values["created_at"] = _parse_created(values["created_at"])
                actual = compute_event_hash(values, row["prev_hash"])
            except (ValueError, TypeError, OverflowError) as error:
                return bad(event_id, f"unreadable row: {type(error).__name__}: {error}"[:500])
            if actual != row["row_hash"]:
                return bad(
                    event_id,
                    f"content hash mismatch: stored row_hash {str(row['row_hash'])[:12]}..., content hashes "
                    f"to {actual[:12]}... (the event was changed)",
                )
            if row["records_head_id"] is not None and row["anchor_hash"] != row["records_head_hash"]:
                return bad(
                    event_id,
                    f"anchor mismatch: the event was recorded after audit record {row['records_head_id']} "
                    f"with hash {str(row['records_head_hash'])[:12]}..., which that record no longer has",
                )
            expected_prev = str(row["row_hash"])
            head_id = event_id
            checked += 1
    return EventsVerifyResult(
        ok=True, checked=checked, head_id=head_id, head_hash=None if head_id is None else expected_prev
    )


def list_events(
    engine: sa.Engine, *, model: str | None = None, limit: int = 100, before_id: int | None = None
) -> list[dict[str, Any]]:
    """Lifecycle events newest first (optionally of one model name)."""
    conditions: list[sa.ColumnElement[bool]] = []
    if model is not None:
        conditions.append(AuditModelEvent.model == model)
    if before_id is not None:
        conditions.append(AuditModelEvent.id < before_id)
    statement = sa.select(AuditModelEvent).where(*conditions).order_by(AuditModelEvent.id.desc()).limit(limit)
    with translate_errors("list model lifecycle records"), engine.connect() as connection:
        rows = connection.execute(statement).mappings().all()
    return [
        {
            "id": row["id"],
            **{name: row[name] for name in EVENT_CONTENT},
            "created_at": utc_iso(row["created_at"]),
            "prev_hash": row["prev_hash"],
            "row_hash": row["row_hash"],
        }
        for row in rows
    ]
