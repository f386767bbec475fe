"""Drift of two versions compared in the audit log (GET /audit/summary?compare=A,B), on synthetic traffic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from core.errors import InputError
from engine.versions import compare_versions, wilson_interval
from service.audit import chain
from service.audit.compare import compare_sides
from service.audit.queries import AuditFilters
from tests.db_fixtures import make_entry

T0 = datetime(2026, 11, 1, tzinfo=UTC)
V1, V2 = "1" * 64, "2" * 64


def traffic(
    engine: sa.Engine,
    rng: np.random.Generator,
    *,
    name: str,
    digest: str,
    low: float,
    high: float,
    n: int,
    start: datetime,
    architecture: str = "densenet201",
) -> None:
    """``n`` requests answered by one version, drift scores uniform in [low, high), flagged above 0.5."""
    for i in range(n):
        entry = make_entry(rng, created_at=start + timedelta(minutes=i), models=[name], methods=["layercam"])
        for report in entry.reports:
            report.architecture, report.model_digest = architecture, digest
            result = report.methods["layercam"]
            score = float(rng.uniform(low, high))
            result["drift_score"], result["drift_index"], result["flagged"] = score, score, score > 0.5
        chain.append(engine, entry)


def test_a_version_that_drifts_more_is_detected(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(0)
    traffic(db_engine, rng, name="densenet201", digest=V1, low=0.1, high=0.5, n=40, start=T0)
    traffic(
        db_engine, rng, name="densenet201", digest=V2, low=0.3, high=0.7, n=40, start=T0 + timedelta(days=1)
    )
    result = compare_sides(db_engine, filters=AuditFilters(), a=V1[:12], b=V2, n_boot=500)
    layercam = result["methods"]["layercam"]
    assert result["architecture"] == "densenet201" and result["a"]["digests"] == [V1]
    assert layercam["a"]["n"] == layercam["b"]["n"] == 40
    assert layercam["significant"] and layercam["direction"] == "more_drift"
    diff = layercam["difference"]["drift_score"]
    assert 0 < diff["ci_low"] < diff["mean_difference"] < diff["ci_high"]
    assert layercam["difference"]["drift_score"]["mann_whitney"]["p_b_greater"] > 0.5
    assert layercam["flagged"]["rate_b"] > layercam["flagged"]["rate_a"] == 0.0
    # the same comparison as one name before and after the replacement
    split = compare_sides(
        db_engine,
        filters=AuditFilters(),
        a="densenet201",
        b="densenet201",
        split=T0 + timedelta(days=1),
        n_boot=500,
    )
    assert split["methods"]["layercam"]["difference"] == layercam["difference"]


def test_nothing_changed_is_not_significant(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(1)
    traffic(db_engine, rng, name="densenet201-a", digest=V1, low=0.1, high=0.6, n=40, start=T0)
    traffic(db_engine, rng, name="densenet201-b", digest=V2, low=0.1, high=0.6, n=40, start=T0)
    result = compare_sides(
        db_engine, filters=AuditFilters(), a="densenet201-a", b="densenet201-b", n_boot=500
    )
    layercam = result["methods"]["layercam"]
    assert not layercam["significant"] and layercam["direction"] == "no_significant_change"
    diff = layercam["difference"]["drift_score"]
    assert diff["ci_low"] < 0 < diff["ci_high"]


def test_sides_must_be_one_architecture_and_distinct(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(2)
    traffic(db_engine, rng, name="densenet201", digest=V1, low=0.1, high=0.5, n=3, start=T0)
    traffic(
        db_engine,
        rng,
        name="resnet50v2",
        digest=V2,
        low=0.1,
        high=0.5,
        n=3,
        start=T0,
        architecture="resnet50v2",
    )
    with pytest.raises(InputError, match="architectures densenet201, resnet50v2"):
        compare_sides(db_engine, filters=AuditFilters(), a="densenet201", b="resnet50v2")
    with pytest.raises(InputError, match="both sides select"):
        compare_sides(db_engine, filters=AuditFilters(), a="densenet201", b="densenet201")
    with pytest.raises(InputError, match="select the same rows"):
        compare_sides(db_engine, filters=AuditFilters(), a="densenet201", b=V1[:10])
    few = compare_sides(
        db_engine, filters=AuditFilters(), a="densenet201", b="densenet201", split=T0 + timedelta(minutes=1)
    )
    assert few["methods"]["layercam"]["difference"]["drift_score"]["mann_whitney"] is None


def test_compare_versions_agrees_with_scipy_and_wilson_with_its_formula() -> None:
    from scipy import stats

    rng = np.random.default_rng(3)
    a, b = rng.uniform(0, 0.5, 30), rng.uniform(0.2, 0.7, 25)
    result = compare_versions(
        {"drift_score": list(a)},
        [False] * 30,
        {"drift_score": list(b)},
        [True] * 5 + [False] * 20,
        metrics=["drift_score"],
        n_boot=200,
    )
    diff = result["difference"]["drift_score"]
    assert diff["mean_difference"] == pytest.approx(b.mean() - a.mean())
    assert diff["mann_whitney"]["p_value"] == pytest.approx(stats.mannwhitneyu(b, a).pvalue)
    assert diff["welch"]["p_value"] == pytest.approx(stats.ttest_ind(b, a, equal_var=False).pvalue)
    assert result["flagged"]["p_value"] == pytest.approx(stats.fisher_exact([[5, 20], [0, 30]]).pvalue)
    assert result["a"]["metrics"]["drift_score"]["mean"] == pytest.approx(a.mean())
    low, high = wilson_interval(5, 25)
    assert low is not None and high is not None
    p, z = 0.2, 1.959963984540054
    centre = (p + z * z / 50) / (1 + z * z / 25)
    assert (low + high) / 2 == pytest.approx(centre)
    assert wilson_interval(0, 0) == (None, None)
