"""What the app's lifespan loads: database engine, the model registry (pairs verified), metrics; kept on
``app.state``.

A model pair that fails to load (missing file, hash mismatch, unreadable manifest...) is recorded with its
reason and the service keeps running without it; ``/readyz`` then says why it is not ready (unless
``CXR_DRIFT_STRICT_MODELS=false``). The served pairs live in :class:`service.app.registry.ModelRegistry`:
an immutable snapshot swapped by ``POST /admin/models/reload``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy

from engine.runtime import ModelPair
from service.app.inference import Inference, session_threads
from service.app.metrics import Metrics
from service.app.registry import FailedPair, ModelRegistry
from service.app.settings import Settings
from service.audit import db, lifecycle
from service.audit.anchor import AnchorExporter

log = logging.getLogger(__name__)

__all__ = ["AppState", "FailedPair", "load_state", "make_registry"]


@dataclass
class AppState:
    settings: Settings
    engine: sqlalchemy.Engine
    metrics: Metrics
    registry: ModelRegistry
    inference: Inference  # admission + batching (service/app/inference.py)
    started_at: float = field(default_factory=time.time)
    anchors: AnchorExporter | None = None

    # The current snapshot's views (a request that needs one consistent view uses registry.use()).
    @property
    def pairs(self) -> dict[str, ModelPair]:
        return self.registry.snapshot.pairs

    @property
    def folders(self) -> dict[str, str]:
        return self.registry.snapshot.folders

    @property
    def failed(self) -> list[FailedPair]:
        return list(self.registry.snapshot.failed)

    def ready_names(self) -> list[str]:
        return sorted(self.registry.snapshot.served)

    def close(self) -> None:
        self.registry.close()  # retire hooks stop each pair's batchers (queued work finished first)
        if self.anchors is not None:
            self.anchors.stop()
        self.engine.dispose()


def make_registry(
    settings: Settings, engine: sqlalchemy.Engine, inference: Inference | None = None
) -> ModelRegistry:
    """A registry of ``settings.artifacts_dir`` that writes its lifecycle events to ``engine`` and serves
    each pair through ``inference`` (batching) when given."""

    def record(event: lifecycle.ModelEvent) -> int:
        return lifecycle.append_event(engine, event).id

    return ModelRegistry(
        Path(settings.artifacts_dir),
        backend=settings.backend,
        ort_threads=session_threads(settings),
        manifest_key=settings.manifest_key_bytes(),
        device=settings.device,
        wrap=inference.attach if inference is not None else None,
        record=record,
    )


def load_state(settings: Settings, *, metrics: Metrics) -> AppState:
    """Migrate (if configured), connect, load and verify the model pairs (their loads recorded)."""
    if settings.migrate_on_start:
        db.upgrade(settings.database_url)
    engine = db.make_engine(
        settings.database_url,
        db.DbTimeouts(timeout_s=settings.db_timeout_s, read_timeout_s=settings.db_read_timeout_s),
    )
    inference = Inference(settings, metrics)
    registry = make_registry(settings, engine, inference)
    registry.reload(reason="service start", defer_records=True)
    if registry.pending:
        log.error("%d model lifecycle record(s) could not be written yet", len(registry.pending))
    anchors = None
    if settings.anchor_interval_s > 0:
        key = settings.anchor_key.get_secret_value() if settings.anchor_key is not None else None
        anchors = AnchorExporter(
            engine, interval_s=settings.anchor_interval_s, path=settings.anchor_file, key=key
        ).start()
    return AppState(
        settings=settings,
        engine=engine,
        metrics=metrics,
        registry=registry,
        inference=inference,
        anchors=anchors,
    )
