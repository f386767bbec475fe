"""The row hash of the audit chain: the hashed columns, canonical JSON, and the hashed document.

    row_hash = SHA-256( canonical_json({"record": content, "drift": drift_rows, "prev_hash": prev_hash}) )

:func:`compute_row_hash` is the definition; :func:`document_parts` and :func:`spliced_hash` build the same
document from canonical pieces (:mod:`service.audit.chain` writes and verifies with them). Pure: no
database access.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from service.audit.db import stored_json
from service.audit.tables import METRIC_COLUMNS

__all__ = [
    "DRIFT_CONTENT",
    "DRIFT_OPTIONAL_CONTENT",
    "GENESIS_HASH",
    "PAYLOAD_KEY",
    "RECORD_CONTENT",
    "SPLICED",
    "canonical_json",
    "compute_row_hash",
    "document_parts",
    "drift_content",
    "drift_json",
    "spliced_hash",
    "utc_iso",
]

GENESIS_HASH = "0" * 64
# The hashed columns of a record and of a drift row.
RECORD_CONTENT: tuple[str, ...] = (
    "request_id",
    "created_at",
    "api_key_name",
    "image_sha256",
    "image_format",
    "image_width",
    "image_height",
    "image_nbytes",
    "options",
    "payload",
)
DRIFT_CONTENT: tuple[str, ...] = (
    "model",
    "method",
    "target_class",
    "transfer_class",
    "finetuned_class",
    "agreement",
    "drift_score",
    "severity",
    "flagged",
    *METRIC_COLUMNS,
    "drift_index",
    "reference_percentile",
    "head_scale_control_iou",
    "model_architecture",
    "model_digest",
)
# Columns added after the first release (revisions 0002, 0004): hashed only when set, so every row written
# before them verifies exactly as it did, and setting or clearing one later still changes the hash.
DRIFT_OPTIONAL_CONTENT: tuple[str, ...] = (
    "drift_index",
    "reference_percentile",
    "head_scale_control_iou",
    "model_architecture",
    "model_digest",
)


def utc_iso(value: datetime) -> str:
    """``value`` as UTC ISO-8601 with microseconds and a ``Z``: the form timestamps are hashed and shown in."""
    if value.tzinfo is None:
        raise ValueError(f"expected a timezone-aware datetime, got naive {value.isoformat()}")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return utc_iso(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical_value(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, ASCII, floats as shortest round-trip repr, UTC ISO timestamps.

    Of a JSON value (str keys, no timestamps) it is :func:`~service.audit.db.stored_json`, the text the JSON
    columns hold."""
    return stored_json(_canonical_value(value))


def compute_row_hash(
    record: Mapping[str, Any], drift_rows: Sequence[Mapping[str, Any]], prev_hash: str
) -> str:
    """SHA-256 (hex) of a record's content, its drift rows (sorted by model, method) and ``prev_hash``."""
    content = {name: record[name] for name in RECORD_CONTENT}
    rows = sorted(
        (
            {
                name: row[name]
                for name in DRIFT_CONTENT
                if name not in DRIFT_OPTIONAL_CONTENT or row.get(name) is not None
            }
            for row in drift_rows
        ),
        key=lambda row: (row["model"], row["method"]),
    )
    document = canonical_json({"record": content, "drift": rows, "prev_hash": prev_hash})
    return hashlib.sha256(document.encode("ascii")).hexdigest()


# The same document assembled from canonical pieces, so that the JSON columns' stored text (which is their
# canonical JSON, db.stored_json) is hashed as it is, and append serialises everything but prev_hash before
# it takes the chain lock. Tests check it against compute_row_hash, the definition.
SPLICED = ("options", "payload")
_RECORD_ORDER = tuple(sorted(RECORD_CONTENT))  # the order sort_keys writes them in
_BEFORE = _RECORD_ORDER[: _RECORD_ORDER.index("options")]
_AFTER = _RECORD_ORDER[_RECORD_ORDER.index("payload") + 1 :]
# verify's fast path relies on this layout (see stored.stored_row_hash): the two texts side by side, then one string
if _RECORD_ORDER[len(_BEFORE) : len(_BEFORE) + 2] != SPLICED or _AFTER != ("request_id",):
    raise RuntimeError(
        f"record columns {_RECORD_ORDER}: re-examine stored.stored_row_hash before changing them"
    )
PAYLOAD_KEY = ',"payload":'
_OPTIONAL = frozenset(DRIFT_OPTIONAL_CONTENT)


def drift_content(values: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A drift row's hashed content from its (name, value) pairs of DRIFT_CONTENT: optional ones when set."""
    return {name: value for name, value in values if value is not None or name not in _OPTIONAL}


def drift_json(contents: list[dict[str, Any]]) -> str:
    """The canonical JSON of drift rows' content as :func:`compute_row_hash` hashes it (plain JSON values)."""
    contents.sort(key=lambda row: (row["model"], row["method"]))
    return stored_json(contents)


def document_parts(content: Mapping[str, Any], drift_json: str) -> tuple[str, str]:
    """The hashed document before and after the ``prev_hash`` value.

    ``content``: the record's hashed columns, ``created_at`` as its :func:`utc_iso` text and ``options`` and
    ``payload`` as their canonical JSON text, spliced in as they are.
    """
    before = stored_json({name: content[name] for name in _BEFORE})
    after = stored_json({name: content[name] for name in _AFTER})
    record = f'{before[:-1]},"options":{content["options"]}{PAYLOAD_KEY}{content["payload"]},{after[1:]}'
    return '{"drift":' + drift_json + ',"prev_hash":', ',"record":' + record + "}"


def spliced_hash(parts: tuple[str, str], prev_hash: str) -> str:
    document = parts[0] + stored_json(prev_hash) + parts[1]
    return hashlib.sha256(document.encode("utf-8")).hexdigest()
