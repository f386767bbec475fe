"""Replicas: separate writer processes (each its own engine, as uvicorn replicas are) append to one
PostgreSQL chain at the same time; the chain stays one verifiable line and every acknowledged append is
exactly one stored row with its hash."""

from __future__ import annotations

import multiprocessing
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from service.audit import chain, rollup
from service.audit.db import make_engine, upgrade
from service.audit.tables import AuditRecord

pytestmark = [pytest.mark.postgres, pytest.mark.slow]  # spawns 3 processes: ~15-50 s on 2 busy cores

WRITERS, PER_WRITER = 3, 12


def _writer(url: str, index: int, start: Any, out: Any) -> None:
    from tests.db_fixtures import MODELS, make_entry

    engine = make_engine(url)
    rng = np.random.default_rng(500 + index)
    entries = [make_entry(rng, models=MODELS[:2]) for _ in range(PER_WRITER)]
    acknowledged = []
    try:
        start.wait(timeout=60)
        for entry in entries:
            result = chain.append(engine, entry)
            acknowledged.append((result.id, result.row_hash, result.prev_hash))
    finally:
        engine.dispose()
        out.put(acknowledged)


def test_writer_processes_keep_one_chain_and_every_ack_is_one_row(pg_url: str) -> None:
    upgrade(pg_url)
    context = multiprocessing.get_context("spawn")
    start, out = context.Event(), context.Queue()
    processes = [context.Process(target=_writer, args=(pg_url, i, start, out)) for i in range(WRITERS)]
    for process in processes:
        process.start()
    start.set()
    acknowledged = [ack for _ in processes for ack in out.get(timeout=120)]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert len(acknowledged) == WRITERS * PER_WRITER
    assert len({prev for _, _, prev in acknowledged}) == len(acknowledged), "the chain forked"
    engine = make_engine(pg_url)
    try:
        assert chain.verify(engine) == chain.VerifyResult(ok=True, checked=WRITERS * PER_WRITER)
        with engine.connect() as connection:
            stored = dict(connection.execute(sa.select(AuditRecord.id, AuditRecord.row_hash)).all())
        assert stored == {record_id: row_hash for record_id, row_hash, _ in acknowledged}
        assert rollup.check(engine) == []  # the rollup kept up under concurrent appends
    finally:
        engine.dispose()
