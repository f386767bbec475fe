"""64-bit ids (``bigint`` on PostgreSQL) and the commit-deadline trigger of the service's appends.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 18:00:00+00:00

Revision 0001 created the ids as ``integer`` (int4, at most 2^31-1) while the API accepts ids up to 2^63-1
(and a busy service would exhaust int4 eventually): an id above 2^31-1 made PostgreSQL answer "integer
out of range". SQLite's INTEGER PRIMARY KEY is already 64-bit: nothing changes there. The ids are not part
of a row's hash, so rows verify unchanged. Downgrading refuses while an id does not fit in int4.

PostgreSQL also gets ``audit_records_commit_deadline``, a deferred constraint trigger that refuses a COMMIT
reached after the deadline the service set for it (see the end of this file and service/audit/chain.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column) pairs holding ids, and the sequences behind the primary keys
ID_COLUMNS: tuple[tuple[str, str], ...] = (
    ("audit_records", "id"),
    ("audit_drift", "id"),
    ("audit_drift", "record_id"),
    ("api_keys", "id"),
)
INT4_MAX = 2**31 - 1


def _sequence(table: str, column: str) -> str | None:
    name = op.get_bind().execute(sa.text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table, "c": column})
    return name.scalar()


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite integers are 64-bit already
    for table, column in ID_COLUMNS:
        op.alter_column(
            table, column, type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False
        )
        sequence = _sequence(table, column)
        if sequence is not None:
            op.execute(f"ALTER SEQUENCE {sequence} AS bigint MAXVALUE 9223372036854775807")
    create_commit_deadline()


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for table, column in ID_COLUMNS:
        too_big = bind.execute(sa.text(f"SELECT max({column}) FROM {table}")).scalar()
        if too_big is not None and too_big > INT4_MAX:
            raise RuntimeError(
                f"refusing to downgrade below 0003: {table}.{column} holds {too_big}, which does not fit in "
                f"a 32-bit integer"
            )
    for table, column in ID_COLUMNS:
        sequence = _sequence(table, column)
        if sequence is not None:
            last = bind.execute(sa.text(f"SELECT last_value FROM {sequence}")).scalar()
            if last is not None and last > INT4_MAX:
                raise RuntimeError(
                    f"refusing to downgrade below 0003: sequence {sequence} is at {last}, beyond 32-bit ids"
                )
            op.execute(f"ALTER SEQUENCE {sequence} AS integer MAXVALUE {INT4_MAX}")
    drop_commit_deadline()
    for table, column in ID_COLUMNS:
        op.alter_column(
            table, column, type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False
        )


# --------------------------------------------------------------------------------- commit deadline
# The service sets `cxr_drift.commit_deadline` (epoch seconds) in each append transaction, a margin before
# its client-side watchdog gives up. A deferred constraint trigger checks it when COMMIT runs: a server
# that stalled (stopped, partitioned) and resumes after the client answered 503 refuses the COMMIT
# instead of committing a row for a request that was answered with an error.
COMMIT_DEADLINE_FUNCTION = """
CREATE FUNCTION cxr_drift_check_commit_deadline() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    deadline text := current_setting('cxr_drift.commit_deadline', true);
BEGIN
    IF deadline IS NOT NULL AND deadline <> ''
            AND extract(epoch FROM clock_timestamp()) > deadline::double precision THEN
        RAISE EXCEPTION 'audit append reached COMMIT after its deadline: the client has given up'
            USING ERRCODE = 'query_canceled';
    END IF;
    RETURN NULL;
END;
$$
"""
COMMIT_DEADLINE_TRIGGER = (
    "CREATE CONSTRAINT TRIGGER audit_records_commit_deadline AFTER INSERT ON audit_records "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION cxr_drift_check_commit_deadline()"
)


def create_commit_deadline() -> None:
    op.execute(COMMIT_DEADLINE_FUNCTION)
    op.execute(COMMIT_DEADLINE_TRIGGER)


def drop_commit_deadline() -> None:
    op.execute("DROP TRIGGER IF EXISTS audit_records_commit_deadline ON audit_records")
    op.execute("DROP FUNCTION IF EXISTS cxr_drift_check_commit_deadline()")
