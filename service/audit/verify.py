"""Verifying the audit chain: recompute every row's hash and follow the links, in id order.

:func:`verify` walks the chain (or, incrementally, the rows after an anchored head) in pages of records,
each with its drift rows. A long walk is split into contiguous id spans walked in worker processes, each
checking its rows' hashes and the links inside it; the spans are then stitched (each span's first row must
link to the previous span's last), so the verdict, the first bad row and its reason are the ones a single
walk gives. Imports no web or model code (the worker processes import only this).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import math
import multiprocessing
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

from core.cpus import usable_cores
from service.audit import db
from service.audit.db import DatabaseUnavailable, translate_errors
from service.audit.hashing import (
    DRIFT_CONTENT,
    GENESIS_HASH,
    RECORD_CONTENT,
)
from service.audit.queries import record_id_ends
from service.audit.stored import sqlite_drift_types_ok, stored_row_hash
from service.audit.tables import AuditDrift, AuditRecord

log = logging.getLogger(__name__)

__all__ = ["PARALLEL_MIN_ROWS", "VerifyResult", "default_workers", "verify"]

# a walk is split only when each worker gets at least this many records (a worker's start-up and its own
# connection cost about as much as hashing a few hundred)
PARALLEL_MIN_ROWS = 2_000


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


def default_workers() -> int:
    """Processes a long walk is split over: the cores this process may use, at most 4."""
    return min(4, usable_cores())


def verify(
    engine: sa.Engine,
    *,
    batch_size: int = 1000,
    anchor: str | None = None,
    since: tuple[int, str] | None = None,
    workers: int | None = None,
) -> VerifyResult:
    """Walk the chain in id order (streamed) and recompute every hash; stop at the first bad row.

    A row is bad when its ``prev_hash`` is not the previous row's ``row_hash`` ("broken link": a row was
    deleted or inserted before it), when its stored content no longer hashes to ``row_hash`` ("content
    hash mismatch": a value was changed), or when a stored value cannot be read back at all or is not in the
    form :func:`~service.audit.chain.append` writes ("unreadable row": e.g. a JSON text with a duplicated
    key or reformatted, a SQLite timestamp or boolean written differently), so what SQL reads is always what
    is hashed. JSON texts are canonical JSON (``db.stored_json``; rows written before hold
    ``db.legacy_stored_json``).

    The result names the chain head (``head_id``, ``head_hash``: the newest verified row). Deleting the
    newest rows leaves a valid shorter chain, so keep the head hash somewhere else (a log, a ticket, a
    notary) and pass it back as ``anchor``: if no row of the verified chain has that hash, the chain was
    truncated or rewritten after it was recorded, and the result is not ok.

    ``since=(head_id, head_hash)`` verifies incrementally: only the rows after a head that an earlier run
    verified and that was kept outside the database. The row ``head_id`` must still hold ``head_hash`` and
    hash to it (else the result is not ok: a wrong or stale anchor is refused, never trusted), and each
    later row must link to the one before it; ``checked`` counts the rows after the anchor. What the full
    walk adds is only the rows up to the anchor, which the earlier run covered.

    ``workers`` (default :func:`default_workers`): a walk of at least ``workers`` x
    :data:`PARALLEL_MIN_ROWS` records is split into that many id spans, walked at once in worker processes
    (kept for later calls) with connections of their own; the result is the one a single walk gives. An
    in-memory SQLite database is always walked here.
    """
    sqlite = engine.dialect.name == "sqlite"
    since_id, since_hash = (None, None) if since is None else (int(since[0]), since[1].strip().lower())
    anchor = anchor.strip().lower() if anchor is not None else None
    workers = default_workers() if workers is None else max(1, int(workers))
    # Rows are never changed and appends are serialised (each commits its record and drift rows together,
    # with ids in commit order), so a later statement sees at least what an earlier one saw.
    with translate_errors("verify the audit chain"), engine.connect() as connection:
        plan = (
            _plan(connection, since_id, since_hash, workers) if _separate_processes_can_read(engine) else []
        )
        if plan:
            connection.rollback()  # not idle in a transaction while the workers walk (a server may end it)
        spans = None
        if plan:
            spans = _walk_spans(engine, _jobs(plan, since_id, since_hash, anchor, batch_size), workers)
        if spans is not None and not _same_rows(connection, plan, spans):
            log.warning("verification workers did not read the rows this process reads; walking here")
            spans = None
        if spans is None:
            after = None if since_id is None else since_id - 1
            (whole,) = _jobs([(after, None)], since_id, since_hash, anchor, batch_size)
            spans = [_walk(connection, sqlite, whole)]
        result = _combine(spans, since_id, anchor)
        if not result.ok:
            return result
        # drift rows that no record owns (written outside append): the walk never reads them, summaries
        # skip them, and a later record taking their record_id would be blamed for them
        orphan = _first_orphan(connection, since_id)
        if orphan is not None:
            owner = orphan[1] if isinstance(orphan[1], int) else None
            return _replace(
                result,
                ok=False,
                first_bad_id=owner,
                reason=f"orphan drift row: audit_drift id {orphan[0]} names record_id {orphan[1]!r}, which "
                "no record has (a drift row written outside the audit path)",
            )
    if since_id is not None and result.head_id is None:
        return _replace(
            result,
            ok=False,
            first_bad_id=since_id,
            reason=f"since: row {since_id} does not hold the anchored hash {since_hash}",
        )
    if anchor is not None and not result.anchor_found:
        return _replace(
            result,
            ok=False,
            reason=(
                f"anchor {anchor[:12]}... is not the hash of any row in the chain: rows recorded after it "
                "were deleted (truncation) or the chain was rewritten"
            ),
        )
    return result


def _replace(result: VerifyResult, **changes: Any) -> VerifyResult:
    return VerifyResult(**{**asdict(result), **changes})


# ---------------------------------------------------------------------------------------------- spans


@dataclass(frozen=True)
class _Job:
    """Walk the records with ids in (after, until] (None: from the first, to the last)."""

    after: int | None
    until: int | None
    # the hash the first row must link to; None: any (the span before it is stitched to it afterwards)
    expected_prev: str | None
    # (id, hash): the first row must be this anchored head; it is hashed but not counted
    since: tuple[int, str] | None
    anchor: str | None
    batch_size: int


@dataclass
class _Span:
    """What walking one job found: its first row, the last row that verified, and the first bad row."""

    first_id: int | None = None
    first_prev: str | None = None
    linked: bool = False  # the first row's link was checked by the walk itself
    head_id: int | None = None
    head_hash: str | None = None
    checked: int = 0
    anchor_found: bool = False
    bad_id: int | None = None
    reason: str | None = None
    database: tuple[Any, ...] = ()  # which database the worker read (_database_identity)

    def bad(self, record_id: int, reason: str) -> _Span:
        self.bad_id, self.reason = record_id, reason
        return self


def _broken_link(prev_hash: str, expected: str) -> str:
    return (
        f"broken link: prev_hash {prev_hash[:12]}... does not match the previous row's row_hash "
        f"{expected[:12]}... (a row before it was deleted or inserted)"
    )


def _statements(sqlite: bool) -> tuple[sa.Select[Any], sa.Select[Any]]:
    """The records' and the drift rows' hashed columns as verification reads them.

    JSON and timestamp columns are read raw, so a tampered value is a bad row, not an exception half-way
    through the walk (SQLite stores them as text that can be edited into anything). The JSON columns are
    read as their stored text on both databases (PostgreSQL `json` keeps the text as written), and SQLite's
    drift columns as stored (SQLite does not enforce column types), with a flag that SQLite computes: every
    value has its column's storage type. Verification then checks that what SQL reads is exactly what is
    hashed (see stored.stored_row_hash)."""
    coerce = sa.type_coerce if sqlite else sa.cast
    raw = {
        "options": coerce(AuditRecord.options, sa.Text).label("options"),
        "payload": coerce(AuditRecord.payload, sa.Text).label("payload"),
        "created_at": sa.type_coerce(AuditRecord.created_at, sa.String).label("created_at"),
    }
    records = sa.select(
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
    drift = sa.select(AuditDrift.record_id, *drift_columns, *([sqlite_drift_types_ok()] if sqlite else []))
    return records, drift


def _walk(connection: sa.Connection, sqlite: bool, job: _Job) -> _Span:
    """Pages of records by id, each with its drift rows in a second query (no record x drift join)."""
    records_statement, drift_statement = _statements(sqlite)
    span = _Span(linked=job.expected_prev is not None or job.since is not None)
    expected_prev, after = job.expected_prev, job.after
    while True:
        page = records_statement if after is None else records_statement.where(AuditRecord.id > after)
        if job.until is not None:
            page = page.where(AuditRecord.id <= job.until)
        records = _fetch(connection, page.limit(job.batch_size), sqlite)
        if not records:
            return span
        drift_of: dict[int, list[Sequence[Any]]] = {}
        in_page = AuditDrift.record_id.between(records[0][0], records[-1][0])
        for row in _fetch(connection, drift_statement.where(in_page), sqlite):
            drift_of.setdefault(row[0], []).append(row)
        for record in records:
            record_id, prev_hash, row_hash = record[0], record[1], record[2]
            at_anchor = job.since is not None and span.first_id is None
            if span.first_id is None:
                span.first_id, span.first_prev = record_id, prev_hash
                expected_prev = prev_hash if expected_prev is None else expected_prev
            if at_anchor and job.since is not None and (record_id, row_hash) != job.since:
                return span.bad(
                    record_id, f"since: row {job.since[0]} does not hold the anchored hash {job.since[1]}"
                )
            if at_anchor:
                expected_prev = str(prev_hash)  # verified up to here by the earlier run
            if prev_hash != expected_prev:
                return span.bad(record_id, _broken_link(str(prev_hash), str(expected_prev)))
            try:
                actual = stored_row_hash(record, drift_of.get(record_id, []), sqlite)
            except (ValueError, TypeError, OverflowError) as error:
                return span.bad(record_id, f"unreadable row: {type(error).__name__}: {error}"[:500])
            if actual != row_hash:
                return span.bad(
                    record_id,
                    f"content hash mismatch: stored row_hash {str(row_hash)[:12]}..., "
                    f"content hashes to {actual[:12]}... (the record or its drift rows were changed)",
                )
            expected_prev = row_hash
            span.head_id, span.head_hash = record_id, row_hash
            span.anchor_found = span.anchor_found or row_hash == job.anchor
            span.checked += 0 if at_anchor else 1
        after = records[-1][0]


def _combine(spans: Sequence[_Span], since_id: int | None, anchor: str | None) -> VerifyResult:
    """The verdict of consecutive spans: each span's first row must link to the last row before it."""
    checked, head_id, head_hash, anchor_found = 0, None, None, False
    expected: str | None = GENESIS_HASH if since_id is None else None

    def result(ok: bool, bad_id: int | None = None, reason: str | None = None) -> VerifyResult:
        return VerifyResult(
            ok=ok,
            checked=checked,
            first_bad_id=bad_id,
            reason=reason,
            head_id=head_id,
            head_hash=head_hash,
            anchor_found=anchor_found if anchor is not None else None,
            since_id=since_id,
        )

    for span in spans:
        stitched = span.first_id is not None and not span.linked and expected is not None
        if stitched and span.first_prev != expected:
            return result(False, span.first_id, _broken_link(str(span.first_prev), str(expected)))
        checked += span.checked
        anchor_found = anchor_found or span.anchor_found
        if span.head_id is not None:
            head_id, head_hash = span.head_id, span.head_hash
            expected = head_hash
        if span.reason is not None:
            return result(False, span.bad_id, span.reason)
    return result(True)


def _separate_processes_can_read(engine: sa.Engine) -> bool:
    """Whether another process can open the database ``engine`` reads (not an in-memory SQLite)."""
    if engine.dialect.name != "sqlite":
        return True
    database = engine.url.database or ""
    return bool(database) and ":memory:" not in database and "mode=memory" not in str(engine.url)


def _plan(
    connection: sa.Connection, since_id: int | None, since_hash: str | None, workers: int
) -> list[tuple[int, int]]:
    """Id spans (after, until] for ``workers`` processes, up to the newest record now (one appended while
    they walk is the next verification's); empty: walk here (too few rows to split, or an anchored head that
    is not there, which the single walk reports)."""
    if workers < 2:
        return []
    first, last = connection.execute(record_id_ends()).one()
    if first is None:
        return []
    if since_id is not None:
        held = connection.execute(
            sa.select(AuditRecord.row_hash).where(AuditRecord.id == since_id)
        ).scalar_one_or_none()
        if held != since_hash:
            return []
        first = since_id
    count = int(last) - int(first) + 1
    parts = min(workers, count // PARALLEL_MIN_ROWS)
    if parts < 2:
        return []
    step = math.ceil(count / parts)
    bounds = [int(first) - 1 + i * step for i in range(parts)]
    return [(after, min(after + step, int(last))) for after in bounds]


def _jobs(
    spans: Sequence[tuple[int | None, int | None]],
    since_id: int | None,
    since_hash: str | None,
    anchor: str | None,
    batch_size: int,
) -> list[_Job]:
    """Consecutive spans (after, until] to walk: the first links to the genesis hash or starts at the
    anchored head; each later one is stitched to the one before it afterwards (:func:`_combine`)."""
    first_prev = GENESIS_HASH if since_id is None else None
    first_since = None if since_id is None else (since_id, str(since_hash))
    return [
        _Job(
            after=after,
            until=until,
            expected_prev=first_prev if i == 0 else None,
            since=first_since if i == 0 else None,
            anchor=anchor,
            batch_size=batch_size,
        )
        for i, (after, until) in enumerate(spans)
    ]


def _walk_spans(engine: sa.Engine, jobs: list[_Job], workers: int) -> list[_Span] | None:
    """``jobs`` walked in the pool of ``workers`` processes; None when the pool cannot run (walk here). One
    deadline for all of them (the read timeout, plus 10 s): past it the pool is dropped (its processes
    ended) and the database counts as stalled."""
    limits = db.timeouts_of(engine)
    wait_s = None if limits is None else limits.read_timeout_s + 10
    url = db.source_url(engine)
    pool = None
    try:
        pool = _pool(workers)
        futures = [pool.submit(_walk_in_worker, url, limits, job) for job in jobs]
        _, late = concurrent.futures.wait(futures, timeout=wait_s)
    except Exception as error:  # a pool that cannot start or take work
        log.warning("verification pool unusable (%s: %s); walking here", type(error).__name__, error)
        if pool is not None:
            _drop_pool(workers, pool)
        return None
    if late:
        for future in late:
            future.cancel()
        _drop_pool(workers, pool, terminate=True)
        raise DatabaseUnavailable(
            f"verification workers did not finish within {wait_s} s", public="stalled (timed out)"
        )
    try:
        return [future.result() for future in futures]
    except Exception as error:  # a worker that failed (a lost process, a connection it could not get): the
        # walk here answers, or fails with the database's own error
        log.warning("verification worker failed (%s: %s); walking here", type(error).__name__, error)
        if isinstance(error, concurrent.futures.process.BrokenProcessPool):
            _drop_pool(workers, pool)
        return None


def _same_rows(connection: sa.Connection, plan: list[tuple[int, int]], spans: Sequence[_Span]) -> bool:
    """Whether the workers read what this connection reads: the same database (file, or server, database
    and table), the walk starts at the planned first row, each span's first and last rows hold here the
    hashes the worker reported, and an ok walk reaches the newest row the plan saw."""
    here_database = _database_identity(connection)
    if any(span.database != here_database for span in spans) or spans[0].first_id != plan[0][0] + 1:
        return False
    prev_of = {span.first_id: span.first_prev for span in spans if span.first_id is not None}
    hash_of = {span.head_id: span.head_hash for span in spans if span.head_id is not None}
    rows = connection.execute(
        sa.select(AuditRecord.id, AuditRecord.prev_hash, AuditRecord.row_hash).where(
            AuditRecord.id.in_(sorted(set(prev_of) | set(hash_of)))
        )
    ).all()
    here = {row[0]: (row[1], row[2]) for row in rows}
    if any(here.get(i, (None, None))[0] != prev for i, prev in prev_of.items()):
        return False
    if any(here.get(i, (None, None))[1] != row_hash for i, row_hash in hash_of.items()):
        return False
    if any(span.reason is not None for span in spans):
        return True  # stopped at a bad row: the rows before it were checked above
    return bool(hash_of) and max(hash_of) == plan[-1][1]


_POOLS: dict[int, concurrent.futures.ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


@atexit.register
def _shut_pools_down() -> None:
    """At exit, before the interpreter tears the executors' modules down under them."""
    for workers in list(_POOLS):
        _drop_pool(workers)


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """The pool of ``workers`` processes, started once and kept (spawned: the caller may hold threads)."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            context = multiprocessing.get_context("spawn")
            pool = _POOLS[workers] = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
        return pool


def _drop_pool(
    workers: int, pool: concurrent.futures.ProcessPoolExecutor | None = None, *, terminate: bool = False
) -> None:
    """Forget the pool of ``workers`` (only ``pool``, if given: another thread may have made a new one) and
    shut it down; ``terminate`` also ends its processes (a walk past its deadline)."""
    with _POOLS_LOCK:
        current = _POOLS.get(workers)
        if current is None or (pool is not None and current is not pool):
            return
        del _POOLS[workers]
    # the executor keeps its processes by pid (a private attribute; absent: nothing to end)
    processes = list((getattr(current, "_processes", None) or {}).values()) if terminate else []
    current.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()


def _walk_in_worker(url: str, limits: db.DbTimeouts | None, job: _Job) -> _Span:
    """In a worker process: walk one span on an engine of its own for ``url``, made for this call (a kept
    connection could go on reading a database file that was since replaced), and say which database it
    read."""
    engine = db.make_engine(url, limits)
    try:
        with (
            translate_errors("verify the audit chain"),
            db.read_bound(engine),
            engine.connect() as connection,
        ):
            span = _walk(connection, engine.dialect.name == "sqlite", job)
            span.database = _database_identity(connection)
            return span
    finally:
        engine.dispose()


def _database_identity(connection: sa.Connection) -> tuple[Any, ...]:
    """Which database ``connection`` reads: SQLite, the main file's device and inode; PostgreSQL, the
    server (address, port, start time), database and schema the audit tables resolve to."""
    if connection.dialect.name == "sqlite":
        rows = connection.exec_driver_sql("PRAGMA database_list").all()
        path = next((row[2] for row in rows if row[1] == "main"), "")
        if not path:
            return ("sqlite", "no file")
        stat = os.stat(path)
        return ("sqlite", stat.st_dev, stat.st_ino)
    row = connection.execute(
        sa.text(
            "SELECT inet_server_addr()::text, inet_server_port(), "
            "extract(epoch FROM pg_postmaster_start_time())::text, current_database(), "
            "to_regclass('audit_records')::oid::bigint"
        )
    ).one()
    return ("postgresql", *row)


# ------------------------------------------------------------------------------------------ reading


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
