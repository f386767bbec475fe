"""The million-row bench's bulk seed (bench/audit_scale.py) writes the chain the service would: it verifies,
its rollup agrees with the exact summary, and a changed value is caught (so its timings are of real rows)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from bench.audit_scale import Writer, seed
from service.audit import chain, rollup
from service.audit.db import make_engine, upgrade
from service.audit.tables import AuditDrift, AuditRecord
from tests.db_fixtures import disable_append_only


def test_bulk_seed_makes_a_verifiable_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'seed.db'}"
    upgrade(url)
    out = seed([Writer(url)], n=40, days=3, chunk=15, workers=1)
    assert out["hashes_checked_with_compute_row_hash"] >= 1
    engine = make_engine(url)
    result = chain.verify(engine, batch_size=7)
    assert result.ok, result.reason
    assert result.checked == 40
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(AuditDrift)).scalar_one() == 240
    assert rollup.check(engine) == []
    disable_append_only(engine)
    with engine.begin() as connection:
        connection.execute(sa.update(AuditDrift).where(AuditDrift.id == 100).values(drift_score=0.123))
    result = chain.verify(engine)
    assert not result.ok
    assert result.first_bad_id == 17  # drift row 100 is record 17's (six rows a record)
    with engine.connect() as connection:
        owner = connection.execute(sa.select(AuditDrift.record_id).where(AuditDrift.id == 100)).scalar_one()
        assert connection.execute(sa.select(AuditRecord.id).where(AuditRecord.id == owner)).scalar_one() == 17
