"""Answering summaries from the daily rollup (:mod:`service.audit.rollup` keeps it): which queries it can
answer (:func:`eligible`), the rollup rows plus the tail after the watermark as arrays (:func:`load`), and the
summary's groups and ranking rows from them (:func:`summary_groups`, :func:`ranking_rows`). How exact each
number is: the :mod:`service.audit.rollup` docstring.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from service.audit.filters import AuditFilters
from service.audit.queries import by_record_ids
from service.audit.recent import Recent
from service.audit.rollup import (
    BIN_HIGH,
    BIN_LOW,
    BIN_WIDTH,
    BINS,
    KEY_COLUMNS,
    N_STATISTICS,
    ROLLUP_DIMENSIONS,
    STATISTICS,
    Key,
    recompute,
    utc_day,
    watermark,
)
from service.audit.tables import AuditDrift, AuditRollup, AuditRollupState

__all__ = ["LOADED", "Loaded", "Merged", "eligible", "load", "ranking_rows", "summary_groups"]


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
                [],
                np.zeros((0, 3), np.int64),
                np.zeros((0, 5, N_STATISTICS)),
                np.zeros((0, N_STATISTICS, BINS + 2), np.int64),
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
            else np.zeros((g, N_STATISTICS, BINS + 2), np.int64),
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
    tail = recompute(
        connection, *by_record_ids(AuditDrift.record_id > after, conditions, connection.dialect.name)
    )
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
    stats = np.frombuffer(b"".join(bytes(row[8]) for row in rows), dtype="<f8").reshape(k, 5, N_STATISTICS)
    hist = np.frombuffer(b"".join(bytes(row[9]) for row in rows), dtype="<u4").reshape(
        k, N_STATISTICS, BINS + 2
    )
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
    range_low, range_high, width = (x[None, :, None] for x in (BIN_LOW, BIN_HIGH, BIN_WIDTH))
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
