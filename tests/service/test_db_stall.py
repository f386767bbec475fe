"""Time limits on the database (issue 11): a stalled PostgreSQL gives 503 / not ready within the configured
bound, nothing is committed for a request answered with an error, and the service recovers by itself."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from service.audit import chain, db, queries
from tests.api_fixtures import chest_like, error_of, headers, make_settings, png_bytes, started, upload
from tests.db_fixtures import make_entry
from tests.pg_cluster import throwaway_cluster

BOUND_S = 2.0
NO_HANG_S = 20.0  # a client timeout that proves "no hang" (the bound is BOUND_S)


@pytest.mark.postgres
def test_a_commit_the_server_reaches_after_its_deadline_is_refused(pg_url: str) -> None:
    """The server checks the commit deadline when COMMIT runs: a COMMIT delayed past it (as when a stalled
    server resumes) rolls back, so a request answered 503 leaves no row."""
    db.upgrade(pg_url)
    engine = db.make_engine(pg_url, db.DbTimeouts(timeout_s=BOUND_S, read_timeout_s=10))
    rng = np.random.default_rng(5)
    try:
        kept = chain.append(engine, make_entry(rng))

        def late_commit(connection: sa.Connection) -> None:
            deadline = db.client_deadline(connection)
            assert deadline is not None
            # past the server's deadline (a margin before the client's), not yet the client's
            time.sleep(max(0.0, deadline - 0.2 - time.time()))

        event.listen(engine, "commit", late_commit)
        late = make_entry(rng)
        with pytest.raises(db.DatabaseUnavailable, match="deadline"):
            chain.append(engine, late)
        event.remove(engine, "commit", late_commit)
        with engine.connect() as connection:
            ids = connection.execute(sa.text("SELECT request_id FROM audit_records")).scalars().all()
        assert late.request_id not in ids and len(ids) == 1
        after = chain.append(engine, make_entry(rng))
        result = chain.verify(engine)
        assert result.ok and result.checked == 2 and result.head_hash == after.row_hash
        assert after.prev_hash == kept.row_hash
    finally:
        engine.dispose()


def _predict(app: Any, seed: int) -> Any:
    return app.client.post(
        "/predict",
        files=upload(png_bytes(chest_like(64, seed=seed))),
        data={"models": "resnet50v2", "methods": "layercam"},
        headers=headers("predict"),
    )


@pytest.mark.slow
def test_a_frozen_database_gives_503_and_not_ready_in_time_and_commits_nothing(api_artifacts: Path) -> None:
    with throwaway_cluster() as cluster:
        settings = make_settings(api_artifacts, cluster.url, db_timeout_s=BOUND_S, db_read_timeout_s=BOUND_S)
        with started(settings) as app:
            first = app.run(_predict(app, 1))
            assert first.status_code == 200, first.text
            cluster.freeze()
            try:

                async def during() -> list[httpx.Response]:
                    answers = asyncio.gather(
                        _predict(app, 2),
                        _predict(app, 3),
                        app.client.get("/readyz"),
                        app.client.get("/audit/summary", headers=headers("audit")),
                    )
                    # the in-process transport has no timeouts: a TimeoutError here is the hang this catches
                    return list(await asyncio.wait_for(answers, NO_HANG_S))

                started_at = time.monotonic()
                predicted_2, predicted_3, ready, summary = app.run(during())
                print(
                    f"frozen database: 4 answers in {time.monotonic() - started_at:.2f} s (bound {BOUND_S} s)"
                )
            finally:
                cluster.thaw()
            for response in (predicted_2, predicted_3):
                assert response.status_code == 503, response.text
                assert error_of(response)["code"] == "audit_unavailable"
                assert "results" not in response.text
            assert ready.status_code == 503 and error_of(ready)["code"] == "not_ready"
            assert summary.status_code == 503 and error_of(summary)["code"] == "database_unavailable"
            # the server resumed: it must not commit the rows of the requests answered 503
            time.sleep(BOUND_S)
            engine = db.make_engine(cluster.url)
            try:
                refused = {predicted_2.headers["x-request-id"], predicted_3.headers["x-request-id"]}
                page = queries.list_records(engine, filters=queries.AuditFilters(), limit=100)
                stored = {item["request_id"] for item in page.items}
                assert stored == {first.json()["request_id"]}, (stored, refused)
            finally:
                engine.dispose()
            # and the service recovers without a restart
            for _ in range(20):
                if app.get("/readyz").status_code == 200:
                    break
                time.sleep(0.5)
            assert app.get("/readyz").status_code == 200
            again = app.run(_predict(app, 4))
            assert again.status_code == 200, again.text
            verified = app.get("/audit/verify", headers=headers("audit")).json()
            assert verified["ok"] and verified["checked"] == 2


def test_service_engines_carry_the_time_limits(db_url: str) -> None:
    engine = db.make_engine(db_url, db.DbTimeouts(timeout_s=3, read_timeout_s=7))
    try:
        assert engine.pool.timeout() == 3  # type: ignore[attr-defined]
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 3000
                return
            assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == "7s"
            assert connection.exec_driver_sql("SHOW lock_timeout").scalar() == "3s"
            # the URL's own options (the test schema's search_path) are kept
            assert str(connection.exec_driver_sql("SHOW search_path").scalar()).startswith("t_")
            dsn = connection.connection.driver_connection.info.dsn  # type: ignore[union-attr]
            assert "connect_timeout=3" in dsn and "tcp_user_timeout=3000" in dsn
    finally:
        engine.dispose()


def test_the_chain_lock_wait_is_bounded(db_url: str) -> None:
    """Another writer holds the chain lock (PostgreSQL advisory lock / SQLite write lock): the append gives
    up with DatabaseUnavailable (503) after the bound instead of queueing forever, and works once it is free."""
    engine = db.make_engine(db_url, db.DbTimeouts(timeout_s=1.0, read_timeout_s=10))
    holder = db.make_engine(db_url)
    rng = np.random.default_rng(7)
    try:
        with holder.connect() as connection:
            if holder.dialect.name == "sqlite":
                connection.execution_options(**{db.SQLITE_IMMEDIATE: True})
            with connection.begin():
                if holder.dialect.name == "postgresql":
                    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(chain.CHAIN_LOCK_KEY)))
                with pytest.raises(db.DatabaseUnavailable):
                    chain.append(engine, make_entry(rng))
        appended = chain.append(engine, make_entry(rng))
        assert chain.verify(engine).checked == 1 and appended.id == 1
    finally:
        engine.dispose()
        holder.dispose()
