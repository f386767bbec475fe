"""The per-record IoUs that the summary's reversal test runs on: every matching record, or a seeded sample.

Over a million records the per-record rows (one per record x model x method) are millions of rows and the
bootstrap runs on all of them; above ``max_records`` records in the time window the test runs on a uniform
random sample instead: ``max_records`` record ids drawn without replacement (NumPy ``default_rng(seed)``)
from the id range of the records in the window, then the drift filters applied to the drawn records (so
fewer may match). The summary reports the draw in ``ranking.sample`` (null when every record was used).

The rows a :class:`Draw` selects never change once drawn: records are append-only and their ids are given
in commit order under the chain lock, so the records with ids in ``id_range`` are fixed. :attr:`Draw.key`
names them (with the filters), and the summary reuses the reversal test computed on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import func

from service.audit.tables import AuditDrift, AuditRecord

__all__ = ["REVERSAL_MAX_RECORDS", "Draw", "draw", "per_record_rows"]

REVERSAL_MAX_RECORDS = 2_000  # the bootstrap is O(n_boot x records): ~0.1-0.2 s at 2,000 on one core
_IN_CHUNK = 5_000  # ids per IN (...) list: below SQLite's bound-parameter limit


@dataclass(frozen=True)
class Draw:
    """Which records the test runs on: every record in the window (``ids`` None) or the drawn ``ids``."""

    id_range: tuple[int, int] | None  # (lowest, highest) record id in the time window; None: no record
    ids: tuple[int, ...] | None
    description: dict[str, Any] | None  # the summary's ``ranking.sample``

    @property
    def key(self) -> tuple[Any, ...]:
        """Identifies the selected records (given the same filters): the id range and the drawn ids."""
        return (self.id_range, self.ids)


def draw(
    connection: sa.Connection,
    time_conditions: list[sa.ColumnElement[bool]],
    *,
    max_records: int | None,
    seed: int,
) -> Draw:
    """The records in the time window, or a sample of ``max_records`` of their ids (one small query)."""
    # id + 0: from the (created_at, id) index over the window; min(id) itself lets PostgreSQL walk the
    # primary key through the heap until a row falls in the window (~0.9 s for the last 30 of 365 days)
    column = AuditRecord.id + 0 if time_conditions else AuditRecord.id
    low, high = connection.execute(
        sa.select(func.min(column), func.max(column)).where(*time_conditions)
    ).one()
    id_range = None if low is None else (int(low), int(high))
    if max_records is None or id_range is None or high - low + 1 <= max_records:
        return Draw(id_range, None, None)
    rng = np.random.default_rng(seed)
    ids = tuple(np.sort(low + rng.choice(high - low + 1, size=max_records, replace=False)).tolist())
    description = {
        "records_drawn": max_records,
        "id_range": [int(low), int(high)],
        "seed": seed,
        "method": "record ids drawn uniformly without replacement from the id range of the records "
        "in the time window (numpy default_rng(seed)), then the filters applied",
    }
    return Draw(id_range, ids, description)


def per_record_rows(
    connection: sa.Connection, conditions: list[sa.ColumnElement[bool]], selected: Draw
) -> list[Any]:
    """(record_id, model, method, iou, head_scale_control_iou) rows under ``conditions`` of the records
    ``selected``."""
    columns = (
        AuditDrift.record_id,
        AuditDrift.model,
        AuditDrift.method,
        AuditDrift.iou,
        AuditDrift.head_scale_control_iou,
    )
    base = sa.select(*columns).join(AuditRecord, AuditDrift.record_id == AuditRecord.id).where(*conditions)
    if selected.id_range is None:
        return []
    low, high = selected.id_range
    base = base.where(AuditDrift.record_id.between(low, high))
    if selected.ids is None:
        return list(connection.execute(base).all())
    rows: list[Any] = []
    for start in range(0, len(selected.ids), _IN_CHUNK):
        chunk = selected.ids[start : start + _IN_CHUNK]
        rows += connection.execute(base.where(AuditDrift.record_id.in_(chunk))).all()
    return rows
