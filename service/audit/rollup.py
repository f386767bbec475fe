"""Daily rollups of the audit log: summaries over millions of drift rows without reading them.

``audit_rollup`` holds one row per (UTC day, model, method, architecture, version digest) with the number of drift rows, how many agree
and are flagged, and two blobs: ``stats`` (float64, shape 5 x S over the S = :data:`STATISTICS`: non-null
count, sum, sum of squares, min, max) and ``hist`` (uint32, S x (BINS + 2): a fixed-bin histogram of each
statistic over its declared range :data:`RANGES`, with an underflow and an overflow bin).

The rollup covers the records up to a **watermark** (``audit_rollup_state``, revision 0007): appends do not
touch it (no read-modify-write of histograms under the chain lock). :func:`catch_up` adds the records after
the watermark in batches, each a transaction under its own lock (not the chain's), and advances it; the
summary runs it when the tail is longer than ``CATCH_UP_AFTER`` records (``cxr-drift db rollup`` runs it
too), and :func:`load` reads the rollup with the watermark in one statement and adds the tail after it from
the raw rows (:func:`accumulate`, the same function), so an answer always covers every committed record.
Records are append-only and their ids are given in commit order under the chain lock, so the records up to
a watermark never change. :func:`rebuild` recomputes the rollup from the raw rows (migration backfill, bulk
loads) and :func:`check` compares the stored rollup with one recomputed from the rows up to the watermark,
so a rollup is only as trustworthy as the chain it is derived from (run it after
:func:`service.audit.chain.verify`).

What the rollup answers (:func:`summary_groups`), and how exactly:

- ``count``, ``agreement_rate``, ``flagged_rate``, per-statistic ``n``: exact (integer counts);
- ``mean`` and ``sd``: from sums and sums of squares, equal to the exact path up to floating-point rounding
  (sd = sqrt((sum x^2 - (sum x)^2 / n) / (n - 1)); all statistics are bounded, |x| <= 100);
- ``p5 .. p95``: approximate. Each order statistic is placed inside the bin that holds it (spread evenly
  over the bin by rank), so it is off by less than the bin width; percentile_cont's interpolation between
  two order statistics keeps that bound. Each metric reports ``percentile_max_error``: the largest width of
  the bins its percentiles came from (range / BINS inside the range; for the under/overflow bins the
  distance from the range edge to the group's exact min/max).

Only queries whose dimensions are rollup dimensions can use it: group by ``model``, ``method``,
``architecture``, ``digest``, ``day``, ``week``; filter on those and ``start``/``end`` at UTC midnights
(:func:`eligible`).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import func

from service.audit.db import SQLITE_IMMEDIATE
from service.audit.filters import AuditFilters
from service.audit.recent import Recent
from service.audit.tables import METRIC_COLUMNS, AuditDrift, AuditRecord, AuditRollup, AuditRollupState

__all__ = [
    "BINS",
    "RANGES",
    "ROLLUP_DIMENSIONS",
    "STATISTICS",
    "Accumulator",
    "accumulate",
    "catch_up",
    "catch_up_connection",
    "check",
    "eligible",
    "rebuild",
    "summary_groups",
    "utc_day",
]

STATISTICS: tuple[str, ...] = (*METRIC_COLUMNS, "drift_score", "drift_index", "reference_percentile")
BINS = 100
_UNIT = (0.0, 1.0)
_SIGNED = (-1.0, 1.0)
# The documented range of each statistic (engine/metrics.py, engine/severity.py); values outside still
# count, in the under/overflow bins.
RANGES: dict[str, tuple[float, float]] = {
    "iou": _UNIT,
    "dice": _UNIT,
    "soft_iou": _UNIT,
    "pearson": _SIGNED,
    "spearman": _SIGNED,
    "ssim": _SIGNED,
    "centroid_shift": _UNIT,
    "peak_shift": _UNIT,
    "zone_shift": _UNIT,
    "emd": _UNIT,
    "entropy_change": _SIGNED,
    "gini_change": _SIGNED,
    "drift_score": _UNIT,
    "drift_index": _UNIT,
    "reference_percentile": (0.0, 100.0),
}
_LOW = np.array([RANGES[name][0] for name in STATISTICS])
_HIGH = np.array([RANGES[name][1] for name in STATISTICS])
_WIDTH = (_HIGH - _LOW) / BINS
ROLLUP_DIMENSIONS: frozenset[str] = frozenset({"model", "method", "architecture", "digest", "day", "week"})
# Key of the PostgreSQL advisory lock of catch_up (not the chain's: catching up never holds up an append).
ROLLUP_LOCK_KEY = 0x0C58_D41F_7A12
CATCH_UP_BATCH = 5_000  # records per catch-up transaction (on SQLite it holds the write lock ~0.2-0.7 s)
_S = len(STATISTICS)
# A rollup row's key: UTC day, model, method, architecture (the model's when the row has none, as
# queries.architecture_expression), version digest ("" for none).
Key = tuple[str, str, str, str, str]
KEY_COLUMNS: tuple[str, ...] = ("day", "model", "method", "architecture", "digest")


def utc_day(created_at: dt.datetime) -> str:
    """The UTC date of a timestamp as ``YYYY-MM-DD`` (the summary's ``day``)."""
    return created_at.astimezone(dt.UTC).strftime("%Y-%m-%d")


@dataclass
class Accumulator:
    """The rollup of some drift rows: counts, [n, sum, sum of squares, min, max] and histograms."""

    count: int = 0
    agreed: int = 0
    flagged: int = 0
    stats: np.ndarray = field(default_factory=lambda: _empty_stats())
    hist: np.ndarray = field(default_factory=lambda: np.zeros((_S, BINS + 2), dtype=np.int64))

    def merge(self, other: Accumulator) -> None:
        self.count += other.count
        self.agreed += other.agreed
        self.flagged += other.flagged
        self.stats[0:3] += other.stats[0:3]
        self.stats[3] = np.fmin(self.stats[3], other.stats[3])
        self.stats[4] = np.fmax(self.stats[4], other.stats[4])
        self.hist += other.hist

    def values(self) -> dict[str, Any]:
        """Column values of an ``audit_rollup`` row (without its key)."""
        return {
            "count": self.count,
            "agreed": self.agreed,
            "flagged": self.flagged,
            "stats": self.stats.astype("<f8").tobytes(),
            "hist": self.hist.astype("<u4").tobytes(),
        }

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Accumulator:
        return cls(
            count=int(row["count"]),
            agreed=int(row["agreed"]),
            flagged=int(row["flagged"]),
            stats=np.frombuffer(bytes(row["stats"]), dtype="<f8").reshape(5, _S).astype(np.float64),
            hist=np.frombuffer(bytes(row["hist"]), dtype="<u4").reshape(_S, BINS + 2).astype(np.int64),
        )


def _key(row: Mapping[Any, Any]) -> Key:
    return (row["day"], row["model"], row["method"], row["architecture"], row["digest"])


def by_day_model_method(rollups: Mapping[Key, Accumulator]) -> dict[tuple[str, str, str], Accumulator]:
    """The rollup keyed as revision 0006 kept it, by (day, model, method): architectures and versions
    merged (the migrations between 0006 and 0007)."""
    out: dict[tuple[str, str, str], Accumulator] = {}
    for key, acc in rollups.items():
        short = key[:3]
        if short in out:
            out[short].merge(acc)
        else:
            out[short] = Accumulator(acc.count, acc.agreed, acc.flagged, acc.stats.copy(), acc.hist.copy())
    return out


def _empty_stats() -> np.ndarray:
    stats = np.zeros((5, _S))
    stats[3] = np.nan  # min/max of no values: NaN (np.fmin/fmax ignore it)
    stats[4] = np.nan
    return stats


def _bins(values: np.ndarray) -> np.ndarray:
    """Bin index per value (0: underflow, 1..BINS, BINS + 1: overflow); ``values`` is (rows, S), NaN = null."""
    position = np.floor((values - _LOW) / _WIDTH)
    index = np.clip(position, 0, BINS - 1) + 1
    index = np.where(values < _LOW, 0, index)
    index = np.where(values > _HIGH, BINS + 1, index)
    return np.nan_to_num(index, nan=0).astype(np.int64)


def accumulate(rows: Iterable[Mapping[str, Any]]) -> dict[Key, Accumulator]:
    """Rollups keyed by :data:`Key` of drift rows carrying ``created_at`` and the drift columns."""
    grouped: dict[Key, list[Mapping[str, Any]]] = {}
    for row in rows:
        architecture = row.get("model_architecture") or row["model"]
        key = (
            utc_day(row["created_at"]),
            row["model"],
            row["method"],
            architecture,
            row.get("model_digest") or "",
        )
        grouped.setdefault(key, []).append(row)
    out: dict[Key, Accumulator] = {}
    for key, members in grouped.items():
        values = np.array(
            [[np.nan if row[name] is None else float(row[name]) for name in STATISTICS] for row in members],
            dtype=np.float64,
        )
        present = ~np.isnan(values)
        acc = Accumulator(
            count=len(members),
            agreed=sum(1 for row in members if row["agreement"]),
            flagged=sum(1 for row in members if row["flagged"]),
        )
        acc.stats[0] = present.sum(axis=0)
        acc.stats[1] = np.where(present, values, 0.0).sum(axis=0)
        acc.stats[2] = np.where(present, values * values, 0.0).sum(axis=0)
        acc.stats[3] = np.fmin.reduce(values, axis=0)
        acc.stats[4] = np.fmax.reduce(values, axis=0)
        bins = _bins(values)
        for s in range(_S):
            acc.hist[s] += np.bincount(bins[present[:, s], s], minlength=BINS + 2)
        out[key] = acc
    return out


def _merge_into(connection: sa.Connection, deltas: Mapping[Key, Accumulator]) -> None:
    """Add ``deltas`` to the stored rollup rows (read-modify-write: the caller holds the rollup lock).
    Three round trips: one read of the days concerned, one batch of updates, one of inserts."""
    if not deltas:
        return
    days = sorted({key[0] for key in deltas})
    stored = {
        _key(row): Accumulator.from_row(row)
        for row in connection.execute(sa.select(AuditRollup).where(AuditRollup.day.in_(days))).mappings()
    }
    updates, inserts = [], []
    for key, delta in deltas.items():
        if key in stored:
            stored[key].merge(delta)
            updates.append(
                {**{f"k_{c}": v for c, v in zip(KEY_COLUMNS, key, strict=True)}, **stored[key].values()}
            )
        else:
            inserts.append({**dict(zip(KEY_COLUMNS, key, strict=True)), **delta.values()})
    if updates:
        statement = (
            sa.update(AuditRollup)
            .where(*(getattr(AuditRollup, c) == sa.bindparam(f"k_{c}") for c in KEY_COLUMNS))
            .values({name: sa.bindparam(name) for name in ("count", "agreed", "flagged", "stats", "hist")})
        )
        connection.execute(statement, updates)
    if inserts:
        connection.execute(sa.insert(AuditRollup), inserts)


def watermark(connection: sa.Connection) -> int:
    """The highest record id the rollup covers."""
    return int(connection.execute(sa.select(AuditRollupState.watermark)).scalar_one())


def state_problem(connection: sa.Connection) -> str | None:
    """Why the rollup state cannot be trusted, or None: a watermark past the newest record (set outside the
    service: every record appended later would be left out of both the rollup and the tail)."""
    current, newest = watermark(connection), _newest(connection)
    if current <= newest:
        return None
    return (
        f"the rollup's watermark {current} is past the newest record {newest}: its state was changed outside "
        "the service (`cxr-drift db rollup --check`, then `rollup.rebuild`)"
    )


def _newest(connection: sa.Connection) -> int:
    return int(connection.execute(sa.select(func.coalesce(func.max(AuditRecord.id), 0))).scalar_one())


def behind(connection: sa.Connection) -> int:
    """Records after the watermark (the tail a summary reads from the raw rows), in one query."""
    after = sa.select(AuditRollupState.watermark).scalar_subquery()
    statement = sa.select(func.count()).select_from(AuditRecord).where(AuditRecord.id > after)
    return int(connection.execute(statement).scalar_one())


def _catch_up_batch(connection: sa.Connection, batch_records: int) -> int:
    """Add the next ``batch_records`` records after the watermark and advance it to the last of them;
    returns how many were added (0: up to date). Batches go by records, not ids (ids may have gaps: a
    rolled-back append, a sequence moved on). The caller's transaction holds the rollup lock."""
    start = watermark(connection)
    batch = (
        sa.select(AuditRecord.id).where(AuditRecord.id > start).order_by(AuditRecord.id).limit(batch_records)
    ).subquery()
    count, upto = connection.execute(sa.select(func.count(), func.max(batch.c.id))).one()
    if not count:
        return 0
    _merge_into(connection, recompute(connection, AuditDrift.record_id > start, AuditDrift.record_id <= upto))
    connection.execute(sa.update(AuditRollupState).values(watermark=upto))
    return int(count)


def catch_up_connection(connection: sa.Connection, *, batch_records: int = CATCH_UP_BATCH) -> int:
    """Bring the rollup up to the newest record in the caller's transaction (migrations); returns the
    records added."""
    total = 0
    while covered := _catch_up_batch(connection, batch_records):
        total += covered
    return total


def catch_up(engine: sa.Engine, *, batch_records: int = CATCH_UP_BATCH, budget_s: float | None = None) -> int:
    """Bring the rollup up to the newest committed record, ``batch_records`` records per transaction, each
    under the rollup lock (PostgreSQL advisory lock ``ROLLUP_LOCK_KEY``; SQLite ``BEGIN IMMEDIATE``); returns
    the records added. Concurrent callers take turns; appends go on meanwhile (on SQLite they wait for a batch's
    transaction, as for any writer: keep batches small there). With ``budget_s``, no batch starts after that
    many seconds (at least one runs): the rest stays in the tail, which summaries read from the raw rows."""
    total = 0
    deadline = None if budget_s is None else time.monotonic() + budget_s
    while deadline is None or total == 0 or time.monotonic() < deadline:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                connection.execution_options(**{SQLITE_IMMEDIATE: True})
            with connection.begin():
                if engine.dialect.name == "postgresql":
                    connection.execute(sa.select(func.pg_advisory_xact_lock(ROLLUP_LOCK_KEY)))
                covered = _catch_up_batch(connection, batch_records)
        if not covered:
            return total
        total += covered
    return total


def _raw_rows(
    connection: sa.Connection, conditions: Sequence[sa.ColumnElement[bool]], batch_size: int = 20_000
) -> Iterable[dict[str, Any]]:
    statement = (
        sa.select(
            AuditRecord.created_at,
            AuditDrift.model,
            AuditDrift.method,
            AuditDrift.model_architecture,
            AuditDrift.model_digest,
            AuditDrift.agreement,
            AuditDrift.flagged,
            *(getattr(AuditDrift, name) for name in STATISTICS),
        )
        .join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
        .where(*conditions)
        .order_by(AuditDrift.record_id)
    )
    options = {"stream_results": True, "yield_per": batch_size}
    result = connection.execute(statement, execution_options=options)
    for row in result.mappings():
        yield dict(row)


def recompute(
    connection: sa.Connection, *conditions: sa.ColumnElement[bool], batch_size: int = 20_000
) -> dict[Key, Accumulator]:
    """The rollup recomputed from the drift rows under ``conditions`` (default: all; streamed, in
    batches)."""
    total: dict[Key, Accumulator] = {}
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        for key, acc in accumulate(batch).items():
            if key in total:
                total[key].merge(acc)
            else:
                total[key] = acc
        batch.clear()

    for row in _raw_rows(connection, conditions, batch_size):
        batch.append(row)
        if len(batch) >= batch_size:
            flush()
    flush()
    return total


def rebuild(connection: sa.Connection, *, set_watermark: bool = True) -> int:
    """Replace the rollup by one recomputed from the raw rows up to the newest record and set the watermark
    there (``set_watermark=False``: revision 0006, which has no watermark); returns the number of rollup
    rows. Run it with no catch-up going on (a migration, a bulk load)."""
    newest = _newest(connection)
    total = recompute(connection, AuditDrift.record_id <= newest)
    connection.execute(sa.delete(AuditRollup))
    if set_watermark:
        connection.execute(sa.update(AuditRollupState).values(watermark=newest))
    if total:
        connection.execute(
            sa.insert(AuditRollup),
            [{**dict(zip(KEY_COLUMNS, k, strict=True)), **acc.values()} for k, acc in sorted(total.items())],
        )
    return len(total)


def stored(connection: sa.Connection) -> dict[Key, Accumulator]:
    """The stored rollup rows by key."""
    return {
        _key(row): Accumulator.from_row(row) for row in connection.execute(sa.select(AuditRollup)).mappings()
    }


def check(engine: sa.Engine, *, rel_tol: float = 1e-9) -> list[str]:
    """Differences between the stored rollup and one recomputed from the raw rows up to the watermark
    (empty: they agree).

    Counts, non-null counts, min, max and histograms must match exactly; sums and sums of squares to
    ``rel_tol`` (they were added in a different order)."""
    # one snapshot: the watermark, the stored rollup and the rows up to the watermark
    options = {"isolation_level": "REPEATABLE READ"} if engine.dialect.name == "postgresql" else {}
    with engine.connect().execution_options(**options) as connection, connection.begin():
        have_all = stored(connection)
        expected = recompute(connection, AuditDrift.record_id <= watermark(connection))
    problems: list[str] = []
    for key in sorted(set(expected) | set(have_all)):
        label = "/".join(part or "-" for part in key)
        if key not in have_all:
            problems.append(f"{label}: rows without a rollup")
            continue
        if key not in expected:
            problems.append(f"{label}: a rollup without rows")
            continue
        want, have = expected[key], have_all[key]
        if (want.count, want.agreed, want.flagged) != (have.count, have.agreed, have.flagged):
            problems.append(
                f"{label}: counts (rows, agreed, flagged) {(have.count, have.agreed, have.flagged)} "
                f"!= {(want.count, want.agreed, want.flagged)} recomputed"
            )
        exact = [0, 3, 4]
        if not np.array_equal(want.stats[exact], have.stats[exact], equal_nan=True) or not np.array_equal(
            want.hist, have.hist
        ):
            problems.append(f"{label}: non-null counts, min, max or histograms differ from the rows")
        if not np.allclose(want.stats[1:3], have.stats[1:3], rtol=rel_tol, atol=1e-12):
            problems.append(f"{label}: sums differ from the rows beyond rounding")
    return problems


# ----------------------------------------------------------------------------------------------- reading


def _midnight(value: dt.datetime | None) -> bool:
    if value is None:
        return True
    utc = value.astimezone(dt.UTC)
    return (utc.hour, utc.minute, utc.second, utc.microsecond) == (0, 0, 0, 0)


def eligible(filters: AuditFilters, group_by: Sequence[str]) -> str | None:
    """None when the rollup can answer this query, else why not."""
    extra = [name for name in group_by if name not in ROLLUP_DIMENSIONS]
    if extra:
        return f"group_by {extra} is not a rollup dimension"
    set_filters = [
        name
        for name in ("target_class", "agreement", "severity", "flagged")
        if getattr(filters, name) is not None
    ]
    if set_filters:
        return f"filters {set_filters} are not rollup dimensions"
    if not (_midnight(filters.start) and _midnight(filters.end)):
        return "start/end are not UTC midnights"
    return None


def _week(day: str) -> str:
    date = dt.date.fromisoformat(day)
    return (date - dt.timedelta(days=date.weekday())).isoformat()


def _day_bounds(filters: AuditFilters) -> list[sa.ColumnElement[bool]]:
    conditions: list[sa.ColumnElement[bool]] = []
    if filters.start is not None:
        conditions.append(AuditRollup.day >= utc_day(filters.start))
    if filters.end is not None:
        conditions.append(AuditRollup.day < utc_day(filters.end))
    if filters.model is not None:
        conditions.append(AuditRollup.model == filters.model)
    if filters.method is not None:
        conditions.append(AuditRollup.method == filters.method)
    if filters.architecture is not None:
        conditions.append(AuditRollup.architecture == filters.architecture)
    if filters.digest is not None:  # as queries.digest_condition: the full digest or a prefix
        text = filters.digest.strip().lower()
        column = AuditRollup.digest
        conditions.append(column == text if len(text) == 64 else column.startswith(text, autoescape=True))
    return conditions


@dataclass
class Merged:
    """Rollup rows merged per group: ``keys`` (group_by values), ``counts`` G x 3 (rows, agreed, flagged),
    ``stats`` G x 5 x S, ``hist`` G x S x (BINS + 2)."""

    keys: list[tuple[Any, ...]]
    counts: np.ndarray
    stats: np.ndarray
    hist: np.ndarray


@dataclass
class Loaded:
    """Rollup rows as arrays: ``keys`` (:data:`Key`) per row, ``counts`` (K x 3: rows, agreed,
    flagged), ``stats`` (K x 5 x S), ``hist`` (K x S x (BINS + 2)); the tail's rows come last."""

    keys: list[Key]
    counts: np.ndarray
    stats: np.ndarray
    hist: np.ndarray
    watermark: int = 0  # the rollup rows cover records up to this id
    tail_rows: int = 0  # drift rows after it, accumulated from the raw rows

    @property
    def total(self) -> int:
        return int(self.counts[:, 0].sum()) if self.keys else 0

    def merge(self, group_by: Sequence[str], *, with_hist: bool = True) -> Merged:
        """The rows merged per ``group_by`` key (values in ``group_by`` order), vectorised."""
        index: dict[tuple[Any, ...], int] = {}
        group_of = np.empty(len(self.keys), dtype=np.int64)
        for i, key in enumerate(self.keys):
            parts: dict[str, Any] = dict(zip(KEY_COLUMNS, key, strict=True))
            parts["digest"] = parts["digest"] or None  # no version digest: null, as on the raw rows
            if "week" in group_by:
                parts["week"] = _week(key[0])
            group_of[i] = index.setdefault(tuple(parts[name] for name in group_by), len(index))
        k, g = len(self.keys), len(index)
        # sort rows by group and reduce each run (no BLAS: its spinning threads cost more than they save here)
        in_order = bool(np.all(np.diff(group_of) >= 0))  # load(order_by=group_by): no reordering copy
        order = slice(None) if in_order else np.argsort(group_of, kind="stable")
        starts = np.searchsorted(group_of[order], np.arange(g))
        if k == 0:
            return Merged(
                [], np.zeros((0, 3), np.int64), np.zeros((0, 5, _S)), np.zeros((0, _S, BINS + 2), np.int64)
            )
        stats = np.add.reduceat(self.stats[order], starts, axis=0)
        stats[:, 3] = np.fmin.reduceat(self.stats[order, 3], starts, axis=0)
        stats[:, 4] = np.fmax.reduceat(self.stats[order, 4], starts, axis=0)
        return Merged(
            keys=list(index),
            counts=np.add.reduceat(self.counts[order], starts, axis=0).astype(np.int64),
            stats=stats,
            hist=np.add.reduceat(self.hist[order], starts, axis=0, dtype=np.int64)
            if with_hist
            else np.zeros((g, _S, BINS + 2), np.int64),
        )


def load(
    connection: sa.Connection,
    filters: AuditFilters,
    conditions: Sequence[sa.ColumnElement[bool]],
    order_by: Sequence[str] = (),
) -> Loaded:
    """The rollup rows under the rollup filters (model, method, days), sorted by ``order_by`` (group_by
    names; week sorts as day) so that merging them needs no reordering, then the tail: the records after
    the watermark, accumulated from their raw rows under ``conditions`` (the same filters on the raw rows:
    the summary's; one row per key at the end). The rollup rows and the watermark are read in one statement (one snapshot: a
    concurrent catch-up cannot make a record count twice or not at all).

    The rollup rows read are kept (:data:`LOADED`) under the watermark they were read at: rows at one
    watermark never change (catch-up moves both in one transaction), so a repeated summary reads only the
    watermark and the tail until the next catch-up."""
    database = connection.engine.url.render_as_string(hide_password=True)
    scope = (database, *(getattr(filters, name) for name in _ROLLUP_FILTERS), tuple(order_by))
    current = watermark(connection)
    kept = LOADED.get((*scope, current))
    if kept is None:
        after, keys, counts, stats, hist = _read_rollup(connection, filters, order_by)
        LOADED.put((*scope, after), (keys, counts, stats, hist))
    else:
        after, (keys, counts, stats, hist) = current, kept
    tail = recompute(connection, AuditDrift.record_id > after, *conditions)
    accumulators = [tail[key] for key in sorted(tail)]
    keys = keys + sorted(tail)
    if accumulators:
        counts = np.concatenate([counts, [[a.count, a.agreed, a.flagged] for a in accumulators]])
        stats = np.concatenate([stats, np.stack([a.stats for a in accumulators])])
        hist = np.concatenate([hist.astype(np.int64), np.stack([a.hist for a in accumulators])])
    tail_rows = sum(a.count for a in accumulators)
    return Loaded(keys=keys, counts=counts, stats=stats, hist=hist, watermark=after, tail_rows=tail_rows)


# the filters the rollup rows are read under (_day_bounds), and the rows read, by watermark (see load)
_ROLLUP_FILTERS = ("start", "end", "model", "method", "architecture", "digest")
LOADED = Recent(4)  # a year of rollup rows is ~15 MB


def _read_rollup(
    connection: sa.Connection, filters: AuditFilters, order_by: Sequence[str]
) -> tuple[int, list[Key], np.ndarray, np.ndarray, np.ndarray]:
    """The watermark and the rollup rows under the filters (read-only arrays), in one statement."""
    columns = {name: getattr(AuditRollup, name) for name in KEY_COLUMNS} | {"week": AuditRollup.day}
    ordering = list(dict.fromkeys(columns[name] for name in order_by))
    statement = (
        sa.select(
            AuditRollupState.watermark,
            AuditRollup.day,
            AuditRollup.model,
            AuditRollup.method,
            AuditRollup.architecture,
            AuditRollup.digest,
            AuditRollup.count,
            AuditRollup.agreed,
            AuditRollup.flagged,
            AuditRollup.stats,
            AuditRollup.hist,
        )
        .select_from(AuditRollupState)
        .outerjoin(AuditRollup, sa.and_(sa.true(), *_day_bounds(filters)))
    )
    result = connection.execute(statement.order_by(*ordering) if ordering else statement).all()
    after = int(result[0][0])
    rows = [row[1:] for row in result if row[1] is not None]
    k = len(rows)
    keys: list[Key] = [tuple(row[:5]) for row in rows]  # type: ignore[misc]
    counts = np.array([tuple(row[5:8]) for row in rows], dtype=np.int64).reshape(k, 3)
    counts.setflags(write=False)
    stats = np.frombuffer(b"".join(bytes(row[8]) for row in rows), dtype="<f8").reshape(k, 5, _S)
    hist = np.frombuffer(b"".join(bytes(row[9]) for row in rows), dtype="<u4").reshape(k, _S, BINS + 2)
    return after, keys, counts, stats, hist


def _order_statistics(
    hist: np.ndarray, low: np.ndarray, high: np.ndarray, j: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Estimates of the j-th smallest values (0-based) and the widths of the intervals they are known to lie
    in. ``hist`` G x S x (BINS + 2); ``low``/``high`` (the exact min/max) G x S; ``j`` G x S x M."""
    cumulative = np.cumsum(hist, axis=2)
    b = (cumulative[:, :, None, :] <= j[..., None]).sum(axis=3)  # the bin holding order statistic j
    b = np.minimum(b, BINS + 1)
    before = np.where(b > 0, np.take_along_axis(cumulative, np.maximum(b - 1, 0), axis=2), 0)
    in_bin = np.maximum(np.take_along_axis(cumulative, b, axis=2) - before, 1)
    range_low, range_high, width = (x[None, :, None] for x in (_LOW, _HIGH, _WIDTH))
    left = np.where(b == 0, -np.inf, np.where(b == BINS + 1, range_high, range_low + (b - 1) * width))
    right = np.where(b == 0, range_low, np.where(b == BINS + 1, np.inf, range_low + b * width))
    left = np.maximum(left, low[..., None])
    right = np.minimum(right, high[..., None])
    estimate = left + (right - left) * (j - before + 0.5) / in_bin
    return estimate, right - left


def _statistics(merged: Merged, percentiles: Sequence[float]) -> list[dict[str, Any]]:
    """Per group, per statistic ``n mean sd p5..p95 percentile_max_error`` (module docstring), vectorised."""
    n = merged.stats[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = merged.stats[:, 1] / n
        variance = np.maximum(merged.stats[:, 2] - merged.stats[:, 1] ** 2 / n, 0.0) / (n - 1)
        position = np.asarray(percentiles)[None, None, :] * np.maximum(n - 1, 0)[..., None]
        k = np.floor(position)
        fraction = position - k
        upper = np.minimum(k + 1, np.maximum(n - 1, 0)[..., None])
        j = np.concatenate([k, upper], axis=2)
        values, widths = _order_statistics(merged.hist, merged.stats[:, 3], merged.stats[:, 4], j)
        m = len(percentiles)
        quantiles = values[..., :m] + fraction * (values[..., m:] - values[..., :m])
        interpolates = fraction > 0
        errors = np.where(interpolates, np.maximum(widths[..., :m], widths[..., m:]), widths[..., :m])
        max_error = errors.max(axis=2)
    names = [f"p{round(p * 100)}" for p in percentiles]
    counts = n.astype(np.int64).tolist()
    means, sds = mean.tolist(), np.sqrt(variance).tolist()
    quantile_list, error_list = quantiles.tolist(), max_error.tolist()
    out = []
    for g in range(len(merged.keys)):
        metrics: dict[str, Any] = {}
        for s, name in enumerate(STATISTICS):
            count = counts[g][s]
            if count:
                stats = {"n": count, "mean": means[g][s], "sd": sds[g][s] if count > 1 else None}
                stats.update(zip(names, quantile_list[g][s], strict=True))
                stats["percentile_max_error"] = error_list[g][s]
            else:
                stats = {
                    "n": 0,
                    "mean": None,
                    "sd": None,
                    **dict.fromkeys(names),
                    "percentile_max_error": None,
                }
            metrics[name] = stats
        out.append(metrics)
    return out


def summary_groups(
    loaded: Loaded, group_by: Sequence[str], percentiles: Sequence[float]
) -> list[dict[str, Any]]:
    """The summary's ``groups`` (same shape as the exact path, plus ``percentile_max_error``), by key."""
    merged = loaded.merge(group_by)
    statistics = _statistics(merged, percentiles)
    # by key, a null digest first (as SQLite orders NULL; PostgreSQL puts it last)
    order = sorted(range(len(merged.keys)), key=lambda g: tuple(v or "" for v in merged.keys[g]))
    groups = []
    for g in order:
        count = int(merged.counts[g, 0])
        if count == 0:
            continue
        groups.append(
            {
                "key": dict(zip(group_by, merged.keys[g], strict=True)),
                "count": count,
                "agreement_rate": int(merged.counts[g, 1]) / count,
                "flagged_rate": int(merged.counts[g, 2]) / count,
                "metrics": statistics[g],
            }
        )
    return groups


def ranking_rows(loaded: Loaded) -> list[tuple[str, str, int, float | None, float | None]]:
    """Per (method, model): drift rows, mean IoU, mean drift score, as the summary's ranking query gives."""
    iou, score = STATISTICS.index("iou"), STATISTICS.index("drift_score")
    merged = loaded.merge(["method", "model"], with_hist=False)
    rows = []
    for g, (method, model) in enumerate(merged.keys):
        n_iou, n_score = merged.stats[g, 0, iou], merged.stats[g, 0, score]
        rows.append(
            (
                method,
                model,
                int(merged.counts[g, 0]),
                float(merged.stats[g, 1, iou] / n_iou) if n_iou else None,
                float(merged.stats[g, 1, score] / n_score) if n_score else None,
            )
        )
    return rows
