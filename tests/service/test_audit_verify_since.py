"""Incremental verification: chain.verify(since=(head_id, head_hash)) checks only the rows after an anchored,
previously verified head, detects tampering after it and refuses a wrong anchor."""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa

from service.audit import chain
from tests.db_fixtures import disable_append_only, make_entry


def test_incremental_verification_checks_only_the_rows_after_the_anchor(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(31)
    first = [chain.append(db_engine, make_entry(rng)) for _ in range(5)]
    full = chain.verify(db_engine)
    assert full.ok and full.head_id == first[-1].id and full.head_hash == first[-1].row_hash
    later = [chain.append(db_engine, make_entry(rng)) for _ in range(3)]
    assert full.head_id is not None and full.head_hash is not None
    outcome = chain.verify(db_engine, since=(full.head_id, full.head_hash.upper()))
    assert outcome.ok and outcome.checked == 3 and outcome.since_id == first[-1].id
    assert (outcome.head_id, outcome.head_hash) == (later[-1].id, later[-1].row_hash)
    # nothing new: still ok, nothing checked, the head is the anchor
    again = chain.verify(db_engine, since=(later[-1].id, later[-1].row_hash))
    assert again.ok and again.checked == 0 and again.head_hash == later[-1].row_hash


def test_a_wrong_or_missing_anchor_is_refused(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(32)
    rows = [chain.append(db_engine, make_entry(rng)) for _ in range(4)]
    wrong = chain.verify(db_engine, since=(rows[1].id, rows[2].row_hash))
    assert not wrong.ok and wrong.first_bad_id == rows[1].id and "anchored hash" in str(wrong.reason)
    missing = chain.verify(db_engine, since=(rows[-1].id + 10, rows[-1].row_hash))
    assert not missing.ok and missing.first_bad_id == rows[-1].id + 10


def test_tampering_after_the_anchor_is_detected_and_at_it_too(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(33)
    rows = [chain.append(db_engine, make_entry(rng)) for _ in range(6)]
    since = (rows[2].id, rows[2].row_hash)
    disable_append_only(db_engine)
    with db_engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE audit_drift SET iou = 0.123 WHERE record_id = :id"), {"id": rows[4].id}
        )
    changed = chain.verify(db_engine, since=since)
    assert not changed.ok and changed.first_bad_id == rows[4].id and changed.checked == 1
    assert "content hash mismatch" in str(changed.reason)
    with db_engine.begin() as connection:  # the anchored row itself edited: its hash no longer recomputes
        connection.execute(
            sa.text("UPDATE audit_records SET image_width = image_width + 1 WHERE id = :id"),
            {"id": rows[2].id},
        )
    at_anchor = chain.verify(db_engine, since=since)
    assert not at_anchor.ok and at_anchor.first_bad_id == rows[2].id


def test_a_row_deleted_after_the_anchor_breaks_the_link(db_engine: sa.Engine) -> None:
    rng = np.random.default_rng(34)
    rows = [chain.append(db_engine, make_entry(rng)) for _ in range(5)]
    disable_append_only(db_engine)
    with db_engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM audit_drift WHERE record_id = :id"), {"id": rows[3].id})
        connection.execute(sa.text("DELETE FROM audit_records WHERE id = :id"), {"id": rows[3].id})
    outcome = chain.verify(db_engine, since=(rows[1].id, rows[1].row_hash))
    assert not outcome.ok and outcome.first_bad_id == rows[4].id and "broken link" in str(outcome.reason)
