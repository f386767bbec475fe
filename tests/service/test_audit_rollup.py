"""The daily rollup behind /audit/summary at scale (service/audit/rollup.py), and the sampled reversal test.

Oracle: the exact path (itself checked against NumPy in test_audit_db.py) and NumPy on the entries."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from core.errors import InputError
from service.audit import chain, rollup, rollup_read, sample, summary
from service.audit.queries import AuditFilters
from service.audit.summary import summarize
from service.audit.tables import AuditRollup, AuditRollupState
from tests.db_fixtures import MODELS, make_entry

START = datetime(2026, 11, 27, 22, 0, tzinfo=UTC)
DIGEST = "a1b2c3d4" * 8


@pytest.fixture
def populated(db_engine: sa.Engine) -> sa.Engine:
    rng = np.random.default_rng(21)
    for i in range(24):  # every 7 h over 7 days
        entry = make_entry(rng, created_at=START + timedelta(hours=7 * i))
        if i % 5 == 0:  # out-of-range values land in the under/overflow bins
            entry.reports[0].methods["gradcampp"]["metrics"]["emd"] = 1.7
        if i % 6 == 0:
            entry.reports[1].methods["layercam"]["metrics"]["ssim"] = None
        if i % 3 == 0:  # a second version of the first model, under an architecture name of its own
            entry.reports[0].model_digest = DIGEST
            entry.reports[0].architecture = "arch-v2"
        chain.append(db_engine, entry)
        if i == 13:  # the first 14 records in the rollup, the other 10 after its watermark (the tail)
            assert rollup.catch_up(db_engine) == 14
    return db_engine


CASES = [
    ([], AuditFilters()),
    (["model", "method"], AuditFilters()),
    (["day", "model"], AuditFilters()),
    (["week", "method"], AuditFilters(model=MODELS[0])),
    (["model"], AuditFilters(method="layercam")),
    (
        ["method"],
        AuditFilters(start=datetime(2026, 11, 29, tzinfo=UTC), end=datetime(2026, 12, 2, tzinfo=UTC)),
    ),
]


@pytest.mark.parametrize(("group_by", "filters"), CASES)
def test_rollup_answers_like_the_exact_path(
    populated: sa.Engine, group_by: list[str], filters: AuditFilters
) -> None:
    exact = summarize(populated, filters=filters, group_by=group_by, mode="exact", n_boot=50)
    rolled = summarize(populated, filters=filters, group_by=group_by, mode="rollup", n_boot=50)
    assert exact["source"]["path"] == "exact" and rolled["source"]["path"] == "rollup"
    assert rolled["source"]["watermark"] == 14
    assert rolled["total"] == exact["total"] > 0
    assert [g["key"] for g in rolled["groups"]] == [g["key"] for g in exact["groups"]]
    for want, have in zip(exact["groups"], rolled["groups"], strict=True):
        assert have["count"] == want["count"]
        assert have["agreement_rate"] == pytest.approx(want["agreement_rate"], rel=1e-12)
        assert have["flagged_rate"] == pytest.approx(want["flagged_rate"], rel=1e-12)
        for name, stats in want["metrics"].items():
            got = have["metrics"][name]
            assert got["n"] == stats["n"]
            for key in ("mean", "sd"):
                if stats[key] is None:
                    assert got[key] is None
                else:
                    assert got[key] == pytest.approx(stats[key], rel=1e-9, abs=1e-12), (name, key)
            bound = got["percentile_max_error"]
            low, high = rollup.RANGES[name]
            in_range = stats["n"] > 0 and all(low <= stats[f"p{p}"] <= high for p in (5, 25, 50, 75, 95))
            if in_range and name != "emd":
                assert bound <= (high - low) / rollup.BINS + 1e-12, name
            for p in (5, 25, 50, 75, 95):
                if stats[f"p{p}"] is None:
                    assert got[f"p{p}"] is None
                else:
                    assert abs(got[f"p{p}"] - stats[f"p{p}"]) <= bound + 1e-12, (name, p)
    # the ranking's per-method means come from the rollup's sums; the reversal test from the same records
    for method, entries in exact["ranking"]["per_method"].items():
        for want, have in zip(entries, rolled["ranking"]["per_method"][method], strict=True):
            assert have["model"] == want["model"] and have["count"] == want["count"]
            assert have["mean_iou"] == pytest.approx(want["mean_iou"], rel=1e-9)
    assert rolled["ranking"]["comparisons"] == exact["ranking"]["comparisons"]


def test_out_of_range_values_widen_the_stated_error(populated: sa.Engine) -> None:
    rolled = summarize(populated, filters=AuditFilters(model=MODELS[0], method="gradcampp"), mode="rollup")
    (group,) = rolled["groups"]
    emd = group["metrics"]["emd"]
    assert emd["p95"] is not None and emd["percentile_max_error"] > 1.0 / rollup.BINS


def test_rollup_refuses_what_it_cannot_answer(populated: sa.Engine) -> None:
    with pytest.raises(InputError, match="not a rollup dimension"):
        summarize(populated, filters=AuditFilters(), group_by=["class"], mode="rollup")
    with pytest.raises(InputError, match="not rollup dimensions"):
        summarize(populated, filters=AuditFilters(severity="high"), mode="rollup")
    with pytest.raises(InputError, match="UTC midnights"):
        summarize(populated, filters=AuditFilters(start=START), mode="rollup")
    with pytest.raises(InputError, match="mode"):
        summarize(populated, filters=AuditFilters(), mode="fast")
    auto = summarize(populated, filters=AuditFilters(), group_by=["class"], n_boot=20)
    assert auto["source"] == {"path": "exact", "reason": "group_by ['class'] is not a rollup dimension"}


def test_auto_uses_the_rollup_above_the_threshold(
    populated: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert summarize(populated, filters=AuditFilters(), n_boot=20)["source"]["path"] == "exact"
    monkeypatch.setattr(summary, "ROLLUP_MIN_ROWS", {"sqlite": 10, "postgresql": 10})
    assert summarize(populated, filters=AuditFilters(), n_boot=20)["source"]["path"] == "rollup"


def test_check_finds_a_tampered_or_missing_rollup(populated: sa.Engine) -> None:
    assert rollup.check(populated) == []
    with populated.begin() as connection:
        day, model, method, architecture, digest = connection.execute(
            sa.select(
                AuditRollup.day,
                AuditRollup.model,
                AuditRollup.method,
                AuditRollup.architecture,
                AuditRollup.digest,
            )
        ).first()  # type: ignore[misc]
        key = (AuditRollup.day == day) & (AuditRollup.model == model) & (AuditRollup.method == method)
        key &= (AuditRollup.architecture == architecture) & (AuditRollup.digest == digest)
        label = f"{day}/{model}/{method}/{architecture}/{digest or '-'}"
        connection.execute(sa.update(AuditRollup).where(key).values(count=AuditRollup.count + 1))
    (problem,) = rollup.check(populated)
    assert f"{label}: counts" in problem
    with populated.begin() as connection:
        connection.execute(sa.delete(AuditRollup).where(key))
    assert rollup.check(populated) == [f"{label}: rows without a rollup"]
    with populated.begin() as connection:
        assert rollup.rebuild(connection) > 0
    assert rollup.check(populated) == []


def test_reversal_test_runs_on_a_seeded_sample_above_the_bound(populated: sa.Engine) -> None:
    def run(seed: int) -> dict[str, Any]:
        ranking = summarize(populated, filters=AuditFilters(), n_boot=50, seed=seed, reversal_max_records=10)[
            "ranking"
        ]
        assert isinstance(ranking, dict)
        return ranking

    first, again, other = run(1), run(1), run(2)
    assert first["sample"]["records_drawn"] == 10 and first["sample"]["seed"] == 1
    (comparison,) = first["comparisons"]
    assert comparison["n_images"] <= 10
    assert first["comparisons"] == again["comparisons"]
    assert first["sample"]["id_range"] == other["sample"]["id_range"]
    full = summarize(populated, filters=AuditFilters(), n_boot=50)["ranking"]
    assert full["sample"] is None and full["comparisons"][0]["n_images"] == 24


def test_reversal_tests_are_reused_only_on_the_same_records(populated: sa.Engine) -> None:
    summary._COMPARISONS.clear()
    options: dict[str, Any] = {"filters": AuditFilters(), "n_boot": 50, "reversal_max_records": 10}
    first = summarize(populated, **options)["ranking"]
    again = summarize(populated, **options)["ranking"]
    assert (first["reused"], again["reused"]) == (False, True)
    assert again["comparisons"] == first["comparisons"]
    summary._COMPARISONS.clear()
    assert summarize(populated, **options)["ranking"]["comparisons"] == first["comparisons"]  # recomputed
    other = summarize(populated, **{**options, "filters": AuditFilters(model=MODELS[0])})["ranking"]
    assert other["reused"] is False
    # a new record moves the window's newest id and row hash: a new draw, computed afresh
    chain.append(populated, make_entry(np.random.default_rng(5), created_at=START + timedelta(days=8)))
    later = summarize(populated, **options)["ranking"]
    assert later["reused"] is False
    assert later["sample"]["id_range"][1] == first["sample"]["id_range"][1] + 1
    full = summarize(populated, filters=AuditFilters(), n_boot=50)["ranking"]
    assert full["reused"] is False and full["comparisons"][0]["n_images"] == 25


def test_the_sampling_frame_holds_while_records_are_appended(
    populated: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sample, "FRAME_STEPS", 4)  # frame steps of 4 ids on this 24-record log
    summary._COMPARISONS.clear()
    options: dict[str, Any] = {"filters": AuditFilters(), "n_boot": 50, "reversal_max_records": 10}
    rng = np.random.default_rng(8)
    seen = []
    for i in range(5):
        ranking = summarize(populated, **options)["ranking"]
        first, last = ranking["sample"]["id_range"]
        low, high = ranking["sample"]["window_id_range"]
        assert low <= first < last <= high and (first - low) + (high - last) < 2 * 4  # under 2 steps out
        assert first % 4 == 0 and (last + 1) % 4 == 0
        seen.append(((first, last), ranking["reused"]))
        chain.append(populated, make_entry(rng, created_at=START + timedelta(days=8, hours=i)))
    # a summary reuses the test exactly when the frame has not moved since the summary before it
    reused = [again for _, again in seen[1:]]
    assert reused == [before[0] == after[0] for before, after in itertools.pairwise(seen)]
    assert seen[0][1] is False and any(reused) and not all(reused)


def test_rollup_rows_are_read_once_per_watermark(populated: sa.Engine) -> None:
    """A repeated summary reads the watermark and the tail, not the rollup rows; after a catch-up it reads
    them again; every answer equals one computed with nothing kept."""
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    def reads_rollup() -> bool:
        return any("audit_rollup." in s and "hist" in s for s in statements)

    def fresh(options: dict[str, Any]) -> dict[str, Any]:
        rollup_read.LOADED.clear()
        return summarize(populated, **options)

    options: dict[str, Any] = {"filters": AuditFilters(), "group_by": ["model", "method"], "mode": "rollup"}
    options |= {"n_boot": 20}
    sa.event.listen(populated, "before_cursor_execute", record)
    try:
        rollup_read.LOADED.clear()
        first = summarize(populated, **options)
        assert reads_rollup()
        statements.clear()
        assert _groups(summarize(populated, **options)) == _groups(first) and not reads_rollup()
        chain.append(populated, make_entry(np.random.default_rng(31), created_at=START + timedelta(days=2)))
        statements.clear()
        with_tail = summarize(populated, **options)  # the same rollup rows, a longer tail
        assert not reads_rollup() and with_tail["source"]["tail_rows"] == first["source"]["tail_rows"] + 6
        assert _groups(with_tail) == _groups(fresh(options))
        rollup.catch_up(populated)
        statements.clear()
        caught_up = summarize(populated, **options)
        assert reads_rollup() and caught_up["source"]["tail_rows"] == 0
        assert [g[:4] for g in _groups(caught_up)] == [g[:4] for g in _groups(with_tail)]
        other = {**options, "filters": AuditFilters(method="layercam")}  # other filters: their own rows
        statements.clear()
        assert _groups(summarize(populated, **other)) == _groups(fresh(other)) and reads_rollup()
    finally:
        sa.event.remove(populated, "before_cursor_execute", record)


def test_a_watermark_past_the_newest_record_is_not_trusted(populated: sa.Engine) -> None:
    """Set outside the service, it would leave every later record out of both the rollup and the tail."""
    exact = summarize(populated, filters=AuditFilters(), group_by=["model"], mode="exact", n_boot=20)
    with populated.begin() as connection:
        connection.execute(sa.update(AuditRollupState).values(watermark=10**9))
    for mode in ("auto", "rollup"):
        result = summarize(populated, filters=AuditFilters(), group_by=["model"], mode=mode, n_boot=20)
        assert result["source"]["path"] == "exact" and "past the newest record" in result["source"]["reason"]
        assert _groups(result) == _groups(exact)
    with populated.begin() as connection:
        rollup.rebuild(connection)
    result = summarize(populated, filters=AuditFilters(), group_by=["model"], mode="rollup", n_boot=20)
    assert result["source"]["path"] == "rollup" and result["source"]["watermark"] == 24


def _groups(result: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The groups' keys, counts and per-metric (n, mean, sd, percentiles) for comparing two answers."""
    out = []
    for group in result["groups"]:
        metrics = [
            (name, stats["n"], stats["mean"], stats["sd"], *(stats[f"p{p}"] for p in (5, 25, 50, 75, 95)))
            for name, stats in sorted(group["metrics"].items())
        ]
        out.append((group["key"], group["count"], group["agreement_rate"], group["flagged_rate"], metrics))
    return out


@pytest.mark.parametrize(("group_by", "filters"), CASES)
def test_the_tail_after_the_watermark_adds_up_to_the_caught_up_rollup(
    populated: sa.Engine, group_by: list[str], filters: AuditFilters
) -> None:
    """Rollup + tail (10 records read from the raw rows) answers as the rollup holding all 24 records."""
    options: dict[str, Any] = {"filters": filters, "group_by": group_by, "mode": "rollup", "n_boot": 20}
    with_tail = summarize(populated, **options)
    # records 15-24 are from 2026-12-02 on: in the tail unless the filters end before
    in_tail = filters.end is None or filters.end > START + timedelta(hours=7 * 14)
    assert with_tail["source"]["watermark"] == 14 and (with_tail["source"]["tail_rows"] > 0) == in_tail
    assert rollup.catch_up(populated) == 10
    caught_up = summarize(populated, **options)
    assert caught_up["source"]["watermark"] == 24 and caught_up["source"]["tail_rows"] == 0
    want, have = _groups(caught_up), _groups(with_tail)
    assert [g[:4] for g in have] == [g[:4] for g in want]  # keys, counts and rates: exact
    for (*_, metrics_want), (*_, metrics_have) in zip(want, have, strict=True):
        for row_want, row_have in zip(metrics_want, metrics_have, strict=True):
            assert row_have[:2] == row_want[:2]
            for a, b in zip(row_have[2:], row_want[2:], strict=True):  # sums added in another order
                assert a == b if b is None else a == pytest.approx(b, rel=1e-9, abs=1e-12)
    assert rollup.check(populated) == []


def test_catch_up_goes_in_batches_and_leaves_appends_out_of_the_rollup(populated: sa.Engine) -> None:
    with populated.connect() as connection:
        assert (rollup.watermark(connection), rollup.behind(connection)) == (14, 10)
    assert rollup.catch_up(populated, batch_records=3) == 10  # 4 transactions
    chain.append(populated, make_entry(np.random.default_rng(9), created_at=START))
    with populated.connect() as connection:
        assert (rollup.watermark(connection), rollup.behind(connection)) == (24, 1)
        loaded = rollup_read.load(connection, AuditFilters(), [])
    assert loaded.total == 25 * len(MODELS) * 2 and loaded.tail_rows == len(MODELS) * 2  # rollup + tail
    assert rollup.check(populated) == []  # the rollup up to its watermark
    assert rollup.catch_up(populated) == 1 and rollup.catch_up(populated) == 0


def test_a_summary_catches_a_long_tail_up(populated: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(summary, "CATCH_UP_AFTER", 5)
    result = summarize(populated, filters=AuditFilters(), mode="rollup", n_boot=20)
    assert result["source"]["watermark"] == 24 and result["source"]["tail_rows"] == 0


def test_a_summary_catches_up_within_its_budget_and_reads_the_rest_raw(
    populated: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert rollup.catch_up(populated, batch_records=3, budget_s=0) == 3  # one batch, then the budget is spent
    exact = summarize(
        populated, filters=AuditFilters(), group_by=["model", "method"], mode="exact", n_boot=20
    )
    monkeypatch.setattr(summary, "CATCH_UP_AFTER", 2)
    monkeypatch.setattr(summary, "CATCH_UP_BATCH", 2)
    monkeypatch.setattr(summary, "CATCH_UP_BUDGET_S", 0)
    result = summarize(
        populated, filters=AuditFilters(), group_by=["model", "method"], mode="rollup", n_boot=20
    )
    # 7 records were behind: the summary rolled up one batch of 2 and read the other 5 from the raw rows
    assert result["source"]["watermark"] == 19 and result["source"]["tail_rows"] == 5 * len(MODELS) * 2
    assert [g[:4] for g in _groups(result)] == [g[:4] for g in _groups(exact)]


def test_digest_and_architecture_are_rollup_dimensions(populated: sa.Engine) -> None:
    for group_by, filters in (
        (["digest", "method"], AuditFilters()),
        (["architecture", "method"], AuditFilters()),
        (["model"], AuditFilters(architecture="arch-v2")),
        (["method"], AuditFilters(digest=DIGEST[:8])),
        (["method"], AuditFilters(digest=DIGEST)),
    ):
        exact = summarize(populated, filters=filters, group_by=group_by, mode="exact", n_boot=20)
        rolled = summarize(populated, filters=filters, group_by=group_by, mode="rollup", n_boot=20)
        assert rolled["source"]["path"] == "rollup"
        assert len(exact["groups"]) >= 2 if "digest" in group_by else exact["total"] > 0
        # a null digest sorts first on SQLite, last on PostgreSQL: compare by key
        order = sorted(_groups(exact), key=lambda g: str(g[0]))
        assert [g[:4] for g in sorted(_groups(rolled), key=lambda g: str(g[0]))] == [g[:4] for g in order]
    none = summarize(populated, filters=AuditFilters(digest="0123abcd"), mode="rollup", n_boot=20)
    assert none["total"] == 0


def test_sqlite_reads_the_tail_and_the_drawn_records_from_the_record_id_index(populated: sa.Engine) -> None:
    """A few hundred tail rows at most, and 2,000 drawn records: a filter on an indexed column (method,
    model) must not make SQLite walk that column's index over the whole log instead (what it did at 1M
    records: 0.9-1.2 s a summary). The statements the summary runs are checked."""
    if populated.dialect.name != "sqlite":
        pytest.skip("SQLite's query planner")
    statements: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "audit_drift" in statement:
            statements.append((statement, parameters))

    filters = AuditFilters(method="layercam", model=MODELS[0])
    sa.event.listen(populated, "before_cursor_execute", keep)
    try:  # the rollup with its 10-record tail; the reversal test on 5 drawn records
        summarize(
            populated, filters=filters, group_by=["model"], mode="rollup", reversal_max_records=5, n_boot=20
        )
    finally:
        sa.event.remove(populated, "before_cursor_execute", keep)
    by_record = [(sql, params) for sql, params in statements if "JOIN audit_records" in sql]
    assert len(by_record) == 2, statements  # the tail's rows, the drawn records' rows
    with populated.connect() as connection:
        for sql, params in by_record:
            plan = [row[3] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)]
            drift_steps = [step for step in plan if "audit_drift" in step]
            assert drift_steps and all("(record_id" in step for step in drift_steps), (sql, plan)
