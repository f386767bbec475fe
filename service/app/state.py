"""What the app's lifespan loads: database engine, model pairs (verified), metrics; kept on ``app.state``.

A model pair that fails to load (missing file, hash mismatch, unreadable manifest...) is recorded with its
reason and the service keeps running without it; ``/readyz`` then says why it is not ready.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy

from engine.runtime import ModelPair
from service.app.inference import Inference
from service.app.metrics import Metrics
from service.app.settings import Settings
from service.audit import db
from service.audit.anchor import AnchorExporter

log = logging.getLogger(__name__)

__all__ = ["AppState", "FailedPair", "load_pairs", "load_state"]


@dataclass(frozen=True)
class FailedPair:
    """A model-pair folder that could not be served, and why."""

    name: str
    folder: str
    reason: str


@dataclass
class AppState:
    settings: Settings
    engine: sqlalchemy.Engine
    metrics: Metrics
    pairs: dict[str, ModelPair] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)
    failed: list[FailedPair] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    inference: Inference | None = None  # admission + batching (service/app/inference.py)
    anchors: AnchorExporter | None = None

    def ready_names(self) -> list[str]:
        return sorted(self.pairs)

    def close(self) -> None:
        if self.inference is not None:
            for pair in self.pairs.values():
                self.inference.detach(pair)
        if self.anchors is not None:
            self.anchors.stop()
        self.engine.dispose()


def load_pairs(
    artifacts_dir: Path,
    *,
    backend: str,
    ort_threads: int | None = None,
    manifest_key: bytes | None = None,
    device: str = "cpu",
) -> tuple[dict[str, ModelPair], dict[str, str], list[FailedPair]]:
    """Load every model pair under ``artifacts_dir`` (each sub-folder holding a ``manifest.json``).

    Returns the loaded pairs by name, their folders, and the folders that failed with the reason.
    """
    pairs: dict[str, ModelPair] = {}
    folders: dict[str, str] = {}
    failed: list[FailedPair] = []
    if not artifacts_dir.is_dir():
        failed.append(
            FailedPair(name="*", folder=str(artifacts_dir), reason="artifacts directory does not exist")
        )
        return pairs, folders, failed
    kwargs: dict[str, Any] = {
        "verify": True,
        "backend": backend,
        "manifest_key": manifest_key,
        "device": device,
    }
    thread_param = _thread_parameter(ModelPair.load)
    if ort_threads is not None and thread_param is not None:
        kwargs[thread_param] = ort_threads
    candidates = sorted(p for p in artifacts_dir.iterdir() if p.is_dir() and (p / "manifest.json").is_file())
    for folder in candidates:
        try:
            pair = ModelPair.load(folder, **kwargs)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("model pair %s not loaded: %s", folder.name, reason)
            failed.append(FailedPair(name=folder.name, folder=str(folder), reason=reason))
            continue
        name = str(pair.name)
        if name in pairs:
            failed.append(
                FailedPair(
                    name=name,
                    folder=str(folder),
                    reason=f"duplicate model name {name!r}: already served from {folders[name]}",
                )
            )
            continue
        pairs[name] = pair
        folders[name] = str(folder)
        log.info("model pair %s loaded from %s", name, folder)
    if not candidates:
        log.warning("no model pair (folder with manifest.json) under %s", artifacts_dir)
    return pairs, folders, failed


def _thread_parameter(func: Any) -> str | None:
    """The name under which the runtime takes an ONNX Runtime thread count, if it takes one."""
    params = inspect.signature(func).parameters
    return next((n for n in ("ort_threads", "threads", "intra_op_threads") if n in params), None)


def load_state(settings: Settings, *, metrics: Metrics) -> AppState:
    """Migrate (if configured), connect, load and verify the model pairs."""
    if settings.migrate_on_start:
        db.upgrade(settings.database_url)
    engine = db.make_engine(
        settings.database_url,
        db.DbTimeouts(timeout_s=settings.db_timeout_s, read_timeout_s=settings.db_read_timeout_s),
    )
    pairs, folders, failed = load_pairs(
        Path(settings.artifacts_dir),
        backend=settings.backend,
        ort_threads=settings.ort_threads,
        manifest_key=settings.manifest_key_bytes(),
        device=settings.device,
    )
    inference = Inference(settings, metrics)
    pairs = {name: inference.attach(pair) for name, pair in pairs.items()}
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
        pairs=pairs,
        folders=folders,
        failed=failed,
        inference=inference,
        anchors=anchors,
    )
