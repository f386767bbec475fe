"""The hash chain of the audit log: appending one request (verifying it: :mod:`service.audit.verify`).

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

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc, func

from engine.report import DriftReport, MethodResult
from service.audit import db
from service.audit.db import SQLITE_IMMEDIATE, stored_json, translate_errors
from service.audit.hashing import (
    DRIFT_CONTENT,
    GENESIS_HASH,
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
from service.audit.verify import VerifyResult, verify

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
