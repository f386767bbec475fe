"""Two versions of one architecture compared over the audit log (``GET /audit/summary?compare=A,B``).

A side is selected by a model name or a version digest (or a prefix of 8+ hex digits); with ``split``, side
``a`` keeps the rows before that instant and side ``b`` those at or after it (so ``compare=X,X&split=T``
compares one name before and after a replacement at T). The rows also pass the summary's filters (time
window, method, class, ...). Both sides must be one architecture and no row may fall on both. Per method,
:func:`engine.versions.compare_versions` does the statistics. Raises :class:`core.errors.InputError` for a
bad selection and :class:`~service.audit.db.DatabaseUnavailable` when the database cannot be reached.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from core.errors import InputError
from engine.versions import COMPARE_METRICS, compare_versions
from service.audit.db import translate_errors
from service.audit.queries import AuditFilters, architecture_expression, drift_conditions, time_conditions
from service.audit.tables import AuditDrift, AuditRecord

__all__ = ["compare_sides"]

_HEX = re.compile(r"^[0-9a-f]{8,64}$")


def _selector(token: str) -> sa.ColumnElement[bool]:
    conditions: list[sa.ColumnElement[bool]] = [AuditDrift.model == token]
    if _HEX.match(token.lower()):
        conditions.append(AuditDrift.model_digest.startswith(token.lower(), autoescape=True))
    return sa.or_(*conditions)


def _matches(token: str, model: str, digest: str | None) -> bool:
    return model == token or (bool(_HEX.match(token.lower())) and (digest or "").startswith(token.lower()))


def compare_sides(
    engine: sa.Engine,
    *,
    filters: AuditFilters,
    a: str,
    b: str,
    split: datetime | None = None,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per method, side ``b`` against side ``a`` (module docstring)."""
    if split is not None and split.tzinfo is None:
        raise InputError("compare_split must be timezone-aware", code="validation_error")
    if a == b and split is None:
        raise InputError(
            f"compare: both sides select {a!r}; give two versions, or one name with compare_split",
            code="validation_error",
        )
    statement = (
        sa.select(
            AuditDrift.method,
            AuditDrift.model,
            AuditDrift.model_digest,
            architecture_expression().label("architecture"),
            AuditRecord.created_at,
            AuditDrift.flagged,
            *(getattr(AuditDrift, name) for name in COMPARE_METRICS),
        )
        .join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
        .where(*time_conditions(filters), *drift_conditions(filters), sa.or_(_selector(a), _selector(b)))
        .order_by(AuditDrift.id)
    )
    with translate_errors("compare model versions"), engine.connect() as connection:
        rows = connection.execute(statement).all()
    sides: dict[str, dict[str, dict[str, Any]]] = {"a": {}, "b": {}}
    architectures: set[str] = set()
    names: dict[str, set[str]] = {"a": set(), "b": set()}
    digests: dict[str, set[str]] = {"a": set(), "b": set()}
    for method, model, digest, architecture, created, flagged, *values in rows:
        in_a = _matches(a, model, digest) and (split is None or created < split)
        in_b = _matches(b, model, digest) and (split is None or created >= split)
        if in_a and in_b:
            raise InputError(
                f"compare: {a!r} and {b!r} select the same rows ({model}, {digest or 'no digest'}); "
                "give two different versions, or a compare_split",
                code="validation_error",
            )
        if not (in_a or in_b):
            continue
        side = "a" if in_a else "b"
        architectures.add(str(architecture))
        names[side].add(str(model))
        if digest:
            digests[side].add(str(digest))
        bucket = sides[side].setdefault(
            method, {"values": {name: [] for name in COMPARE_METRICS}, "flagged": []}
        )
        bucket["flagged"].append(bool(flagged))
        for name, value in zip(COMPARE_METRICS, values, strict=True):
            bucket["values"][name].append(value)
    if len(architectures) > 1:
        raise InputError(
            f"compare: the two sides span architectures {', '.join(sorted(architectures))}; compare versions "
            "of one architecture",
            code="validation_error",
        )
    methods: dict[str, Any] = {}
    for method in sorted(set(sides["a"]) | set(sides["b"])):
        left = sides["a"].get(method, {"values": {}, "flagged": []})
        right = sides["b"].get(method, {"values": {}, "flagged": []})
        methods[method] = compare_versions(
            left["values"],
            left["flagged"],
            right["values"],
            right["flagged"],
            alpha=alpha,
            n_boot=n_boot,
            seed=seed,
        )
    return {
        "a": {"selector": a, "models": sorted(names["a"]), "digests": sorted(digests["a"])},
        "b": {"selector": b, "models": sorted(names["b"]), "digests": sorted(digests["b"])},
        "split": None if split is None else split.isoformat(),
        "architecture": next(iter(architectures), None),
        "metrics": list(COMPARE_METRICS),
        "methods": methods,
        "test": "per method: Mann-Whitney U (two-sided) of each metric and Fisher's exact test of the flagged "
        "rates, b against a, one Holm family; significant = a Holm-adjusted p < alpha (engine/versions.py)",
    }
