"""Daily rollups of the audit log: summaries over millions of drift rows without reading them.

``audit_rollup`` holds one row per (UTC day, model, method) with the number of drift rows, how many agree
and are flagged, and two blobs: ``stats`` (float64, shape 5 x S over the S = :data:`STATISTICS`: non-null
count, sum, sum of squares, min, max) and ``hist`` (uint32, S x (BINS + 2): a fixed-bin histogram of each
statistic over its declared range :data:`RANGES`, with an underflow and an overflow bin). :func:`add` keeps
it up to date inside :func:`service.audit.chain.append`'s transaction (under the chain lock), so a committed
record is always in the rollup; :func:`rebuild` recomputes it from the raw rows (migration backfill, bulk
loads) and :func:`check` compares the stored rollup with one recomputed from the rows, so a rollup is only
as trustworthy as the chain it is derived from (run it after :func:`service.audit.chain.verify`).

What the rollup answers (:func:`summary_groups`), and how exactly:

- ``count``, ``agreement_rate``, ``flagged_rate``, per-statistic ``n``: exact (integer counts);
- ``mean`` and ``sd``: from sums and sums of squares, equal to the exact path up to floating-point rounding
  (sd = sqrt((sum x^2 - (sum x)^2 / n) / (n - 1)); all statistics are bounded, |x| <= 100);
- ``p5 .. p95``: approximate. Each order statistic is placed inside the bin that holds it (spread evenly
  over the bin by rank), so it is off by less than the bin width; percentile_cont's interpolation between
  two order statistics keeps that bound. Each metric reports ``percentile_max_error``: the largest width of
  the bins its percentiles came from (range / BINS inside the range; for the under/overflow bins the
  distance from the range edge to the group's exact min/max).

Only queries whose dimensions are rollup dimensions can use it: group by ``model``, ``method``, ``day``,
``week``; filter on ``model``, ``method`` and ``start``/``end`` at UTC midnights (:func:`eligible`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa

from service.audit.filters import AuditFilters
from service.audit.tables import METRIC_COLUMNS, AuditDrift, AuditRecord, AuditRollup

__all__ = [
    "BINS",
    "RANGES",
    "ROLLUP_DIMENSIONS",
    "STATISTICS",
    "Accumulator",
    "accumulate",
    "add",
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
ROLLUP_DIMENSIONS: frozenset[str] = frozenset({"model", "method", "day", "week"})
_S = len(STATISTICS)


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


def accumulate(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], Accumulator]:
    """Rollups keyed by (day, model, method) of drift rows carrying ``created_at`` and the drift columns."""
    grouped: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((utc_day(row["created_at"]), row["model"], row["method"]), []).append(row)
    out: dict[tuple[str, str, str], Accumulator] = {}
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


def add(connection: sa.Connection, created_at: dt.datetime, drift_rows: Sequence[Mapping[str, Any]]) -> None:
    """Add one record's drift rows to the rollup, in the caller's transaction (which holds the chain lock:
    appends are serialised, so read-modify-write cannot race another append). Three round trips: one read
    of the record's day, one batch of updates, one of inserts."""
    deltas = accumulate({**row, "created_at": created_at} for row in drift_rows)
    if not deltas:
        return
    day = utc_day(created_at)
    stored = {
        (row["day"], row["model"], row["method"]): Accumulator.from_row(row)
        for row in connection.execute(sa.select(AuditRollup).where(AuditRollup.day == day)).mappings()
    }
    updates, inserts = [], []
    for key, delta in deltas.items():
        values = {"k_day": key[0], "k_model": key[1], "k_method": key[2]}
        if key in stored:
            stored[key].merge(delta)
            updates.append({**values, **stored[key].values()})
        else:
            inserts.append({"day": key[0], "model": key[1], "method": key[2], **delta.values()})
    if updates:
        statement = (
            sa.update(AuditRollup)
            .where(
                AuditRollup.day == sa.bindparam("k_day"),
                AuditRollup.model == sa.bindparam("k_model"),
                AuditRollup.method == sa.bindparam("k_method"),
            )
            .values({name: sa.bindparam(name) for name in ("count", "agreed", "flagged", "stats", "hist")})
        )
        connection.execute(statement, updates)
    if inserts:
        connection.execute(sa.insert(AuditRollup), inserts)


def _raw_rows(connection: sa.Connection, batch_size: int = 20_000) -> Iterable[dict[str, Any]]:
    statement = (
        sa.select(
            AuditRecord.created_at,
            AuditDrift.model,
            AuditDrift.method,
            AuditDrift.agreement,
            AuditDrift.flagged,
            *(getattr(AuditDrift, name) for name in STATISTICS),
        )
        .join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
        .order_by(AuditDrift.record_id)
    )
    options = {"stream_results": True, "yield_per": batch_size}
    result = connection.execute(statement, execution_options=options)
    for row in result.mappings():
        yield dict(row)


def recompute(
    connection: sa.Connection, *, batch_size: int = 20_000
) -> dict[tuple[str, str, str], Accumulator]:
    """The rollup recomputed from every drift row (streamed, in batches)."""
    total: dict[tuple[str, str, str], Accumulator] = {}
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        for key, acc in accumulate(batch).items():
            if key in total:
                total[key].merge(acc)
            else:
                total[key] = acc
        batch.clear()

    for row in _raw_rows(connection, batch_size):
        batch.append(row)
        if len(batch) >= batch_size:
            flush()
    flush()
    return total


def rebuild(connection: sa.Connection) -> int:
    """Replace the rollup by one recomputed from the raw rows; returns the number of rollup rows."""
    total = recompute(connection)
    connection.execute(sa.delete(AuditRollup))
    if total:
        connection.execute(
            sa.insert(AuditRollup),
            [
                {"day": k[0], "model": k[1], "method": k[2], **acc.values()}
                for k, acc in sorted(total.items())
            ],
        )
    return len(total)


def check(engine: sa.Engine, *, rel_tol: float = 1e-9) -> list[str]:
    """Differences between the stored rollup and one recomputed from the raw rows (empty: they agree).

    Counts, non-null counts, min, max and histograms must match exactly; sums and sums of squares to
    ``rel_tol`` (they were added in a different order)."""
    with engine.connect() as connection:
        expected = recompute(connection)
        stored = {
            (row["day"], row["model"], row["method"]): Accumulator.from_row(row)
            for row in connection.execute(sa.select(AuditRollup)).mappings()
        }
    problems: list[str] = []
    for key in sorted(set(expected) | set(stored)):
        label = "/".join(key)
        if key not in stored:
            problems.append(f"{label}: rows without a rollup")
            continue
        if key not in expected:
            problems.append(f"{label}: a rollup without rows")
            continue
        want, have = expected[key], stored[key]
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
    """Rollup rows as arrays: ``keys`` (day, model, method) per row, ``counts`` (K x 3: rows, agreed,
    flagged), ``stats`` (K x 5 x S), ``hist`` (K x S x (BINS + 2))."""

    keys: list[tuple[str, str, str]]
    counts: np.ndarray
    stats: np.ndarray
    hist: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts[:, 0].sum()) if self.keys else 0

    def merge(self, group_by: Sequence[str], *, with_hist: bool = True) -> Merged:
        """The rows merged per ``group_by`` key (values in ``group_by`` order), vectorised."""
        index: dict[tuple[Any, ...], int] = {}
        group_of = np.empty(len(self.keys), dtype=np.int64)
        for i, (day, model, method) in enumerate(self.keys):
            parts = {"day": day, "model": model, "method": method}
            if "week" in group_by:
                parts["week"] = _week(day)
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


def load(connection: sa.Connection, filters: AuditFilters, order_by: Sequence[str] = ()) -> Loaded:
    """The rollup rows under the rollup filters (model, method, days), in one query, sorted by ``order_by``
    (group_by names; week sorts as day) so that merging them needs no reordering."""
    columns = {"day": AuditRollup.day, "week": AuditRollup.day, "model": AuditRollup.model}
    columns["method"] = AuditRollup.method
    ordering = list(dict.fromkeys(columns[name] for name in order_by))
    statement = sa.select(
        AuditRollup.day,
        AuditRollup.model,
        AuditRollup.method,
        AuditRollup.count,
        AuditRollup.agreed,
        AuditRollup.flagged,
        AuditRollup.stats,
        AuditRollup.hist,
    ).where(*_day_bounds(filters))
    rows = connection.execute(statement.order_by(*ordering) if ordering else statement).all()
    k = len(rows)
    return Loaded(
        keys=[(row[0], row[1], row[2]) for row in rows],
        counts=np.array([tuple(row[3:6]) for row in rows], dtype=np.int64).reshape(k, 3),
        stats=np.frombuffer(b"".join(bytes(row[6]) for row in rows), dtype="<f8").reshape(k, 5, _S),
        hist=np.frombuffer(b"".join(bytes(row[7]) for row in rows), dtype="<u4").reshape(k, _S, BINS + 2),
    )


def log_size(connection: sa.Connection) -> int:
    """Drift rows in the whole log (from the rollup: one small table scan)."""
    statement = sa.select(sa.func.coalesce(sa.func.sum(AuditRollup.count), 0))
    return int(connection.execute(statement).scalar_one())


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
    order = sorted(range(len(merged.keys)), key=lambda g: merged.keys[g])
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
