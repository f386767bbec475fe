"""Audit tables (hash-chained records, per model x method drift rows), API keys, append-only triggers.

Revision ID: 0001
Revises:
Create Date: 2026-11-26 12:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

METRICS = (
    "iou",
    "dice",
    "soft_iou",
    "pearson",
    "spearman",
    "ssim",
    "centroid_shift",
    "peak_shift",
    "zone_shift",
    "emd",
    "entropy_change",
    "gini_change",
)
APPEND_ONLY_TABLES = ("audit_records", "audit_drift")


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("api_key_name", sa.String(100), nullable=True),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_format", sa.String(16), nullable=False),
        sa.Column("image_width", sa.Integer(), nullable=False),
        sa.Column("image_height", sa.Integer(), nullable=False),
        sa.Column("image_nbytes", sa.BigInteger(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_records"),
        sa.UniqueConstraint("request_id", name="uq_audit_records_request_id"),
        sa.UniqueConstraint("row_hash", name="uq_audit_records_row_hash"),
    )
    op.create_index("ix_audit_records_created_at", "audit_records", ["created_at"])
    op.create_index("ix_audit_records_api_key_name", "audit_records", ["api_key_name"])
    op.create_index("ix_audit_records_image_sha256", "audit_records", ["image_sha256"])

    op.create_table(
        "audit_drift",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("record_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("target_class", sa.String(100), nullable=False),
        sa.Column("transfer_class", sa.String(100), nullable=False),
        sa.Column("finetuned_class", sa.String(100), nullable=False),
        sa.Column("agreement", sa.Boolean(), nullable=False),
        sa.Column("drift_score", sa.Double(), nullable=True),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        *(sa.Column(name, sa.Double(), nullable=True) for name in METRICS),
        sa.ForeignKeyConstraint(
            ["record_id"], ["audit_records.id"], name="fk_audit_drift_record_id_audit_records"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_audit_drift"),
        sa.UniqueConstraint("record_id", "model", "method", name="uq_audit_drift_record_model_method"),
    )
    op.create_index("ix_audit_drift_record_id", "audit_drift", ["record_id"])
    op.create_index("ix_audit_drift_model_method", "audit_drift", ["model", "method"])
    op.create_index("ix_audit_drift_method", "audit_drift", ["method"])
    op.create_index("ix_audit_drift_target_class", "audit_drift", ["target_class"])
    op.create_index("ix_audit_drift_agreement", "audit_drift", ["agreement"])
    op.create_index("ix_audit_drift_severity", "audit_drift", ["severity"])
    op.create_index("ix_audit_drift_flagged", "audit_drift", ["flagged"])

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("name", name="uq_api_keys_name"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )

    _create_append_only_triggers()


def downgrade() -> None:
    _drop_append_only_triggers()
    op.drop_table("api_keys")
    op.drop_index("ix_audit_drift_flagged", table_name="audit_drift")
    op.drop_index("ix_audit_drift_severity", table_name="audit_drift")
    op.drop_index("ix_audit_drift_agreement", table_name="audit_drift")
    op.drop_index("ix_audit_drift_target_class", table_name="audit_drift")
    op.drop_index("ix_audit_drift_method", table_name="audit_drift")
    op.drop_index("ix_audit_drift_model_method", table_name="audit_drift")
    op.drop_index("ix_audit_drift_record_id", table_name="audit_drift")
    op.drop_table("audit_drift")
    op.drop_index("ix_audit_records_image_sha256", table_name="audit_records")
    op.drop_index("ix_audit_records_api_key_name", table_name="audit_records")
    op.drop_index("ix_audit_records_created_at", table_name="audit_records")
    op.drop_table("audit_records")


# Append-only in the database itself: a client that bypasses the application still cannot UPDATE/DELETE.
# Named <table>_append_only_<op> so tests (acting as an attacker with admin rights) can drop or disable them.
def _create_append_only_triggers() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for table in APPEND_ONLY_TABLES:
            for operation in ("update", "delete"):
                op.execute(
                    f"CREATE TRIGGER {table}_append_only_{operation} BEFORE {operation.upper()} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {operation.upper()} rejected'); END"
                )
    elif dialect == "postgresql":
        op.execute(
            """
            CREATE FUNCTION cxr_drift_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '% is append-only: % rejected', TG_TABLE_NAME, TG_OP
                    USING ERRCODE = 'insufficient_privilege';
            END;
            $$
            """
        )
        for table in APPEND_ONLY_TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_append_only_row BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION cxr_drift_reject_change()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_append_only_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION cxr_drift_reject_change()"
            )
    else:
        raise NotImplementedError(f"append-only triggers for {dialect!r}: expected sqlite or postgresql")


def _drop_append_only_triggers() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for table in APPEND_ONLY_TABLES:
            for operation in ("update", "delete"):
                op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only_{operation}")
    elif dialect == "postgresql":
        for table in APPEND_ONLY_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only_row ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only_truncate ON {table}")
        op.execute("DROP FUNCTION IF EXISTS cxr_drift_reject_change()")
