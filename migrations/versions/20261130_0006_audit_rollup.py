"""Daily rollups of the drift rows (service/audit/rollup.py), backfilled from the rows already stored.

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-30 07:00:00+00:00

``audit_rollup`` is derived data (not hash-chained): one row per (UTC day, model, method), maintained in each
append's transaction and checked against the verified rows by ``rollup.check``. The backfill streams the
existing rows once (about 15 s per million drift rows on one core).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "audit_rollup",
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("agreed", sa.BigInteger(), nullable=False),
        sa.Column("flagged", sa.BigInteger(), nullable=False),
        sa.Column("stats", sa.LargeBinary(), nullable=False),
        sa.Column("hist", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("day", "model", "method", name="pk_audit_rollup"),
    )
    _backfill(table)


def _backfill(table: sa.Table) -> None:
    """This revision's rollup (by day, model, method) from the app's rollup of every row."""
    from service.audit import rollup  # the one definition of the rollup (the app's)

    daily = rollup.by_day_model_method(rollup.recompute(op.get_bind()))
    rows = [{"day": k[0], "model": k[1], "method": k[2], **acc.values()} for k, acc in sorted(daily.items())]
    if rows:
        op.bulk_insert(table, rows)


def downgrade() -> None:
    op.drop_table("audit_rollup")
