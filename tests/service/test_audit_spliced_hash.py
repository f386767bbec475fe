"""Issue 12: the row hash assembled from canonical pieces (append serialises before the chain lock, verify
hashes the stored JSON text as it is) equals compute_row_hash, the definition; rows stored in the earlier
JSON form still verify; a text moved across the options/payload boundary is not accepted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import numpy as np
import pytest
import sqlalchemy as sa

from service.audit import chain, db, hashing
from service.audit.tables import AuditRecord
from tests.db_fixtures import make_entry
from tests.service.test_audit_db import disable_append_only


def _odd_entry(rng: np.random.Generator, i: int) -> chain.AuditEntry:
    """Entries with the values that canonical JSON treats specially: escapes, non-ASCII, None, -0.0,
    big ints, microseconds, a non-UTC offset, nested keys named like the record's own."""
    entry = make_entry(rng, api_key_name=[None, 'clé "quoted" \\ back', "tester"][i % 3])
    entry.request_id = f'{entry.request_id}-"\\é{i}'
    entry.created_at = datetime(2026, 3, 1, 12, 0, i, 123 * i, tzinfo=UTC).astimezone(
        timezone(timedelta(hours=-5))
    )
    entry.options = {
        "payload": {"options": [1, 2.5, -0.0]},
        "zz": "\u2028\x00",
        "big": 2**63 - 1,
        "empty": {},
        "list": [],
        "nested": {"b": None, "a": True},
    }
    entry.timings_ms = {"total": float(rng.uniform()), "ünï": 1e-7, "big": 1e300}
    if i % 2:
        entry.maps = {"layercam": [[0, 255], [1, 2]]}
    report = entry.reports[0]
    report.methods["layercam"]["metrics"]["ssim"] = float("nan")
    report.methods["layercam"]["metrics"]["pearson"] = -0.0
    if i % 3 == 0:
        cast(dict[str, Any], report.methods["gradcampp"]).pop("drift_index")  # optional columns unset
    return entry


def test_spliced_hash_equals_compute_row_hash() -> None:
    rng = np.random.default_rng(41)
    prev = chain.GENESIS_HASH
    for i in range(40):
        entry = _odd_entry(rng, i) if i % 2 else make_entry(rng)
        record = chain._record_values(entry)
        rows = chain.drift_rows_from_reports(entry.reports)
        content = {
            **record,
            "created_at": chain.utc_iso(record["created_at"]),
            **{name: db.stored_json(record[name]) for name in ("options", "payload")},
        }
        contents = [
            hashing.drift_content((name, row[name]) for name in hashing.DRIFT_CONTENT) for row in rows
        ]
        spliced = hashing.spliced_hash(hashing.document_parts(content, hashing.drift_json(contents)), prev)
        assert spliced == chain.compute_row_hash(record, rows, prev)
        # the stored JSON text is the canonical JSON of the value, the text the hash covers
        assert db.stored_json(record["payload"]) == chain.canonical_json(record["payload"])
        prev = spliced


def test_appended_hashes_are_compute_row_hash_and_the_stored_text_is_canonical(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(42)
    entries = [_odd_entry(rng, i) for i in range(6)]
    prev = chain.GENESIS_HASH
    for entry in entries:
        result = chain.append(db_engine, entry)
        record = chain._record_values(entry)
        assert result.prev_hash == prev
        assert result.row_hash == chain.compute_row_hash(
            record, chain.drift_rows_from_reports(entry.reports), prev
        )
        prev = result.row_hash
    as_text = "" if db_engine.dialect.name == "sqlite" else "::text"
    with db_engine.connect() as connection:
        texts = connection.exec_driver_sql(
            f"SELECT options{as_text}, payload{as_text} FROM audit_records ORDER BY id"
        ).all()
    for (options, payload), entry in zip(texts, entries, strict=True):
        record = chain._record_values(entry)
        assert (options, payload) == (db.stored_json(record["options"]), db.stored_json(record["payload"]))
    assert chain.verify(db_engine) == chain.VerifyResult(ok=True, checked=len(entries))


def test_rows_stored_in_the_earlier_json_form_still_verify(db_engine: sa.Engine) -> None:
    """Rows written before canonical storage hold json.dumps's default text: their hash is unchanged."""
    rng = np.random.default_rng(43)
    results = [chain.append(db_engine, _odd_entry(rng, i)) for i in range(4)]
    disable_append_only(db_engine)
    pg = db_engine.dialect.name == "postgresql"
    with db_engine.begin() as connection:
        for result in results[:3]:
            row = connection.execute(
                sa.select(AuditRecord.options, AuditRecord.payload).where(AuditRecord.id == result.id)
            ).one()
            values = [db.legacy_stored_json(value) for value in (row.options, row.payload)]
            assert values[1] != db.stored_json(row.payload)  # the forms differ
            connection.execute(
                sa.text(
                    "UPDATE audit_records SET options = CAST(:options AS json), payload = CAST(:payload AS json) "
                    "WHERE id = :id"
                    if pg
                    else "UPDATE audit_records SET options = :options, payload = :payload WHERE id = :id"
                ),
                {"options": values[0], "payload": values[1], "id": result.id},
            )
    assert chain.verify(db_engine) == chain.VerifyResult(ok=True, checked=4)
    since = chain.verify(db_engine, since=(results[0].id, results[0].row_hash))
    assert since.ok and since.checked == 3


def test_text_moved_across_the_options_payload_boundary_is_refused(sqlite_url: str) -> None:
    """Options ending in a nested key "payload": its tail moved into the payload column leaves the hashed
    concatenation unchanged (asserted), but neither column holds what was hashed; verify must refuse it."""
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    try:
        rng = np.random.default_rng(44)
        entries = [make_entry(rng) for _ in range(3)]
        entries[1].options = {"a": 1, "payload": 2}
        results = [chain.append(engine, entry) for entry in entries]
        victim = results[1]
        with engine.connect() as connection:
            options, payload = connection.exec_driver_sql(
                f"SELECT options, payload FROM audit_records WHERE id = {victim.id}"
            ).one()
        assert options == '{"a":1,"payload":2}'
        moved_options, moved_payload = '{"a":1', '2},"payload":' + payload
        assert moved_options + ',"payload":' + moved_payload == options + ',"payload":' + payload
        disable_append_only(engine)
        with engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE audit_records SET options = :o, payload = :p WHERE id = :id"),
                {"o": moved_options, "p": moved_payload, "id": victim.id},
            )
        outcome = chain.verify(engine)
        assert (outcome.ok, outcome.first_bad_id, outcome.checked) == (False, victim.id, 1), outcome
        assert (outcome.reason or "").startswith("unreadable row")
    finally:
        engine.dispose()


@pytest.mark.parametrize("batch_size", [1, 2, 1000])
def test_verify_pages_carry_the_link_and_the_drift_rows(db_engine: sa.Engine, batch_size: int) -> None:
    """Pages of records with their drift rows fetched per page: every page boundary keeps the link check,
    and a drift row deleted from a record at a boundary is still found."""
    rng = np.random.default_rng(45)
    results = [chain.append(db_engine, make_entry(rng)) for _ in range(5)]
    assert chain.verify(db_engine, batch_size=batch_size) == chain.VerifyResult(ok=True, checked=5)
    since = chain.verify(db_engine, batch_size=batch_size, since=(results[1].id, results[1].row_hash))
    assert since.ok and since.checked == 3
    disable_append_only(db_engine)
    with db_engine.begin() as connection:
        connection.exec_driver_sql(
            f"DELETE FROM audit_drift WHERE record_id = {results[3].id} AND method = 'layercam'"
        )
    outcome = chain.verify(db_engine, batch_size=batch_size)
    assert (outcome.ok, outcome.first_bad_id, outcome.checked) == (False, results[3].id, 3)
