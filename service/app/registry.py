"""The served model pairs as an immutable snapshot, swapped atomically on reload.

A :class:`Snapshot` maps each served name (the folder's name) to a :class:`ServedPair`: the loaded
:class:`~engine.runtime.ModelPair`, its identity (name, architecture, version digest), its folder and since
when it serves. It never changes; :meth:`ModelRegistry.reload` builds a new one and swaps the reference.

A request takes the current snapshot once, with :meth:`ModelRegistry.use`, and keeps it to the end: a reload
in the meantime changes what the *next* request sees, never the pair a running request computes with. Each
served pair counts the requests using it; a pair that a reload retired or replaced is closed (its retire
hooks run, then ``ModelPair.close``) when the last of those requests finishes, or at once if none holds it.

Reload rules (``POST /admin/models/reload``, ``cxr-drift reload``, and start-up, which is the first
reload): every sub-folder of the artifacts folder holding a ``manifest.json`` is a candidate, named by its
folder. A new name is loaded with its files verified; a served name whose version digest
(core.identity.version_digest, from the manifest) is unchanged is kept as it is (not re-verified); a
changed digest is loaded and verified, then replaces the old one; a served name whose folder is gone is
retired. A folder that fails (bad manifest, hash mismatch, bad name...) is listed with its reason, and a
name that was serving keeps serving its previous version. Each load, replacement and retirement is written
to the lifecycle chain (service/audit/lifecycle.py) **before** the new snapshot serves; if that write fails
the reload changes nothing. At start-up a failed write is kept pending (``/readyz`` says so) and retried on
the next reload or readiness check.

Hooks, for per-pair resources (e.g. an inference batcher): :meth:`ModelRegistry.add_load_hook` runs for a
pair before it first serves; :meth:`ModelRegistry.add_retire_hook` when it is closed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from core.errors import InputError
from core.identity import ModelIdentity, version_digest
from core.manifest import read_manifest
from engine.runtime import ModelPair
from service.audit.lifecycle import ModelEvent

log = logging.getLogger(__name__)

__all__ = [
    "FailedPair",
    "ModelRegistry",
    "ReloadReport",
    "ServedPair",
    "Snapshot",
]


@dataclass(frozen=True)
class FailedPair:
    """A model-pair folder that could not be served, and why."""

    name: str
    folder: str
    reason: str


class _Usage:
    """How many requests use a served pair, and whether it was retired (then closed when unused)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.retired = False
        self.closed = False


@dataclass(frozen=True)
class ServedPair:
    pair: ModelPair
    identity: ModelIdentity
    folder: str
    since: datetime
    usage: _Usage = field(default_factory=_Usage, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.identity.name


@dataclass(frozen=True)
class Snapshot:
    """What is served at one moment (never changes)."""

    served: Mapping[str, ServedPair]
    failed: tuple[FailedPair, ...] = ()
    generation: int = 0

    @property
    def pairs(self) -> dict[str, ModelPair]:
        return {name: served.pair for name, served in self.served.items()}

    @property
    def folders(self) -> dict[str, str]:
        return {name: served.folder for name, served in self.served.items()}


@dataclass
class ReloadReport:
    """What one reload did, by model name."""

    loaded: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[FailedPair] = field(default_factory=list)
    event_ids: list[int] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.replaced or self.retired)


Recorder = Callable[[ModelEvent], int]
Hook = Callable[[ServedPair], None]


class ModelRegistry:
    """The served pairs of one artifacts folder (module docstring)."""

    def __init__(
        self,
        artifacts_dir: Path,
        *,
        backend: str = "onnx",
        ort_threads: int | None = None,
        manifest_key: bytes | None = None,
        device: str = "cpu",
        wrap: Callable[[ModelPair], ModelPair] | None = None,
        record: Recorder | None = None,
    ) -> None:
        self.artifacts_dir = Path(artifacts_dir)
        self.backend = backend
        self.ort_threads = ort_threads
        self.manifest_key = manifest_key
        self.device = device
        self._wrap = wrap  # e.g. the inference batcher: what requests call instead of the loaded pair
        self._record = record
        self._snapshot = Snapshot(served=MappingProxyType({}))
        self._reload_lock = threading.Lock()
        self._load_hooks: list[Hook] = []
        self._retire_hooks: list[Hook] = []
        self.pending: list[ModelEvent] = []

    # ------------------------------------------------------------------------------------------ reading

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @contextlib.contextmanager
    def use(self) -> Iterator[Snapshot]:
        """The current snapshot, its pairs held (not closed by a reload) until the block ends."""
        snapshot = self._snapshot
        held = list(snapshot.served.values())
        for served in held:
            with served.usage.lock:
                served.usage.count += 1
        try:
            yield snapshot
        finally:
            for served in held:
                with served.usage.lock:
                    served.usage.count -= 1
                    close = served.usage.retired and served.usage.count == 0 and not served.usage.closed
                    if close:
                        served.usage.closed = True
                if close:
                    self._close(served)

    # ------------------------------------------------------------------------------------------ hooks

    def add_load_hook(self, hook: Hook) -> None:
        """``hook(served)`` runs for each pair before it first serves (also for pairs already serving)."""
        self._load_hooks.append(hook)
        for served in self._snapshot.served.values():
            hook(served)

    def add_retire_hook(self, hook: Hook) -> None:
        """``hook(served)`` runs when a retired or replaced pair is closed (no request uses it any more)."""
        self._retire_hooks.append(hook)

    def _close(self, served: ServedPair) -> None:
        for hook in self._retire_hooks:
            try:
                hook(served)
            except Exception:
                log.exception("retire hook failed for %s", served.name)
        served.pair.close()
        log.info("model pair %s (%s...) closed", served.name, served.identity.digest[:12])

    def _retire(self, served: ServedPair) -> None:
        with served.usage.lock:
            served.usage.retired = True
            close = served.usage.count == 0 and not served.usage.closed
            if close:
                served.usage.closed = True
        if close:
            self._close(served)

    def close(self) -> None:
        """Retire every pair (at shutdown)."""
        snapshot, self._snapshot = self._snapshot, Snapshot(served=MappingProxyType({}))
        for served in snapshot.served.values():
            self._retire(served)

    # ------------------------------------------------------------------------------------------ reloading

    def _candidates(self) -> list[Path]:
        return sorted(
            p for p in self.artifacts_dir.iterdir() if p.is_dir() and (p / "manifest.json").is_file()
        )

    def _load(self, folder: Path) -> ModelPair:
        kwargs: dict[str, Any] = {
            "verify": True,
            "backend": self.backend,
            "name": folder.name,
            "manifest_key": self.manifest_key,
            "device": self.device,
        }
        if self.ort_threads is not None:
            kwargs["threads"] = self.ort_threads
        pair = ModelPair.load(folder, **kwargs)
        return self._wrap(pair) if self._wrap is not None else pair

    def flush_pending(self) -> None:
        """Write lifecycle events that could not be written at start-up (raises if it still fails)."""
        while self.pending and self._record is not None:
            self._record(self.pending[0])
            self.pending.pop(0)

    def reload(
        self, *, actor: str | None = None, reason: str | None = None, defer_records: bool = False
    ) -> ReloadReport:
        """Rescan the artifacts folder and swap in a new snapshot (module docstring). ``defer_records``: keep
        the lifecycle events pending instead of failing when they cannot be written (start-up)."""
        if reason is not None and len(reason) > 2000:
            raise InputError("reason: at most 2000 characters", code="validation_error")
        with self._reload_lock:
            return self._reload(actor=actor, reason=reason, defer_records=defer_records)

    def _reload(self, *, actor: str | None, reason: str | None, defer_records: bool) -> ReloadReport:
        report = ReloadReport()
        old = self._snapshot
        served: dict[str, ServedPair] = {}
        new_pairs: list[ServedPair] = []
        events: list[ModelEvent] = []
        now = datetime.now(UTC)
        if not self.artifacts_dir.is_dir():
            report.failed.append(
                FailedPair(
                    name="*", folder=str(self.artifacts_dir), reason="artifacts directory does not exist"
                )
            )
            candidates: list[Path] = []
        else:
            candidates = self._candidates()
            if not candidates:
                log.warning("no model pair (folder with manifest.json) under %s", self.artifacts_dir)
        for folder in candidates:
            name = folder.name
            current = old.served.get(name)
            try:
                ModelIdentity.check_name(name)
                digest = version_digest(read_manifest(folder))
                if current is not None and current.identity.digest == digest:
                    served[name] = current
                    report.unchanged.append(name)
                    continue
                pair = self._load(folder)
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
                log.warning("model pair %s not loaded: %s", name, why)
                report.failed.append(FailedPair(name=name, folder=str(folder), reason=why))
                if current is not None:  # keep serving the version that worked
                    served[name] = current
                continue
            fresh = ServedPair(pair=pair, identity=pair.identity, folder=str(folder), since=now)
            served[name] = fresh
            new_pairs.append(fresh)
            if current is None:
                report.loaded.append(name)
                events.append(self._event("load", fresh, None, actor, reason, now))
            else:
                report.replaced.append(name)
                events.append(self._event("replace", fresh, current.identity.digest, actor, reason, now))
        for name, current in old.served.items():
            if name not in served:
                report.retired.append(name)
                events.append(self._event("retire", current, None, actor, reason, now))
        try:
            for hook in self._load_hooks:
                for fresh in new_pairs:
                    hook(fresh)
            if self._record is not None:
                if defer_records:
                    self.pending.extend(events)
                    with contextlib.suppress(Exception):
                        self.flush_pending()
                else:
                    self.flush_pending()
                    report.event_ids = [self._record(event) for event in events]
        except BaseException:
            for fresh in new_pairs:  # nothing was swapped: the new pairs never served
                self._retire(fresh)
            raise
        self._snapshot = Snapshot(
            served=MappingProxyType(dict(sorted(served.items()))),
            failed=tuple(report.failed),
            generation=old.generation + 1,
        )
        for name in report.replaced + report.retired:
            self._retire(old.served[name])
        if report.changed:
            log.info(
                "models reloaded: loaded %s, replaced %s, retired %s, failed %s",
                report.loaded,
                report.replaced,
                report.retired,
                [f.name for f in report.failed],
            )
        return report

    @staticmethod
    def _event(
        kind: str,
        served: ServedPair,
        previous: str | None,
        actor: str | None,
        reason: str | None,
        now: datetime,
    ) -> ModelEvent:
        return ModelEvent(
            event=kind,
            model=served.identity.name,
            model_architecture=served.identity.architecture,
            model_digest=served.identity.digest,
            previous_digest=previous,
            api_key_name=actor,
            reason=reason,
            created_at=now,
        )
