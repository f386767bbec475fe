"""Request dependencies as ``Annotated`` type aliases, so handlers never repeat ``Depends(...)``.

Authentication: the key comes in ``X-API-Key`` or ``Authorization: Bearer <key>``. It is checked against the
keys in the settings (SHA-256 digests, compared with ``hmac.compare_digest``) and then against the database
(``service.app.keys.authenticate``). No key or an unknown key: 401; a key whose role does not allow the
route: 403. Role ``admin`` allows everything.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import sqlalchemy
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.app import keys
from service.app.errors import ApiError
from service.app.settings import Settings
from service.app.state import AppState
from service.audit.db import DatabaseUnavailable

log = logging.getLogger(__name__)

__all__ = [
    "AnyKeyDep",
    "AuditKeyDep",
    "EngineDep",
    "PredictKeyDep",
    "Principal",
    "SettingsDep",
    "StateDep",
    "require_role",
]


@dataclass(frozen=True)
class Principal:
    """Who made the request: the key's name (``None`` when auth is disabled) and its role."""

    name: str | None
    role: str


def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "cxr", None)
    if state is None:
        raise ApiError(503, "not_started", "the service is starting up or shutting down; retry shortly")
    assert isinstance(state, AppState)
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_app_settings(state: StateDep) -> Settings:
    return state.settings


def get_engine(state: StateDep) -> sqlalchemy.Engine:
    return state.engine


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
EngineDep = Annotated[sqlalchemy.Engine, Depends(get_engine)]

# auto_error=False: we answer missing keys ourselves, in the error model; these also document the schemes
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")
_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")


def authenticate(state: AppState, key: str) -> Principal | None:
    """The principal for ``key``: settings keys first (constant-time), then the database's keys."""
    return authenticate_digest(state, keys.hash_key(key))


def authenticate_digest(state: AppState, digest: str) -> Principal | None:
    """The principal whose key has the SHA-256 hex ``digest`` (see :func:`authenticate`)."""
    found: Principal | None = None
    for entry in state.settings.settings_keys():
        # compare against every entry (no early exit), so timing does not tell which prefix matched
        if hmac.compare_digest(digest.encode(), entry.sha256.encode()) and found is None:
            found = Principal(name=entry.name, role=entry.role)
    if found is not None:
        return found
    try:
        api_key = keys.authenticate_digest(state.engine, digest)
    except DatabaseUnavailable as exc:
        log.warning("API key check: audit database unavailable: %s", exc)
        raise ApiError(
            503, "database_unavailable", f"cannot check the API key: audit database {exc.public}; retry later"
        ) from exc
    if api_key is None:
        return None
    return Principal(name=str(api_key.name), role=str(api_key.role))


_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer, ApiKey header="X-API-Key"'}


def check_key(state: AppState, key: str | None, allowed: frozenset[str]) -> Principal:
    """Authenticate ``key`` and require a role in ``allowed``; raises :class:`ApiError` 401/403 otherwise."""
    if not state.settings.auth_enabled:
        return Principal(name=None, role="admin")
    if not key:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send it in the X-API-Key header or as 'Authorization: Bearer <key>'",
            headers=_UNAUTHORIZED_HEADERS,
        )
    principal = authenticate(state, key)
    if principal is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", headers=_UNAUTHORIZED_HEADERS)
    if principal.role not in allowed:
        raise ApiError(
            403,
            "forbidden",
            f"the key {principal.name!r} has role {principal.role!r}; this route needs one of "
            f"{', '.join(sorted(allowed))}",
            details={"role": principal.role, "allowed_roles": sorted(allowed)},
        )
    return principal


def key_from_headers(x_api_key: str | None, authorization: str | None) -> str | None:
    """The key from ``X-API-Key``, else from ``Authorization: Bearer <key>``."""
    if x_api_key:
        return x_api_key
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return None


def allowed_roles(*roles: str) -> frozenset[str]:
    return frozenset(roles) | {"admin"}


# request.state attribute under which UploadAuthMiddleware leaves the principal it authenticated
AUTHENTICATED_STATE_KEY = "cxr_principal"


def require_role(*roles: str) -> Callable[..., Principal]:
    """A dependency that authenticates the request and requires one of ``roles`` (``admin`` passes all)."""
    allowed = allowed_roles(*roles)

    def dependency(
        request: Request,
        state: StateDep,
        api_key: Annotated[str | None, Depends(_api_key_header)],
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        earlier = getattr(request.state, AUTHENTICATED_STATE_KEY, None)
        if isinstance(earlier, Principal) and earlier.role in allowed:
            return earlier  # authenticated by UploadAuthMiddleware for this very request
        key = api_key or (bearer.credentials if bearer is not None else None)
        return check_key(state, key, allowed)

    return dependency


PredictKeyDep = Annotated[Principal, Depends(require_role("predict"))]
AuditKeyDep = Annotated[Principal, Depends(require_role("audit"))]
AnyKeyDep = Annotated[Principal, Depends(require_role("predict", "audit"))]
