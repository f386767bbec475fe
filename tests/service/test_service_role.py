"""PostgreSQL least privilege (issue 11): the owner migrates, the service connects as a role that can only
INSERT and SELECT the audit tables, so it cannot rewrite the log or switch its append-only triggers off."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import sqlalchemy as sa

from cli import db as commands_db
from core.errors import ConfigError
from service.app import keys
from service.app.settings import get_settings
from service.audit import chain, db, queries
from service.audit.summary import summarize
from tests.db_fixtures import make_entry

pytestmark = pytest.mark.postgres


@pytest.fixture
def service_role(pg_url: str) -> Iterator[str]:
    """A unique role name (roles are cluster-wide); the role is dropped afterwards if it was created."""
    role = f"cxr_test_app_{uuid.uuid4().hex[:10]}"
    yield role
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with admin.connect() as connection:
            if connection.exec_driver_sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'").first():
                connection.exec_driver_sql(f'DROP OWNED BY "{role}"')
                connection.exec_driver_sql(f'DROP ROLE "{role}"')
    finally:
        admin.dispose()


def as_role(url: str, role: str) -> str:
    return sa.make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_records SET image_width = image_width + 1",
        "UPDATE audit_drift SET iou = 0",
        "DELETE FROM audit_records",
        "DELETE FROM audit_drift",
        "TRUNCATE audit_records, audit_drift",
        "ALTER TABLE audit_records DISABLE TRIGGER ALL",
        "ALTER TABLE audit_drift DISABLE TRIGGER audit_drift_append_only_row",
        "DROP TRIGGER audit_records_append_only_row ON audit_records",
        "SET session_replication_role = replica",
        "UPDATE api_keys SET revoked_at = NULL",
        "INSERT INTO api_keys (name, role, key_hash, created_at) VALUES ('x', 'admin', 'h', now())",
        "UPDATE alembic_version SET version_num = '0001'",
        "CREATE TABLE audit_shadow (id int)",
        "UPDATE audit_model_events SET reason = 'x'",
        "DELETE FROM audit_model_events",
        "DELETE FROM audit_rollup",
        "TRUNCATE audit_model_events",
    ],
)
def test_the_service_role_cannot_change_the_log(pg_url: str, service_role: str, statement: str) -> None:
    db.upgrade(pg_url)
    db.grant_service_role(pg_url, service_role, password=None)
    owner = db.make_engine(pg_url)
    engine = db.make_engine(as_role(pg_url, service_role), db.DbTimeouts())
    try:
        chain.append(owner, make_entry(np.random.default_rng(1)))
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT current_user").scalar() == service_role
            assert connection.exec_driver_sql(
                "SELECT NOT rolsuper AND NOT rolbypassrls FROM pg_roles WHERE rolname = current_user"
            ).scalar()
        with pytest.raises(sa.exc.DBAPIError) as refused, engine.begin() as connection:
            connection.exec_driver_sql(statement)
        code = getattr(refused.value.orig, "sqlstate", None)
        assert code == "42501", (code, refused.value)  # insufficient_privilege (incl. "must be owner")
        assert chain.verify(owner).ok and chain.verify(owner).checked == 1
    finally:
        engine.dispose()
        owner.dispose()


def test_the_service_role_writes_through_the_real_path_and_reads_summaries(
    pg_url: str, service_role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.upgrade(pg_url)
    # the migration-time step: `cxr-drift db upgrade` with CXR_DRIFT_SERVICE_ROLE set grants the role
    monkeypatch.setenv("CXR_DRIFT_SERVICE_ROLE", service_role)
    monkeypatch.setenv("CXR_DRIFT_SERVICE_ROLE_PASSWORD", "not-used-with-trust-auth")
    get_settings.cache_clear()
    try:
        parser = argparse.ArgumentParser()
        commands_db.configure_parser(parser)
        assert commands_db.run(parser.parse_args(["upgrade", "--database-url", pg_url])) == 0
    finally:
        get_settings.cache_clear()
    owner = db.make_engine(pg_url)
    engine = db.make_engine(as_role(pg_url, service_role), db.DbTimeouts())
    try:
        plaintext = keys.create_key(owner, name="ops", role="audit")  # keys are managed as the owner
        db.check_writable(engine)
        db.upgrade(as_role(pg_url, service_role))  # migrate-on-start at the newest revision is a no-op
        rng = np.random.default_rng(2)
        appended = [chain.append(engine, make_entry(rng)) for _ in range(3)]
        assert [a.id for a in appended] == [1, 2, 3]
        assert chain.verify(engine).ok and chain.verify(engine).head_hash == appended[-1].row_hash
        summary = summarize(engine, filters=queries.AuditFilters(), group_by=["model"])
        assert summary  # computed by the role, in SQL
        assert queries.get_record(engine, 2)["row_hash"] == appended[1].row_hash  # type: ignore[index]
        found = keys.authenticate(engine, plaintext)
        assert found is not None and found.name == "ops"
        with pytest.raises(ConfigError, match="superuser"):
            db.grant_service_role(pg_url, "postgres")  # a superuser is never a service role
    finally:
        engine.dispose()
        owner.dispose()
