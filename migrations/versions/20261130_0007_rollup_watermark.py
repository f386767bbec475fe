"""The rollup leaves the append (a watermark in ``audit_rollup_state``) and gains architecture and digest.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 10:00:00+00:00

Up to 0006 each append added its drift rows to ``audit_rollup`` in its own transaction, under the chain
lock. From 0007 appends write only the chained rows; ``rollup.catch_up`` (at summary time when the tail is
long, or ``cxr-drift db rollup``) adds the records after the watermark in batches, and summaries add the tail
themselves (service/audit/rollup.py). The rollup's key gains the architecture and the version digest, so
summaries by version or architecture read it too. The upgrade rebuilds the rollup from the rows (about 15-30 s
per million drift rows on one core) and sets the watermark to the newest record; the downgrade catches it up
to the newest record and merges architectures and versions back into 0006's (day, model, method) rows.
It also adds an index on audit_records (created_at, id): a summary's time window gives its id range from the
index alone (without it PostgreSQL answered min(id) by walking the primary key through the heap: ~0.9 s for
the last 30 days of a million records).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

def _values() -> list[sa.Column[object]]:
    big, blob = sa.BigInteger(), sa.LargeBinary()
    types = {"count": big, "agreed": big, "flagged": big, "stats": blob, "hist": blob}
    return [sa.Column(name, kind, nullable=False) for name, kind in types.items()]


def _key(*names: str) -> list[sa.Column[str]]:
    lengths = {"day": 10, "model": 64, "method": 32, "architecture": 64, "digest": 64}
    return [sa.Column(name, sa.String(lengths[name]), nullable=False) for name in names]


def upgrade() -> None:
    from service.audit import rollup  # the one definition of the rollup (the app's)

    state = op.create_table(
        "audit_rollup_state",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("watermark", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_rollup_state"),
    )
    op.bulk_insert(state, [{"id": 1, "watermark": 0}])
    op.drop_table("audit_rollup")
    op.create_table(
        "audit_rollup",
        *_key("day", "model", "method"),
        *_values(),
        *_key("architecture", "digest"),
        sa.PrimaryKeyConstraint("day", "model", "method", "architecture", "digest", name="pk_audit_rollup"),
    )
    rollup.rebuild(op.get_bind())
    op.create_index("ix_audit_records_created_at_id", "audit_records", ["created_at", "id"])


def downgrade() -> None:
    from service.audit import rollup

    op.drop_index("ix_audit_records_created_at_id", table_name="audit_records")

    connection = op.get_bind()
    rollup.catch_up_connection(connection)
    daily = rollup.by_day_model_method(rollup.stored(connection))
    op.drop_table("audit_rollup")
    table = op.create_table(
        "audit_rollup",
        *_key("day", "model", "method"),
        *_values(),
        sa.PrimaryKeyConstraint("day", "model", "method", name="pk_audit_rollup"),
    )
    rows = [{"day": k[0], "model": k[1], "method": k[2], **acc.values()} for k, acc in sorted(daily.items())]
    if rows:
        op.bulk_insert(table, rows)
    op.drop_table("audit_rollup_state")
