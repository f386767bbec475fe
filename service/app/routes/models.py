"""The model pairs the service serves, and those it could not load (with the reason).

Server paths (the pair folders, paths in reasons and manifests) are shown to the ``admin`` role only; other
roles see the folder as ``null``, paths under the artifacts folder relative to it and any other absolute
path as ``<path>``.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter

from engine.predict import resolve_models
from service.app.deps import AnyKeyDep, StateDep
from service.app.errors import error_responses
from service.app.schemas import ModelInfo, ModelsResponse, NotReadyModel
from service.audit.chain import utc_iso

router = APIRouter(tags=["models"])

HIDDEN_PATH = "<path>"
# an absolute POSIX path (not preceded by a word character, so "1/2" or "a/b" stay) or a Windows one
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])(?:/|[A-Za-z]:[\\/])[^\s'\"`,;()<>]+")


def _manifest_of(pair: Any) -> dict[str, Any]:
    manifest: Any = getattr(pair, "manifest", None)
    if manifest is not None and hasattr(manifest, "to_dict"):
        manifest = manifest.to_dict()
    return dict(manifest) if isinstance(manifest, dict) else {}


def hide_paths(value: Any, artifacts_dir: str) -> Any:
    """``value`` (text or JSON) with paths under ``artifacts_dir`` made relative and other absolute paths
    replaced by :data:`HIDDEN_PATH`."""
    if isinstance(value, str):
        root = artifacts_dir.rstrip("/\\")
        text = (
            value.replace(root + "/", "").replace(root + "\\", "").replace(root, HIDDEN_PATH)
            if root
            else value
        )
        return _ABSOLUTE_PATH.sub(HIDDEN_PATH, text)
    if isinstance(value, dict):
        return {k: hide_paths(v, artifacts_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [hide_paths(v, artifacts_dir) for v in value]
    return value


@router.get(
    "/models",
    response_model=ModelsResponse,
    summary="loaded model pairs with their manifests, and the ones not ready with reasons "
    "(server paths for the admin role only)",
    responses=error_responses(401, 403),
)
def list_models(state: StateDep, principal: AnyKeyDep) -> ModelsResponse:
    admin = principal.role == "admin"
    root = str(state.settings.artifacts_dir)

    def shown(value: Any) -> Any:
        return value if admin else hide_paths(value, root)

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
                folder=served.folder if admin else None,
                architecture=manifest.get("architecture"),
                digest=served.identity.digest,
                since=utc_iso(served.since),
                default_version=name in defaults,
                class_names=list(pair.class_names),
                input_size=int(pair.input_size),
                manifest=shown(manifest),
            )
        )
    not_ready = [
        NotReadyModel(name=f.name, folder=f.folder if admin else None, reason=shown(f.reason))
        for f in snapshot.failed
    ]
    if not pairs:
        default_models: list[str] = []
    elif state.settings.default_models:
        default_models = resolve_models(pairs, state.settings.default_models, strict=False)
    else:
        default_models = sorted(pairs)
    return ModelsResponse(
        ready=ready, not_ready=not_ready, default_models=default_models, strict=state.settings.strict_models
    )
