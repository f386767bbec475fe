"""Summaries of the audit log, computed in SQL: per-group rates and metric statistics, and the ranking.

Both dialects give the same numbers: PostgreSQL with ``stddev_samp`` and ``percentile_cont``, SQLite (which
has neither) with window functions. The architecture stability ranking per method uses the per (method,
model) means from SQL; its comparison between methods is :func:`engine.ranking.reversal_test` on the
per-record IoUs (one query selecting record id, model, method and IoU under the same filters; a record is
one image). Raises :class:`~service.audit.db.DatabaseUnavailable` when the database cannot be reached.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func
from sqlalchemy.dialects import postgresql

from core.errors import InputError
from engine.ranking import DEFAULT_ALPHA, DEFAULT_N_BOOT, method_tables, rank_models, reversal_test
from service.audit import rollup, rollup_read
from service.audit.db import translate_errors
from service.audit.queries import AuditFilters, architecture_expression, drift_conditions, time_conditions
from service.audit.recent import Recent
from service.audit.sample import REVERSAL_MAX_RECORDS, Draw, draw, per_record_rows
from service.audit.tables import AuditDrift, AuditRecord

__all__ = [
    "GROUP_BY_OPTIONS",
    "MODES",
    "PERCENTILES",
    "ROLLUP_MIN_ROWS",
    "SUMMARY_STATISTICS",
    "WINDOWS",
    "requests_over_time",
    "summarize",
]

log = logging.getLogger(__name__)

CONTROL_METHOD = "gradcampp"  # the method whose head-scale control the audit rows carry
GROUP_BY_OPTIONS: tuple[str, ...] = (
    "model",
    "architecture",
    "digest",
    "method",
    "class",
    "agreement",
    "day",
    "week",
)
PERCENTILES: tuple[float, ...] = (0.05, 0.25, 0.50, 0.75, 0.95)
SUMMARY_STATISTICS: tuple[str, ...] = rollup.STATISTICS
# "auto": the daily rollup (service/audit/rollup.py) when it can answer and the query covers at least
# ROLLUP_MIN_ROWS drift rows of the database (fewer are fast and exact on the raw rows: about 0.2 s at the
# bound on either; the exact path reads ~5,000 drift rows/s on SQLite, ~200,000 on PostgreSQL);
# "exact": always the raw rows; "rollup": the rollup or a 422 saying why it cannot answer.
MODES: tuple[str, ...] = ("auto", "exact", "rollup")
ROLLUP_MIN_ROWS: dict[str, int] = {"sqlite": 1_000, "postgresql": 50_000}
# A rollup summary adds the records after the rollup's watermark from the raw rows; above this many it first
# catches the rollup up (rollup.catch_up), so the tail a summary reads stays short: 500 records (3,000
# drift rows) add ~50-65 ms to a summary, their catch-up ~80 ms once.
CATCH_UP_AFTER = 500
# a summary's own catch-up: small batches (on SQLite a batch holds the write lock that appends wait for:
# ~0.1-0.3 s per 2,000 records) and a time budget (the rest of a long tail is read from the raw rows)
CATCH_UP_BATCH = 2_000
CATCH_UP_BUDGET_S = 2.0
WINDOWS: tuple[str, ...] = ("day", "week")


def _group_expression(name: str, dialect: str) -> Any:
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


def _check_group_by(group_by: Sequence[str]) -> list[str]:
    if isinstance(group_by, str):
        group_by = [group_by]
    names = list(group_by)
    for name in names:
        if name not in GROUP_BY_OPTIONS:
            raise InputError(
                f"group_by: unknown value {name!r}; valid options: {', '.join(GROUP_BY_OPTIONS)}",
                code="validation_error",
                details={"valid": list(GROUP_BY_OPTIONS)},
            )
    if len(set(names)) != len(names):
        raise InputError(f"group_by: each value at most once, got {names}", code="validation_error")
    if "day" in names and "week" in names:
        raise InputError("group_by: choose one of 'day' and 'week', not both", code="validation_error")
    return names


def _rate(column: Any) -> sa.ColumnElement[Any]:
    return func.avg(sa.case((column, 1.0), else_=0.0))


def _summary_statement_postgresql(
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


def _metric_statistics(rest: Sequence[Any], dialect: str) -> dict[str, Any]:
    """The per-metric statistics of one group's row (after its key, count and rates)."""
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
        stats: dict[str, Any] = {"n": n, "mean": _float_or_none(mean), "sd": _float_or_none(sd)}
        for p, q in zip(PERCENTILES, quantiles, strict=True):
            stats[f"p{round(p * 100)}"] = _float_or_none(q)
        metrics[name] = stats
    return metrics


def summarize(
    engine: sa.Engine,
    *,
    filters: AuditFilters,
    group_by: Sequence[str] = (),
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    mode: str = "auto",
    reversal_max_records: int | None = REVERSAL_MAX_RECORDS,
) -> dict[str, Any]:
    """Aggregate the drift rows (one per record x model x method) matching ``filters``, in SQL.

    Per group: ``count`` (drift rows), ``agreement_rate`` and ``flagged_rate`` (fractions of those rows),
    and for every metric and ``drift_score``: ``n`` (non-null values), ``mean``, ``sd`` (sample, n - 1;
    null when n < 2) and ``p5 p25 p50 p75 p95`` (linear interpolation between closest ranks: PostgreSQL
    ``percentile_cont``, NumPy's default; computed with window functions on SQLite). ``group_by`` takes
    values among ``GROUP_BY_OPTIONS``; "day"/"week" are UTC dates, weeks starting on Monday.

    ``ranking``: per method, the models ordered from most to least stable by mean top-k IoU between the
    transfer and fine-tuned maps over every matching row (higher = evidence moved less; ties by name; a
    model without a mean IoU comes last, with rank null), and for each pair of methods
    :func:`engine.ranking.reversal_test` on the per-record IoUs (``n_boot`` resamples seeded with ``seed``,
    level ``alpha``), on the **common records** (a value for every compared model under both methods):

    - ``methods``, ``models``, ``n_images`` (common records), ``n_images_left_out``, ``models_left_out``;
    - ``order`` and ``means`` (per method, on the common records), ``top``, ``top_changes``;
    - descriptive: ``kendall_tau`` and ``p_value`` (null with a ``note`` when undefined), ``reversed_pairs``
      (pairs ordered one way under one method and the other way under the other), ``rank_changed`` and
      ``reversal_descriptive`` (at least one such pair: the orders differ);
    - inferential: ``interaction_tests`` (per model pair the Wilcoxon test of the per-record interaction,
      ``p_holm`` over the pairs), ``bootstrap`` (``p_order_differs``, ``p_top_changes``), ``alpha``,
      ``significant_pairs`` and ``reversal``: the verdict (the orders differ AND a Holm-adjusted interaction
      p < alpha), null with a ``note`` for fewer than 2 models or too few common records.

    ``mode`` (:data:`MODES`) chooses between the raw rows and the daily rollup; ``source`` in the answer says
    which answered and which numbers are exact (rollup: percentiles approximate, each metric with its
    ``percentile_max_error``). Above ``reversal_max_records`` records in the time window the reversal test
    runs on a seeded random sample of records (:mod:`service.audit.sample`), described in ``ranking.sample``.
    The reversal tests are reused (``ranking.reused``) when a recent summary ran them on the same records
    under the same filters and options (the key holds the row hash of the newest selected record, which
    covers every record before it): the answer is the same as recomputing, at a fraction of the cost.
    """
    names = _check_group_by(group_by)
    if mode not in MODES:
        raise InputError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}", code="validation_error")
    not_rollup = rollup_read.eligible(filters, names)
    if mode == "rollup" and not_rollup is not None:
        raise InputError(f"mode=rollup: {not_rollup}", code="validation_error")
    dialect = engine.dialect.name
    on_time = time_conditions(filters)
    conditions = on_time + drift_conditions(filters)
    with translate_errors("summarize the audit log"), engine.connect() as connection:
        loaded = None
        if mode != "exact" and not_rollup is None and (problem := rollup.state_problem(connection)):
            log.error("summary answered from the raw rows: %s", problem)
            not_rollup = problem
        if mode != "exact" and not_rollup is None:
            if rollup.behind(connection) > CATCH_UP_AFTER:
                _catch_up(engine)
                connection.rollback()  # end this read transaction: the next read sees the caught-up rollup
            loaded = rollup_read.load(connection, filters, conditions, order_by=names)
        min_rows = ROLLUP_MIN_ROWS.get(dialect, ROLLUP_MIN_ROWS["postgresql"])
        if loaded is not None and (mode == "rollup" or loaded.total >= min_rows):
            groups = rollup_read.summary_groups(loaded, names, PERCENTILES)
            ranking_rows: Sequence[Any] = rollup_read.ranking_rows(loaded)
            source = {
                "path": "rollup",
                "exact": ["count", "agreement_rate", "flagged_rate", "n"],
                "rounding": ["mean", "sd"],
                "approximate": [f"p{round(p * 100)}" for p in PERCENTILES],
                "bins": rollup.BINS,
                "ranges": {name: list(rollup.RANGES[name]) for name in SUMMARY_STATISTICS},
                "note": "mean and sd from sums (equal to the exact path up to floating-point rounding); "
                "percentiles from fixed-bin histograms, each off by at most the metric's percentile_max_error",
                "watermark": loaded.watermark,
                "tail_rows": loaded.tail_rows,
            }
        else:
            groups = _exact_groups(connection, names, conditions, dialect)
            reason = "mode=exact" if mode == "exact" else not_rollup
            source = {
                "path": "exact",
                "reason": reason or f"the query covers fewer than {min_rows} drift rows",
            }
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
        selected = draw(connection, on_time, max_records=reversal_max_records, seed=seed)
        methods = tuple(sorted({row[0] for row in ranking_rows}))
        key = _comparisons_key(connection, engine, selected, filters, methods, (n_boot, seed, alpha))
        comparisons = None if key is None else _COMPARISONS.get(key)
        reused = comparisons is not None
        if comparisons is None:
            per_record = per_record_rows(connection, conditions, selected)
            comparisons = _comparisons(methods, per_record, n_boot=n_boot, seed=seed, alpha=alpha)
            if key is not None:
                _COMPARISONS.put(key, comparisons)
    ranking = _ranking(ranking_rows, copy.deepcopy(comparisons), alpha=alpha)
    ranking["sample"] = selected.description
    ranking["reused"] = reused
    return {
        "filters": filters.to_dict(),
        "group_by": names,
        "percentiles": list(PERCENTILES),
        "total": sum(group["count"] for group in groups),
        "groups": groups,
        "ranking": ranking,
        "source": source,
    }


def _exact_groups(
    connection: sa.Connection, names: list[str], conditions: list[sa.ColumnElement[bool]], dialect: str
) -> list[dict[str, Any]]:
    """The summary's groups from the raw drift rows (exact percentiles)."""
    group_columns = [_group_expression(name, dialect) for name in names]
    if dialect == "postgresql":
        statement = _summary_statement_postgresql(group_columns, conditions)
    else:
        statement = _summary_statement_sqlite(group_columns, conditions)
    rows = connection.execute(statement).all()
    groups = []
    for row in rows:
        values = list(row)
        key = {name: values[i] for i, name in enumerate(names)}
        count, agreement_rate, flagged_rate = values[len(names) : len(names) + 3]
        groups.append(
            {
                "key": key,
                "count": int(count),
                "agreement_rate": _float_or_none(agreement_rate),
                "flagged_rate": _float_or_none(flagged_rate),
                "metrics": _metric_statistics(values[len(names) + 3 :], dialect),
            }
        )
    return groups


def _catch_up(engine: sa.Engine) -> None:
    """Catch the rollup up; a failure (a read-only role, a busy database) leaves a longer tail, which the
    summary still reads, so it is logged, not raised."""
    try:
        rollup.catch_up(engine, batch_records=CATCH_UP_BATCH, budget_s=CATCH_UP_BUDGET_S)
    except sa.exc.DBAPIError as error:
        log.warning("rollup catch-up failed (the summary reads the tail from the raw rows): %s", error)


# Reversal tests by the records they ran on (see _comparisons_key): a repeated summary reuses its test.
_COMPARISONS = Recent(64)


def _comparisons_key(
    connection: sa.Connection,
    engine: sa.Engine,
    selected: Draw,
    filters: AuditFilters,
    methods: tuple[str, ...],
    options: tuple[Any, ...],
) -> tuple[Any, ...] | None:
    """What the reversal tests depend on: the database, the chain up to the newest selected record (its
    row hash covers every record and drift row before it), the selected ids, the filters, the methods and
    the test's options. None (never reused) when no record is selected."""
    if selected.id_range is None:
        return None
    # the newest record up to the selection's last id (an id can be missing: a rolled-back append's)
    head = connection.execute(
        sa.select(AuditRecord.row_hash)
        .where(AuditRecord.id <= selected.id_range[1])
        .order_by(AuditRecord.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    if head is None:
        return None
    database = engine.url.render_as_string(hide_password=True)
    return (database, head, selected.key, json.dumps(filters.to_dict(), default=str), methods, options)


def _comparisons(
    methods: Sequence[str], per_record: Sequence[Any], *, n_boot: int, seed: int, alpha: float
) -> list[dict[str, Any]]:
    """Every pair of ``methods`` compared with :func:`engine.ranking.reversal_test` on the per-record
    IoUs."""
    tables = method_tables((record_id, model, method, iou) for record_id, model, method, iou, _ in per_record)
    # GradCAM++ under the head-scale control (docs/DESIGN.md section 3): the same test with it in place
    controls = method_tables(
        (record_id, model, method, control)
        for record_id, model, method, _, control in per_record
        if method == CONTROL_METHOD and control is not None
    ).get(CONTROL_METHOD)
    comparisons = []
    for first, second in itertools.combinations(sorted(methods), 2):
        options: dict[str, Any] = {"n_boot": n_boot, "seed": seed, "alpha": alpha}
        test = reversal_test(
            tables.get(first, {}),
            tables.get(second, {}),
            control=controls if second == CONTROL_METHOD else None,
            **options,
        )
        if controls and first == CONTROL_METHOD:
            test["control"] = reversal_test(controls, tables.get(second, {}), **options)
        comparisons.append(
            {
                "methods": [first, second],
                "models": test["models"],
                "n_images": test["n_images"],
                "n_images_left_out": test["n_images_left_out"],
                "models_left_out": test["models_left_out"],
                "order": {first: test["order_a"], second: test["order_b"]},
                "means": {first: test["means_a"], second: test["means_b"]},
                "top": {first: test["top_a"], second: test["top_b"]},
                "top_changes": test["top_changes"],
                "kendall_tau": test["tau"],
                "p_value": test["p_value"],
                "rank_changed": test["reversal_descriptive"],
                "reversal_descriptive": test["reversal_descriptive"],
                "reversed_pairs": test["reversed_pairs"],
                "interaction_tests": test["interaction_tests"],
                "bootstrap": test["bootstrap"],
                "alpha": test["alpha"],
                "significant_pairs": test["significant_pairs"],
                "reversal": test["reversal"],
                "note": test["note"],
                "head_scale_control": None
                if test["control"] is None
                else {
                    "replaces": CONTROL_METHOD,
                    "reversal": test["control"]["reversal"],
                    "reversal_descriptive": test["control"]["reversal_descriptive"],
                    "n_images": test["control"]["n_images"],
                    "order": test["control"]["order_b" if second == CONTROL_METHOD else "order_a"],
                    "interaction_tests": test["control"]["interaction_tests"],
                    "bootstrap": test["control"]["bootstrap"],
                    "note": test["control"]["note"],
                },
            }
        )
    return comparisons


def _ranking(rows: Sequence[Any], comparisons: list[dict[str, Any]], *, alpha: float) -> dict[str, Any]:
    """Per method, the models by mean IoU (:func:`engine.ranking.rank_models`), and the comparisons."""
    entries: dict[str, dict[str, dict[str, Any]]] = {}
    for method, model, count, mean_iou, mean_drift in rows:
        entries.setdefault(method, {})[model] = {
            "model": model,
            "count": int(count),
            "mean_iou": _float_or_none(mean_iou),
            "mean_drift_score": _float_or_none(mean_drift),
        }
    mean_ious = {
        method: {model: entry["mean_iou"] for model, entry in by_model.items()}
        for method, by_model in entries.items()
    }
    per_method: dict[str, list[dict[str, Any]]] = {}
    for method, by_model in entries.items():
        order = rank_models(mean_ious[method])
        unranked = sorted(model for model in by_model if model not in order)
        per_method[method] = [
            {**by_model[model], "rank": rank} for rank, model in enumerate(order, start=1)
        ] + [{**by_model[model], "rank": None} for model in unranked]
    return {
        "by": "mean_iou",
        "order": "descending: most stable (highest mean IoU) first",
        "comparison": "engine.ranking.reversal_test on the records with an IoU for every compared model under "
        "both methods: reversal = the orders of the means differ AND a Holm-adjusted Wilcoxon p of the "
        f"per-record interaction < alpha ({alpha:g}); rank_changed = reversal_descriptive = the orders differ",
        "per_method": per_method,
        "comparisons": comparisons,
    }


def requests_over_time(
    engine: sa.Engine, *, filters: AuditFilters, window: str = "day"
) -> list[dict[str, Any]]:
    """Requests (records) per UTC ``window`` ("day" or "week", weeks starting on Monday), oldest first.

    A record counts when any of its drift rows matches ``filters`` (as in ``queries.list_records``), and
    counts as flagged when any of its matching drift rows is flagged. Each item: ``window`` (the window's
    first date, ``YYYY-MM-DD``), ``requests``, ``flagged`` and ``flagged_rate`` (flagged / requests).
    """
    if window not in WINDOWS:
        raise InputError(
            f"window: unknown value {window!r}; valid options: {', '.join(WINDOWS)}", code="validation_error"
        )
    dialect = engine.dialect.name
    key = _group_expression(window, dialect)
    per_record = (
        sa.select(
            key.label("w"),
            AuditRecord.id.label("record_id"),
            func.max(sa.case((AuditDrift.flagged, 1), else_=0)).label("f"),
        )
        .select_from(AuditDrift)
        .join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
        .where(*time_conditions(filters), *drift_conditions(filters))
        .group_by(key, AuditRecord.id)
        .subquery("per_record")
    )
    statement = (
        sa.select(per_record.c.w, func.count(), func.sum(per_record.c.f))
        .group_by(per_record.c.w)
        .order_by(per_record.c.w)
    )
    with translate_errors("count audit records over time"), engine.connect() as connection:
        rows = connection.execute(statement).all()
    return [
        {
            "window": str(w),
            "requests": int(n),
            "flagged": int(f or 0),
            "flagged_rate": (int(f or 0) / int(n)) if n else None,
        }
        for w, n, f in rows
    ]
