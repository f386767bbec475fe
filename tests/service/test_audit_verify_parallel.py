"""Verification split over worker processes gives the verdict of one walk: the same first bad row, reason,
count and head, wherever the damage is (inside a span, at a span's first or last row, at the anchored head),
on both databases."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from bench.audit_scale import Writer, seed
from service.audit import chain, db
from service.audit import verify as verify_module
from service.audit.db import DbTimeouts, make_engine, upgrade
from service.audit.tables import AuditDrift, AuditRecord
from service.audit.verify import VerifyResult, verify
from tests.db_fixtures import disable_append_only, make_entry

RECORDS = 60
WORKERS = 3  # spans (0, 20], (20, 40], (40, 60]


@pytest.fixture
def seeded(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[sa.Engine]:
    """The seeded chain, through an engine made as the service makes it (time limits: on PostgreSQL the
    URL's search_path then travels in the connect arguments, and the workers must still find the schema)."""
    seed([Writer(db_url)], n=RECORDS, days=2, chunk=25, workers=1)
    monkeypatch.setattr(verify_module, "PARALLEL_MIN_ROWS", 5)
    engine = make_engine(db_url, DbTimeouts(timeout_s=5.0, read_timeout_s=60.0))
    yield engine
    engine.dispose()


def both(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, **kwargs: Any
) -> tuple[VerifyResult, VerifyResult]:
    """(one walk here, the walk split over WORKERS processes: asserted not to run here)."""
    single = verify(engine, workers=1, batch_size=7, **kwargs)
    with monkeypatch.context() as patch:

        def not_here(*args: Any) -> None:
            raise AssertionError("the split walk ran in this process")

        patch.setattr(verify_module, "_walk", not_here)
        split = verify(engine, workers=WORKERS, batch_size=7, **kwargs)
    return single, split


def same(single: VerifyResult, split: VerifyResult) -> None:
    assert split == single  # ok, checked, first_bad_id, reason
    assert (split.head_id, split.head_hash, split.anchor_found, split.since_id) == (
        single.head_id,
        single.head_hash,
        single.anchor_found,
        single.since_id,
    )


def row_hash(engine: sa.Engine, record_id: int) -> str:
    with engine.connect() as connection:
        return str(
            connection.execute(
                sa.select(AuditRecord.row_hash).where(AuditRecord.id == record_id)
            ).scalar_one()
        )


def test_an_intact_chain_verifies_the_same_split(seeded: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    assert verify_module._plan(seeded.connect(), None, None, WORKERS) == [(0, 20), (20, 40), (40, 60)]
    single, split = both(seeded, monkeypatch, anchor=row_hash(seeded, 33))
    assert single.ok and single.checked == RECORDS and single.anchor_found
    same(single, split)
    single, split = both(seeded, monkeypatch, since=(12, row_hash(seeded, 12)))
    assert single.ok and single.checked == RECORDS - 12
    same(single, split)


def delete_record(record_id: int) -> Callable[[sa.Connection], None]:
    def edit(connection: sa.Connection) -> None:
        connection.execute(sa.delete(AuditDrift).where(AuditDrift.record_id == record_id))
        connection.execute(sa.delete(AuditRecord).where(AuditRecord.id == record_id))

    return edit


def change_drift(record_id: int) -> Callable[[sa.Connection], None]:
    def edit(connection: sa.Connection) -> None:
        first = (
            sa.select(sa.func.min(AuditDrift.id)).where(AuditDrift.record_id == record_id).scalar_subquery()
        )
        connection.execute(sa.update(AuditDrift).where(AuditDrift.id == first).values(drift_score=0.5))

    return edit


def change_record(record_id: int) -> Callable[[sa.Connection], None]:
    def edit(connection: sa.Connection) -> None:
        connection.execute(sa.update(AuditRecord).where(AuditRecord.id == record_id).values(image_width=1))

    return edit


EDITS = {"delete": delete_record, "drift": change_drift, "record": change_record}


@pytest.mark.parametrize(
    ("kind", "record_id"),
    [
        ("delete", 21),  # a span's first row: the next one's link is stitched
        ("delete", 20),  # a span's last row
        ("delete", 41),
        ("delete", 1),
        ("drift", 30),  # inside a span
        ("record", 20),
        ("record", 41),
        ("drift", RECORDS),
    ],
)
def test_damage_is_found_where_one_walk_finds_it(
    seeded: sa.Engine, monkeypatch: pytest.MonkeyPatch, kind: str, record_id: int
) -> None:
    anchor, since = row_hash(seeded, RECORDS), (15, row_hash(seeded, 15))
    disable_append_only(seeded)
    with seeded.begin() as connection:
        EDITS[kind](record_id)(connection)
    # damage before the anchored head is the earlier run's to find, not the incremental one's
    variants: list[dict[str, Any]] = [{}, {"anchor": anchor}, *([{"since": since}] if record_id > 15 else [])]
    for kwargs in variants:
        single, split = both(seeded, monkeypatch, **kwargs)
        assert not single.ok, kwargs
        same(single, split)


def test_records_appended_while_the_workers_walk_do_not_spoil_the_split(
    seeded: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service appends while it verifies: the split covers the records there when it started (the next
    verification takes the rest) and is accepted, not thrown away for a walk here."""
    walk_spans = verify_module._walk_spans
    rng = np.random.default_rng(5)

    def appending(*args: Any) -> Any:
        chain.append(seeded, make_entry(rng))
        return walk_spans(*args)

    def not_here(*args: Any) -> None:
        raise AssertionError("the split was thrown away and the walk ran in this process")

    monkeypatch.setattr(verify_module, "_walk_spans", appending)
    monkeypatch.setattr(verify_module, "_walk", not_here)
    result = verify(seeded, workers=WORKERS)
    assert result.ok and result.checked == RECORDS and result.head_id == RECORDS
    monkeypatch.undo()
    assert verify(seeded, workers=1).checked == RECORDS + 1


def test_a_stale_or_wrong_since_anchor_is_refused_the_same(
    seeded: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    for since in ((15, row_hash(seeded, 16)), (RECORDS + 5, row_hash(seeded, 15))):
        single = verify(seeded, workers=1, since=since)
        split = verify(seeded, workers=WORKERS, since=since)  # walked here: the anchor is not there
        assert not single.ok and "since:" in (single.reason or "")
        same(single, split)


def test_a_broken_pool_falls_back_to_one_walk(seeded: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[int] = []

    def broken(workers: int) -> Any:
        tried.append(workers)
        raise BrokenProcessPool("a worker died")

    monkeypatch.setattr(verify_module, "_pool", broken)
    result = verify(seeded, workers=WORKERS)
    assert tried == [WORKERS]
    assert result.ok and result.checked == RECORDS


@pytest.mark.parametrize("other", ["empty", "another chain"])
def test_workers_that_read_another_database_are_not_trusted(
    seeded: sa.Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, other: str
) -> None:
    """If the workers open some other database (a lost search_path, a replaced file), their spans do not
    match this connection's rows: the walk is done here, and a change to the real chain is still found."""
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    upgrade(elsewhere)
    if other == "another chain":
        seed([Writer(elsewhere)], n=RECORDS, days=2, chunk=25, workers=1)  # same seed: same rows, same hashes
    disable_append_only(seeded)
    with seeded.begin() as connection:
        change_record(30)(connection)
    single = verify(seeded, workers=1)
    assert not single.ok and single.first_bad_id == 30
    monkeypatch.setattr(db, "source_url", lambda engine: elsewhere)
    split = verify(seeded, workers=WORKERS)
    same(single, split)


def test_an_in_memory_database_is_walked_here() -> None:
    assert not verify_module._separate_processes_can_read(sa.create_engine("sqlite://"))
    assert not verify_module._separate_processes_can_read(
        sa.create_engine("sqlite:///file::memory:?uri=true")
    )
    assert verify_module._separate_processes_can_read(sa.create_engine("sqlite:////tmp/x.db"))


def test_the_worker_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.app.settings import Settings

    monkeypatch.setenv("CXR_DRIFT_VERIFY_WORKERS", "3")
    assert Settings().verify_workers == 3
    for bad in ("0", "-2", "65"):
        monkeypatch.setenv("CXR_DRIFT_VERIFY_WORKERS", bad)
        with pytest.raises(ValidationError, match=r"verify_workers must be 1\.\.64"):
            Settings()
    monkeypatch.delenv("CXR_DRIFT_VERIFY_WORKERS")
    assert Settings().verify_workers is None
    assert 1 <= verify_module.default_workers() <= 4


def test_workers_past_the_deadline_are_ended_and_the_answer_is_unavailable(
    seeded: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans share one deadline (the read timeout + 10 s); past it the pool's processes are ended, the pool
    is forgotten (the next call starts a new one) and the database counts as stalled (503)."""
    verify(seeded, workers=WORKERS)  # the pool is up
    pool = verify_module._POOLS[WORKERS]
    processes = list(pool._processes.values())
    assert processes and not any(ended(p.pid) for p in processes)
    deadlines: list[float | None] = []

    def nothing_done(futures: Any, timeout: float | None = None) -> tuple[set[Any], set[Any]]:
        deadlines.append(timeout)
        return set(), set(futures)

    monkeypatch.setattr(verify_module.concurrent.futures, "wait", nothing_done)
    with pytest.raises(db.DatabaseUnavailable, match="did not finish within 70"):
        verify(seeded, workers=WORKERS)
    assert deadlines == [70.0]
    assert WORKERS not in verify_module._POOLS
    deadline = time.monotonic() + 10
    while not all(ended(p.pid) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(ended(p.pid) for p in processes)
    monkeypatch.undo()
    assert verify(seeded, workers=WORKERS).ok  # a new pool


def ended(pid: int | None) -> bool:
    """The process is gone or a zombie (the executor's own thread reaps it, so Process.join cannot say)."""
    if pid is None:
        return False  # not started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
