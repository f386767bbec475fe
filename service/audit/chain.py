"""The hash chain of the audit log: appending one request, verifying the chain.

Each request writes one ``audit_records`` row and one ``audit_drift`` row per model x method, in one
transaction. Appends are serialised (PostgreSQL ``pg_advisory_xact_lock``, SQLite ``BEGIN IMMEDIATE``), so
the chain never forks. The row hash and canonical JSON are defined in :mod:`service.audit.hashing`; the
first row links to ``GENESIS_HASH`` (64 zeros). UPDATE and DELETE are also rejected by triggers in the
database (created by the migration). The JSON columns hold their canonical JSON, the very text that is
hashed, so verification hashes it without parsing it.

What a chain can and cannot show: changing any stored value of a row, or deleting/inserting a row in the
middle, is detected by :func:`verify`; deleting the newest rows, or rewriting every hash after a change, is
not (compare the head hash with one kept elsewhere for that).

What is stored of a request is its :class:`engine.report.DriftReport` objects as ``DriftReport.to_dict()``
(which leaves the maps out: no pixels are ever stored), its timings and, when the service keeps maps for
review (``CXR_DRIFT_KEEP_MAPS``), ``payload["maps"]``: 16x16 uint8 maps (:mod:`engine.review_maps`), hashed
like the rest of the payload. :func:`append` and :func:`verify`
raise :class:`~service.audit.db.DatabaseUnavailable` when the database cannot be reached.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc, func

from engine.report import DriftReport, MethodResult
from service.audit import db
from service.audit.db import SQLITE_IMMEDIATE, legacy_stored_json, stored_json, translate_errors
from service.audit.hashing import (
    DRIFT_CONTENT,
    GENESIS_HASH,
    PAYLOAD_KEY,
    RECORD_CONTENT,
    SPLICED,
    canonical_json,
    compute_row_hash,
    document_parts,
    drift_content,
    drift_json,
    spliced_hash,
    utc_iso,
)
from service.audit.tables import METRIC_COLUMNS, AuditDrift, AuditRecord

__all__ = [
    "DRIFT_CONTENT",
    "GENESIS_HASH",
    "RECORD_CONTENT",
    "AppendResult",
    "AuditEntry",
    "VerifyResult",
    "append",
    "canonical_json",
    "compute_row_hash",
    "drift_rows_from_reports",
    "utc_iso",
    "verify",
]

log = logging.getLogger(__name__)

# Key of the PostgreSQL advisory lock that serialises appends (any constant shared by all replicas).
CHAIN_LOCK_KEY = 0x0C58_D41F_7A11
# Transaction setting read by the commit-deadline trigger (revision 0003) on PostgreSQL.
COMMIT_DEADLINE_SETTING = "cxr_drift.commit_deadline"


@dataclass
class AuditEntry:
    """What the web layer records for one request: its image's digest, options, reports and timings."""

    request_id: str
    created_at: datetime
    api_key_name: str | None
    image_sha256: str
    image_format: str
    image_width: int
    image_height: int
    image_nbytes: int
    options: dict[str, Any]
    reports: Sequence[DriftReport]
    timings_ms: dict[str, Any]
    # the payload's "maps" section (engine.review_maps.review_maps), when maps for review are kept
    maps: dict[str, Any] | None = None


@dataclass(frozen=True)
class AppendResult:
    id: int
    row_hash: str
    prev_hash: str


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`. Equality compares the verdict (``ok checked first_bad_id reason``)."""

    ok: bool
    checked: int
    first_bad_id: int | None = None
    reason: str | None = None
    # the newest row that verified, and its hash: keep it elsewhere and pass it back as ``anchor``
    head_id: int | None = field(default=None, compare=False)
    head_hash: str | None = field(default=None, compare=False)
    # whether the ``anchor`` hash given to verify() is a row of the verified chain (None: none given)
    anchor_found: bool | None = field(default=None, compare=False)
    # incremental verification: the id of the anchored, previously verified head it started after
    since_id: int | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ entry preparation


def _json_safe(value: Any, where: str) -> Any:
    """Plain JSON types as the database gives them back: non-finite floats become null."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and callable(value.item):  # NumPy scalar
        return _json_safe(value.item(), where)
    if hasattr(value, "tolist") and callable(value.tolist):  # small NumPy array
        return _json_safe(value.tolist(), where)
    raise TypeError(
        f"{where}: expected a JSON value (dict, list, str, number, bool, None), got {type(value)}"
    )


def _metric(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    # -0.0 + 0.0 == 0.0: SQLite would give -0.0 back as 0.0 and change the hash.
    return number + 0.0 if math.isfinite(number) else None


def _control_iou(result: MethodResult) -> float | None:
    """GradCAM++'s head-scale control as an IoU with the fine-tuned map (1 - residual drift), if reported."""
    control = result["diagnostics"].get("head_scale_control")
    return None if not control else _metric(1.0 - float(control["residual_drift_score"]))


def drift_rows_from_reports(reports: Sequence[DriftReport]) -> list[dict[str, Any]]:
    """One ``audit_drift`` row (without ids) per report x method."""
    rows: list[dict[str, Any]] = []
    for report in reports:
        for method, result in report.methods.items():
            row: dict[str, Any] = {
                "model": report.model,
                "model_architecture": report.architecture,
                "model_digest": report.model_digest,
                "method": method,
                "target_class": report.target_class["name"],
                "transfer_class": report.predictions["transfer"]["class"],
                "finetuned_class": report.predictions["finetuned"]["class"],
                "agreement": bool(report.agreement),
                "drift_score": _metric(result["drift_score"]),
                "severity": result["severity"],
                "flagged": bool(result["flagged"]),
                "drift_index": _metric(result.get("drift_index")),
                "reference_percentile": _metric(result.get("reference_percentile")),
                "head_scale_control_iou": _control_iou(result),
            }
            row.update({name: _metric(result["metrics"].get(name)) for name in METRIC_COLUMNS})
            rows.append(row)
    keys = [(row["model"], row["method"]) for row in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"drift reports: each (model, method) must appear once, got {keys}")
    return rows


def _record_values(entry: AuditEntry) -> dict[str, Any]:
    if entry.created_at.tzinfo is None:
        raise ValueError(
            f"AuditEntry.created_at: expected a timezone-aware UTC datetime, got {entry.created_at}"
        )
    # to_dict() leaves the maps out: no image-derived pixels are stored.
    payload = {"reports": [report.to_dict() for report in entry.reports], "timings_ms": entry.timings_ms}
    if entry.maps is not None:
        payload["maps"] = entry.maps
    return {
        "request_id": str(entry.request_id),
        # The database keeps microseconds: truncate nothing else, and store UTC.
        "created_at": entry.created_at.astimezone(UTC),
        "api_key_name": entry.api_key_name,
        "image_sha256": str(entry.image_sha256),
        "image_format": str(entry.image_format),
        "image_width": int(entry.image_width),
        "image_height": int(entry.image_height),
        "image_nbytes": int(entry.image_nbytes),
        "options": _json_safe(entry.options, "options"),
        "payload": _json_safe(payload, "payload"),
    }


# --------------------------------------------------------------------------------------------- writing


def append(engine: sa.Engine, entry: AuditEntry) -> AppendResult:
    """Write ``entry`` and its drift rows in one committed transaction, chained to the newest record."""
    record = _record_values(entry)
    drift_rows = drift_rows_from_reports(entry.reports)
    dialect = engine.dialect.name
    # everything but prev_hash is serialised before the chain lock is taken; the JSON columns are written as
    # the very text that is hashed
    texts = {name: stored_json(record[name]) for name in SPLICED}
    drift_text = drift_json(
        [drift_content((name, row[name]) for name in DRIFT_CONTENT) for row in drift_rows]
    )
    parts = document_parts({**record, "created_at": utc_iso(record["created_at"]), **texts}, drift_text)
    stored = {**record, **{name: _json_text(text, dialect) for name, text in texts.items()}}
    with translate_errors("append an audit record"), engine.connect() as connection:
        if dialect == "sqlite":
            connection.execution_options(**{SQLITE_IMMEDIATE: True})
        try:
            with connection.begin():
                if dialect == "postgresql":
                    # one round trip: this transaction's limits, then the chain lock (its wait is bounded
                    # by the session's lock_timeout)
                    lock = func.pg_advisory_xact_lock(CHAIN_LOCK_KEY)
                    connection.execute(sa.select(*_transaction_limits(connection), lock))
                last = connection.execute(
                    sa.select(AuditRecord.row_hash).order_by(AuditRecord.id.desc()).limit(1)
                ).scalar_one_or_none()
                prev_hash = last or GENESIS_HASH
                row_hash = spliced_hash(parts, prev_hash)
                record_id = connection.execute(
                    sa.insert(AuditRecord)
                    .values(**stored, prev_hash=prev_hash, row_hash=row_hash)
                    .returning(AuditRecord.id)
                ).scalar_one()
                if drift_rows:
                    connection.execute(
                        sa.insert(AuditDrift), [{**row, "record_id": record_id} for row in drift_rows]
                    )
        except exc.IntegrityError as error:
            raise ValueError(
                f"audit record for request_id {entry.request_id!r} not written: {error.orig}"
            ) from error
    log.debug("audit record %s appended: id=%d hash=%s", entry.request_id, record_id, row_hash)
    return AppendResult(id=record_id, row_hash=row_hash, prev_hash=prev_hash)


def _json_text(text: str, dialect: str) -> sa.ColumnElement[Any]:
    """A JSON column's value given as its text (PostgreSQL `json` keeps it as written, SQLite stores it)."""
    value = sa.literal(text, sa.Text)
    return value if dialect == "sqlite" else sa.cast(value, sa.JSON)


def _transaction_limits(connection: sa.Connection) -> list[sa.ColumnElement[Any]]:
    """PostgreSQL: settings that bound this append on the server too, when the engine has time limits.

    ``statement_timeout`` and ``idle_in_transaction_session_timeout`` abort it if the client stalls or
    vanishes while holding the chain lock; ``cxr_drift.commit_deadline`` (an epoch time, checked by the
    deferred trigger of revision 0003 when COMMIT runs) refuses a COMMIT that the server reaches after the
    client has given up: its deadline is ahead of the client's watchdog by a margin, so a request answered
    503 because it timed out is not committed later when a stalled server resumes.
    """
    limits = db.timeouts_of(connection.engine)
    deadline = db.client_deadline(connection)
    if limits is None or deadline is None:
        return []
    margin = min(1.0, limits.timeout_s / 4)
    timeout_ms = str(int(limits.timeout_s * 1000))
    return [
        func.set_config("statement_timeout", timeout_ms, True),
        func.set_config("idle_in_transaction_session_timeout", timeout_ms, True),
        func.set_config(COMMIT_DEADLINE_SETTING, f"{deadline - margin:.6f}", True),
    ]


# ------------------------------------------------------------------------------------------- verifying


def verify(
    engine: sa.Engine,
    *,
    batch_size: int = 1000,
    anchor: str | None = None,
    since: tuple[int, str] | None = None,
) -> VerifyResult:
    """Walk the chain in id order (streamed) and recompute every hash; stop at the first bad row.

    A row is bad when its ``prev_hash`` is not the previous row's ``row_hash`` ("broken link": a row was
    deleted or inserted before it), when its stored content no longer hashes to ``row_hash`` ("content
    hash mismatch": a value was changed), or when a stored value cannot be read back at all or is not in the
    form :func:`append` writes ("unreadable row": e.g. a JSON text with a duplicated key or reformatted,
    a SQLite timestamp or boolean written differently), so what SQL reads is always what is hashed. JSON
    texts are canonical JSON (``db.stored_json``; rows written before hold ``db.legacy_stored_json``).

    The result names the chain head (``head_id``, ``head_hash``: the newest verified row). Deleting the
    newest rows leaves a valid shorter chain, so keep the head hash somewhere else (a log, a ticket, a
    notary) and pass it back as ``anchor``: if no row of the verified chain has that hash, the chain was
    truncated or rewritten after it was recorded, and the result is not ok.

    ``since=(head_id, head_hash)`` verifies incrementally: only the rows after a head that an earlier run
    verified and that was kept outside the database. The row ``head_id`` must still hold ``head_hash`` and
    hash to it (else the result is not ok: a wrong or stale anchor is refused, never trusted), and each
    later row must link to the one before it; ``checked`` counts the rows after the anchor. What the full
    walk adds is only the rows up to the anchor, which the earlier run covered.
    """
    # JSON and timestamp columns are read raw, so a tampered value is a bad row, not an exception half-way
    # through the walk (SQLite stores them as text that can be edited into anything). The JSON columns are
    # read as their stored text on both databases (PostgreSQL `json` keeps the text as written), and SQLite's
    # drift columns as stored (SQLite does not enforce column types), with a flag that SQLite computes: every
    # value has its column's storage type. Verification then checks that what SQL reads is exactly what is
    # hashed (see _stored_row_hash).
    sqlite = engine.dialect.name == "sqlite"
    coerce = sa.type_coerce if sqlite else sa.cast
    raw = {
        "options": coerce(AuditRecord.options, sa.Text).label("options"),
        "payload": coerce(AuditRecord.payload, sa.Text).label("payload"),
        "created_at": sa.type_coerce(AuditRecord.created_at, sa.String).label("created_at"),
    }
    records_statement = sa.select(
        AuditRecord.id,
        AuditRecord.prev_hash,
        AuditRecord.row_hash,
        *(raw.get(name, getattr(AuditRecord, name)) for name in RECORD_CONTENT),
    ).order_by(AuditRecord.id)
    drift_columns = [
        sa.type_coerce(getattr(AuditDrift, name), sa.types.NullType())
        if sqlite
        else getattr(AuditDrift, name)
        for name in DRIFT_CONTENT
    ]
    drift_statement = sa.select(
        AuditDrift.record_id, *drift_columns, *([_sqlite_drift_types_ok()] if sqlite else [])
    )
    checked = 0
    expected_prev = GENESIS_HASH
    since_id, since_hash = (None, None) if since is None else (int(since[0]), since[1].strip().lower())
    head_id: int | None = None
    anchor = anchor.strip().lower() if anchor is not None else None
    anchor_found = False

    def bad(record_id: int | None, reason: str) -> VerifyResult:
        return VerifyResult(
            ok=False,
            checked=checked,
            first_bad_id=record_id,
            reason=reason,
            head_id=head_id,
            head_hash=None if head_id is None else expected_prev,
            anchor_found=anchor_found if anchor is not None else None,
            since_id=since_id,
        )

    # Pages of records by id, each with its drift rows in a second query (no record x drift join). Rows are
    # never changed and appends are serialised (each commits its record and drift rows together, with ids in
    # commit order), so a later statement sees at least what an earlier one saw.
    after = None if since_id is None else since_id - 1
    with translate_errors("verify the audit chain"), engine.connect() as connection:
        while True:
            page = records_statement if after is None else records_statement.where(AuditRecord.id > after)
            records = _fetch(connection, page.limit(batch_size), sqlite)
            if not records:
                break
            drift_of: dict[int, list[Sequence[Any]]] = {}
            in_page = AuditDrift.record_id.between(records[0][0], records[-1][0])
            for row in _fetch(connection, drift_statement.where(in_page), sqlite):
                drift_of.setdefault(row[0], []).append(row)
            for record in records:
                record_id, prev_hash, row_hash = record[0], record[1], record[2]
                at_anchor = since_id is not None and head_id is None
                if at_anchor and (record_id != since_id or row_hash != since_hash):
                    return bad(
                        record_id, f"since: row {since_id} does not hold the anchored hash {since_hash}"
                    )
                if at_anchor:
                    expected_prev = str(prev_hash)  # verified up to here by the earlier run
                if prev_hash != expected_prev:
                    return bad(
                        record_id,
                        f"broken link: prev_hash {str(prev_hash)[:12]}... does not match the previous "
                        f"row's row_hash {expected_prev[:12]}... (a row before it was deleted or inserted)",
                    )
                try:
                    actual = _stored_row_hash(record, drift_of.get(record_id, []), sqlite)
                except (ValueError, TypeError, OverflowError) as error:
                    return bad(record_id, f"unreadable row: {type(error).__name__}: {error}"[:500])
                if actual != row_hash:
                    return bad(
                        record_id,
                        f"content hash mismatch: stored row_hash {str(row_hash)[:12]}..., "
                        f"content hashes to {actual[:12]}... (the record or its drift rows were changed)",
                    )
                expected_prev = row_hash
                head_id = record_id
                anchor_found = anchor_found or expected_prev == anchor
                checked += 0 if at_anchor else 1
            after = records[-1][0]
        # drift rows that no record owns (written outside append): the walk never reads them, summaries
        # skip them, and a later record taking their record_id would be blamed for them
        orphan = _first_orphan(connection, since_id)
        if orphan is not None:
            owner = orphan[1] if isinstance(orphan[1], int) else None
            return bad(
                owner,
                f"orphan drift row: audit_drift id {orphan[0]} names record_id {orphan[1]!r}, which no "
                "record has (a drift row written outside the audit path)",
            )
    if since_id is not None and head_id is None:
        return bad(since_id, f"since: row {since_id} does not hold the anchored hash {since_hash}")
    if anchor is not None and not anchor_found:
        return VerifyResult(
            ok=False,
            checked=checked,
            first_bad_id=None,
            reason=(
                f"anchor {anchor[:12]}... is not the hash of any row in the chain: rows recorded after it "
                "were deleted (truncation) or the chain was rewritten"
            ),
            head_id=head_id,
            head_hash=None if head_id is None else expected_prev,
            anchor_found=False,
            since_id=since_id,
        )
    return VerifyResult(
        ok=True,
        checked=checked,
        head_id=head_id,
        head_hash=None if head_id is None else expected_prev,
        anchor_found=True if anchor is not None else None,
        since_id=since_id,
    )


def _first_orphan(connection: sa.Connection, since_id: int | None) -> Sequence[Any] | None:
    """The first drift row (id, record_id) that no record owns; after ``since_id``, the first that names a
    record from it on (one a later record could be blamed for; a NULL record_id, which the schema forbids
    and the full walk reports, names none). Ordered by ``id + 0`` so PostgreSQL reads the record_id index
    instead of walking the primary key through every earlier drift row."""
    owned = sa.exists().where(AuditRecord.id == AuditDrift.record_id)
    orphans = sa.select(AuditDrift.id, AuditDrift.record_id).order_by(AuditDrift.id + 0).limit(1)
    if since_id is None:
        return connection.execute(orphans.where(~owned)).first()
    owned = owned.where(AuditRecord.id >= since_id)  # the owner of a later record_id is a later record
    return connection.execute(orphans.where(AuditDrift.record_id >= since_id, ~owned)).first()


def _fetch(connection: sa.Connection, statement: sa.Select[Any], sqlite: bool) -> Sequence[Sequence[Any]]:
    """The rows of ``statement``; on SQLite, a page holding text that is not valid UTF-8 (written around the
    service) is read again with its bad bytes kept (as surrogates), so the row holding it fails verification
    by its id instead of the driver stopping the walk with a decode error. Only such a page pays for the
    lenient decoder (a Python call per text value, a fifth of the walk's time)."""
    try:
        return connection.execute(statement).all()
    except exc.OperationalError as error:
        if not sqlite or "Could not decode to UTF-8" not in str(error.orig):
            raise
    with _lenient_text(connection):
        return connection.execute(statement).all()


@contextlib.contextmanager
def _lenient_text(connection: sa.Connection) -> Iterator[None]:
    """SQLite: read text with bad UTF-8 bytes kept as surrogates. This connection only, restored before it
    goes back to the pool."""
    raw: Any = connection.connection.dbapi_connection
    before = raw.text_factory
    raw.text_factory = lambda data: data.decode("utf-8", "surrogateescape")
    try:
        yield
    finally:
        raw.text_factory = before


def _stored_row_hash(record: Sequence[Any], drift: Sequence[Sequence[Any]], sqlite: bool) -> str:
    """The hash of a stored record, from its columns as :func:`verify` reads them raw.

    ``record``: id, prev_hash, row_hash, then :data:`RECORD_CONTENT`; ``drift``: its rows, each record_id,
    then :data:`DRIFT_CONTENT` and, on SQLite, the flag "every value has its column's storage type". Raises
    ValueError or TypeError when a stored value is not in the one form append() writes.

    The JSON texts are hashed as they are stored when they are canonical (what append writes): if the hash
    then matches, the stored text is byte for byte the text append hashed, so it has no duplicated key and
    is not reformatted, and SQL reads what is hashed. That holds because the document around the two texts
    is rebuilt from the other columns, whose canonical form fixes where it ends before ``options`` and starts
    after ``payload``, and neither text contains the separator ``,"payload":`` between them, so no part of
    one can have moved into the other. Any other text (a row written before canonical storage, or a changed
    one) is parsed: it must be exactly db.stored_json or db.legacy_stored_json of its value, which is hashed.
    """
    prev_hash, row_hash = record[1], record[2]
    content = dict(zip(RECORD_CONTENT, record[3:], strict=True))
    content["created_at"] = utc_iso(_stored_created_at(content["created_at"]))
    drift_text = None
    if not sqlite or all(row[-1] == 1 for row in drift):
        rows = [drift_content(zip(DRIFT_CONTENT, row[1:], strict=False)) for row in drift]
        if sqlite:  # booleans are stored as 0 or 1 (checked by the flag)
            for row in rows:
                for name in _DRIFT_BOOLEANS:
                    row[name] = None if row[name] is None else row[name] == 1
        drift_text = drift_json(rows)
        if all(isinstance(content[n], str) and PAYLOAD_KEY not in content[n] for n in SPLICED):
            actual = spliced_hash(document_parts(content, drift_text), prev_hash)
            if actual == row_hash:
                return actual
    for name in SPLICED:
        content[name] = _canonical_stored_json(name, content[name])
    if drift_text is None:  # SQLite: a value without its column's storage type; this names it
        stored = [_parse_stored_drift(dict(zip(DRIFT_CONTENT, row[1:], strict=False))) for row in drift]
        drift_text = drift_json([drift_content(row.items()) for row in stored])
    return spliced_hash(document_parts(content, drift_text), prev_hash)


def _canonical_stored_json(name: str, value: Any) -> str:
    """The canonical JSON of a JSON column's value, from its stored text, which must be the text append()
    writes for that value (or wrote, before canonical storage)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        return stored_json(value)  # SQLite gave a number back: it is hashed as read
    parsed = json.loads(value)
    canonical = stored_json(parsed)
    # SQL reads the text (SQLite's json_extract takes a duplicated key's first value, Python its last):
    # require the text to be exactly what append() wrote for the value that is hashed.
    if value != canonical and value != legacy_stored_json(parsed):
        json.loads(value, object_pairs_hook=_no_duplicate_keys)  # names a duplicated key
        raise ValueError(f"{name}: the stored JSON text is not the form append() writes")
    return canonical


def _stored_created_at(created: Any) -> datetime:
    """``created_at`` as append() stored it: PostgreSQL's driver gives a timestamp, SQLite its text."""
    if isinstance(created, str):
        text = created
        created = datetime.fromisoformat(text)
        # SQLite compares and groups the text (time filters, day/week): it must be the one stored form
        if created.tzinfo is not None or created.strftime(_SQLITE_TIMESTAMP) != text:
            raise ValueError(f"created_at: stored text {text[:40]!r} is not the form append() writes")
    if not isinstance(created, datetime):
        raise TypeError(f"created_at: expected a timestamp, got {type(created).__name__}")
    return created.replace(tzinfo=UTC) if created.tzinfo is None else created


# how SQLAlchemy stores a naive UTC datetime in SQLite
_SQLITE_TIMESTAMP = "%Y-%m-%d %H:%M:%S.%f"
_DRIFT_BOOLEANS = tuple(
    name for name in DRIFT_CONTENT if isinstance(AuditDrift.__table__.columns[name].type, sa.Boolean)
)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate JSON key(s) {sorted({k for k in keys if keys.count(k) > 1})[:5]}")
    return dict(pairs)


def _sqlite_drift_types_ok() -> sa.ColumnElement[Any]:
    """SQLite: whether every hashed drift value has its column's storage type (the checks of
    :func:`_parse_stored_drift`, which names the value when this is false)."""
    checks = []
    for name in DRIFT_CONTENT:
        column = getattr(AuditDrift, name)
        kind = func.typeof(column)
        column_type = AuditDrift.__table__.columns[name].type
        if isinstance(column_type, sa.Boolean):
            checks.append(sa.or_(kind == "null", sa.and_(kind == "integer", column.in_([0, 1]))))
        elif isinstance(column_type, sa.Float):
            checks.append(kind.in_(["null", "real"]))
        elif isinstance(column_type, sa.String):
            checks.append(kind.in_(["null", "text"]))
    return sa.case((sa.and_(*checks), 1), else_=0).label("types_ok")


def _parse_stored_drift(row: dict[str, Any]) -> dict[str, Any]:
    """A SQLite drift row from its values as stored: each must have its column's storage type (SQLite does
    not enforce them), so SQL reads what is hashed (e.g. ``agreement`` 2 reads as true in Python but is
    not ``IS 1`` in a filter; the text '0.5' is not the number 0.5 to an aggregate)."""
    parsed: dict[str, Any] = {}
    for name, value in row.items():
        column_type = AuditDrift.__table__.columns[name].type
        if value is None:
            parsed[name] = None
        elif isinstance(column_type, sa.Boolean):
            if type(value) is not int or value not in (0, 1):
                raise ValueError(f"{name}: stored {value!r} is not a boolean 0 or 1")
            parsed[name] = bool(value)
        elif isinstance(column_type, sa.Float):
            if type(value) is not float:
                raise ValueError(f"{name}: stored {value!r} is not a REAL")
            parsed[name] = value
        elif isinstance(column_type, sa.String):
            if type(value) is not str:
                raise ValueError(f"{name}: stored {value!r} is not TEXT")
            parsed[name] = value
        else:
            parsed[name] = value
    return parsed
