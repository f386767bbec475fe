"""The filters every audit reader shares (listings, exports, summaries, the rollup): one definition, no
database code, so every reader can import it without importing the others."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["AuditFilters"]


class AuditFilters(BaseModel):
    """Filters of summaries, listings and exports (unset: no filter). ``start`` is inclusive, ``end``
    exclusive; both must be timezone-aware. The same model describes the filters in API responses."""

    model_config = ConfigDict(frozen=True)

    start: datetime | None = None
    end: datetime | None = None
    model: str | None = None
    architecture: str | None = None
    digest: str | None = None
    method: str | None = None
    target_class: str | None = None
    agreement: bool | None = None
    severity: str | None = None
    flagged: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """The filters as JSON values (timestamps as ``datetime.isoformat()``)."""
        return {
            name: (value.isoformat() if isinstance(value, datetime) else value)
            for name, value in self.model_dump().items()
        }
