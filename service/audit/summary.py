"""Summaries of the audit log: per-group rates and metric statistics, and the ranking.

The groups come from the daily rollup where it can answer (:mod:`service.audit.rollup_read`: counts exact,
percentiles approximate with a stated bound) or exactly from the raw drift rows (:mod:`service.audit.exact`:
PostgreSQL in SQL, SQLite in arrays). The architecture stability ranking per method uses the per (method,
model) means; its comparison between methods is :func:`engine.ranking.reversal_test` on the per-record IoUs
(one query selecting record id, model, method and IoU under the same filters; a record is one image).
Raises :class:`~service.audit.db.DatabaseUnavailable` when the database cannot be reached."""

from __future__ import annotations

import copy
import itertools
import json
import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func

from core.errors import InputError
from engine.ranking import DEFAULT_ALPHA, DEFAULT_N_BOOT, method_tables, rank_models, reversal_test
from service.audit import rollup, rollup_read
from service.audit.db import translate_errors
from service.audit.exact import (
    PERCENTILES,
    SUMMARY_STATISTICS,
    exact_groups,
    float_or_none,
    group_expression,
)
from service.audit.queries import AuditFilters, drift_conditions, time_conditions
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
# "auto": the daily rollup (service/audit/rollup.py) when it can answer and the query covers at least
# ROLLUP_MIN_ROWS drift rows of the database (fewer are fast and exact on the raw rows: about 0.2 s at the
# bound on either; measured rates of the exact path: service/audit/exact.py and BENCHMARKS.md);
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
    """Aggregate the drift rows (one per record x model x method) matching ``filters``.

    Per group (none when no row matches): ``count`` (drift rows), ``agreement_rate`` and ``flagged_rate``
    (fractions of those rows), and for every metric and ``drift_score``: ``n`` (non-null values), ``mean``,
    ``sd`` (sample, n - 1; null when n < 2) and ``p5 p25 p50 p75 p95`` (linear interpolation between closest
    ranks: PostgreSQL ``percentile_cont``, NumPy's default; :mod:`service.audit.exact`). ``group_by`` takes
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
            groups = exact_groups(connection, names, conditions)
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
            "mean_iou": float_or_none(mean_iou),
            "mean_drift_score": float_or_none(mean_drift),
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
    key = group_expression(window, dialect)
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
