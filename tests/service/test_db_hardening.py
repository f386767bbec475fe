"""Issue 11 (database items): 64-bit ids, database errors as clear answers, generic /readyz reasons,
verification over the stored text."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from service.audit import chain, db, queries
from service.audit.tables import AuditDrift
from tests.api_fixtures import ApiClient, error_of, free_port, headers, make_settings, started
from tests.db_fixtures import MODELS, make_entry, make_report

INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1


def column_types(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND (column_name = 'id' OR column_name = 'record_id')"
        ).all()
    return {str(name): str(kind) for name, kind in rows}


# ------------------------------------------------------------------------------------- 64-bit ids


@pytest.mark.postgres
def test_bigint_migration_down_and_up_with_data_then_ids_beyond_int4(pg_url: str) -> None:
    """Rows are written at the newest revision (so the test holds whatever revisions follow 0003), taken
    down to 0002 (int4) and up again (bigint) with their hashes intact; then ids go past int4."""
    rng = np.random.default_rng(11)
    db.upgrade(pg_url)
    engine = db.make_engine(pg_url)
    try:
        appended = [chain.append(engine, make_entry(rng)) for _ in range(3)]
        db.downgrade(pg_url, "0002")
        # (the chain is verified after the upgrade: today's code reads columns of later revisions)
        assert set(column_types(engine).values()) == {"integer"}
        db.upgrade(pg_url)
        types = column_types(engine)
        assert {"audit_records.id", "audit_drift.id", "audit_drift.record_id", "api_keys.id"} <= set(types)
        assert set(types.values()) == {"bigint"}, types
        result = chain.verify(engine)
        assert result.ok and result.checked == 3 and result.head_hash == appended[-1].row_hash
        record = queries.get_record(engine, appended[1].id)
        assert record is not None and record["row_hash"] == appended[1].row_hash
        # the sequences go past int4 too
        with engine.begin() as connection:
            for table in ("audit_records", "audit_drift"):
                connection.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {INT4_MAX + 10})"
                )
        big = chain.append(engine, make_entry(rng))
        assert big.id == INT4_MAX + 11 and big.prev_hash == appended[-1].row_hash
        assert chain.verify(engine).ok and chain.verify(engine).checked == 4
        record = queries.get_record(engine, big.id)
        assert record is not None and record["drift"]
        assert queries.get_record(engine, INT8_MAX) is None
        page = queries.list_records(engine, filters=queries.AuditFilters(), before_id=INT8_MAX)
        assert next(item["id"] for item in page.items) == big.id
        # a downgrade would truncate the id: refused, nothing changed
        with pytest.raises(RuntimeError, match="refusing to downgrade below 0003"):
            db.downgrade(pg_url, "0002")
        assert db.current_revision(engine) == db.head_revision()
        assert chain.verify(engine).checked == 4
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def audit_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ApiClient]:
    """The app with no model pair (the audit routes need only the database)."""
    url = (
        f"sqlite:///{tmp_path / 'audit.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    with started(make_settings(tmp_path / "no-artifacts", url)) as app:
        chain.append(app.app.state.cxr.engine, make_entry(np.random.default_rng(3)))
        yield app


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (f"/audit/records/{INT4_MAX + 1}", 404),
        (f"/audit/records/{INT8_MAX}", 404),
        (f"/audit/records?before_id={INT4_MAX + 1}", 200),
        (f"/audit/records?before_id={INT8_MAX}", 200),
    ],
)
def test_64_bit_ids_are_answered_not_500(audit_app: ApiClient, path: str, status: int) -> None:
    response = audit_app.get(path, headers=headers("audit"))
    assert response.status_code == status, response.text
    if status == 200:
        assert len(response.json()["items"]) == 1


def test_a_database_error_is_answered_by_the_exception_middleware(
    audit_app: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A driver error that is not an outage: 422 for a refused value, else a JSON 500 with the request id,
    answered without re-raising (the ASGI client here raises app exceptions: a re-raise would fail the
    test, and on a real server it closes the keep-alive connection)."""

    def refuse() -> None:
        raise sa.exc.DataError("SELECT 1", {}, Exception("integer out of range"))

    def broken() -> None:
        raise sa.exc.ProgrammingError("SELECT nope", {}, Exception("relation does not exist"))

    audit_app.app.add_api_route("/refuse", refuse, methods=["GET"])
    audit_app.app.add_api_route("/broken", broken, methods=["GET"])
    refused = audit_app.get("/refuse")
    assert refused.status_code == 422 and error_of(refused)["code"] == "invalid_input"
    with caplog.at_level(logging.ERROR, logger="service.app.errors"):
        failed = audit_app.get("/broken")
    assert failed.status_code == 500
    error = error_of(failed)
    assert error["code"] == "internal_error" and "relation" not in error["message"]
    assert error["details"]["request_id"] == failed.headers["x-request-id"]
    assert any(error["details"]["request_id"] in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------ /readyz exposure


def test_readyz_names_no_host_port_or_credentials_of_a_database_that_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+psycopg://secret_user:hunter2pw@127.0.0.1:{port}/secret_db"
    settings = make_settings(tmp_path / "no-artifacts", url, migrate_on_start=False)
    with started(settings) as app, caplog.at_level(logging.WARNING, logger="service.app.routes.health"):
        response = app.get("/readyz")
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "not_ready" and "audit database" in error["message"]
    for secret in ("secret_user", "hunter2pw", "secret_db", str(port), "127.0.0.1", "connection"):
        assert secret not in response.text, secret
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert str(port) in logged and "hunter2pw" not in logged


# ------------------------------------------------------------------------ verification of stored text


def _drop_update_triggers(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        for table in ("audit_records", "audit_drift"):
            if engine.dialect.name == "sqlite":
                connection.exec_driver_sql(f"DROP TRIGGER {table}_append_only_update")
            else:
                connection.exec_driver_sql(f"DROP TRIGGER {table}_append_only_row ON {table}")


def test_a_duplicate_json_key_that_sql_reads_fails_verification(db_engine: sa.Engine) -> None:
    """A key inserted before the real one: SQLite's json_extract reads the first, Python's json the last."""
    rng = np.random.default_rng(21)
    ids = [chain.append(db_engine, make_entry(rng)).id for _ in range(3)]
    assert chain.verify(db_engine).ok
    sqlite = db_engine.dialect.name == "sqlite"
    read = (
        "SELECT json_extract(payload, '$.timings_ms.total') FROM audit_records WHERE id = :id"
        if sqlite
        else "SELECT (payload::json -> 'timings_ms' ->> 'total')::float FROM audit_records WHERE id = :id"
    )
    with db_engine.connect() as connection:
        real = connection.execute(sa.text(read), {"id": ids[1]}).scalar()
    _drop_update_triggers(db_engine)
    edit = (
        'UPDATE audit_records SET payload = \'{"timings_ms": {"total": 1.5}, \' || substr(payload, 2) '
        "WHERE id = :id"
        if sqlite
        else 'UPDATE audit_records SET payload = (\'{"timings_ms": {"total": 1.5}, \' || '
        "substr(payload::text, 2))::json WHERE id = :id"
    )
    with db_engine.begin() as connection:
        connection.execute(sa.text(edit), {"id": ids[1]})
    with db_engine.connect() as connection:
        seen = connection.execute(sa.text(read), {"id": ids[1]}).scalar()
    if sqlite:
        assert seen == 1.5 != real  # what SQL reads changed ...
    result = chain.verify(db_engine)  # ... and so must the verdict
    assert not result.ok and result.first_bad_id == ids[1], result
    assert "duplicate JSON key" in (result.reason or "")


def test_reformatted_json_text_fails_verification(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(22)
    ids = [chain.append(db_engine, make_entry(rng)).id for _ in range(2)]
    _drop_update_triggers(db_engine)
    cast = "" if db_engine.dialect.name == "sqlite" else "::text"
    back = "" if db_engine.dialect.name == "sqlite" else "::json"
    with db_engine.begin() as connection:
        connection.execute(
            sa.text(
                f"UPDATE audit_records SET options = (replace(options{cast}, '{{', '{{ ')){back} WHERE id = :id"
            ),
            {"id": ids[0]},
        )
    result = chain.verify(db_engine)
    assert not result.ok and result.first_bad_id == ids[0]


def test_a_drift_row_that_no_record_owns_fails_verification(db_engine: sa.Engine) -> None:
    """A drift row planted for the next record id (foreign keys bypassed): the walk never reads it, summaries
    skip it, and the record that later takes that id would be blamed for it."""
    rng = np.random.default_rng(23)
    ids = [chain.append(db_engine, make_entry(rng)).id for _ in range(2)]
    head = chain.verify(db_engine)
    assert head.ok and head.head_id is not None and head.head_hash is not None
    columns = ", ".join(c.name for c in AuditDrift.__table__.columns if c.name not in ("id", "record_id"))
    plant = (
        f"INSERT INTO audit_drift (record_id, {columns}) "
        f"SELECT record_id + 1, {columns} FROM audit_drift WHERE record_id = {ids[1]}"
    )
    if db_engine.dialect.name == "sqlite":
        raw = db_engine.raw_connection()
        try:
            raw.execute("PRAGMA foreign_keys = OFF")  # outside a transaction: SQLite ignores it inside one
            raw.execute(plant)
            raw.commit()
        finally:
            raw.close()
    else:
        with db_engine.begin() as connection:
            connection.exec_driver_sql("SET LOCAL session_replication_role = replica")  # no FK triggers
            connection.exec_driver_sql(plant)
    for result in (chain.verify(db_engine), chain.verify(db_engine, since=(head.head_id, head.head_hash))):
        assert not result.ok and result.first_bad_id == ids[1] + 1, result
        assert "orphan drift row" in (result.reason or "")


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        ("UPDATE audit_records SET created_at = replace(created_at, ' ', 'T') WHERE id = :id", "created_at"),
        ("UPDATE audit_drift SET agreement = 2 WHERE record_id = :id AND agreement = 1", "agreement"),
        ("UPDATE audit_drift SET iou = CAST(CAST(iou AS TEXT) AS BLOB) WHERE record_id = :id", "iou"),
        ("UPDATE audit_drift SET severity = CAST(severity AS BLOB) WHERE record_id = :id", "severity"),
    ],
)
def test_sqlite_values_that_sql_reads_differently_fail_verification(
    sqlite_url: str, edit: str, why: str
) -> None:
    """SQLite does not enforce column types: a value Python reads as the hashed one but SQL does not
    (a timestamp text with 'T' sorts differently, agreement 2 is not `IS 1`) must fail verification."""
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    try:
        rng = np.random.default_rng(23)
        agreeing = make_entry(rng)
        agreeing.reports = [
            make_report(rng, model=model, transfer_class="normal", finetuned_class="normal")
            for model in MODELS
        ]
        ids = [chain.append(engine, make_entry(rng)).id, chain.append(engine, agreeing).id]
        _drop_update_triggers(engine)
        with engine.begin() as connection:
            assert connection.execute(sa.text(edit), {"id": ids[1]}).rowcount > 0
        result = chain.verify(engine)
        assert not result.ok and result.first_bad_id == ids[1] and why in (result.reason or ""), result
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("edit", "read"),
    [
        (
            "UPDATE audit_records SET options = CAST(x'7bff7d' AS TEXT) WHERE id = :id",
            "SELECT options FROM audit_records WHERE id = :id",
        ),
        (
            "UPDATE audit_drift SET model = model || CAST(x'ff' AS TEXT) WHERE record_id = :id",
            "SELECT model FROM audit_drift WHERE record_id = :id",
        ),
    ],
)
def test_sqlite_text_that_is_not_utf8_fails_verification_by_row(
    sqlite_url: str, edit: str, read: str
) -> None:
    """Bytes that are not UTF-8, written around the service: the row is named, the walk does not stop with
    the driver's decode error (which the API would answer as an unavailable database)."""
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    try:
        rng = np.random.default_rng(24)
        ids = [chain.append(engine, make_entry(rng)).id for _ in range(3)]
        _drop_update_triggers(engine)
        with engine.begin() as connection:
            assert connection.execute(sa.text(edit), {"id": ids[1]}).rowcount > 0
        result = chain.verify(engine)
        assert not result.ok and result.first_bad_id == ids[1], result
        # the pooled connection decodes strictly again
        with engine.connect() as connection, pytest.raises(sa.exc.OperationalError, match="decode"):
            connection.execute(sa.text(read), {"id": ids[1]}).all()
    finally:
        engine.dispose()


def test_keep_alive_survives_a_database_error_on_a_real_server(tmp_path: Path) -> None:
    """Over one HTTP/1.1 connection to uvicorn: a database error's 500, then another request."""
    import http.client
    import threading

    import uvicorn

    from service.app.main import create_app

    app = create_app(make_settings(tmp_path / "no-artifacts", f"sqlite:///{tmp_path / 'audit.db'}"))

    def broken() -> None:
        raise sa.exc.ProgrammingError("SELECT nope", {}, Exception("relation does not exist"))

    app.add_api_route("/broken", broken, methods=["GET"])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.05)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/broken")
        first = connection.getresponse()
        assert first.status == 500 and b"internal_error" in first.read()
        assert (first.getheader("connection") or "").lower() != "close"
        connection.request("GET", "/healthz")  # the same socket: raises if the server closed it
        second = connection.getresponse()
        assert second.status == 200 and b"ok" in second.read()
        connection.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
