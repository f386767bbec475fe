"""Reading the audit log back: the filters every reader shares, pages of records, one record, CSV export.

A record matches the filters when any of its drift rows does (for listings), and a drift row matches when
all set filters do. Every function raises :class:`~service.audit.db.DatabaseUnavailable` when the database
cannot be reached.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from service.audit.db import translate_errors
from service.audit.filters import AuditFilters
from service.audit.hashing import DRIFT_CONTENT, utc_iso
from service.audit.tables import AuditDrift, AuditRecord

__all__ = [
    "CSV_COLUMNS",
    "FORMULA_PREFIXES",
    "AuditFilters",
    "RecordPage",
    "architecture_expression",
    "by_record_ids",
    "csv_cell",
    "digest_condition",
    "drift_conditions",
    "export_csv",
    "get_record",
    "list_records",
    "record_id_ends",
    "time_conditions",
]


@dataclass
class RecordPage:
    items: list[dict[str, Any]] = field(default_factory=list)
    next_before_id: int | None = None


# ------------------------------------------------------------------------------------------- filtering


def drift_conditions(filters: AuditFilters) -> list[sa.ColumnElement[bool]]:
    """SQL conditions on ``audit_drift`` for the set filters other than time."""
    conditions: list[sa.ColumnElement[bool]] = []
    if filters.model is not None:
        conditions.append(AuditDrift.model == filters.model)
    if filters.architecture is not None:
        conditions.append(architecture_expression() == filters.architecture)
    if filters.digest is not None:
        conditions.append(digest_condition(filters.digest))
    if filters.method is not None:
        conditions.append(AuditDrift.method == filters.method)
    if filters.target_class is not None:
        conditions.append(AuditDrift.target_class == filters.target_class)
    if filters.agreement is not None:
        conditions.append(AuditDrift.agreement.is_(filters.agreement))
    if filters.severity is not None:
        conditions.append(AuditDrift.severity == filters.severity)
    if filters.flagged is not None:
        conditions.append(AuditDrift.flagged.is_(filters.flagged))
    return conditions


def architecture_expression() -> sa.ColumnElement[str]:
    """A drift row's architecture: ``model_architecture``, or for rows written before revision 0004 (which
    named a pair after its architecture) the ``model`` column."""
    return sa.func.coalesce(AuditDrift.model_architecture, AuditDrift.model)


def digest_condition(digest: str) -> sa.ColumnElement[bool]:
    """Rows whose version digest is ``digest`` (64 hex digits) or starts with it (a prefix of 8 or more)."""
    text = digest.strip().lower()
    if len(text) == 64:
        return AuditDrift.model_digest == text
    return AuditDrift.model_digest.startswith(text, autoescape=True)


def by_record_ids(
    selection: sa.ColumnElement[bool], filters: Sequence[sa.ColumnElement[Any]], dialect: str
) -> list[sa.ColumnElement[Any]]:
    """Conditions for a query that selects few records by id (``selection``: a record_id range or list)
    and then applies ``filters``. On SQLite, each is marked by how often it holds (``likelihood``): the id
    selection for very few rows, a filter for most, so the planner reads the record_id index; it otherwise
    takes an equality filter's index (model, method) and walks half the log (0.9-1.1 s a summary at 1M
    records). PostgreSQL's statistics need no hint."""
    if dialect != "sqlite":
        return [selection, *filters]
    few: sa.ColumnElement[Any] = sa.literal_column("0.000001")
    most: sa.ColumnElement[Any] = sa.literal_column("0.9")
    return [sa.func.likelihood(selection, few), *(sa.func.likelihood(f, most) for f in filters)]


def record_id_ends() -> sa.Select[Any]:
    """(lowest, highest) record id, each from an end of the primary key: SQLite scans the table for min and
    max in one SELECT (60 ms at 1M records)."""
    return sa.select(
        sa.select(sa.func.min(AuditRecord.id)).scalar_subquery(),
        sa.select(sa.func.max(AuditRecord.id)).scalar_subquery(),
    )


def time_conditions(filters: AuditFilters) -> list[sa.ColumnElement[bool]]:
    """SQL conditions on ``audit_records.created_at``; a naive ``start``/``end`` is a ValueError."""
    conditions: list[sa.ColumnElement[bool]] = []
    for name, value in (("start", filters.start), ("end", filters.end)):
        if value is not None and value.tzinfo is None:
            raise ValueError(
                f"filter {name}: expected a timezone-aware datetime, got naive {value.isoformat()}"
            )
    if filters.start is not None:
        conditions.append(AuditRecord.created_at >= filters.start)
    if filters.end is not None:
        conditions.append(AuditRecord.created_at < filters.end)
    return conditions


# ------------------------------------------------------------------------------------------- reading


def _drift_dict(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {name: row[name] for name in DRIFT_CONTENT}


def _record_dict(row: Mapping[Any, Any], *, with_payload: bool) -> dict[str, Any]:
    item = {
        "id": row["id"],
        "request_id": row["request_id"],
        "created_at": utc_iso(row["created_at"]),
        "api_key_name": row["api_key_name"],
        "image_sha256": row["image_sha256"],
        "image_format": row["image_format"],
        "image_width": row["image_width"],
        "image_height": row["image_height"],
        "image_nbytes": row["image_nbytes"],
        "options": row["options"],
        "prev_hash": row["prev_hash"],
        "row_hash": row["row_hash"],
    }
    if with_payload:
        payload = row["payload"] or {}
        item["reports"] = payload.get("reports", [])
        item["timings_ms"] = payload.get("timings_ms", {})
        item["maps"] = payload.get("maps")
    return item


def _attach_drift(connection: sa.Connection, items: list[dict[str, Any]]) -> None:
    if not items:
        return
    by_id = {item["id"]: item for item in items}
    for item in items:
        item["drift"] = []
    rows = connection.execute(
        sa.select(AuditDrift)
        .where(AuditDrift.record_id.in_(list(by_id)))
        .order_by(AuditDrift.record_id, AuditDrift.model, AuditDrift.method)
    ).mappings()
    for row in rows:
        by_id[row["record_id"]]["drift"].append(_drift_dict(row))


def list_records(
    engine: sa.Engine, *, filters: AuditFilters, limit: int = 50, before_id: int | None = None
) -> RecordPage:
    """Records newest first, with their drift rows; a record matches when any of its drift rows does.

    Page on with ``before_id=page.next_before_id`` (None on the last page).
    """
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit: expected 1..1000, got {limit}")
    conditions = time_conditions(filters)
    on_drift = drift_conditions(filters)
    if on_drift:  # per record, its few drift rows: SQLite otherwise scanned a filter's index per record
        owned = AuditDrift.record_id == AuditRecord.id
        conditions.append(sa.exists().where(*by_record_ids(owned, on_drift, engine.dialect.name)))
    if before_id is not None:
        conditions.append(AuditRecord.id < before_id)
    statement = sa.select(AuditRecord).where(*conditions).order_by(AuditRecord.id.desc()).limit(limit + 1)
    with translate_errors("list audit records"), engine.connect() as connection:
        rows = connection.execute(statement).mappings().all()
        items = [_record_dict(row, with_payload=False) for row in rows[:limit]]
        _attach_drift(connection, items)
    next_before_id = items[-1]["id"] if len(rows) > limit else None
    return RecordPage(items=items, next_before_id=next_before_id)


def get_record(engine: sa.Engine, record_id: int) -> dict[str, Any] | None:
    """One record with its drift rows and stored reports and timings; None if there is no such id."""
    with translate_errors("read an audit record"), engine.connect() as connection:
        row = connection.execute(sa.select(AuditRecord).where(AuditRecord.id == record_id)).mappings().first()
        if row is None:
            return None
        item = _record_dict(row, with_payload=True)
        _attach_drift(connection, [item])
    return item


# --------------------------------------------------------------------------------------------- export

CSV_COLUMNS: tuple[str, ...] = (
    "record_id",
    "request_id",
    "created_at",
    "api_key_name",
    "image_sha256",
    "image_format",
    "image_width",
    "image_height",
    *DRIFT_CONTENT,
)


# OWASP "CSV injection": a text cell starting with one of these is read as a formula by spreadsheets.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """``value`` as a CSV cell: a string that starts with ``= + - @``, tab or CR gets a leading ``'`` so that a
    spreadsheet shows it as text instead of running it; numbers (negative ones too) stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def _csv_line(values: Sequence[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([csv_cell(v) for v in values])
    return buffer.getvalue()


def export_csv(engine: sa.Engine, *, filters: AuditFilters, batch_size: int = 1000) -> Iterator[str]:
    """CSV lines (header first), one per matching (record, model, method), oldest first, streamed.

    The query runs before this returns (so an unreachable database raises here, not mid-stream); the
    rows are fetched in batches while the iterator is consumed. Timestamps are UTC ISO-8601.
    """
    statement = (
        sa.select(
            AuditRecord.id,
            AuditRecord.request_id,
            AuditRecord.created_at,
            AuditRecord.api_key_name,
            AuditRecord.image_sha256,
            AuditRecord.image_format,
            AuditRecord.image_width,
            AuditRecord.image_height,
            *(getattr(AuditDrift, name) for name in DRIFT_CONTENT),
        )
        .join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
        .where(*time_conditions(filters), *drift_conditions(filters))
        .order_by(AuditRecord.id, AuditDrift.model, AuditDrift.method)
    )
    with translate_errors("export the audit log"):
        connection = engine.connect()
        try:
            streaming = connection.execution_options(stream_results=True, yield_per=batch_size)
            result = streaming.execute(statement)
        except BaseException:
            connection.close()
            raise

    def lines() -> Iterator[str]:
        try:
            yield _csv_line(CSV_COLUMNS)
            with translate_errors("export the audit log"):
                for row in result:
                    values = list(row)
                    values[2] = utc_iso(values[2])
                    yield _csv_line(["" if v is None else v for v in values])
        finally:
            result.close()
            connection.close()

    return lines()
