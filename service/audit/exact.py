"""A summary's groups computed exactly from the raw drift rows (the rollup's approximate answer:
:mod:`service.audit.rollup_read`).

Per group: the drift row count, the agreement and flagged rates, and per statistic ``n`` (non-null values),
``mean``, ``sd`` (sample, n - 1; null when n < 2) and the :data:`PERCENTILES` with linear interpolation between
the closest ranks: with the n values sorted as x_0..x_{n-1}, h = p (n - 1),
P(p) = x_floor(h) + (h - floor(h)) (x_floor(h)+1 - x_floor(h)), as PostgreSQL's ``percentile_cont`` and
NumPy's default method.

- PostgreSQL: in SQL (``stddev_samp``, ``percentile_cont``).
- SQLite has neither: the matching rows' statistics are read into arrays (at most :data:`IN_MEMORY_ROWS`
  rows, ~300 bytes each at the peak; at most :data:`IN_MEMORY_AT_ONCE` summaries at once, the others wait)
  and each statistic is sorted once within its groups. Above that bound the statistics are ranked in SQL
  with window functions instead (the same numbers, in bounded memory, at about 5,000 drift rows/s: one sort
  per statistic, each carrying every column).

A selection with no rows has no groups (as on the rollup), with or without ``group_by``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import func
from sqlalchemy.dialects import postgresql

from service.audit.queries import architecture_expression
from service.audit.rollup import STATISTICS
from service.audit.tables import AuditDrift, AuditRecord

__all__ = [
    "IN_MEMORY_ROWS",
    "PERCENTILES",
    "SUMMARY_STATISTICS",
    "exact_groups",
    "float_or_none",
    "group_expression",
]

PERCENTILES: tuple[float, ...] = (0.05, 0.25, 0.50, 0.75, 0.95)
SUMMARY_STATISTICS: tuple[str, ...] = STATISTICS
# SQLite: drift rows read into memory for one summary, at most (1,000,000 x ~300 bytes at the peak: ~300 MB),
# and summaries doing so at once
IN_MEMORY_ROWS = 1_000_000
IN_MEMORY_AT_ONCE = 2
_FETCH_ROWS = 20_000
_in_memory = threading.BoundedSemaphore(IN_MEMORY_AT_ONCE)


def float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def group_expression(name: str, dialect: str) -> Any:
    """The SQL value of a ``group_by`` name (summary.GROUP_BY_OPTIONS)."""
    if name == "model":
        return AuditDrift.model
    if name == "architecture":
        return architecture_expression()
    if name == "digest":
        return AuditDrift.model_digest
    if name == "method":
        return AuditDrift.method
    if name == "class":
        return AuditDrift.target_class
    if name == "agreement":  # keep requests where the checkpoints agree apart from those where they do not
        return AuditDrift.agreement
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


def exact_groups(
    connection: sa.Connection, names: list[str], conditions: list[sa.ColumnElement[bool]]
) -> list[dict[str, Any]]:
    """The groups (ordered by key; a null key first on SQLite, last on PostgreSQL) of the drift rows matching
    ``conditions``, grouped by ``names``: ``key``, ``count``, ``agreement_rate``, ``flagged_rate``,
    ``metrics``."""
    dialect = connection.dialect.name
    group_columns = [group_expression(name, dialect) for name in names]
    if dialect == "sqlite":
        with _in_memory:
            in_memory = _sqlite_groups(connection, names, group_columns, conditions)
        if in_memory is not None:
            return in_memory
        statement = _statement_sqlite(group_columns, conditions)
    else:
        statement = _statement_postgresql(group_columns, conditions)
    groups = []
    for row in connection.execute(statement):
        values = list(row)
        count, agreement_rate, flagged_rate = values[len(names) : len(names) + 3]
        if not count:  # without group_by, SQL answers one row for no rows
            continue
        groups.append(
            {
                "key": {name: values[i] for i, name in enumerate(names)},
                "count": int(count),
                "agreement_rate": float_or_none(agreement_rate),
                "flagged_rate": float_or_none(flagged_rate),
                "metrics": _sql_statistics(values[len(names) + 3 :], dialect),
            }
        )
    return groups


# ---------------------------------------------------------------------------------- SQLite, in memory


def _sqlite_groups(
    connection: sa.Connection,
    names: list[str],
    group_columns: list[Any],
    conditions: list[sa.ColumnElement[bool]],
) -> list[dict[str, Any]] | None:
    """The groups from arrays of the matching rows; None when more than :data:`IN_MEMORY_ROWS` match."""
    statement = (
        sa.select(
            *group_columns,
            AuditDrift.agreement,
            AuditDrift.flagged,
            *(getattr(AuditDrift, name) for name in SUMMARY_STATISTICS),
        )
        .select_from(AuditDrift)
        .join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
        .where(*conditions)
    )
    width = len(names)
    index: dict[tuple[Any, ...], int] = {}
    codes: list[np.ndarray] = []
    flags: list[np.ndarray] = []
    values: list[np.ndarray] = []
    rows = 0
    result = connection.execute(statement)
    cursor = result.cursor  # plain tuples: no Row objects (the group keys are converted below, once each)
    try:
        while chunk := cursor.fetchmany(_FETCH_ROWS):
            rows += len(chunk)
            if rows > IN_MEMORY_ROWS:
                return None
            codes.append(
                np.fromiter((index.setdefault(tuple(r[:width]), len(index)) for r in chunk), np.int64)
            )
            flags.append(np.array([(bool(r[width]), bool(r[width + 1])) for r in chunk], dtype=bool))
            # None (a null statistic) becomes NaN
            values.append(np.array([r[width + 2 :] for r in chunk], dtype=np.float64))
    finally:
        result.close()
    if not rows:
        return []
    code = np.concatenate(codes)
    both = np.concatenate(flags)
    stats = np.concatenate(values)
    del codes, flags, values
    n_groups = len(index)
    count = np.bincount(code, minlength=n_groups)
    agreed = np.bincount(code, weights=both[:, 0], minlength=n_groups)
    flagged = np.bincount(code, weights=both[:, 1], minlength=n_groups)
    per_statistic = [_statistics(code, stats[:, s], n_groups) for s in range(len(SUMMARY_STATISTICS))]
    # the values SQLAlchemy's result types make of the raw ones (agreement: 0/1 -> bool)
    processors = [column.type.result_processor(connection.dialect, None) for column in group_columns]
    typed = {
        key: tuple(v if f is None or v is None else f(v) for f, v in zip(processors, key, strict=True))
        for key in index
    }
    groups = []
    for key in sorted(index, key=lambda key: tuple((value is not None, value) for value in typed[key])):
        g = index[key]
        groups.append(
            {
                "key": dict(zip(names, typed[key], strict=True)),
                "count": int(count[g]),
                "agreement_rate": float(agreed[g] / count[g]),
                "flagged_rate": float(flagged[g] / count[g]),
                "metrics": {name: per_statistic[s][g] for s, name in enumerate(SUMMARY_STATISTICS)},
            }
        )
    return groups


def _statistics(code: np.ndarray, column: np.ndarray, n_groups: int) -> list[dict[str, Any]]:
    """One statistic's n, mean, sd and percentiles per group (codes 0..n_groups-1; NaN = null)."""
    present = ~np.isnan(column)
    code, column = code[present], column[present]
    order = np.lexsort((column, code))  # by group, then value
    code, column = code[order], column[order]
    n = np.bincount(code, minlength=n_groups)
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(code, weights=column, minlength=n_groups) / n
        squares = np.bincount(code, weights=(column - mean[code]) ** 2, minlength=n_groups)
        sd = np.sqrt(squares / (n - 1))
    last = np.maximum(start + n - 1, 0)
    quantiles = []
    for p in PERCENTILES:
        position = p * np.maximum(n - 1, 0)
        low = np.floor(position).astype(np.int64)
        fraction = position - low
        x_low = column[np.minimum(start + low, last)] if column.size else np.zeros(n_groups)
        x_high = column[np.minimum(start + low + 1, last)] if column.size else np.zeros(n_groups)
        quantiles.append(x_low + fraction * (x_high - x_low))
    out = []
    for g in range(n_groups):
        size = int(n[g])
        stats: dict[str, Any] = {
            "n": size,
            "mean": float(mean[g]) if size else None,
            "sd": float(sd[g]) if size > 1 else None,
        }
        for p, q in zip(PERCENTILES, quantiles, strict=True):
            stats[f"p{round(p * 100)}"] = float(q[g]) if size else None
        out.append(stats)
    return out


# ----------------------------------------------------------------------------------------------- SQL


def _rate(column: Any) -> sa.ColumnElement[Any]:
    return func.avg(sa.case((column, 1.0), else_=0.0))


def _statement_postgresql(
    group_columns: list[sa.ColumnElement[Any]], conditions: list[sa.ColumnElement[bool]]
) -> sa.Select[Any]:
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
    return (
        sa.select(*selected)
        .select_from(AuditDrift)
        .join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
        .where(*conditions)
        .group_by(*group_columns)
        .order_by(*group_columns)
    )


def _statement_sqlite(
    group_columns: list[sa.ColumnElement[Any]], conditions: list[sa.ColumnElement[bool]]
) -> sa.Select[Any]:
    """The module docstring's percentiles in SQLite SQL: each statistic ranked in its group with window
    functions, the two closest ranks interpolated; the sample SD two-pass, sum((x - mean)^2) / (n - 1), with
    the group mean from a window."""
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


def _sql_statistics(rest: Sequence[Any], dialect: str) -> dict[str, Any]:
    """The per-statistic values of one group's row of the SQL statements (after its key, count and rates)."""
    metrics: dict[str, Any] = {}
    offset = 0
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
        stats: dict[str, Any] = {"n": n, "mean": float_or_none(mean), "sd": float_or_none(sd)}
        for p, q in zip(PERCENTILES, quantiles, strict=True):
            stats[f"p{round(p * 100)}"] = float_or_none(q)
        metrics[name] = stats
    return metrics
