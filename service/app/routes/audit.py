"""The audit trail: summaries, records (JSON pages and CSV), and verification of the hash chain."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine

from core.vocabulary import METHODS, SEVERITIES
from service.app.deps import AuditKeyDep, EngineDep, SettingsDep
from service.app.errors import ApiError, error_responses
from service.app.schemas import (
    AuditFiltersOut,
    AuditRecord,
    AuditRecordPage,
    AuditSummaryResponse,
    AuditVerifyResponse,
    ModelEventPage,
)
from service.audit import chain, lifecycle, queries
from service.audit.compare import compare_sides
from service.audit.db import DatabaseUnavailable, read_bound
from service.audit.queries import AuditFilters
from service.audit.summary import GROUP_BY_OPTIONS, summarize

log = logging.getLogger(__name__)

router = APIRouter(prefix="/audit", tags=["audit"])

T = TypeVar("T")

if TYPE_CHECKING:
    MethodName = str
    Severity = str
else:
    # the query's enum: core.vocabulary.METHODS (a Literal of its values, which mypy cannot spell from a tuple)
    MethodName = Literal[METHODS]
    Severity = Literal[SEVERITIES]


def audit_filters(
    start: Annotated[
        datetime | None, Query(description="records created at or after (ISO 8601; no offset = UTC)")
    ] = None,
    end: Annotated[
        datetime | None, Query(description="records created before (ISO 8601; no offset = UTC)")
    ] = None,
    model: Annotated[str | None, Query(description="model pair name (its folder's name)")] = None,
    architecture: Annotated[
        str | None, Query(description="architecture (rows before revision 0004: their model name)")
    ] = None,
    digest: Annotated[
        str | None,
        Query(
            pattern="^[0-9a-fA-F]{8,64}$",
            description="version digest, or a prefix of it (8 or more hex digits)",
        ),
    ] = None,
    method: Annotated[MethodName | None, Query()] = None,
    target_class: Annotated[str | None, Query(alias="class", description="target class name")] = None,
    agreement: Annotated[bool | None, Query(description="both checkpoints predicted the same class")] = None,
    severity: Annotated[Severity | None, Query()] = None,
    flagged: Annotated[bool | None, Query()] = None,
) -> AuditFilters:
    start, end = _as_utc("start", start), _as_utc("end", end)
    for name, text in (("model", model), ("architecture", architecture), ("class", target_class)):
        if text is not None and "\x00" in text:
            # PostgreSQL refuses NUL in text parameters (a driver DataError, not a client error otherwise)
            raise ApiError(422, "validation_error", f"{name} must not contain NUL characters")
    if start is not None and end is not None and end <= start:
        raise ApiError(
            422, "validation_error", f"end ({end.isoformat()}) must be after start ({start.isoformat()})"
        )
    return AuditFilters(
        start=start,
        end=end,
        model=model,
        architecture=architecture,
        digest=digest.lower() if digest is not None else None,
        method=method,
        target_class=target_class,
        agreement=agreement,
        severity=severity,
        flagged=flagged,
    )


FiltersDep = Annotated[AuditFilters, Depends(audit_filters)]
# Record ids are 64-bit integers in both databases: larger values would overflow the driver (a 500).
MAX_ID = 2**63 - 1


def _as_utc(name: str, value: datetime | None) -> datetime | None:
    """``value`` in UTC; a time without an offset is taken as UTC. Out-of-range instants are a 422."""
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise ApiError(
            422, "validation_error", f"{name} ({value.isoformat()}) is out of range in UTC: {exc}"
        ) from exc


def _filters_out(filters: AuditFilters) -> AuditFiltersOut:
    return AuditFiltersOut.model_validate(filters.model_dump())


async def _call_db(engine: Engine, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking audit-layer call off the event loop, under the read time limit (its connections are
    aborted after ``db_read_timeout_s``); a database failure becomes 503."""

    def bounded() -> T:
        with read_bound(engine):
            return func(*args, **kwargs)

    try:
        return await run_in_threadpool(bounded)
    except DatabaseUnavailable as exc:
        log.warning("audit database unavailable: %s", exc)  # the details (host, driver error) only here
        raise ApiError(
            503,
            "database_unavailable",
            f"audit database {exc.public}; retry later",
            headers={"Retry-After": "5"},
        ) from exc


def _parse_group_by(values: list[str]) -> list[str]:
    parts = [p.strip() for v in values for p in v.split(",") if p.strip()]
    unknown = [p for p in parts if p not in GROUP_BY_OPTIONS]
    if unknown:
        raise ApiError(
            422,
            "validation_error",
            f"unknown group_by value(s) {', '.join(map(repr, unknown))}; valid options: "
            f"{', '.join(GROUP_BY_OPTIONS)}",
            details={"valid": list(GROUP_BY_OPTIONS)},
        )
    return list(dict.fromkeys(parts))


@router.get(
    "/summary",
    response_model=AuditSummaryResponse,
    summary="aggregates of drift over time windows and filters",
    responses=error_responses(401, 403, 422, 503),
)
async def summary(
    engine: EngineDep,
    principal: AuditKeyDep,
    filters: FiltersDep,
    group_by: Annotated[
        list[str],
        Query(description=f"repeat or comma-separate; among {', '.join(GROUP_BY_OPTIONS)}"),
    ] = [],  # noqa: B006 - FastAPI copies defaults per request
    mode: Annotated[
        Literal["auto", "exact", "rollup"],
        Query(
            description="auto: the daily rollup when it can answer and the query covers >= 50,000 drift rows "
            "(PostgreSQL) or 1,000 (SQLite), else the raw rows; exact: the raw rows; rollup: the rollup or 422 "
            "(summary.source says which)"
        ),
    ] = "auto",
    compare: Annotated[
        str | None,
        Query(
            description="A,B: compare version B with version A (each a model name or a version digest, or "
            "a prefix of 8+ hex digits) of one architecture: per method drift means with CIs, flagged rates "
            "and whether the difference is significant (in summary.comparison)"
        ),
    ] = None,
    compare_split: Annotated[
        datetime | None,
        Query(description="with compare: side A keeps rows before this instant, side B rows from it on"),
    ] = None,
) -> AuditSummaryResponse:
    groups = _parse_group_by(group_by)
    result = await _call_db(
        engine, summarize, engine, filters=filters, group_by=groups, mode=mode
    )  # bad input: InputError, 422
    if compare is not None:
        sides = [part.strip() for part in compare.split(",")]
        if len(sides) != 2 or not all(sides) or any("\x00" in side for side in sides):
            raise ApiError(422, "validation_error", f"compare must be two selectors 'A,B', got {compare!r}")
        result["comparison"] = await _call_db(
            engine,
            compare_sides,
            engine,
            filters=filters,
            a=sides[0],
            b=sides[1],
            split=_as_utc("compare_split", compare_split),
        )
    elif compare_split is not None:
        raise ApiError(422, "validation_error", "compare_split needs compare=A,B")
    return AuditSummaryResponse(filters=_filters_out(filters), group_by=groups, summary=result)


@router.get(
    "/records",
    response_model=AuditRecordPage,
    summary="audit records, newest first, paginated with before_id",
    responses=error_responses(401, 403, 422, 503),
)
async def list_records(
    engine: EngineDep,
    principal: AuditKeyDep,
    filters: FiltersDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="only records with a smaller id")
    ] = None,
) -> AuditRecordPage:
    page = await _call_db(
        engine, queries.list_records, engine, filters=filters, limit=limit, before_id=before_id
    )
    items = [AuditRecord.model_validate(item) for item in page.items]
    return AuditRecordPage(items=items, next_before_id=page.next_before_id)


@router.get(
    "/records.csv",
    response_class=StreamingResponse,
    summary="audit records as CSV, one row per (record, model, method)",
    responses={200: {"content": {"text/csv": {}}}, **error_responses(401, 403, 422, 503)},
)
async def export_records_csv(
    engine: EngineDep, principal: AuditKeyDep, filters: FiltersDep
) -> StreamingResponse:
    def first_and_rest() -> tuple[str, Iterator[str]]:
        lines = iter(queries.export_csv(engine, filters=filters))
        return next(lines, ""), lines

    # read the header now, so a database that is down is a 503, not a broken 200 stream
    first, rest = await _call_db(engine, first_and_rest)

    def body() -> Iterator[str]:
        yield first
        yield from rest

    return StreamingResponse(
        body(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="audit-records.csv"'},
    )


@router.get(
    "/records/{record_id}",
    response_model=AuditRecord,
    summary="one audit record",
    responses=error_responses(401, 403, 404, 422, 503),
)
async def get_record(
    record_id: Annotated[int, Path(ge=1, le=MAX_ID)], engine: EngineDep, principal: AuditKeyDep
) -> AuditRecord:
    record = await _call_db(engine, queries.get_record, engine, record_id)
    if record is None:
        raise ApiError(404, "not_found", f"no audit record with id {record_id}", details={"id": record_id})
    return AuditRecord.model_validate(record)


@router.get(
    "/verify",
    response_model=AuditVerifyResponse,
    summary="recompute the hash chain; names the first record that does not match",
    responses=error_responses(401, 403, 422, 503),
)
async def verify(
    engine: EngineDep,
    settings: SettingsDep,
    principal: AuditKeyDep,
    anchor: Annotated[
        str | None,
        Query(
            pattern="^[0-9a-fA-F]{64}$",
            description="a head_hash recorded earlier (outside this database); the answer is not ok "
            "unless a row of the chain has it, so deleting the newest rows is detected",
        ),
    ] = None,
    since_id: Annotated[
        int | None,
        Query(
            ge=1,
            description="incremental: verify only the rows after this head_id of an earlier verification "
            "(give since_hash too); the row must still hold since_hash, else the answer is not ok",
        ),
    ] = None,
    since_hash: Annotated[
        str | None,
        Query(pattern="^[0-9a-fA-F]{64}$", description="the head_hash recorded with since_id"),
    ] = None,
) -> AuditVerifyResponse:
    if (since_id is None) != (since_hash is None):
        raise ApiError(422, "validation_error", "since_id and since_hash go together: give both or neither")
    since = None if since_id is None or since_hash is None else (since_id, since_hash)
    workers = settings.verify_workers
    result = await _call_db(engine, chain.verify, engine, anchor=anchor, since=since, workers=workers)
    events = await _call_db(engine, lifecycle.verify_events, engine)
    body = {**result.to_dict(), "model_events": events.to_dict()}
    body["ok"] = bool(result.ok and events.ok)
    return AuditVerifyResponse.model_validate(body)


@router.get(
    "/model-events",
    response_model=ModelEventPage,
    summary="model lifecycle records (load, replace, retire), newest first",
    responses=error_responses(401, 403, 422, 503),
)
async def model_events(
    engine: EngineDep,
    principal: AuditKeyDep,
    model: Annotated[str | None, Query(description="one model name")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> ModelEventPage:
    if model is not None and "\x00" in model:
        raise ApiError(422, "validation_error", "model must not contain NUL characters")
    items = await _call_db(
        engine, lifecycle.list_events, engine, model=model, limit=limit, before_id=before_id
    )
    return ModelEventPage.model_validate({"items": items})
