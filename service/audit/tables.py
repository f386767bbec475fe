"""Tables of the audit database (SQLAlchemy 2 typed declarative models).

``audit_records`` holds one hash-chained row per served request, ``audit_drift`` one row per record x model
x method with the drift metrics as plain float columns (so summaries aggregate in SQL), ``api_keys`` the
hashed API keys. No image bytes and no patient identifiers are stored: the image is known by its SHA-256.
The migrations in ``migrations/versions`` create exactly these tables (a test compares them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from engine.metrics import SCALAR_METRICS

__all__ = [
    "AUDIT_TABLES",
    "METRIC_COLUMNS",
    "ApiKeyRow",
    "AuditDrift",
    "AuditModelEvent",
    "AuditRecord",
    "AuditRollup",
    "AuditRollupState",
    "Base",
    "IdType",
    "UtcDateTime",
    "metadata",
]

# Deterministic constraint names, so migrations can name what they drop (Alembic "naming conventions").
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# One float column per drift metric (declared one by one on AuditDrift below; the migration test checks them).
METRIC_COLUMNS: tuple[str, ...] = SCALAR_METRICS

AUDIT_TABLES: tuple[str, ...] = ("audit_records", "audit_drift", "audit_model_events")

# Ids are 64-bit on both databases (the API accepts ids up to 2^63-1): ``bigint`` on PostgreSQL (revision
# 0003), and SQLite's INTEGER PRIMARY KEY, which is 64-bit already and the only type that autoincrements.
IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every dialect (SQLite stores naive text: we store UTC there)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"expected a timezone-aware datetime, got naive {value.isoformat()}")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime(), dict[str, Any]: sa.JSON()}


metadata = Base.metadata


class AuditRecord(Base):
    """One served request. ``row_hash`` = SHA-256 of the canonical content, drift rows and ``prev_hash``."""

    __tablename__ = "audit_records"
    # revision 0007: the id range of a time window from the index alone (service/audit/sample.py draw)
    __table_args__ = (sa.Index("ix_audit_records_created_at_id", "created_at", "id"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    api_key_name: Mapped[str | None] = mapped_column(sa.String(100), index=True)
    image_sha256: Mapped[str] = mapped_column(sa.String(64), index=True)
    image_format: Mapped[str] = mapped_column(sa.String(16))
    image_width: Mapped[int] = mapped_column(sa.Integer)
    image_height: Mapped[int] = mapped_column(sa.Integer)
    image_nbytes: Mapped[int] = mapped_column(sa.BigInteger)
    # PostgreSQL `json` (not jsonb) keeps the text as written, so the hash recomputes from the stored value.
    options: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    prev_hash: Mapped[str] = mapped_column(sa.String(64))
    row_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)


class AuditDrift(Base):
    """One record x model x method: the drift metrics as columns. Metrics are NULL when undefined."""

    __tablename__ = "audit_drift"
    __table_args__ = (
        sa.UniqueConstraint("record_id", "model", "method", name="uq_audit_drift_record_model_method"),
        sa.Index("ix_audit_drift_model_method", "model", "method"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    record_id: Mapped[int] = mapped_column(IdType, sa.ForeignKey("audit_records.id"), index=True)
    model: Mapped[str] = mapped_column(sa.String(64))
    method: Mapped[str] = mapped_column(sa.String(32), index=True)
    target_class: Mapped[str] = mapped_column(sa.String(100), index=True)
    transfer_class: Mapped[str] = mapped_column(sa.String(100))
    finetuned_class: Mapped[str] = mapped_column(sa.String(100))
    agreement: Mapped[bool] = mapped_column(sa.Boolean, index=True)
    drift_score: Mapped[float | None] = mapped_column(sa.Double)
    severity: Mapped[str] = mapped_column(sa.String(16), index=True)
    flagged: Mapped[bool] = mapped_column(sa.Boolean, index=True)
    iou: Mapped[float | None] = mapped_column(sa.Double)
    dice: Mapped[float | None] = mapped_column(sa.Double)
    soft_iou: Mapped[float | None] = mapped_column(sa.Double)
    pearson: Mapped[float | None] = mapped_column(sa.Double)
    spearman: Mapped[float | None] = mapped_column(sa.Double)
    ssim: Mapped[float | None] = mapped_column(sa.Double)
    centroid_shift: Mapped[float | None] = mapped_column(sa.Double)
    peak_shift: Mapped[float | None] = mapped_column(sa.Double)
    zone_shift: Mapped[float | None] = mapped_column(sa.Double)
    emd: Mapped[float | None] = mapped_column(sa.Double)
    entropy_change: Mapped[float | None] = mapped_column(sa.Double)
    gini_change: Mapped[float | None] = mapped_column(sa.Double)
    # revision 0002: the absolute drift index and the request's percentile among the pair's reference scores
    drift_index: Mapped[float | None] = mapped_column(sa.Double)
    reference_percentile: Mapped[float | None] = mapped_column(sa.Double)
    # GradCAM++ only: IoU of the head-scale control map with the fine-tuned map (1 - residual drift)
    head_scale_control_iou: Mapped[float | None] = mapped_column(sa.Double)
    # revision 0004: which version answered (``model`` is the pair's name); NULL on older rows, whose ``model``
    # was the architecture
    model_architecture: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    model_digest: Mapped[str | None] = mapped_column(sa.String(64), index=True)


class AuditModelEvent(Base):
    """A model lifecycle event (revision 0004): a pair loaded, replaced by another version, or retired.

    Hash-chained on its own (``prev_hash``/``row_hash``, service/audit/lifecycle.py) and anchored in the
    records' chain: ``records_head_id``/``records_head_hash`` name the newest audit record when it happened.
    """

    __tablename__ = "audit_model_events"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(index=True)
    event: Mapped[str] = mapped_column(sa.String(16), index=True)
    model: Mapped[str] = mapped_column(sa.String(64), index=True)
    model_architecture: Mapped[str] = mapped_column(sa.String(64))
    model_digest: Mapped[str] = mapped_column(sa.String(64), index=True)
    previous_digest: Mapped[str | None] = mapped_column(sa.String(64))
    api_key_name: Mapped[str | None] = mapped_column(sa.String(100))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    records_head_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    records_head_hash: Mapped[str | None] = mapped_column(sa.String(64))
    prev_hash: Mapped[str] = mapped_column(sa.String(64))
    row_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)


class AuditRollup(Base):
    """Revision 0006: one (UTC day, model, method) of drift rows, rolled up (service/audit/rollup.py);
    revision 0007 adds architecture and version digest to the key.

    Derived data, not part of the hash chain: brought up to the watermark of ``audit_rollup_state`` (revision
    0007; before it, in each append's transaction) and checked
    against the (verified) raw rows by ``rollup.check``."""

    __tablename__ = "audit_rollup"

    day: Mapped[str] = mapped_column(sa.String(10), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    method: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    count: Mapped[int] = mapped_column(sa.BigInteger)
    agreed: Mapped[int] = mapped_column(sa.BigInteger)
    flagged: Mapped[int] = mapped_column(sa.BigInteger)
    stats: Mapped[bytes] = mapped_column(sa.LargeBinary)  # float64 [n, sum, sum of squares, min, max] x S
    hist: Mapped[bytes] = mapped_column(sa.LargeBinary)  # uint32 S x (BINS + 2)
    # revision 0007: the architecture (model_architecture, else the model) and version digest ("" for none)
    architecture: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(sa.String(64), primary_key=True)


class ApiKeyRow(Base):
    """An API key: only its SHA-256 is stored; revoked keys stay (with ``revoked_at``) for the record."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(100), unique=True)
    role: Mapped[str] = mapped_column(sa.String(16))
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class AuditRollupState(Base):
    """Revision 0007: how far ``audit_rollup`` goes, in one row (``id`` 1): ``watermark`` is the highest
    record id whose drift rows are in the rollup (service/audit/rollup.py ``catch_up``)."""

    __tablename__ = "audit_rollup_state"

    id: Mapped[int] = mapped_column(
        sa.BigInteger, primary_key=True, autoincrement=False
    )  # ids are 64-bit (0003)
    watermark: Mapped[int] = mapped_column(sa.BigInteger)
