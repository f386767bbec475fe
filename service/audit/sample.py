"""The per-record IoUs that the summary's reversal test runs on: every matching record, or a seeded sample.

Over a million records the per-record rows (one per record x model x method) are millions of rows and the
bootstrap runs on all of them; above ``max_records`` records in the time window the test runs on a uniform
random sample instead: ``max_records`` record ids drawn without replacement (NumPy ``default_rng(seed)``)
from the id range of the records in the window, then the drift filters applied to the drawn records (so
fewer may match). The summary reports the draw in ``ranking.sample`` (null when every record was used).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import func

from service.audit.tables import AuditDrift, AuditRecord

__all__ = ["REVERSAL_MAX_RECORDS", "per_record_rows"]

REVERSAL_MAX_RECORDS = 2_000  # the bootstrap is O(n_boot x records): ~0.4 s at 2,000 on one core
_IN_CHUNK = 5_000  # ids per IN (...) list: below SQLite's bound-parameter limit


def per_record_rows(
    connection: sa.Connection,
    time_conditions: list[sa.ColumnElement[bool]],
    conditions: list[sa.ColumnElement[bool]],
    *,
    max_records: int | None,
    seed: int,
) -> tuple[list[Any], dict[str, Any] | None]:
    """(record_id, model, method, iou, head_scale_control_iou) rows under ``conditions``, and the sample
    description (None: all matching records)."""
    columns = (
        AuditDrift.record_id,
        AuditDrift.model,
        AuditDrift.method,
        AuditDrift.iou,
        AuditDrift.head_scale_control_iou,
    )
    base = sa.select(*columns).join(AuditRecord, AuditDrift.record_id == AuditRecord.id).where(*conditions)
    if max_records is not None:
        low, high = connection.execute(
            sa.select(func.min(AuditRecord.id), func.max(AuditRecord.id)).where(*time_conditions)
        ).one()
        if low is not None and high - low + 1 > max_records:
            rng = np.random.default_rng(seed)
            ids = np.sort(low + rng.choice(high - low + 1, size=max_records, replace=False)).tolist()
            rows: list[Any] = []
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                rows += connection.execute(base.where(AuditDrift.record_id.in_(chunk))).all()
            sample = {
                "records_drawn": max_records,
                "id_range": [int(low), int(high)],
                "seed": seed,
                "method": "record ids drawn uniformly without replacement from the id range of the records "
                "in the time window (numpy default_rng(seed)), then the filters applied",
            }
            return rows, sample
    return list(connection.execute(base).all()), None
