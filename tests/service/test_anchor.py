"""Chain-head anchors exported outside the database (issue 11): signed lines, verification, the exporter."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from cli import db as commands_db
from service.app.settings import get_settings
from service.audit import anchor, chain
from tests.api_fixtures import make_settings, started
from tests.db_fixtures import make_entry

KEY = "anchor-test-key-" + "k" * 16


def _truncate_newest(engine: sa.Engine) -> None:
    """An attacker with the owner's rights deletes the newest record (triggers dropped first)."""
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            for table in ("audit_records", "audit_drift"):
                connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_append_only_delete")
        else:
            for table in ("audit_records", "audit_drift"):
                connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_append_only_row ON {table}")
        newest = connection.exec_driver_sql("SELECT max(id) FROM audit_records").scalar()
        connection.exec_driver_sql(f"DELETE FROM audit_drift WHERE record_id = {newest}")
        connection.exec_driver_sql(f"DELETE FROM audit_records WHERE id = {newest}")


def test_a_signed_anchor_verifies_and_catches_truncation_and_forgery(
    db_engine: sa.Engine, tmp_path: Path
) -> None:
    rng = np.random.default_rng(31)
    appended = [chain.append(db_engine, make_entry(rng)) for _ in range(3)]
    path = tmp_path / "anchors.jsonl"
    document = anchor.export_anchor(db_engine, path=path, key=KEY)
    assert document["head_id"] == appended[-1].id and document["head_hash"] == appended[-1].row_hash
    line = path.read_text().splitlines()[-1]
    assert json.loads(line) == document
    assert anchor.verify_anchor(db_engine, line, key=KEY).ok
    assert not anchor.verify_anchor(db_engine, line, key="another key").ok
    forged = json.dumps({**document, "head_id": appended[0].id, "head_hash": appended[0].row_hash})
    check = anchor.verify_anchor(db_engine, forged, key=KEY)
    assert not check.ok and "bad signature" in (check.reason or "")
    # unsigned but consistent: fine without a key, refused when a key is expected
    unsigned = json.dumps({k: v for k, v in document.items() if k != "hmac_sha256"})
    assert anchor.verify_anchor(db_engine, unsigned).ok
    assert not anchor.verify_anchor(db_engine, unsigned, key=KEY).ok
    chain.append(db_engine, make_entry(rng))  # rows after the anchor are fine
    assert anchor.verify_anchor(db_engine, line, key=KEY).ok
    _truncate_newest(db_engine)
    _truncate_newest(db_engine)  # the anchored row is gone now: a valid, shorter chain
    assert chain.verify(db_engine).ok
    check = anchor.verify_anchor(db_engine, line, key=KEY)
    assert not check.ok and "truncation" in (check.reason or ""), check


def test_cli_anchor_and_verify_anchor(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.audit import db

    db.upgrade(sqlite_url)
    engine = db.make_engine(sqlite_url)
    monkeypatch.setenv("CXR_DRIFT_ANCHOR_KEY", KEY)
    get_settings.cache_clear()
    parser = argparse.ArgumentParser()
    commands_db.configure_parser(parser)
    path = tmp_path / "anchors.jsonl"
    try:
        rng = np.random.default_rng(32)
        for _ in range(2):
            chain.append(engine, make_entry(rng))
        assert (
            commands_db.run(parser.parse_args(["anchor", "--out", str(path), "--database-url", sqlite_url]))
            == 0
        )
        assert "hmac_sha256" in path.read_text()
        verify_args = parser.parse_args(["verify-anchor", str(path), "--database-url", sqlite_url])
        assert commands_db.run(verify_args) == 0
        _truncate_newest(engine)
        assert commands_db.run(verify_args) == 1
    finally:
        get_settings.cache_clear()
        engine.dispose()


def test_the_service_exports_the_head_periodically(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "anchors.jsonl"
    settings = make_settings(
        tmp_path / "no-artifacts",
        f"sqlite:///{tmp_path / 'audit.db'}",
        anchor_interval_s=1,
        anchor_file=path,
        anchor_key=KEY,
    )
    with caplog.at_level(logging.INFO, logger="service.audit.anchor"), started(settings) as app:
        engine = app.app.state.cxr.engine
        head = chain.append(engine, make_entry(np.random.default_rng(33)))
        lines: list[str] = []
        for _ in range(100):
            lines = [
                ln for ln in (path.read_text().splitlines() if path.exists() else []) if head.row_hash in ln
            ]
            if lines:
                break
            time.sleep(0.1)
        assert lines, "no anchor line with the head within 10 s (interval 1 s)"
        assert anchor.verify_anchor(engine, lines[-1], key=KEY).ok
    assert any(head.row_hash in r.getMessage() for r in caplog.records)
    assert not any(
        t.name == "cxr-anchor-export" and t.is_alive() for t in __import__("threading").enumerate()
    )
