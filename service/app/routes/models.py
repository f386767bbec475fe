"""The model pairs the service serves, and those it could not load (with the reason)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from engine.predict import resolve_models
from service.app.deps import AnyKeyDep, StateDep
from service.app.errors import error_responses
from service.app.schemas import ModelInfo, ModelsResponse, NotReadyModel
from service.audit.chain import utc_iso

router = APIRouter(tags=["models"])


def _manifest_of(pair: Any) -> dict[str, Any]:
    manifest: Any = getattr(pair, "manifest", None)
    if manifest is not None and hasattr(manifest, "to_dict"):
        manifest = manifest.to_dict()
    return dict(manifest) if isinstance(manifest, dict) else {}


@router.get(
    "/models",
    response_model=ModelsResponse,
    summary="loaded model pairs with their manifests, and the ones not ready with reasons",
    responses=error_responses(401, 403),
)
def list_models(state: StateDep, principal: AnyKeyDep) -> ModelsResponse:
    snapshot = state.registry.snapshot  # one consistent view
    pairs = snapshot.pairs
    defaults = set(resolve_models(pairs, sorted({p.architecture for p in pairs.values()}), strict=False))
    ready = []
    for name, served in snapshot.served.items():
        pair = served.pair
        manifest = _manifest_of(pair)
        ready.append(
            ModelInfo(
                name=name,
                folder=served.folder,
                architecture=manifest.get("architecture"),
                digest=served.identity.digest,
                since=utc_iso(served.since),
                default_version=name in defaults,
                class_names=list(pair.class_names),
                input_size=int(pair.input_size),
                manifest=manifest,
            )
        )
    not_ready = [NotReadyModel(name=f.name, folder=f.folder, reason=f.reason) for f in snapshot.failed]
    if not pairs:
        default_models: list[str] = []
    elif state.settings.default_models:
        default_models = resolve_models(pairs, state.settings.default_models, strict=False)
    else:
        default_models = sorted(pairs)
    return ModelsResponse(
        ready=ready, not_ready=not_ready, default_models=default_models, strict=state.settings.strict_models
    )
