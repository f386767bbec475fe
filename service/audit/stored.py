"""Reading a stored audit row back as it was hashed: the row hash recomputed from the columns as SQL reads
them raw, and the checks that what SQL reads is exactly what is hashed (canonical JSON texts, SQLite's
timestamp text and storage types). Used by :mod:`service.audit.verify`; no web or model code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func

from service.audit.db import legacy_stored_json, stored_json
from service.audit.hashing import (
    DRIFT_CONTENT,
    PAYLOAD_KEY,
    RECORD_CONTENT,
    SPLICED,
    document_parts,
    drift_content,
    drift_json,
    spliced_hash,
    utc_iso,
)
from service.audit.tables import AuditDrift

__all__ = ["sqlite_drift_types_ok", "stored_row_hash"]


def stored_row_hash(record: Sequence[Any], drift: Sequence[Sequence[Any]], sqlite: bool) -> str:
    """The hash of a stored record, from its columns as :func:`verify` reads them raw.

    ``record``: id, prev_hash, row_hash, then :data:`RECORD_CONTENT`; ``drift``: its rows, each record_id,
    then :data:`DRIFT_CONTENT` and, on SQLite, the flag "every value has its column's storage type". Raises
    ValueError or TypeError when a stored value is not in the one form append() writes.

    The JSON texts are hashed as they are stored when they are canonical (what append writes): if the hash
    then matches, the stored text is byte for byte the text append hashed, so it has no duplicated key and
    is not reformatted, and SQL reads what is hashed. That holds because the document around the two texts
    is rebuilt from the other columns, whose canonical form fixes where it ends before ``options`` and starts
    after ``payload``, and neither text contains the separator ``,"payload":`` between them, so no part of
    one can have moved into the other. Any other text (a row written before canonical storage, or a changed
    one) is parsed: it must be exactly db.stored_json or db.legacy_stored_json of its value, which is hashed.
    """
    prev_hash, row_hash = record[1], record[2]
    content = dict(zip(RECORD_CONTENT, record[3:], strict=True))
    content["created_at"] = utc_iso(_stored_created_at(content["created_at"]))
    drift_text = None
    if not sqlite or all(row[-1] == 1 for row in drift):
        rows = [drift_content(zip(DRIFT_CONTENT, row[1:], strict=False)) for row in drift]
        if sqlite:  # booleans are stored as 0 or 1 (checked by the flag)
            for row in rows:
                for name in _DRIFT_BOOLEANS:
                    row[name] = None if row[name] is None else row[name] == 1
        drift_text = drift_json(rows)
        if all(isinstance(content[n], str) and PAYLOAD_KEY not in content[n] for n in SPLICED):
            actual = spliced_hash(document_parts(content, drift_text), prev_hash)
            if actual == row_hash:
                return actual
    for name in SPLICED:
        content[name] = _canonical_stored_json(name, content[name])
    if drift_text is None:  # SQLite: a value without its column's storage type; this names it
        stored = [_parse_stored_drift(dict(zip(DRIFT_CONTENT, row[1:], strict=False))) for row in drift]
        drift_text = drift_json([drift_content(row.items()) for row in stored])
    return spliced_hash(document_parts(content, drift_text), prev_hash)


def _canonical_stored_json(name: str, value: Any) -> str:
    """The canonical JSON of a JSON column's value, from its stored text, which must be the text append()
    writes for that value (or wrote, before canonical storage)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        return stored_json(value)  # SQLite gave a number back: it is hashed as read
    parsed = json.loads(value)
    canonical = stored_json(parsed)
    # SQL reads the text (SQLite's json_extract takes a duplicated key's first value, Python its last):
    # require the text to be exactly what append() wrote for the value that is hashed.
    if value != canonical and value != legacy_stored_json(parsed):
        json.loads(value, object_pairs_hook=_no_duplicate_keys)  # names a duplicated key
        raise ValueError(f"{name}: the stored JSON text is not the form append() writes")
    return canonical


def _stored_created_at(created: Any) -> datetime:
    """``created_at`` as append() stored it: PostgreSQL's driver gives a timestamp, SQLite its text."""
    if isinstance(created, str):
        text = created
        created = datetime.fromisoformat(text)
        # SQLite compares and groups the text (time filters, day/week): it must be the one stored form
        if created.tzinfo is not None or created.strftime(_SQLITE_TIMESTAMP) != text:
            raise ValueError(f"created_at: stored text {text[:40]!r} is not the form append() writes")
    if not isinstance(created, datetime):
        raise TypeError(f"created_at: expected a timestamp, got {type(created).__name__}")
    return created.replace(tzinfo=UTC) if created.tzinfo is None else created


# how SQLAlchemy stores a naive UTC datetime in SQLite
_SQLITE_TIMESTAMP = "%Y-%m-%d %H:%M:%S.%f"
_DRIFT_BOOLEANS = tuple(
    name for name in DRIFT_CONTENT if isinstance(AuditDrift.__table__.columns[name].type, sa.Boolean)
)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate JSON key(s) {sorted({k for k in keys if keys.count(k) > 1})[:5]}")
    return dict(pairs)


def sqlite_drift_types_ok() -> sa.ColumnElement[Any]:
    """SQLite: whether every hashed drift value has its column's storage type (the checks of
    :func:`_parse_stored_drift`, which names the value when this is false)."""
    checks = []
    for name in DRIFT_CONTENT:
        column = getattr(AuditDrift, name)
        kind = func.typeof(column)
        column_type = AuditDrift.__table__.columns[name].type
        if isinstance(column_type, sa.Boolean):
            checks.append(sa.or_(kind == "null", sa.and_(kind == "integer", column.in_([0, 1]))))
        elif isinstance(column_type, sa.Float):
            checks.append(kind.in_(["null", "real"]))
        elif isinstance(column_type, sa.String):
            checks.append(kind.in_(["null", "text"]))
    return sa.case((sa.and_(*checks), 1), else_=0).label("types_ok")


def _parse_stored_drift(row: dict[str, Any]) -> dict[str, Any]:
    """A SQLite drift row from its values as stored: each must have its column's storage type (SQLite does
    not enforce them), so SQL reads what is hashed (e.g. ``agreement`` 2 reads as true in Python but is
    not ``IS 1`` in a filter; the text '0.5' is not the number 0.5 to an aggregate)."""
    parsed: dict[str, Any] = {}
    for name, value in row.items():
        column_type = AuditDrift.__table__.columns[name].type
        if value is None:
            parsed[name] = None
        elif isinstance(column_type, sa.Boolean):
            if type(value) is not int or value not in (0, 1):
                raise ValueError(f"{name}: stored {value!r} is not a boolean 0 or 1")
            parsed[name] = bool(value)
        elif isinstance(column_type, sa.Float):
            if type(value) is not float:
                raise ValueError(f"{name}: stored {value!r} is not a REAL")
            parsed[name] = value
        elif isinstance(column_type, sa.String):
            if type(value) is not str:
                raise ValueError(f"{name}: stored {value!r} is not TEXT")
            parsed[name] = value
        else:
            parsed[name] = value
    return parsed
