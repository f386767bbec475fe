"""API keys on SQLite and PostgreSQL: create, authenticate, roles, revoke, and the ``keys`` CLI."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa

from cli.main import main as cli_main
from service.app import keys
from service.audit.tables import ApiKeyRow


def test_create_then_authenticate(db_engine: sa.Engine) -> None:
    plaintext = keys.create_key(db_engine, name="auditor", role="audit")
    assert plaintext.startswith(keys.KEY_PREFIX) and len(plaintext) > 40
    found = keys.authenticate(db_engine, plaintext)
    assert found is not None
    assert (found.name, found.role) == ("auditor", "audit")
    assert found.created_at is not None and found.created_at.tzinfo is not None
    assert keys.authenticate(db_engine, plaintext + "x") is None
    assert keys.authenticate(db_engine, "") is None
    assert keys.authenticate(db_engine, keys.hash_key(plaintext)) is None  # the stored hash is not a key


def test_only_the_sha256_is_stored(db_engine: sa.Engine) -> None:
    plaintext = keys.create_key(db_engine, name="p1", role="predict")
    with db_engine.connect() as connection:
        stored = connection.execute(sa.select(ApiKeyRow.key_hash)).scalar_one()
        everything = " ".join(str(v) for row in connection.execute(sa.select(ApiKeyRow)).all() for v in row)
    assert stored == hashlib.sha256(plaintext.encode()).hexdigest() == keys.hash_key(plaintext)
    assert plaintext not in everything


def test_keys_are_unique_and_random(db_engine: sa.Engine) -> None:
    first = keys.create_key(db_engine, name="a", role="predict")
    second = keys.create_key(db_engine, name="b", role="predict")
    assert first != second
    with pytest.raises(ValueError, match="already exists"):
        keys.create_key(db_engine, name="a", role="audit")


@pytest.mark.parametrize(
    ("role", "allowed"),
    [("predict", {"predict"}), ("audit", {"audit"}), ("admin", {"predict", "audit", "admin"})],
)
def test_roles(db_engine: sa.Engine, role: str, allowed: set[str]) -> None:
    found = keys.authenticate(db_engine, keys.create_key(db_engine, name=f"k-{role}", role=role))
    assert found is not None
    assert {required for required in keys.ROLES if found.allows(required)} == allowed


def test_invalid_role_and_name_are_refused(db_engine: sa.Engine) -> None:
    with pytest.raises(ValueError, match="valid options: predict, audit, admin"):
        keys.create_key(db_engine, name="x", role="root")
    with pytest.raises(ValueError, match="invalid key name"):
        keys.create_key(db_engine, name="has space", role="audit")


def test_revoke(db_engine: sa.Engine) -> None:
    plaintext = keys.create_key(db_engine, name="temp", role="admin")
    other = keys.create_key(db_engine, name="stays", role="audit")
    keys.revoke_key(db_engine, name="temp")
    assert keys.authenticate(db_engine, plaintext) is None
    assert keys.authenticate(db_engine, other) is not None
    listed = {k.name: k for k in keys.list_keys(db_engine)}
    assert listed["temp"].revoked_at is not None and listed["stays"].revoked_at is None
    first_revocation = listed["temp"].revoked_at
    keys.revoke_key(db_engine, name="temp")  # twice: keeps the first time
    assert {k.name: k for k in keys.list_keys(db_engine)}["temp"].revoked_at == first_revocation
    with pytest.raises(ValueError, match="existing keys: stays, temp"):
        keys.revoke_key(db_engine, name="nobody")


def test_keys_cli(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keys", "create", "--role", "audit", "--name", "ops", "--database-url", db_url]) == 0
    plaintext = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli_main(["keys", "list", "--database-url", db_url]) == 0
    listing = capsys.readouterr().out
    assert "ops\taudit" in listing and "active" in listing and plaintext not in listing
    assert cli_main(["keys", "revoke", "ops", "--database-url", db_url]) == 0
    capsys.readouterr()
    assert cli_main(["keys", "list", "--database-url", db_url]) == 0
    assert "revoked" in capsys.readouterr().out
    assert cli_main(["keys", "revoke", "ghost", "--database-url", db_url]) == 1
    assert "no API key named 'ghost'" in capsys.readouterr().err


def test_keys_cli_without_database_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CXR_DRIFT_DATABASE_URL", raising=False)
    assert cli_main(["keys", "list"]) == 1
    assert "CXR_DRIFT_DATABASE_URL" in capsys.readouterr().err


def test_keys_cli_with_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    url = "sqlite:////nonexistent-directory/cxr-drift/audit.db"
    assert cli_main(["keys", "list", "--database-url", url]) == 1
    assert "audit database unavailable" in capsys.readouterr().err
