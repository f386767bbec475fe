"""Daily rollups of the audit log: summaries over millions of drift rows without reading them.

``audit_rollup`` holds one row per (UTC day, model, method, architecture, version digest) with the number of drift rows, how many agree
and are flagged, and two blobs: ``stats`` (float64, shape 5 x S over the S = :data:`STATISTICS`: non-null
count, sum, sum of squares, min, max) and ``hist`` (uint32, S x (BINS + 2): a fixed-bin histogram of each
statistic over its declared range :data:`RANGES`, with an underflow and an overflow bin).

The rollup covers the records up to a **watermark** (``audit_rollup_state``, revision 0007): appends do not
touch it (no read-modify-write of histograms under the chain lock). :func:`catch_up` adds the records after
the watermark in batches, each a transaction under its own lock (not the chain's), and advances it; the
summary runs it when the tail is longer than ``CATCH_UP_AFTER`` records (``cxr-drift db rollup`` runs it
too), and :func:`service.audit.rollup_read.load` reads the rollup with the watermark in one statement and adds the tail after it from
the raw rows (:func:`accumulate`, the same function), so an answer always covers every committed record.
Records are append-only and their ids are given in commit order under the chain lock, so the records up to
a watermark never change. :func:`rebuild` recomputes the rollup from the raw rows (migration backfill, bulk
loads) and :func:`check` compares the stored rollup with one recomputed from the rows up to the watermark,
so a rollup is only as trustworthy as the chain it is derived from (run it after
:func:`service.audit.chain.verify`).

What the rollup answers (:func:`service.audit.rollup_read.summary_groups`), and how exactly:

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
(:func:`service.audit.rollup_read.eligible`).
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
    "rebuild",
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
BIN_LOW = np.array([RANGES[name][0] for name in STATISTICS])
BIN_HIGH = np.array([RANGES[name][1] for name in STATISTICS])
BIN_WIDTH = (BIN_HIGH - BIN_LOW) / BINS
ROLLUP_DIMENSIONS: frozenset[str] = frozenset({"model", "method", "architecture", "digest", "day", "week"})
# Key of the PostgreSQL advisory lock of catch_up (not the chain's: catching up never holds up an append).
ROLLUP_LOCK_KEY = 0x0C58_D41F_7A12
CATCH_UP_BATCH = 5_000  # records per catch-up transaction (on SQLite it holds the write lock ~0.2-0.7 s)
N_STATISTICS = len(STATISTICS)
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
    hist: np.ndarray = field(default_factory=lambda: np.zeros((N_STATISTICS, BINS + 2), dtype=np.int64))

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
            stats=np.frombuffer(bytes(row["stats"]), dtype="<f8").reshape(5, N_STATISTICS).astype(np.float64),
            hist=np.frombuffer(bytes(row["hist"]), dtype="<u4")
            .reshape(N_STATISTICS, BINS + 2)
            .astype(np.int64),
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
    stats = np.zeros((5, N_STATISTICS))
    stats[3] = np.nan  # min/max of no values: NaN (np.fmin/fmax ignore it)
    stats[4] = np.nan
    return stats


def _bins(values: np.ndarray) -> np.ndarray:
    """Bin index per value (0: underflow, 1..BINS, BINS + 1: overflow); ``values`` is (rows, S), NaN = null."""
    position = np.floor((values - BIN_LOW) / BIN_WIDTH)
    index = np.clip(position, 0, BINS - 1) + 1
    index = np.where(values < BIN_LOW, 0, index)
    index = np.where(values > BIN_HIGH, BINS + 1, index)
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
        for s in range(N_STATISTICS):
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
    connection: sa.Connection,
    conditions: Sequence[sa.ColumnElement[Any]],
    batch_size: int = 20_000,
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
    connection: sa.Connection, *conditions: sa.ColumnElement[Any], batch_size: int = 20_000
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
