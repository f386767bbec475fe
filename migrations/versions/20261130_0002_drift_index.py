"""Absolute drift index, reference percentile and the GradCAM++ head-scale control on audit_drift rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 12:00:00+00:00

Rows written before this revision keep NULL in these columns; the hash chain leaves NULL values of these
columns out of a row's content (service/audit/chain.py), so those rows verify unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("drift_index", "reference_percentile", "head_scale_control_iou")


def upgrade() -> None:
    with op.batch_alter_table("audit_drift", recreate="never") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Double(), nullable=True))


def downgrade() -> None:
    # Values in these columns are part of their rows' hashes: dropping them would make every such row fail
    # verification for good. Refuse unless no row holds one.
    filled = " OR ".join(f"{name} IS NOT NULL" for name in COLUMNS)
    if op.get_bind().execute(sa.text(f"SELECT 1 FROM audit_drift WHERE {filled} LIMIT 1")).first():
        raise RuntimeError(
            "refusing to downgrade below 0002: audit_drift rows hold drift_index, reference_percentile or "
            "head_scale_control_iou values that their hash chain covers; dropping them would break it"
        )
    # both dialects support DROP COLUMN for a plain nullable column (SQLite >= 3.35)
    for name in reversed(COLUMNS):
        op.drop_column("audit_drift", name)
