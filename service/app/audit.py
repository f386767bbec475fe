"""The append-only, hash-chained audit log of served predictions, and its summaries.

Each request writes one ``audit_records`` row and one ``audit_drift`` row per model x method, in one
transaction. Appends are serialised (PostgreSQL ``pg_advisory_xact_lock``, SQLite ``BEGIN IMMEDIATE``), so
the chain never forks. The row hash is

    row_hash = SHA-256( canonical_json({"record": content, "drift": drift_rows, "prev_hash": prev_hash}) )

where ``content`` is every stored column of the record except ``id``, ``row_hash`` and ``prev_hash``,
``drift_rows`` are the record's drift rows (every column except ``id``/``record_id``) sorted by
(model, method), and ``canonical_json`` is JSON with sorted keys, no whitespace, ASCII only, floats in
Python's shortest round-trip ``repr``, no NaN/inf (stored as null), and timestamps as UTC ISO-8601
``YYYY-MM-DDTHH:MM:SS.ffffffZ``. The first row links to ``GENESIS_HASH`` (64 zeros). UPDATE and DELETE
are also rejected by triggers in the database (created by the migration).

What a chain can and cannot show: changing any stored value of a row, or deleting/inserting a row in the
middle, is detected by :func:`verify`; deleting the newest rows, or rewriting every hash after a change, is
not (compare the head hash with one kept elsewhere for that).

Every function raises :class:`~service.app.db.DatabaseUnavailable` when the database cannot be reached.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc, func
from sqlalchemy.dialects import postgresql

from service.app.db import SQLITE_IMMEDIATE, translate_errors
from service.app.tables import METRIC_COLUMNS, AuditDrift, AuditRecord

__all__ = [
    "GENESIS_HASH",
    "GROUP_BY_OPTIONS",
    "PERCENTILES",
    "SUMMARY_STATISTICS",
    "AppendResult",
    "AuditEntry",
    "AuditFilters",
    "RecordPage",
    "VerifyResult",
    "append",
    "canonical_json",
    "compute_row_hash",
    "drift_rows_from_reports",
    "export_csv",
    "get_record",
    "list_records",
    "summarize",
    "verify",
]

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
# Key of the PostgreSQL advisory lock that serialises appends (any constant shared by all replicas).
CHAIN_LOCK_KEY = 0x0C58_D41F_7A11
GROUP_BY_OPTIONS: tuple[str, ...] = ("model", "method", "class", "day", "week")
PERCENTILES: tuple[float, ...] = (0.05, 0.25, 0.50, 0.75, 0.95)
SUMMARY_STATISTICS: tuple[str, ...] = (*METRIC_COLUMNS, "drift_score")
# Keys of a report that would carry image-derived pixels; never stored in the audit log.
_PIXEL_KEYS = ("maps", "overlays")
_RECORD_CONTENT = (
    "request_id",
    "created_at",
    "api_key_name",
    "image_sha256",
    "image_format",
    "image_width",
    "image_height",
    "image_nbytes",
    "options",
    "payload",
)
_DRIFT_CONTENT = (
    "model",
    "method",
    "target_class",
    "transfer_class",
    "finetuned_class",
    "agreement",
    "drift_score",
    "severity",
    "flagged",
    *METRIC_COLUMNS,
)


@dataclass
class AuditEntry:
    """What the web layer records for one request; ``reports`` are ``DriftReport.to_dict()`` without maps."""

    request_id: str
    created_at: datetime
    api_key_name: str | None
    image_sha256: str
    image_format: str
    image_width: int
    image_height: int
    image_nbytes: int
    options: dict[str, Any]
    reports: list[dict[str, Any]]
    timings_ms: dict[str, Any]


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AuditFilters:
    """Filters of summaries, listings and exports. ``start`` is inclusive, ``end`` exclusive."""

    start: datetime | None = None
    end: datetime | None = None
    model: str | None = None
    method: str | None = None
    target_class: str | None = None
    agreement: bool | None = None
    severity: str | None = None
    flagged: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items()}


@dataclass
class RecordPage:
    items: list[dict[str, Any]] = field(default_factory=list)
    next_before_id: int | None = None


# ----------------------------------------------------------------------------------------------- hashing


def _utc_iso(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError(f"expected a timezone-aware datetime, got naive {value.isoformat()}")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return _utc_iso(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical_value(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, ASCII, floats as shortest round-trip repr, UTC ISO timestamps."""
    return json.dumps(
        _canonical_value(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def compute_row_hash(
    record: Mapping[str, Any], drift_rows: Sequence[Mapping[str, Any]], prev_hash: str
) -> str:
    """SHA-256 (hex) of a record's content, its drift rows (sorted by model, method) and ``prev_hash``."""
    content = {name: record[name] for name in _RECORD_CONTENT}
    rows = sorted(
        ({name: row[name] for name in _DRIFT_CONTENT} for row in drift_rows),
        key=lambda row: (row["model"], row["method"]),
    )
    document = canonical_json({"record": content, "drift": rows, "prev_hash": prev_hash})
    return hashlib.sha256(document.encode("ascii")).hexdigest()


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


def _require(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        present = sorted(mapping) if isinstance(mapping, Mapping) else type(mapping).__name__
        raise ValueError(f"drift report: expected key {key!r} in {where}, found {present}")
    return mapping[key]


def drift_rows_from_reports(reports: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One ``audit_drift`` row (without ids) per report x method, from ``DriftReport.to_dict()`` dicts."""
    rows: list[dict[str, Any]] = []
    for report in reports:
        model = str(_require(report, "model", "report"))
        predictions = _require(report, "predictions", model)
        target = _require(report, "target_class", model)
        for method, result in _require(report, "methods", model).items():
            metrics = _require(result, "metrics", f"{model}.methods.{method}")
            row: dict[str, Any] = {
                "model": model,
                "method": str(method),
                "target_class": str(_require(target, "name", f"{model}.target_class")),
                "transfer_class": str(_require(_require(predictions, "transfer", model), "class", model)),
                "finetuned_class": str(_require(_require(predictions, "finetuned", model), "class", model)),
                "agreement": bool(_require(report, "agreement", model)),
                "drift_score": _metric(result.get("drift_score")),
                "severity": str(_require(result, "severity", f"{model}.methods.{method}")),
                "flagged": bool(_require(result, "flagged", f"{model}.methods.{method}")),
            }
            row.update({name: _metric(metrics.get(name)) for name in METRIC_COLUMNS})
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
    reports = []
    for report in entry.reports:
        stripped = [key for key in _PIXEL_KEYS if key in report]
        if stripped:
            log.warning("audit record %s: not storing %s of report (pixels)", entry.request_id, stripped)
        reports.append({k: v for k, v in report.items() if k not in _PIXEL_KEYS})
    payload = {"reports": reports, "timings_ms": entry.timings_ms}
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
    drift_rows = drift_rows_from_reports(record["payload"]["reports"])
    dialect = engine.dialect.name
    with translate_errors("append an audit record"), engine.connect() as connection:
        if dialect == "sqlite":
            connection.execution_options(**{SQLITE_IMMEDIATE: True})
        try:
            with connection.begin():
                if dialect == "postgresql":
                    connection.execute(sa.select(func.pg_advisory_xact_lock(CHAIN_LOCK_KEY)))
                last = connection.execute(
                    sa.select(AuditRecord.row_hash).order_by(AuditRecord.id.desc()).limit(1)
                ).scalar_one_or_none()
                prev_hash = last or GENESIS_HASH
                row_hash = compute_row_hash(record, drift_rows, prev_hash)
                record_id = connection.execute(
                    sa.insert(AuditRecord)
                    .values(**record, prev_hash=prev_hash, row_hash=row_hash)
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


# ------------------------------------------------------------------------------------------- verifying


def verify(engine: sa.Engine, *, batch_size: int = 1000, anchor: str | None = None) -> VerifyResult:
    """Walk the chain in id order (streamed) and recompute every hash; stop at the first bad row.

    A row is bad when its ``prev_hash`` is not the previous row's ``row_hash`` ("broken link": a row was
    deleted or inserted before it), when its stored content no longer hashes to ``row_hash`` ("content
    hash mismatch": a value was changed), or when a stored value cannot be read back at all ("unreadable
    row": e.g. a JSON column or timestamp edited into something invalid).

    The result names the chain head (``head_id``, ``head_hash``: the newest verified row). Deleting the
    newest rows leaves a valid shorter chain, so keep the head hash somewhere else (a log, a ticket, a
    notary) and pass it back as ``anchor``: if no row of the verified chain has that hash, the chain was
    truncated or rewritten after it was recorded, and the result is not ok.
    """
    # JSON and timestamp columns are read raw and parsed here, so a tampered value is a bad row, not an
    # exception half-way through the stream (SQLite stores them as text that can be edited into anything).
    raw = {
        "options": sa.type_coerce(AuditRecord.options, sa.Text).label("options"),
        "payload": sa.type_coerce(AuditRecord.payload, sa.Text).label("payload"),
        "created_at": sa.type_coerce(AuditRecord.created_at, sa.String).label("created_at"),
    }
    record_columns = [column.name for column in AuditRecord.__table__.columns]
    selected = [raw.get(name, getattr(AuditRecord, name)) for name in record_columns]
    drift_columns = [getattr(AuditDrift, name).label(f"d_{name}") for name in _DRIFT_CONTENT]
    statement = (
        sa.select(*selected, AuditDrift.id.label("d_id"), *drift_columns)
        .outerjoin(AuditDrift, AuditDrift.record_id == AuditRecord.id)
        .order_by(AuditRecord.id, AuditDrift.model, AuditDrift.method)
    )
    checked = 0
    expected_prev = GENESIS_HASH
    head_id: int | None = None
    anchor = anchor.strip().lower() if anchor is not None else None
    anchor_found = False

    def bad(record_id: int, reason: str) -> VerifyResult:
        return VerifyResult(
            ok=False,
            checked=checked,
            first_bad_id=record_id,
            reason=reason,
            head_id=head_id,
            head_hash=None if head_id is None else expected_prev,
            anchor_found=anchor_found if anchor is not None else None,
        )

    with translate_errors("verify the audit chain"), engine.connect() as connection:
        result = connection.execution_options(stream_results=True, yield_per=batch_size).execute(statement)
        for record_id, rows in itertools.groupby(result.mappings(), key=lambda row: row["id"]):
            rows_list = list(rows)
            record = {name: rows_list[0][name] for name in record_columns}
            drift = [
                {name: row[f"d_{name}"] for name in _DRIFT_CONTENT}
                for row in rows_list
                if row["d_id"] is not None
            ]
            if record["prev_hash"] != expected_prev:
                return bad(
                    record_id,
                    f"broken link: prev_hash {str(record['prev_hash'])[:12]}... does not match the previous "
                    f"row's row_hash {expected_prev[:12]}... (a row before it was deleted or inserted)",
                )
            try:
                record = _parse_stored_record(record)
                actual = compute_row_hash(record, drift, record["prev_hash"])
            except (ValueError, TypeError, OverflowError) as error:
                return bad(record_id, f"unreadable row: {type(error).__name__}: {error}"[:500])
            if actual != record["row_hash"]:
                return bad(
                    record_id,
                    f"content hash mismatch: stored row_hash {str(record['row_hash'])[:12]}..., "
                    f"content hashes to {actual[:12]}... (the record or its drift rows were changed)",
                )
            expected_prev = record["row_hash"]
            head_id = record_id
            anchor_found = anchor_found or expected_prev == anchor
            checked += 1
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
        )
    return VerifyResult(
        ok=True,
        checked=checked,
        head_id=head_id,
        head_hash=None if head_id is None else expected_prev,
        anchor_found=True if anchor is not None else None,
    )


def _parse_stored_record(record: dict[str, Any]) -> dict[str, Any]:
    """JSON columns and ``created_at`` as :func:`append` hashed them, from their raw stored form.

    PostgreSQL's driver hands JSON and timestamps over already parsed; SQLite gives their text.
    """
    parsed = dict(record)
    for name in ("options", "payload"):
        value = parsed[name]
        if isinstance(value, str | bytes):
            parsed[name] = json.loads(value)
    created = parsed["created_at"]
    if isinstance(created, str):
        created = datetime.fromisoformat(created)
    if not isinstance(created, datetime):
        raise TypeError(f"created_at: expected a timestamp, got {type(created).__name__}")
    parsed["created_at"] = created.replace(tzinfo=UTC) if created.tzinfo is None else created
    return parsed


# ------------------------------------------------------------------------------------------- filtering


def _drift_conditions(filters: AuditFilters) -> list[sa.ColumnElement[bool]]:
    conditions: list[sa.ColumnElement[bool]] = []
    if filters.model is not None:
        conditions.append(AuditDrift.model == filters.model)
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


def _time_conditions(filters: AuditFilters) -> list[sa.ColumnElement[bool]]:
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


def _group_expression(name: str, dialect: str) -> Any:
    if name == "model":
        return AuditDrift.model
    if name == "method":
        return AuditDrift.method
    if name == "class":
        return AuditDrift.target_class
    created = AuditRecord.created_at
    if dialect == "postgresql":
        utc = func.timezone("UTC", created)
        return func.to_char(func.date_trunc(name, utc), "YYYY-MM-DD")
    # SQLite stores UTC text 'YYYY-MM-DD HH:MM:SS.ffffff': the date is its first 10 characters (SQLite's
    # date functions would round 23:59:59.9995 up to the next day). ISO weeks start on Monday: 'weekday 0'
    # moves to the next Sunday (or stays on one), '-6 days' goes back to that week's Monday.
    day = func.substr(created, 1, 10)
    if name == "day":
        return day
    return func.date(day, "weekday 0", "-6 days")


def _check_group_by(group_by: Sequence[str]) -> list[str]:
    if isinstance(group_by, str):
        group_by = [group_by]
    names = list(group_by)
    for name in names:
        if name not in GROUP_BY_OPTIONS:
            raise ValueError(
                f"group_by: unknown value {name!r}; valid options: {', '.join(GROUP_BY_OPTIONS)}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"group_by: each value at most once, got {names}")
    if "day" in names and "week" in names:
        raise ValueError("group_by: choose one of 'day' and 'week', not both")
    return names


# ----------------------------------------------------------------------------------------- summarizing


def _rate(column: Any) -> sa.ColumnElement[Any]:
    return func.avg(sa.case((column, 1.0), else_=0.0))


def _summary_rows_postgresql(
    group_columns: list[sa.ColumnElement[Any]], conditions: list[sa.ColumnElement[bool]]
) -> tuple[list[Any], int]:
    selected: list[sa.ColumnElement[Any]] = [*group_columns]
    selected += [func.count().label("n"), _rate(AuditDrift.agreement), _rate(AuditDrift.flagged)]
    fractions = postgresql.array([sa.literal(p, sa.Double) for p in PERCENTILES])
    for name in SUMMARY_STATISTICS:
        column = getattr(AuditDrift, name)
        selected += [
            func.count(column),
            func.avg(column),
            func.stddev_samp(column),
            func.percentile_cont(fractions).within_group(column),
        ]
    statement = (
        sa.select(*selected)
        .select_from(AuditDrift)
        .join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
        .where(*conditions)
        .group_by(*group_columns)
        .order_by(*group_columns)
    )
    return [statement], len(group_columns)


def _summary_statement_sqlite(
    group_columns: list[sa.ColumnElement[Any]], conditions: list[sa.ColumnElement[bool]]
) -> sa.Select[Any]:
    """SQLite has no percentile aggregate: rank each metric in its group with window functions and
    interpolate linearly between the two closest ranks, exactly as ``percentile_cont`` (and NumPy's default
    'linear' method) do: with the n non-null values sorted as x_0..x_{n-1}, h = p (n - 1),
    P(p) = x_floor(h) + (h - floor(h)) (x_floor(h)+1 - x_floor(h)). The sample SD is two-pass:
    sum((x - mean)^2) / (n - 1), with the group mean from a window."""
    partition = group_columns or None
    inner_columns: list[sa.ColumnElement[Any]] = [
        column.label(f"g{i}") for i, column in enumerate(group_columns)
    ]
    inner_columns += [AuditDrift.agreement.label("agreement"), AuditDrift.flagged.label("flagged")]
    for name in SUMMARY_STATISTICS:
        column = getattr(AuditDrift, name)
        inner_columns += [
            column.label(f"v_{name}"),
            (func.row_number().over(partition_by=partition, order_by=column.asc().nulls_last()) - 1).label(
                f"r_{name}"
            ),
            func.count(column).over(partition_by=partition).label(f"n_{name}"),
            func.avg(column).over(partition_by=partition).label(f"m_{name}"),
        ]
    inner = (
        sa.select(*inner_columns)
        .select_from(AuditDrift)
        .join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
        .where(*conditions)
        .subquery("ranked")
    )
    groups = [inner.c[f"g{i}"] for i in range(len(group_columns))]
    selected: list[sa.ColumnElement[Any]] = [*groups]
    selected += [func.count().label("n"), _rate(inner.c.agreement), _rate(inner.c.flagged)]
    for name in SUMMARY_STATISTICS:
        value, rank, count, mean = (inner.c[f"{prefix}_{name}"] for prefix in ("v", "r", "n", "m"))
        group_count = func.max(count)
        squares = func.sum((value - mean) * (value - mean))
        variance = sa.case((group_count > 1, squares / sa.cast(group_count - 1, sa.Double)))
        percentiles = []
        for p in PERCENTILES:
            position = p * (count - 1)
            low = sa.cast(position, sa.Integer)
            fraction = position - low
            percentiles.append(
                func.sum(
                    sa.case(
                        (rank == low, value * (1.0 - fraction)),
                        (rank == low + 1, value * fraction),
                        else_=0.0,
                    )
                )
            )
        selected += [func.count(value), func.avg(value), variance, *percentiles]
    return sa.select(*selected).group_by(*groups).order_by(*groups)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def summarize(engine: sa.Engine, *, filters: AuditFilters, group_by: Sequence[str] = ()) -> dict[str, Any]:
    """Aggregate the drift rows (one per record x model x method) matching ``filters``, in SQL.

    Per group: ``count`` (drift rows), ``agreement_rate`` and ``flagged_rate`` (fractions of those rows),
    and for every metric and ``drift_score``: ``n`` (non-null values), ``mean``, ``sd`` (sample, n - 1;
    null when n < 2) and ``p5 p25 p50 p75 p95`` (linear interpolation between closest ranks: PostgreSQL
    ``percentile_cont``, NumPy's default; computed with window functions on SQLite). ``group_by`` takes
    values among ``GROUP_BY_OPTIONS``; "day"/"week" are UTC dates, weeks starting on Monday.

    ``ranking``: per method, the models ordered from most to least stable by mean top-k IoU between the
    transfer and fine-tuned maps (higher = evidence moved less; ties by lower mean drift score, then name),
    and for each pair of methods the Kendall tau-b between the models' mean IoUs (``scipy.stats.kendalltau``;
    tau = 1 same order, tau < 0 ``reversal``), ``rank_changed`` when any pair of models swaps.
    """
    names = _check_group_by(group_by)
    dialect = engine.dialect.name
    conditions = _time_conditions(filters) + _drift_conditions(filters)
    group_columns = [_group_expression(name, dialect) for name in names]
    if dialect == "postgresql":
        (statement,), _ = _summary_rows_postgresql(group_columns, conditions)
    else:
        statement = _summary_statement_sqlite(group_columns, conditions)
    with translate_errors("summarize the audit log"), engine.connect() as connection:
        rows = connection.execute(statement).all()
        ranking_rows = connection.execute(
            sa.select(
                AuditDrift.method,
                AuditDrift.model,
                func.count(),
                func.avg(AuditDrift.iou),
                func.avg(AuditDrift.drift_score),
            )
            .join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
            .where(*conditions)
            .group_by(AuditDrift.method, AuditDrift.model)
        ).all()

    groups = []
    for row in rows:
        values = list(row)
        key = {name: values[i] for i, name in enumerate(names)}
        rest = values[len(names) :]
        count, agreement_rate, flagged_rate = int(rest[0]), rest[1], rest[2]
        metrics: dict[str, Any] = {}
        offset = 3
        for name in SUMMARY_STATISTICS:
            if dialect == "postgresql":
                n, mean, sd, quantiles = rest[offset : offset + 4]
                offset += 4
                quantiles = list(quantiles) if quantiles is not None else [None] * len(PERCENTILES)
            else:
                n, mean, variance = rest[offset : offset + 3]
                quantiles = list(rest[offset + 3 : offset + 3 + len(PERCENTILES)])
                offset += 3 + len(PERCENTILES)
                sd = None if variance is None else math.sqrt(max(float(variance), 0.0))
            n = int(n)
            if n == 0:
                quantiles = [None] * len(PERCENTILES)
            stats: dict[str, Any] = {"n": n, "mean": _float_or_none(mean), "sd": _float_or_none(sd)}
            for p, q in zip(PERCENTILES, quantiles, strict=True):
                stats[f"p{round(p * 100)}"] = _float_or_none(q)
            metrics[name] = stats
        groups.append(
            {
                "key": key,
                "count": count,
                "agreement_rate": _float_or_none(agreement_rate),
                "flagged_rate": _float_or_none(flagged_rate),
                "metrics": metrics,
            }
        )
    return {
        "filters": filters.to_dict(),
        "group_by": names,
        "percentiles": list(PERCENTILES),
        "total": sum(group["count"] for group in groups),
        "groups": groups,
        "ranking": _ranking(ranking_rows),
    }


def _ranking(rows: Sequence[Any]) -> dict[str, Any]:
    from scipy.stats import kendalltau

    per_method: dict[str, list[dict[str, Any]]] = {}
    for method, model, count, mean_iou, mean_drift in rows:
        per_method.setdefault(method, []).append(
            {
                "model": model,
                "count": int(count),
                "mean_iou": _float_or_none(mean_iou),
                "mean_drift_score": _float_or_none(mean_drift),
            }
        )
    for entries in per_method.values():
        entries.sort(
            key=lambda e: (
                e["mean_iou"] is None,
                -(e["mean_iou"] or 0.0),
                math.inf if e["mean_drift_score"] is None else e["mean_drift_score"],
                e["model"],
            )
        )
        for rank, entry in enumerate(entries, start=1):
            entry["rank"] = rank
    comparisons = []
    for first, second in itertools.combinations(sorted(per_method), 2):
        iou_first = {e["model"]: e["mean_iou"] for e in per_method[first] if e["mean_iou"] is not None}
        iou_second = {e["model"]: e["mean_iou"] for e in per_method[second] if e["mean_iou"] is not None}
        models = sorted(set(iou_first) & set(iou_second))
        tau: float | None = None
        p_value: float | None = None
        if len(models) >= 2:
            result = kendalltau([iou_first[m] for m in models], [iou_second[m] for m in models])
            if math.isfinite(result.statistic):
                tau, p_value = float(result.statistic), float(result.pvalue)
        order_first = [e["model"] for e in per_method[first] if e["model"] in models]
        order_second = [e["model"] for e in per_method[second] if e["model"] in models]
        comparisons.append(
            {
                "methods": [first, second],
                "models": models,
                "order": {first: order_first, second: order_second},
                "kendall_tau": tau,
                "p_value": p_value,
                "rank_changed": tau is not None and tau < 1.0,
                "reversal": tau is not None and tau < 0.0,
            }
        )
    return {
        "by": "mean_iou",
        "order": "descending: most stable (highest mean IoU) first",
        "per_method": per_method,
        "comparisons": comparisons,
    }


# ------------------------------------------------------------------------------------------- reading


def _drift_dict(row: Mapping[Any, Any]) -> dict[str, Any]:
    return {name: row[name] for name in _DRIFT_CONTENT}


def _record_dict(row: Mapping[Any, Any], *, with_payload: bool) -> dict[str, Any]:
    item = {
        "id": row["id"],
        "request_id": row["request_id"],
        "created_at": _utc_iso(row["created_at"]),
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
    conditions = _time_conditions(filters)
    drift_conditions = _drift_conditions(filters)
    if drift_conditions:
        conditions.append(sa.exists().where(AuditDrift.record_id == AuditRecord.id, *drift_conditions))
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


CSV_COLUMNS: tuple[str, ...] = (
    "record_id",
    "request_id",
    "created_at",
    "api_key_name",
    "image_sha256",
    "image_format",
    "image_width",
    "image_height",
    *_DRIFT_CONTENT,
)


def _csv_line(values: Sequence[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
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
            *(getattr(AuditDrift, name) for name in _DRIFT_CONTENT),
        )
        .join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
        .where(*_time_conditions(filters), *_drift_conditions(filters))
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
                    values[2] = _utc_iso(values[2])
                    yield _csv_line(["" if v is None else v for v in values])
        finally:
            result.close()
            connection.close()

    return lines()
