"""The audit log on SQLite and PostgreSQL: chain, tamper detection, triggers, concurrency, summaries."""

from __future__ import annotations

import csv
import io
import itertools
import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import numpy as np
import pytest
import sqlalchemy as sa
from scipy.stats import kendalltau, wilcoxon

from core.errors import InputError
from core.vocabulary import METHODS
from engine.ranking import method_tables, reversal_test
from service.audit import chain, exact, hashing, queries
from service.audit.chain import AuditEntry
from service.audit.db import DatabaseUnavailable, check_writable, make_engine, upgrade
from service.audit.queries import AuditFilters
from service.audit.summary import summarize
from service.audit.tables import METRIC_COLUMNS
from tests.db_fixtures import MODELS, disable_append_only, make_entry

STATISTICS = (*METRIC_COLUMNS, "drift_score", "drift_index", "reference_percentile")


def append_many(engine: sa.Engine, entries: list[AuditEntry]) -> list[chain.AppendResult]:
    return [chain.append(engine, entry) for entry in entries]


def drift_rows_of(entries: list[AuditEntry]) -> list[dict[str, Any]]:
    """The oracle's own reading of the reports (independent of chain.drift_rows_from_reports)."""
    rows = []
    for entry in entries:
        for report in entry.reports:
            for method, result in report.methods.items():
                row = {
                    "created_at": entry.created_at,
                    "model": report.model,
                    "method": method,
                    "class": report.target_class["name"],
                    "agreement": report.agreement,
                    "severity": result["severity"],
                    "flagged": result["flagged"],
                    "drift_score": result["drift_score"],
                    "drift_index": result["drift_index"],
                    "reference_percentile": result["reference_percentile"],
                }
                row.update({name: result["metrics"][name] for name in METRIC_COLUMNS})
                rows.append(row)
    return rows


def expected_stats(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=np.float64)
    quantiles = np.percentile(array, [5, 25, 50, 75, 95])
    return {
        "n": len(values),
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)) if len(values) > 1 else None,
        **{f"p{p}": float(q) for p, q in zip((5, 25, 50, 75, 95), quantiles, strict=True)},
    }


def assert_stats_close(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if value is None:
            assert actual[key] is None, key
        else:
            assert actual[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


# ---------------------------------------------------------------------------------------------- chain


def test_append_links_rows_and_verify_accepts_them(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(1)
    results = append_many(db_engine, [make_entry(rng) for _ in range(5)])
    assert results[0].prev_hash == chain.GENESIS_HASH
    for previous, current in itertools.pairwise(results):
        assert current.prev_hash == previous.row_hash
        assert current.id > previous.id
    outcome = chain.verify(db_engine)
    assert outcome == chain.VerifyResult(ok=True, checked=5, first_bad_id=None, reason=None)
    assert outcome.to_dict()["ok"] is True
    assert chain.verify(db_engine, batch_size=2).checked == 5  # streaming in small batches


def test_verify_on_empty_database_is_ok(db_engine: sa.Engine) -> None:
    assert chain.verify(db_engine) == chain.VerifyResult(ok=True, checked=0)


def test_stored_hash_recomputes_from_the_stored_columns(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(2)
    entry = make_entry(rng)
    entry.reports[0].methods["layercam"]["metrics"]["ssim"] = float("nan")  # undefined metric
    entry.reports[0].methods["layercam"]["metrics"]["pearson"] = -0.0
    maps = {"transfer": np.zeros((4, 4)), "finetuned": np.ones((4, 4))}
    entry.reports[0].maps = {"layercam": maps}  # pixels must not be stored
    result = chain.append(db_engine, entry)
    record = queries.get_record(db_engine, result.id)
    assert record is not None
    assert record["row_hash"] == result.row_hash
    assert "maps" not in record["reports"][0]
    layercam = next(d for d in record["drift"] if d["model"] == MODELS[0] and d["method"] == "layercam")
    assert layercam["ssim"] is None
    assert chain.verify(db_engine).ok


@pytest.mark.parametrize(
    ("table", "column", "new_value"),
    [
        ("audit_records", "image_width", "image_width + 1"),
        ("audit_records", "api_key_name", "'someone_else'"),
        ("audit_drift", "iou", "iou + 0.000001"),
        ("audit_drift", "flagged", "NOT flagged"),
        ("audit_drift", "drift_index", "drift_index + 0.01"),
        ("audit_drift", "reference_percentile", "NULL"),
    ],
)
def test_verify_names_the_tampered_row(db_engine: sa.Engine, table: str, column: str, new_value: str) -> None:
    rng = np.random.default_rng(3)
    results = append_many(db_engine, [make_entry(rng) for _ in range(4)])
    victim = results[2].id
    disable_append_only(db_engine)
    key = "id" if table == "audit_records" else "record_id"
    with db_engine.begin() as connection:
        changed = connection.exec_driver_sql(
            f"UPDATE {table} SET {column} = {new_value} WHERE {key} = {victim}"
        ).rowcount
    assert changed >= 1
    outcome = chain.verify(db_engine)
    assert not outcome.ok
    assert outcome.first_bad_id == victim
    assert outcome.checked == 2
    assert outcome.reason is not None and outcome.reason.startswith("content hash mismatch")


def test_rows_without_the_revision_0002_columns_hash_as_before(db_engine: sa.Engine) -> None:
    """A row written before drift_index/reference_percentile existed (both NULL) keeps its original hash:
    the content is the first release's column set, nothing more."""
    rng = np.random.default_rng(11)
    entry = make_entry(rng)
    for report in entry.reports:
        for method_result in report.methods.values():
            cast(dict[str, Any], method_result).pop("drift_index")
            cast(dict[str, Any], method_result).pop("reference_percentile")
    first_release = [n for n in chain.DRIFT_CONTENT if n not in hashing.DRIFT_OPTIONAL_CONTENT]
    appended = chain.append(db_engine, entry)
    record = queries.get_record(db_engine, appended.id)
    assert record is not None
    rows = chain.drift_rows_from_reports(entry.reports)
    assert all(row["drift_index"] is None and row["reference_percentile"] is None for row in rows)
    content = {name: f"value of {name}" for name in chain.RECORD_CONTENT}
    old_rows = [{name: row[name] for name in first_release} for row in rows]
    assert chain.compute_row_hash(content, rows, "0" * 64) == chain.compute_row_hash(
        content, old_rows, "0" * 64
    )
    with_index = [{**row, "drift_index": 0.5} for row in rows]
    assert chain.compute_row_hash(content, with_index, "0" * 64) != chain.compute_row_hash(
        content, rows, "0" * 64
    )
    assert all(row["drift_index"] is None for row in record["drift"])
    # revision 0004's identity columns alike: absent from old rows, hashed once set
    assert all(row["model_digest"] is None and row["model_architecture"] is None for row in record["drift"])
    with_digest = [{**row, "model_digest": "ab" * 32} for row in rows]
    assert chain.compute_row_hash(content, with_digest, "0" * 64) != chain.compute_row_hash(
        content, rows, "0" * 64
    )
    assert chain.verify(db_engine).ok


def test_verify_names_the_row_after_a_deleted_one(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(4)
    results = append_many(db_engine, [make_entry(rng) for _ in range(4)])
    disable_append_only(db_engine)
    with db_engine.begin() as connection:
        connection.exec_driver_sql(f"DELETE FROM audit_drift WHERE record_id = {results[1].id}")
        connection.exec_driver_sql(f"DELETE FROM audit_records WHERE id = {results[1].id}")
    outcome = chain.verify(db_engine)
    assert not outcome.ok
    assert outcome.first_bad_id == results[2].id
    assert outcome.reason is not None and outcome.reason.startswith("broken link")


def test_verify_detects_a_deleted_drift_row(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(5)
    results = append_many(db_engine, [make_entry(rng) for _ in range(3)])
    disable_append_only(db_engine)
    with db_engine.begin() as connection:
        connection.exec_driver_sql(
            f"DELETE FROM audit_drift WHERE record_id = {results[0].id} AND method = 'gradcampp'"
        )
    outcome = chain.verify(db_engine)
    assert (outcome.ok, outcome.first_bad_id) == (False, results[0].id)


def test_verify_reports_the_head_and_detects_truncation_against_an_anchor(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(51)
    results = append_many(db_engine, [make_entry(rng) for _ in range(4)])
    outcome = chain.verify(db_engine)
    assert (outcome.head_id, outcome.head_hash) == (results[-1].id, results[-1].row_hash)
    assert outcome.anchor_found is None
    # an anchor anywhere in the chain (the head recorded some time ago) is found
    assert chain.verify(db_engine, anchor=results[1].row_hash).anchor_found is True
    assert chain.verify(db_engine, anchor=results[-1].row_hash.upper()).ok
    # deleting the newest rows leaves a valid, shorter chain: only the external anchor shows it
    disable_append_only(db_engine)
    with db_engine.begin() as connection:
        for victim in results[2:]:
            connection.exec_driver_sql(f"DELETE FROM audit_drift WHERE record_id = {victim.id}")
            connection.exec_driver_sql(f"DELETE FROM audit_records WHERE id = {victim.id}")
    assert chain.verify(db_engine).ok
    truncated = chain.verify(db_engine, anchor=results[-1].row_hash)
    assert not truncated.ok and truncated.anchor_found is False and truncated.first_bad_id is None
    assert truncated.reason is not None and "truncation" in truncated.reason
    assert (truncated.head_id, truncated.checked) == (results[1].id, 2)


def test_verify_reports_an_unreadable_row_instead_of_failing(db_engine: sa.Engine) -> None:
    """A JSON column edited into a value that cannot be hashed back is a bad row, not an exception."""
    rng = np.random.default_rng(52)
    results = append_many(db_engine, [make_entry(rng) for _ in range(3)])
    disable_append_only(db_engine)
    edits = ["""payload = '{"reports": [], "timings_ms": {"total": 1e999}}'"""]
    if db_engine.dialect.name == "sqlite":  # SQLite also stores whatever text it is given
        edits += ["payload = 'not json'", "options = '{\"topk\": NaN}'", "created_at = 'yesterday'"]
    for edit in edits:
        with db_engine.begin() as connection:
            connection.exec_driver_sql(f"UPDATE audit_records SET {edit} WHERE id = {results[1].id}")
        outcome = chain.verify(db_engine)
        assert (outcome.ok, outcome.first_bad_id, outcome.checked) == (False, results[1].id, 1), edit
        assert outcome.head_id == results[0].id and outcome.head_hash == results[0].row_hash


def test_triggers_reject_update_and_delete(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(6)
    append_many(db_engine, [make_entry(rng) for _ in range(2)])
    for table in ("audit_records", "audit_drift"):
        for statement in (f"UPDATE {table} SET id = id", f"DELETE FROM {table}"):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"), db_engine.begin() as connection:
                connection.exec_driver_sql(statement)
    assert chain.verify(db_engine) == chain.VerifyResult(ok=True, checked=2)


def test_postgresql_rejects_truncate(db_engine: sa.Engine) -> None:
    if db_engine.dialect.name != "postgresql":
        pytest.skip("TRUNCATE exists on PostgreSQL only")
    append_many(db_engine, [make_entry(np.random.default_rng(7))])
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), db_engine.begin() as connection:
        connection.exec_driver_sql("TRUNCATE audit_drift, audit_records")


def test_duplicate_request_id_is_refused_and_chain_unchanged(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(8)
    entry = make_entry(rng)
    chain.append(db_engine, entry)
    with pytest.raises(ValueError, match=entry.request_id):
        chain.append(db_engine, entry)
    assert chain.verify(db_engine) == chain.VerifyResult(ok=True, checked=1)


def test_naive_created_at_is_refused(db_engine: sa.Engine) -> None:
    entry = make_entry(np.random.default_rng(9), created_at=datetime(2026, 1, 1, 12, 0))
    with pytest.raises(ValueError, match="timezone-aware"):
        chain.append(db_engine, entry)


def test_concurrent_appends_keep_one_linear_chain(db_url: str) -> None:
    threads_count, per_thread = 4, 5
    engines = [make_engine(db_url) for _ in range(threads_count)]
    errors: list[BaseException] = []
    results: list[chain.AppendResult] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads_count)

    def work(index: int) -> None:
        rng = np.random.default_rng(100 + index)
        entries = [make_entry(rng, models=MODELS[:1]) for _ in range(per_thread)]
        try:
            barrier.wait()
            for entry in entries:
                result = chain.append(engines[index], entry)
                with lock:
                    results.append(result)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for engine in engines:
        engine.dispose()
    assert errors == []
    assert len(results) == threads_count * per_thread
    prev_hashes = [r.prev_hash for r in results]
    assert len(set(prev_hashes)) == len(prev_hashes), (
        "two rows link to the same predecessor: the chain forked"
    )
    engine = make_engine(db_url)
    try:
        assert chain.verify(engine) == chain.VerifyResult(ok=True, checked=threads_count * per_thread)
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------------ summaries

START = datetime(2026, 11, 27, 22, 0, tzinfo=UTC)  # a Friday


@pytest.fixture
def populated(db_engine: sa.Engine) -> tuple[sa.Engine, list[AuditEntry]]:
    rng = np.random.default_rng(10)
    # every 9 h over ~5 days: crosses the Sunday/Monday week boundary and several UTC days
    entries = [make_entry(rng, created_at=START + timedelta(hours=9 * i)) for i in range(14)]
    append_many(db_engine, entries)
    return db_engine, entries


def test_summary_matches_a_python_recomputation(populated: tuple[sa.Engine, list[AuditEntry]]) -> None:
    engine, entries = populated
    rows = drift_rows_of(entries)
    summary = summarize(engine, filters=AuditFilters(), group_by=["model", "method"])
    assert summary["total"] == len(rows)
    assert len(summary["groups"]) == len(MODELS) * len(METHODS)
    for group in summary["groups"]:
        members = [
            r for r in rows if r["model"] == group["key"]["model"] and r["method"] == group["key"]["method"]
        ]
        assert group["count"] == len(members)
        assert group["agreement_rate"] == pytest.approx(np.mean([r["agreement"] for r in members]))
        assert group["flagged_rate"] == pytest.approx(np.mean([r["flagged"] for r in members]))
        for name in STATISTICS:
            assert_stats_close(group["metrics"][name], expected_stats([r[name] for r in members]))


def test_summary_without_grouping_is_one_group(populated: tuple[sa.Engine, list[AuditEntry]]) -> None:
    engine, entries = populated
    rows = drift_rows_of(entries)
    summary = summarize(engine, filters=AuditFilters(), group_by=[])
    (group,) = summary["groups"]
    assert group["key"] == {}
    assert group["count"] == len(rows)
    assert_stats_close(group["metrics"]["iou"], expected_stats([r["iou"] for r in rows]))


def test_percentiles_match_numpy_for_groups_of_every_size(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(19)
    sizes = {"densenet201": 1, "resnet50v2": 2, "inceptionv3": 3, "vgg": 4, "vit": 7, "convnext": 13}
    entries = []
    for model, n in sizes.items():
        for _ in range(n):
            entry = make_entry(rng, models=[model], methods=METHODS[:1])
            # ties and repeated values are where rank-based percentiles go wrong
            entry.reports[0].methods[METHODS[0]]["metrics"]["iou"] = float(rng.choice([0.1, 0.5, 0.5, 0.9]))
            entries.append(entry)
    append_many(db_engine, entries)
    summary = summarize(db_engine, filters=AuditFilters(), group_by=["model"])
    assert {g["key"]["model"]: g["count"] for g in summary["groups"]} == sizes
    rows = drift_rows_of(entries)
    for group in summary["groups"]:
        members = [r for r in rows if r["model"] == group["key"]["model"]]
        for name in ("iou", "emd", "drift_score"):
            assert_stats_close(group["metrics"][name], expected_stats([r[name] for r in members]))


def test_sqlite_past_its_memory_bound_gives_the_same_numbers_in_sql(
    db_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's exact groups come from arrays of the rows up to exact.IN_MEMORY_ROWS, from window functions
    past it: the same groups, in the same order, and both equal to NumPy (a group with one value, a statistic
    with no value in a group, ties, null group keys)."""
    if db_engine.dialect.name != "sqlite":
        pytest.skip("the in-memory path is SQLite's")
    rng = np.random.default_rng(23)
    entries = []
    for i in range(9):
        models = MODELS if i else MODELS[:1]
        entry = make_entry(rng, created_at=START + timedelta(hours=7 * i), models=models)
        for report in entry.reports:
            for result in report.methods.values():
                result["metrics"]["iou"] = float(rng.choice([0.25, 0.5, 0.5]))
                if report.model == MODELS[1]:
                    result["metrics"]["ssim"] = None  # no value in any of that model's groups
        entries.append(entry)
    append_many(db_engine, entries)
    rows = drift_rows_of(entries)
    calls: list[int] = []
    in_sql = exact._statement_sqlite

    def counted(*args: Any) -> Any:
        calls.append(1)
        return in_sql(*args)

    monkeypatch.setattr(exact, "_statement_sqlite", counted)
    for names in ([], ["model", "method"], ["day", "agreement"], ["class", "digest"]):
        in_memory = summarize(db_engine, filters=AuditFilters(), group_by=names, mode="exact")["groups"]
        with monkeypatch.context() as bound:
            bound.setattr(exact, "IN_MEMORY_ROWS", 5)
            past_bound = summarize(db_engine, filters=AuditFilters(), group_by=names, mode="exact")["groups"]
        assert [g["key"] for g in in_memory] == [g["key"] for g in past_bound]
        typed = [[(k, type(v)) for k, v in g["key"].items()] for g in in_memory]
        assert typed == [[(k, type(v)) for k, v in g["key"].items()] for g in past_bound]  # True, not 1
        for a, b in zip(in_memory, past_bound, strict=True):
            assert a["count"] == b["count"]
            assert a["agreement_rate"] == pytest.approx(b["agreement_rate"], rel=1e-12)
            assert a["flagged_rate"] == pytest.approx(b["flagged_rate"], rel=1e-12)
            for name in STATISTICS:
                assert_stats_close(a["metrics"][name], b["metrics"][name])
        for group in in_memory:
            members = [
                r for r in rows if all(r[n] == v for n, v in group["key"].items() if n in ("model", "method"))
            ]
            if set(group["key"]) <= {"model", "method"}:
                assert group["count"] == len(members)
                for name in ("iou", "drift_score", "ssim"):
                    values = [r[name] for r in members if r[name] is not None]
                    expected = expected_stats(values) if values else {"n": 0, "mean": None, "sd": None}
                    if not values:
                        expected.update({f"p{p}": None for p in (5, 25, 50, 75, 95)})
                    assert_stats_close(group["metrics"][name], expected)
    assert len(calls) == 4  # past the bound, every call took the SQL path


@pytest.mark.parametrize("mode", ["exact", "auto"])
def test_a_selection_with_no_rows_has_no_groups_on_every_path(
    populated: tuple[sa.Engine, list[AuditEntry]], mode: str
) -> None:
    engine, _ = populated
    for names in ([], ["model"], ["day", "method"]):
        summary = summarize(engine, filters=AuditFilters(model="no-such-model"), group_by=names, mode=mode)
        assert summary["groups"] == [] and summary["total"] == 0, (names, summary["source"])


def test_null_metrics_are_left_out_of_statistics(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(11)
    entries = [make_entry(rng, models=MODELS[:1], methods=METHODS[:1]) for _ in range(5)]
    for entry in entries[:2]:
        entry.reports[0].methods[METHODS[0]]["metrics"]["ssim"] = None
    append_many(db_engine, entries)
    (group,) = summarize(db_engine, filters=AuditFilters(), group_by=[])["groups"]
    kept = [e.reports[0].methods[METHODS[0]]["metrics"]["ssim"] for e in entries[2:]]
    assert_stats_close(group["metrics"]["ssim"], expected_stats(kept))
    assert group["metrics"]["iou"]["n"] == 5


FILTER_CASES = [
    AuditFilters(model="resnet50v2"),
    AuditFilters(method="gradcampp"),
    AuditFilters(target_class="normal"),
    AuditFilters(agreement=True),
    AuditFilters(agreement=False),
    AuditFilters(severity="high"),
    AuditFilters(flagged=True),
    AuditFilters(start=START + timedelta(days=1), end=START + timedelta(days=3)),
    AuditFilters(start=START + timedelta(days=1), model="densenet201", flagged=False),
]


def test_filters_select_the_same_rows_as_python(populated: tuple[sa.Engine, list[AuditEntry]]) -> None:
    engine, entries = populated
    for filters in FILTER_CASES:
        check_filters(engine, entries, filters)


def check_filters(engine: sa.Engine, entries: list[AuditEntry], filters: AuditFilters) -> None:

    def keep(row: dict[str, Any]) -> bool:
        checks = [
            filters.start is None or row["created_at"] >= filters.start,
            filters.end is None or row["created_at"] < filters.end,
            filters.model is None or row["model"] == filters.model,
            filters.method is None or row["method"] == filters.method,
            filters.target_class is None or row["class"] == filters.target_class,
            filters.agreement is None or row["agreement"] == filters.agreement,
            filters.severity is None or row["severity"] == filters.severity,
            filters.flagged is None or row["flagged"] == filters.flagged,
        ]
        return all(checks)

    rows = [r for r in drift_rows_of(entries) if keep(r)]
    assert rows, f"the fixture data should exercise every filter: {filters}"
    summary = summarize(engine, filters=filters, group_by=["class"])
    assert summary["total"] == len(rows)
    by_class: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_class[row["class"]].append(row["drift_score"])
    assert {g["key"]["class"]: g["count"] for g in summary["groups"]} == {
        k: len(v) for k, v in by_class.items()
    }
    for group in summary["groups"]:
        assert_stats_close(group["metrics"]["drift_score"], expected_stats(by_class[group["key"]["class"]]))

    exported = list(csv.DictReader(io.StringIO("".join(queries.export_csv(engine, filters=filters)))))
    assert len(exported) == len(rows)
    listed_ids: set[int] = set()
    page = queries.list_records(engine, filters=filters, limit=3)
    while True:
        listed_ids.update(item["id"] for item in page.items)
        if page.next_before_id is None:
            break
        page = queries.list_records(engine, filters=filters, limit=3, before_id=page.next_before_id)
    assert listed_ids == {int(row["record_id"]) for row in exported}


@pytest.mark.parametrize("unit", ["day", "week"])
def test_grouping_by_day_and_week_uses_utc_dates(db_engine: sa.Engine, unit: str) -> None:
    rng = np.random.default_rng(12)
    plus_five = timezone(timedelta(hours=5))
    stamps = [
        datetime(2026, 11, 29, 23, 59, 59, 999999, tzinfo=UTC),  # Sunday, last microsecond
        datetime(2026, 11, 30, 0, 0, tzinfo=UTC),  # Monday: a new day and a new ISO week
        datetime(2026, 11, 30, 3, 0, tzinfo=plus_five),  # = Sunday 22:00 UTC
        datetime(2026, 12, 31, 12, 0, tzinfo=UTC),  # Thursday; its week starts on Monday 28 December
        datetime(2027, 1, 3, 12, 0, tzinfo=UTC),  # Sunday of that same week, in the next year
    ]
    entries = [make_entry(rng, created_at=stamp, models=MODELS[:1], methods=METHODS[:1]) for stamp in stamps]
    append_many(db_engine, entries)
    summary = summarize(db_engine, filters=AuditFilters(), group_by=[unit])
    expected: dict[str, int] = defaultdict(int)
    for stamp in stamps:
        day = stamp.astimezone(UTC).date()
        key = day if unit == "day" else day - timedelta(days=day.weekday())
        expected[key.isoformat()] += 1
    assert {g["key"][unit]: g["count"] for g in summary["groups"]} == dict(expected)


def test_group_by_rejects_unknown_values(db_engine: sa.Engine) -> None:
    with pytest.raises(
        InputError, match="valid options: model, architecture, digest, method, class, agreement, day, week"
    ) as info:
        summarize(db_engine, filters=AuditFilters(), group_by=["hour"])
    assert info.value.code == "validation_error"


def test_agreeing_and_disagreeing_requests_are_summarized_apart(
    populated: tuple[sa.Engine, list[AuditEntry]],
) -> None:
    engine, entries = populated
    rows = drift_rows_of(entries)
    summary = summarize(engine, filters=AuditFilters(), group_by=["agreement", "method"])
    assert {(g["key"]["agreement"], g["key"]["method"]) for g in summary["groups"]} == {
        (bool(r["agreement"]), r["method"]) for r in rows
    }
    for group in summary["groups"]:
        members = [
            r
            for r in rows
            if bool(r["agreement"]) == group["key"]["agreement"] and r["method"] == group["key"]["method"]
        ]
        assert group["count"] == len(members)
        assert group["agreement_rate"] == float(group["key"]["agreement"])
        assert_stats_close(
            group["metrics"]["drift_index"], expected_stats([r["drift_index"] for r in members])
        )


def _with_iou(entries: list[AuditEntry], iou: Any) -> list[AuditEntry]:
    """Set every report's IoU to ``iou(entry_index, model, method)``."""
    for index, entry in enumerate(entries):
        for report in entry.reports:
            for method, result in report.methods.items():
                result["metrics"]["iou"] = iou(index, report.model, method)
    return entries


def _engine_reversal(
    entries: list[AuditEntry], ids: list[int], first: str, second: str, **options: Any
) -> dict[str, Any]:
    """The oracle: engine.ranking.reversal_test on the values as written, keyed by record id."""
    records = [
        (record_id, report.model, method, result["metrics"]["iou"])
        for record_id, entry in zip(ids, entries, strict=True)
        for report in entry.reports
        for method, result in report.methods.items()
    ]
    tables = method_tables(records)
    return reversal_test(tables.get(first, {}), tables.get(second, {}), **options)


def test_ranking_and_its_reversal_between_methods(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(13)
    # LayerCAM: inceptionv3 most stable, resnet50v2 least; GradCAM++: densenet201 first, inceptionv3 last
    base_iou = {
        "layercam": {"inceptionv3": 0.78, "densenet201": 0.70, "resnet50v2": 0.55},
        "gradcampp": {"densenet201": 0.75, "resnet50v2": 0.66, "inceptionv3": 0.60},
    }
    entries = _with_iou(
        [make_entry(rng) for _ in range(10)],
        lambda _, model, method: base_iou[method][model] + float(rng.uniform(-0.02, 0.02)),
    )
    ids = [result.id for result in append_many(db_engine, entries)]
    ranking = summarize(db_engine, filters=AuditFilters(), group_by=[], n_boot=400)["ranking"]
    rows = drift_rows_of(entries)
    means = {
        (m, model): np.mean([r["iou"] for r in rows if r["method"] == m and r["model"] == model])
        for m in METHODS
        for model in MODELS
    }
    for method in METHODS:
        order = [e["model"] for e in ranking["per_method"][method]]
        assert order == sorted(MODELS, key=lambda model: -means[(method, model)])
        for entry in ranking["per_method"][method]:
            assert entry["mean_iou"] == pytest.approx(means[(method, entry["model"])])
    (comparison,) = ranking["comparisons"]
    first, second = comparison["methods"]
    models = sorted(MODELS)
    expected_tau = kendalltau([means[(first, m)] for m in models], [means[(second, m)] for m in models])
    assert comparison["kendall_tau"] == pytest.approx(expected_tau.statistic)
    assert comparison["kendall_tau"] < 0
    # a strong interaction on 10 records: the orders differ and the interaction tests say it is not chance
    assert comparison["reversal"] is True and comparison["rank_changed"] is True
    assert comparison["reversal_descriptive"] is True and comparison["significant_pairs"]
    assert comparison["bootstrap"]["p_order_differs"] > 0.9
    assert comparison["reversed_pairs"] == [["densenet201", "inceptionv3"], ["inceptionv3", "resnet50v2"]]
    assert comparison["order"] == {m: [e["model"] for e in ranking["per_method"][m]] for m in METHODS}
    assert comparison["n_images"] == 10 and comparison["n_images_left_out"] == 0
    assert isinstance(comparison["note"], str)
    expected = _engine_reversal(entries, ids, first, second, n_boot=400)
    assert comparison["reversal"] == expected["reversal"]
    assert comparison["interaction_tests"] == expected["interaction_tests"]
    assert comparison["bootstrap"] == expected["bootstrap"]


def test_the_verdict_is_repeated_under_the_head_scale_control(db_engine: sa.Engine) -> None:
    """GradCAM++ reverses LayerCAM's order, but with the head scale matched (the control) it ranks like
    LayerCAM: the reversal is head scale, and the summary says so, as engine.ranking does on the same values."""
    rng = np.random.default_rng(17)
    base_iou = {
        "layercam": {"inceptionv3": 0.78, "densenet201": 0.70, "resnet50v2": 0.55},
        "gradcampp": {"densenet201": 0.75, "resnet50v2": 0.66, "inceptionv3": 0.60},
    }
    entries = _with_iou(
        [make_entry(rng) for _ in range(10)],
        lambda _, model, method: base_iou[method][model] + float(rng.uniform(-0.02, 0.02)),
    )
    for entry in entries:
        for report in entry.reports:
            control_iou = report.methods["layercam"]["metrics"]["iou"] + float(rng.uniform(-0.01, 0.01))
            report.methods["gradcampp"]["diagnostics"]["head_scale_control"] = {
                "residual_drift_score": 1.0 - control_iou
            }
    ids = [result.id for result in append_many(db_engine, entries)]
    (comparison,) = summarize(db_engine, filters=AuditFilters(), group_by=[], n_boot=300)["ranking"][
        "comparisons"
    ]
    assert comparison["methods"] == ["gradcampp", "layercam"] and comparison["reversal"] is True
    control = comparison["head_scale_control"]
    assert control["replaces"] == "gradcampp" and control["n_images"] == 10
    assert control["reversal"] is False and control["reversal_descriptive"] is False
    records = [
        (record_id, report.model, method, result["metrics"]["iou"])
        for record_id, entry in zip(ids, entries, strict=True)
        for report in entry.reports
        for method, result in report.methods.items()
    ]
    controls = [
        (
            record_id,
            report.model,
            "gradcampp",
            1.0 - report.methods["gradcampp"]["diagnostics"]["head_scale_control"]["residual_drift_score"],
        )
        for record_id, entry in zip(ids, entries, strict=True)
        for report in entry.reports
    ]
    expected = reversal_test(
        method_tables(controls)["gradcampp"], method_tables(records)["layercam"], n_boot=300
    )
    assert control["interaction_tests"] == expected["interaction_tests"]
    assert control["bootstrap"] == expected["bootstrap"] and control["reversal"] == expected["reversal"]
    rows = queries.list_records(db_engine, filters=AuditFilters(), limit=1).items[0]["drift"]
    layercam_rows = [d for d in rows if d["method"] == "layercam"]
    assert all(d["head_scale_control_iou"] is None for d in layercam_rows)
    assert chain.verify(db_engine).ok


def test_reversal_verdict_on_per_record_values_equals_the_engines(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(31)
    # no interaction: the same architecture effects under both methods, small and close, plus noise
    effect = {"densenet201": 0.60, "resnet50v2": 0.605, "inceptionv3": 0.61}
    shift = {"layercam": 0.0, "gradcampp": -0.1}
    entries = [make_entry(rng) for _ in range(16)]
    entries.append(make_entry(rng, models=("densenet201", "resnet50v2")))  # one model missing: left out
    noise = {(i, m, meth): rng.normal(0, 0.08) for i in range(17) for m in MODELS for meth in METHODS}
    image = [rng.normal(0, 0.1) for _ in range(17)]
    _with_iou(
        entries, lambda i, model, method: effect[model] + shift[method] + image[i] + noise[(i, model, method)]
    )
    ids = [result.id for result in append_many(db_engine, entries)]
    summary = summarize(db_engine, filters=AuditFilters(), group_by=[], n_boot=300, seed=4)
    (comparison,) = summary["ranking"]["comparisons"]
    first, second = comparison["methods"]
    expected = _engine_reversal(entries, ids, first, second, n_boot=300, seed=4)
    assert comparison["n_images"] == expected["n_images"] == 16 and comparison["n_images_left_out"] == 1
    for key in ("reversal", "reversal_descriptive", "interaction_tests", "bootstrap", "significant_pairs"):
        assert comparison[key] == expected[key], key
    assert comparison["order"] == {first: expected["order_a"], second: expected["order_b"]}
    assert comparison["means"] == {first: expected["means_a"], second: expected["means_b"]}
    assert comparison["rank_changed"] == expected["reversal_descriptive"]
    # no interaction: the means of this draw swap by chance (the old rule's "reversal"), the verdict says no
    assert comparison["rank_changed"] is True and comparison["reversal"] is False
    # the interaction by hand for one pair, against scipy
    by_key = {
        (record_id, report.model, method): result["metrics"]["iou"]
        for record_id, entry in zip(ids[:16], entries[:16], strict=True)
        for report in entry.reports
        for method, result in report.methods.items()
    }
    a, b = "densenet201", "inceptionv3"
    d = [
        (by_key[(r, a, first)] - by_key[(r, b, first)]) - (by_key[(r, a, second)] - by_key[(r, b, second)])
        for r in ids[:16]
    ]
    test = next(t for t in comparison["interaction_tests"] if (t["model_a"], t["model_b"]) == (a, b))
    assert test["p_value"] == pytest.approx(wilcoxon(d).pvalue)
    # filters apply: one model left leaves no verdict
    (only,) = summarize(db_engine, filters=AuditFilters(model="resnet50v2"), group_by=[], n_boot=50)[
        "ranking"
    ]["comparisons"]
    assert only["reversal"] is None and "at least 2" in only["note"]


def test_ranking_breaks_ties_by_name_and_leaves_models_without_iou_unranked(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(21)
    iou = {"resnet50v2": 0.5, "densenet201": 0.5, "inceptionv3": None}
    entries = []
    for _ in range(2):
        entry = make_entry(rng, methods=METHODS)
        for report in entry.reports:
            for result in report.methods.values():
                result["metrics"]["iou"] = iou[report.model]
        entries.append(entry)
    append_many(db_engine, entries)
    ranking = summarize(db_engine, filters=AuditFilters(), group_by=[])["ranking"]
    for method in METHODS:
        ranked = [(e["model"], e["rank"]) for e in ranking["per_method"][method]]
        assert ranked == [("densenet201", 1), ("resnet50v2", 2), ("inceptionv3", None)]
    (comparison,) = ranking["comparisons"]
    assert comparison["models"] == ["densenet201", "resnet50v2"]
    assert comparison["kendall_tau"] is None and comparison["note"]
    # two records: too few for a verdict; the means tie, so the orders do not differ either
    assert comparison["reversal"] is None and not comparison["rank_changed"]
    assert comparison["n_images"] == 2 and "at least 6" in comparison["note"]
    assert comparison["reversed_pairs"] == []


# ------------------------------------------------------------------------------------ records, export


def test_list_records_pages_newest_first(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(14)
    results = append_many(db_engine, [make_entry(rng) for _ in range(7)])
    seen: list[int] = []
    page = queries.list_records(db_engine, filters=AuditFilters(), limit=3)
    while True:
        seen.extend(item["id"] for item in page.items)
        for item in page.items:
            assert len(item["drift"]) == len(MODELS) * len(METHODS)
            assert "reports" not in item
        if page.next_before_id is None:
            break
        page = queries.list_records(db_engine, filters=AuditFilters(), limit=3, before_id=page.next_before_id)
    assert seen == [r.id for r in reversed(results)]
    with pytest.raises(ValueError, match="limit"):
        queries.list_records(db_engine, filters=AuditFilters(), limit=0)


@pytest.mark.parametrize(
    "filters",
    [AuditFilters(flagged=True), AuditFilters(agreement=False, target_class="Effusion")],
    ids=["flagged", "agreement-class"],
)
def test_sqlite_lists_filtered_records_through_each_records_drift_rows(
    db_engine: sa.Engine, filters: AuditFilters
) -> None:
    """The page query looks up each record's few drift rows by record_id; with a filter's own index inside
    the per-record subquery SQLite scanned every flagged drift row per record (9.8 s a page at 300,000
    records)."""
    if db_engine.dialect.name != "sqlite":
        pytest.skip("SQLite's query planner")
    rng = np.random.default_rng(16)
    append_many(db_engine, [make_entry(rng) for _ in range(3)])
    statements: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if "EXISTS" in statement:
            statements.append((statement, parameters))

    sa.event.listen(db_engine, "before_cursor_execute", keep)
    try:
        queries.list_records(db_engine, filters=filters, limit=5)
    finally:
        sa.event.remove(db_engine, "before_cursor_execute", keep)
    assert len(statements) == 1
    with db_engine.connect() as connection:
        plan = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statements[0][0]}", statements[0][1]).all()
    drift_steps = [row[3] for row in plan if "audit_drift" in row[3]]
    assert drift_steps and all("(record_id=" in step for step in drift_steps), plan


def test_get_record_returns_what_was_written(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(15)
    entry = make_entry(rng, created_at=datetime(2026, 11, 26, 12, 30, 15, 123456, tzinfo=UTC))
    result = chain.append(db_engine, entry)
    record = queries.get_record(db_engine, result.id)
    assert record is not None
    assert record["request_id"] == entry.request_id
    assert record["created_at"] == "2026-11-26T12:30:15.123456Z"
    assert record["image_sha256"] == entry.image_sha256
    assert record["reports"] == [report.to_dict() for report in entry.reports]
    assert record["timings_ms"] == entry.timings_ms
    assert record["options"] == entry.options
    assert queries.get_record(db_engine, result.id + 1000) is None


def test_export_csv_has_one_line_per_record_model_method(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(16)
    entries = [make_entry(rng) for _ in range(3)]
    append_many(db_engine, entries)
    lines = list(queries.export_csv(db_engine, filters=AuditFilters()))
    assert lines[0].rstrip("\n").split(",") == list(queries.CSV_COLUMNS)
    rows = list(csv.DictReader(io.StringIO("".join(lines))))
    expected = drift_rows_of(entries)
    assert len(rows) == len(expected)
    order = [(r["request_id"], r["model"], r["method"]) for r in rows]
    assert order == sorted(order, key=lambda key: ([e.request_id for e in entries].index(key[0]), key[1:]))
    by_key = {(r["request_id"], r["model"], r["method"]): r for r in rows}
    for entry in entries:
        for report in entry.reports:
            for method, result in report.methods.items():
                row = by_key[(entry.request_id, report.model, method)]
                assert float(row["iou"]) == result["metrics"]["iou"]
                assert row["severity"] == result["severity"]


# ---------------------------------------------------------------------------------------- availability


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////nonexistent-directory/cxr-drift/audit.db",
        "postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2",
    ],
    ids=["sqlite", "postgresql"],
)
def test_unreachable_database_raises_database_unavailable(url: str) -> None:
    engine = make_engine(url)
    entry = make_entry(np.random.default_rng(17))
    calls = [
        lambda: chain.append(engine, entry),
        lambda: chain.verify(engine),
        lambda: summarize(engine, filters=AuditFilters(), group_by=["model"]),
        lambda: queries.list_records(engine, filters=AuditFilters()),
        lambda: queries.get_record(engine, 1),
        lambda: queries.export_csv(engine, filters=AuditFilters()),
        lambda: check_writable(engine),
    ]
    for call in calls:
        with pytest.raises(DatabaseUnavailable, match="audit database unavailable"):
            call()
    engine.dispose()


def test_check_writable(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        with pytest.raises(DatabaseUnavailable, match="upgrade"):
            check_writable(engine)
        upgrade(empty_db_url)
        check_writable(engine)
    finally:
        engine.dispose()


def test_make_engine_configures_sqlite_for_durability(db_engine: sa.Engine) -> None:
    if db_engine.dialect.name != "sqlite":
        pytest.skip("SQLite pragmas")
    with db_engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert (connection.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) > 0


def test_make_engine_bounds_the_postgresql_connect_time(db_engine: sa.Engine) -> None:
    if db_engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL connection parameters")
    with db_engine.connect() as connection:
        dsn = connection.connection.driver_connection.info.dsn  # type: ignore[union-attr]
    assert "connect_timeout=10" in dsn


def test_make_engine_refuses_unknown_urls() -> None:
    with pytest.raises(ValueError, match="psycopg"):
        make_engine("postgresql+psycopg2://u@h/db")
    with pytest.raises(ValueError, match="expected one of"):
        make_engine("mysql://u@h/db")


def test_a_report_missing_a_key_writes_nothing(db_engine: sa.Engine) -> None:
    """Reports are typed (a missing key is a type error); at run time the append fails before writing."""
    entry = make_entry(np.random.default_rng(18))
    del cast(dict[str, Any], entry.reports[1].methods["layercam"])["severity"]
    with pytest.raises(KeyError, match="severity"):
        chain.append(db_engine, entry)
    assert chain.verify(db_engine) == chain.VerifyResult(ok=True, checked=0)


def test_a_model_reported_twice_is_refused(db_engine: sa.Engine) -> None:
    entry = make_entry(np.random.default_rng(20), models=MODELS[:1])
    entry.reports = [*entry.reports, *entry.reports]
    with pytest.raises(ValueError, match="must appear once"):
        chain.append(db_engine, entry)
