"""Alembic migrations on SQLite and PostgreSQL: round trip, schema == metadata, triggers, CLI."""

from __future__ import annotations

import argparse
import multiprocessing
import re
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from cli import db as commands_db
from service.audit import chain, db
from service.audit.tables import metadata
from tests.db_fixtures import make_entry

REPO = Path(__file__).resolve().parents[2]
APP_TABLES = {
    "audit_records",
    "audit_drift",
    "audit_model_events",
    "api_keys",
    "audit_rollup",
    "audit_rollup_state",
}


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


def trigger_names(engine: sa.Engine) -> set[str]:
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            query = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        else:
            query = (
                "SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "WHERE NOT t.tgisinternal AND c.relnamespace = current_schema()::regnamespace"
            )
        return set(connection.exec_driver_sql(query).scalars())


def test_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    engine = db.make_engine(empty_db_url)
    try:
        assert db.current_revision(engine) is None
        db.upgrade(empty_db_url)
        head = db.head_revision()
        assert db.current_revision(engine) == head
        assert table_names(engine) == APP_TABLES
        assert trigger_names(engine), "the migration creates the append-only triggers"
        db.downgrade(empty_db_url)
        assert db.current_revision(engine) is None
        assert table_names(engine) == set()
        assert trigger_names(engine) == set()
        db.upgrade(empty_db_url)
        assert db.current_revision(engine) == head
        assert table_names(engine) == APP_TABLES
        db.check_writable(engine)
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_table_metadata(empty_db_url: str) -> None:
    db.upgrade(empty_db_url)
    engine = db.make_engine(empty_db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_append_only_triggers_cover_both_audit_tables(empty_db_url: str) -> None:
    db.upgrade(empty_db_url)
    engine = db.make_engine(empty_db_url)
    try:
        names = trigger_names(engine)
    finally:
        engine.dispose()
    for table in ("audit_records", "audit_drift", "audit_model_events"):
        assert any(name.startswith(f"{table}_append_only") for name in names), names


def test_revisions_are_date_prefixed_with_one_head() -> None:
    files = sorted(p.name for p in (REPO / "migrations" / "versions").glob("*.py"))
    assert files
    for name in files:
        assert re.fullmatch(r"20\d{6}_\w+\.py", name), f"{name}: expected YYYYMMDD_<rev>_<slug>.py"
    script = ScriptDirectory(str(REPO / "migrations"))
    assert len(script.get_heads()) == 1
    assert db.head_revision() == script.get_current_head()


def test_alembic_cli_reads_the_url_from_the_environment(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic.config import main as alembic_main

    monkeypatch.setenv("CXR_DRIFT_DATABASE_URL", sqlite_url)
    monkeypatch.chdir(REPO)
    alembic_main(argv=["-c", str(REPO / "alembic.ini"), "-x", "configure_logger=false", "upgrade", "head"])
    engine = db.make_engine(sqlite_url)
    try:
        assert db.current_revision(engine) == db.head_revision()
    finally:
        engine.dispose()


def test_downgrade_below_0002_refuses_to_drop_hashed_values(sqlite_url: str) -> None:
    """Rows written since 0002 hash their drift_index etc.: dropping the columns would break the chain."""
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    try:
        chain.append(engine, make_entry(np.random.default_rng(0)))
        with pytest.raises(Exception, match="refusing to downgrade below 0002"):
            db.downgrade(sqlite_url, "0001")
        # the refused step leaves 0002 in place (SQLite commits each later revision's downgrade on its own)
        assert db.current_revision(engine) not in {None, "0001"}
        db.upgrade(sqlite_url)
        assert chain.verify(engine).ok
    finally:
        engine.dispose()


def test_0006_backfills_the_rollup_from_existing_rows(empty_db_url: str) -> None:
    """Rows written before 0006 (here: before a downgrade to 0002 dropped the rollup) are rolled up."""
    from service.audit import rollup
    from service.audit.tables import AuditRollup

    db.upgrade(empty_db_url)
    engine = db.make_engine(empty_db_url)
    try:
        rng = np.random.default_rng(3)
        for _ in range(4):
            chain.append(engine, make_entry(rng))
        rollup.catch_up(engine)
        with engine.connect() as connection:
            before = {
                tuple(row[:3]): row for row in connection.execute(sa.select(AuditRollup.__table__)).all()
            }
        assert before and sum(row[3] for row in before.values()) > 0
        db.downgrade(empty_db_url, "0002")
        assert "audit_rollup" not in table_names(engine)
        db.upgrade(empty_db_url)
        assert rollup.check(engine) == []
        with engine.connect() as connection:
            after = {
                tuple(row[:3]): row for row in connection.execute(sa.select(AuditRollup.__table__)).all()
            }
        assert set(after) == set(before)
        assert all(after[k][3:6] == before[k][3:6] and after[k][7] == before[k][7] for k in after)
        assert chain.verify(engine).ok
    finally:
        engine.dispose()


def test_0007_moves_the_rollup_behind_a_watermark_and_back(empty_db_url: str) -> None:
    """Down to 0006 the rollup covers every record again (tail caught up, versions merged per day, model
    and method); up to 0007 it is rebuilt by architecture and version with the watermark at the newest."""
    from service.audit import rollup

    db.upgrade(empty_db_url)
    engine = db.make_engine(empty_db_url)
    try:
        rng = np.random.default_rng(4)
        entries = [make_entry(rng) for _ in range(5)]
        entries[1].reports[0].model_digest = "ab" * 32  # a second version of one model
        for entry in entries[:3]:
            chain.append(engine, entry)
        assert rollup.catch_up(engine) == 3
        for entry in entries[3:]:
            chain.append(engine, entry)  # after the watermark
        with engine.connect() as connection:
            want = rollup.by_day_model_method(rollup.recompute(connection))
        db.downgrade(empty_db_url, "0006")
        assert "audit_rollup_state" not in table_names(engine)
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT * FROM audit_rollup")).mappings().all()
        assert {(r["day"], r["model"], r["method"]) for r in rows} == set(want)
        for row in rows:
            expected = want[(row["day"], row["model"], row["method"])]
            assert (row["count"], row["agreed"], row["flagged"]) == (
                expected.count,
                expected.agreed,
                expected.flagged,
            )
            assert row["hist"] == expected.values()["hist"]
        db.upgrade(empty_db_url)
        with engine.connect() as connection:
            assert (rollup.watermark(connection), rollup.behind(connection)) == (5, 0)
        assert rollup.check(engine) == []
        assert chain.verify(engine).ok
    finally:
        engine.dispose()


def test_db_command(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    commands_db.configure_parser(parser)

    def run(*argv: str) -> str:
        assert commands_db.run(parser.parse_args([*argv, "--database-url", sqlite_url])) == 0
        return capsys.readouterr().out

    assert "not migrated" in run("current")
    run("upgrade")
    assert f"current: {db.head_revision()}" in run("current")
    run("downgrade")
    assert "not migrated" in run("current")


def test_db_rollup_command_catches_up_and_checks(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    commands_db.configure_parser(parser)
    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    try:
        rng = np.random.default_rng(6)
        for _ in range(3):
            chain.append(engine, make_entry(rng))
    finally:
        engine.dispose()

    def run(*argv: str) -> str:
        assert commands_db.run(parser.parse_args([*argv, "--database-url", sqlite_url])) == 0
        return capsys.readouterr().out

    assert "3 record(s) added, watermark 3" in run("rollup")
    checked = run("rollup", "--check")
    assert "0 record(s) added, watermark 3" in checked and "rollup check: 0 difference(s)" in checked


def test_missing_url_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXR_DRIFT_DATABASE_URL", raising=False)
    parser = argparse.ArgumentParser()
    commands_db.configure_parser(parser)
    with pytest.raises(ValueError, match="CXR_DRIFT_DATABASE_URL"):
        commands_db.run(parser.parse_args(["upgrade"]))


def test_upgrade_of_an_unreachable_database_raises_database_unavailable() -> None:
    with pytest.raises(db.DatabaseUnavailable):
        db.upgrade("sqlite:////nonexistent-directory/cxr-drift/audit.db")


def test_concurrent_upgrades_do_not_race(empty_db_url: str) -> None:
    """Replicas migrate on start: upgrades from several processes at once leave one migrated schema."""
    with multiprocessing.get_context("fork").Pool(3) as pool:
        pool.map(db.upgrade, [empty_db_url] * 3)
    engine = db.make_engine(empty_db_url)
    try:
        assert db.current_revision(engine) == db.head_revision()
        assert table_names(engine) == APP_TABLES
    finally:
        engine.dispose()
