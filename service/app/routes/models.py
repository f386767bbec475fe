"""The model pairs the service serves, and those it could not load (with the reason)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.app.deps import AnyKeyDep, StateDep
from service.app.errors import error_responses
from service.app.schemas import ModelInfo, ModelsResponse, NotReadyModel

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
    ready = []
    for name in state.ready_names():
        pair = state.pairs[name]
        manifest = _manifest_of(pair)
        ready.append(
            ModelInfo(
                name=name,
                folder=state.folders.get(name, ""),
                architecture=manifest.get("architecture"),
                class_names=list(pair.class_names),
                input_size=int(pair.input_size),
                manifest=manifest,
            )
        )
    not_ready = [NotReadyModel(name=f.name, folder=f.folder, reason=f.reason) for f in state.failed]
    return ModelsResponse(ready=ready, not_ready=not_ready)
