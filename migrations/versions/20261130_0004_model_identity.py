"""Model identity on audit_drift rows, and the hash-chained model lifecycle events.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 18:00:00+00:00

``audit_drift`` gains ``model_architecture`` and ``model_digest`` (nullable): rows written before keep NULL,
and the hash chain leaves NULL values of these columns out of a row's content (service/audit/chain.py
``DRIFT_OPTIONAL_CONTENT``), so they verify unchanged. ``audit_model_events`` records every load,
replacement and retirement of a model pair in its own hash chain (service/audit/lifecycle.py), append-only
like the audit tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("model_architecture", "model_digest")
EVENTS = "audit_model_events"


def upgrade() -> None:
    with op.batch_alter_table("audit_drift", recreate="never") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.String(64), nullable=True))
    for name in COLUMNS:
        op.create_index(f"ix_audit_drift_{name}", "audit_drift", [name])
    op.create_table(
        EVENTS,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("model_architecture", sa.String(64), nullable=False),
        sa.Column("model_digest", sa.String(64), nullable=False),
        sa.Column("previous_digest", sa.String(64), nullable=True),
        sa.Column("api_key_name", sa.String(100), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("records_head_id", sa.BigInteger(), nullable=True),
        sa.Column("records_head_hash", sa.String(64), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=f"pk_{EVENTS}"),
        sa.UniqueConstraint("row_hash", name=f"uq_{EVENTS}_row_hash"),
    )
    for name in ("created_at", "event", "model", "model_digest"):
        op.create_index(f"ix_{EVENTS}_{name}", EVENTS, [name])
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for operation in ("update", "delete"):
            op.execute(
                f"CREATE TRIGGER {EVENTS}_append_only_{operation} BEFORE {operation.upper()} ON {EVENTS} "
                f"BEGIN SELECT RAISE(ABORT, '{EVENTS} is append-only: {operation.upper()} rejected'); END"
            )
    else:  # cxr_drift_reject_change() comes from revision 0001
        op.execute(
            f"CREATE TRIGGER {EVENTS}_append_only_row BEFORE UPDATE OR DELETE ON {EVENTS} "
            "FOR EACH ROW EXECUTE FUNCTION cxr_drift_reject_change()"
        )
        op.execute(
            f"CREATE TRIGGER {EVENTS}_append_only_truncate BEFORE TRUNCATE ON {EVENTS} "
            "FOR EACH STATEMENT EXECUTE FUNCTION cxr_drift_reject_change()"
        )


def downgrade() -> None:
    # Values in these columns are part of their rows' hashes, and the events are audit records themselves:
    # refuse unless none exists.
    bind = op.get_bind()
    filled = " OR ".join(f"{name} IS NOT NULL" for name in COLUMNS)
    if (
        bind.execute(sa.text(f"SELECT 1 FROM audit_drift WHERE {filled} LIMIT 1")).first()
        or bind.execute(sa.text(f"SELECT 1 FROM {EVENTS} LIMIT 1")).first()
    ):
        raise RuntimeError(
            "refusing to downgrade below 0004: audit_drift rows hold model_architecture or model_digest "
            f"values that their hash chain covers, or {EVENTS} holds lifecycle records"
        )
    if bind.dialect.name == "sqlite":
        for operation in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {EVENTS}_append_only_{operation}")
    else:
        op.execute(f"DROP TRIGGER IF EXISTS {EVENTS}_append_only_row ON {EVENTS}")
        op.execute(f"DROP TRIGGER IF EXISTS {EVENTS}_append_only_truncate ON {EVENTS}")
    for name in ("created_at", "event", "model", "model_digest"):
        op.drop_index(f"ix_{EVENTS}_{name}", table_name=EVENTS)
    op.drop_table(EVENTS)
    for name in reversed(COLUMNS):
        op.drop_index(f"ix_audit_drift_{name}", table_name="audit_drift")
        op.drop_column("audit_drift", name)
