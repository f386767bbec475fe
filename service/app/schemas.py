"""Response models of every route (they are what the committed OpenAPI document describes).

The per-model report mirrors the engine's ``DriftReport.to_dict()``; models allow extra keys so that a field
the engine adds later reaches clients without a schema change here (it just is not documented yet).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.predict import PredictOptions
from service.audit.queries import AuditFilters

__all__ = [
    "AuditRecord",
    "AuditRecordPage",
    "AuditSummaryResponse",
    "AuditVerifyResponse",
    "HealthResponse",
    "ModelsResponse",
    "PredictResponse",
    "ReadyResponse",
]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class CheckpointPrediction(_Open):
    index: int
    class_name: str = Field(alias="class")
    probabilities: dict[str, float]


class Predictions(_Open):
    transfer: CheckpointPrediction
    finetuned: CheckpointPrediction


class TargetClass(_Open):
    index: int
    name: str
    source: Literal["finetuned_prediction", "requested"] | str


class MethodReport(_Open):
    metrics: dict[str, float | dict[str, float | None] | None]
    drift_score: float | None = None
    drift_index: float | None = Field(
        default=None,
        description="0 = no more than the transfer checkpoint moves under benign input changes (calibrated "
        "noise floor), 1 = as different as unrelated maps; severity is a fixed band of it",
    )
    severity: Literal["low", "moderate", "high"] | None = None
    reference_percentile: float | None = Field(
        default=None,
        description="percent of this pair's calibration images (of the target class when it has its own "
        "reference) with a drift score at or below this one: how unusual the request is for this pair",
    )
    own_prediction: dict[str, Any] | None = Field(
        default=None,
        description="when the checkpoints disagree: each checkpoint's map of its own prediction compared",
    )
    flagged: bool = False
    flags: list[str] = Field(default_factory=list)
    diagnostics: dict[str, Any] = Field(default_factory=dict)


class MethodMaps(BaseModel):
    """One method's maps for both checkpoints: base64 PNG overlays, or raw (S, S) arrays in [0, 1]."""

    transfer: str | list[list[float]]
    finetuned: str | list[list[float]]
    transfer_own: str | list[list[float]] | None = Field(
        default=None, description="when the checkpoints disagree: the transfer map for its own prediction"
    )
    finetuned_own: str | list[list[float]] | None = Field(
        default=None, description="when the checkpoints disagree: the fine-tuned map for its own prediction"
    )


class ModelReport(_Open):
    model: str = Field(description="the model pair's name (its folder's name)")
    architecture: str | None = Field(default=None, description="the pair's architecture (manifest)")
    model_digest: str | None = Field(
        default=None, description="version digest: SHA-256 over the checkpoint hashes and the manifest"
    )
    class_names: list[str]
    predictions: Predictions
    agreement: bool
    target_class: TargetClass
    methods: dict[str, MethodReport]
    thresholds: dict[str, Any] = Field(default_factory=dict)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    maps: dict[str, MethodMaps] | None = Field(
        default=None, description="present when maps=overlay (base64 PNG) or maps=raw (nested lists)"
    )


class ImageInfo(BaseModel):
    sha256: str
    format: str
    width: int
    height: int
    nbytes: int


class PredictResponse(BaseModel):
    request_id: str
    audit_record_id: int
    audit_row_hash: str
    image: ImageInfo
    options: PredictOptions
    results: list[ModelReport]
    timings_ms: dict[str, float]


class AuditRecord(_Open):
    """One audit row: the request, the image's digest (never its bytes), the chain hashes, per (model, method)
    drift rows, and (single-record view) the stored reports and timings."""

    id: int
    request_id: str
    created_at: datetime
    api_key_name: str | None = None
    image_sha256: str
    image_format: str
    image_width: int
    image_height: int
    image_nbytes: int
    options: dict[str, Any]
    prev_hash: str
    row_hash: str
    drift: list[dict[str, Any]] = Field(default_factory=list)
    reports: list[dict[str, Any]] | None = None
    timings_ms: dict[str, Any] | None = None
    maps: dict[str, Any] | None = Field(
        default=None,
        description="maps kept for review (CXR_DRIFT_KEEP_MAPS; single-record view): keep, grid, kept and "
        "models -> method -> checkpoint -> {shape, min, max, uint8 (base64)}; absent when none were kept",
    )


class AuditRecordPage(BaseModel):
    items: list[AuditRecord]
    next_before_id: int | None = Field(description="pass as before_id to get the next (older) page")


class AuditFiltersOut(AuditFilters):
    # The audit layer's filters, as applied (times in UTC); a subclass only to keep the schema's name.
    pass


class AuditSummaryResponse(BaseModel):
    filters: AuditFiltersOut
    group_by: list[str]
    summary: dict[str, Any] = Field(description="aggregates as computed by the audit layer")


class ModelEventsVerify(BaseModel):
    ok: bool
    checked: int
    first_bad_id: int | None
    reason: str | None
    head_id: int | None = None
    head_hash: str | None = None


class AuditVerifyResponse(BaseModel):
    ok: bool = Field(description="both chains verify: the records and the model lifecycle events")
    checked: int = Field(description="rows verified before the first bad one (all of them when ok)")
    first_bad_id: int | None
    reason: str | None
    head_id: int | None = Field(default=None, description="id of the newest row that verified")
    head_hash: str | None = Field(
        default=None,
        description="row_hash of that row: store it outside the database and pass it later as `anchor`; "
        "a chain can only show truncation of its newest rows against such an external copy",
    )
    anchor_found: bool | None = Field(
        default=None,
        description="whether the `anchor` given is a row of the verified chain (null: none given)",
    )
    since_id: int | None = Field(
        default=None, description="incremental verification: the anchored head the check started after"
    )
    model_events: ModelEventsVerify | None = Field(
        default=None,
        description="the model lifecycle chain (service/audit/lifecycle.py): hashes, links, and each "
        "event's anchor in the records' chain",
    )


class ModelInfo(BaseModel):
    name: str = Field(description="the name it is served under: its folder's name")
    folder: str | None = Field(None, description="the pair's folder on the server (admin role only)")
    architecture: str | None
    digest: str = Field(
        description="version digest (core.identity.version_digest): what every audit row records"
    )
    since: str = Field(description="UTC ISO-8601 time since which this version serves")
    default_version: bool = Field(
        description="whether it is the default version of its architecture (the served name that sorts last)"
    )
    class_names: list[str]
    input_size: int
    manifest: dict[str, Any]


class NotReadyModel(BaseModel):
    name: str
    folder: str | None = Field(None, description="the folder on the server (admin role only)")
    reason: str


class ModelsResponse(BaseModel):
    ready: list[ModelInfo]
    not_ready: list[NotReadyModel]
    default_models: list[str] = Field(
        description="the names a /predict without models= runs (CXR_DRIFT_DEFAULT_MODELS, or every served pair)"
    )
    strict: bool = Field(description="CXR_DRIFT_STRICT_MODELS: whether one failed folder makes /readyz 503")


class ReloadRequest(BaseModel):
    reason: str | None = Field(
        default=None, max_length=2000, description="why (kept in the lifecycle records)"
    )


class ReloadResponse(BaseModel):
    loaded: list[str]
    replaced: list[str]
    retired: list[str]
    unchanged: list[str]
    failed: list[NotReadyModel]
    event_ids: list[int] = Field(description="ids of the lifecycle records written (GET /audit/model-events)")


class ModelEventOut(BaseModel):
    id: int
    created_at: str
    event: Literal["load", "replace", "retire"]
    model: str
    model_architecture: str
    model_digest: str
    previous_digest: str | None
    api_key_name: str | None
    reason: str | None
    records_head_id: int | None = Field(description="the newest audit record when the event was written")
    records_head_hash: str | None
    prev_hash: str
    row_hash: str


class ModelEventPage(BaseModel):
    items: list[ModelEventOut]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    uptime_s: float | None = None


class ReadyResponse(BaseModel):
    ready: bool
    models_ready: list[str]
    models_failed: list[NotReadyModel]
    database: str
    reasons: list[str]
    strict: bool = Field(
        default=True, description="CXR_DRIFT_STRICT_MODELS: a failed model folder makes the service not ready"
    )
