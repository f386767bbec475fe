"""The per-record IoUs that the summary's reversal test runs on: every matching record, or a seeded sample.

Over a million records the per-record rows (one per record x model x method) are millions of rows and the
bootstrap runs on all of them; above ``max_records`` records in the time window the test runs on a uniform
random sample instead: ``max_records`` record ids drawn without replacement (NumPy ``default_rng(seed)``)
from the id range of the records in the window, then the drift filters applied to the drawn records (so
fewer may match). The summary reports the draw in ``ranking.sample`` (null when every record was used).

The ids are drawn from a sampling frame that moves in steps: the window's id range with its ends rounded
inwards to a multiple of a power of two no larger than 1/:data:`FRAME_STEPS` of the range, so the frame
leaves out fewer than 2% of the window's records (the oldest and newest few) and stays the same while
records are appended, until the next step. The rows a :class:`Draw` selects never change once drawn:
records are append-only and their ids are given in commit order under the chain lock, so the records with
ids in ``id_range`` are fixed. :attr:`Draw.key` names them (with the filters), and the summary reuses the
reversal test computed on them: under live traffic a summary recomputes the test about once per 1% growth
of the window, not after every append.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import func

from service.audit.queries import by_record_ids, record_id_ends
from service.audit.tables import AuditDrift, AuditRecord

__all__ = ["FRAME_STEPS", "REVERSAL_MAX_RECORDS", "Draw", "draw", "per_record_rows"]

REVERSAL_MAX_RECORDS = 2_000  # the bootstrap is O(n_boot x records): ~0.1-0.2 s at 2,000 on one core
FRAME_STEPS = 100  # the sampling frame moves in steps of at most 1/FRAME_STEPS of the window's id range
_IN_CHUNK = 5_000  # ids per IN (...) list: below SQLite's bound-parameter limit


@dataclass(frozen=True)
class Draw:
    """Which records the test runs on: every record in the window (``ids`` None) or the drawn ``ids``."""

    id_range: tuple[int, int] | None  # (lowest, highest) id of the window, or of the frame; None: no record
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
    if time_conditions:
        # id + 0: from the (created_at, id) index over the window; min(id) itself lets PostgreSQL walk the
        # primary key through the heap until a row falls in the window (~0.9 s for the last 30 of 365 days)
        column = AuditRecord.id + 0
        statement = sa.select(func.min(column), func.max(column)).where(*time_conditions)
    else:
        statement = record_id_ends()
    low, high = connection.execute(statement).one()
    id_range = None if low is None else (int(low), int(high))
    if max_records is None or id_range is None or high - low + 1 <= max_records:
        return Draw(id_range, None, None)
    first, last = sampling_frame(low, high)
    if last - first + 1 <= max_records:
        first, last = low, high
    rng = np.random.default_rng(seed)
    ids = tuple(np.sort(first + rng.choice(last - first + 1, size=max_records, replace=False)).tolist())
    description = {
        "records_drawn": max_records,
        "id_range": [first, last],
        "window_id_range": [int(low), int(high)],
        "seed": seed,
        "method": "record ids drawn uniformly without replacement (numpy default_rng(seed)) from the "
        "sampling frame id_range: the id range of the records in the time window with its ends rounded "
        f"inwards to a step of at most 1/{FRAME_STEPS} of it (it leaves out under 2% of the window and "
        "stays the same while records are appended, until the next step), then the filters applied",
    }
    return Draw((first, last), ids, description)


def sampling_frame(low: int, high: int) -> tuple[int, int]:
    """``[low, high]`` with its ends rounded inwards to a multiple of the frame step: the largest power of
    two not above ``(high - low + 1) / FRAME_STEPS`` (1 for a range under ``2 * FRAME_STEPS``)."""
    step = 1 << max(0, ((high - low + 1) // FRAME_STEPS).bit_length() - 1)
    return -(-low // step) * step, (high + 1) // step * step - 1


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
    base = sa.select(*columns).join(AuditRecord, AuditDrift.record_id == AuditRecord.id)
    if selected.id_range is None:
        return []
    dialect = connection.dialect.name
    low, high = selected.id_range
    in_range = AuditDrift.record_id.between(low, high)
    if selected.ids is None:
        return list(connection.execute(base.where(*by_record_ids(in_range, conditions, dialect))).all())
    rows: list[Any] = []
    for start in range(0, len(selected.ids), _IN_CHUNK):
        drawn = AuditDrift.record_id.in_(selected.ids[start : start + _IN_CHUNK])
        rows += connection.execute(base.where(*by_record_ids(drawn, [in_range, *conditions], dialect))).all()
    return rows
