"""API keys kept in the audit database: created once, stored as a hash, revocable.

A key is ``cxr_`` + 32 random bytes (URL-safe base64). Only ``hash_key(key)`` = SHA-256 hex of the key's
UTF-8 bytes is stored; because keys are 256-bit random, a salt or a slow hash adds nothing (the same digest
form is accepted from settings as ``CXR_DRIFT_API_KEYS=name:role:sha256hex``). Roles: ``predict``
(``POST /predict``), ``audit`` (the ``/audit`` endpoints) and ``admin`` (both).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import exc

from core.errors import InputError
from core.vocabulary import ROLES
from service.audit.db import translate_errors
from service.audit.tables import ApiKeyRow

__all__ = [
    "KEY_PREFIX",
    "ROLES",
    "ApiKey",
    "authenticate",
    "authenticate_digest",
    "check_key_name",
    "create_key",
    "hash_key",
    "list_keys",
    "revoke_key",
    "role_allows",
]

log = logging.getLogger(__name__)

KEY_PREFIX = "cxr_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")


@dataclass(frozen=True)
class ApiKey:
    name: str
    role: str
    created_at: datetime | None = None
    revoked_at: datetime | None = None

    def allows(self, role: str) -> bool:
        return role_allows(self.role, role)


def role_allows(granted: str, required: str) -> bool:
    """Whether a key of role ``granted`` may use an endpoint that requires ``required`` (admin: all)."""
    return granted == "admin" or granted == required


def hash_key(plaintext: str) -> str:
    """SHA-256 hex digest of the key's UTF-8 bytes: what is stored, and what settings list."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise InputError(f"unknown role {role!r}; valid options: {', '.join(ROLES)}")
    return role


def check_key_name(name: str) -> str:
    """The one rule for API key names, wherever they come from (``cxr-drift keys create``, the database,
    ``CXR_DRIFT_API_KEYS``): 1-100 letters, digits and ``_ . @ -``, starting with a letter or digit (so a
    name is never a spreadsheet formula). Raises :class:`InputError` (a ``ValueError``) otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(
            f"invalid key name {name!r}: expected 1-100 characters, letters, digits and _ . @ -, "
            "starting with a letter or digit"
        )
    return name


def create_key(engine: sa.Engine, *, name: str, role: str) -> str:
    """Store a new key named ``name`` with ``role`` and return its plaintext (shown this one time only)."""
    check_key_name(name)
    _check_role(role)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    with translate_errors("create an API key"):
        try:
            with engine.begin() as connection:
                connection.execute(
                    sa.insert(ApiKeyRow).values(
                        name=name, role=role, key_hash=hash_key(plaintext), created_at=datetime.now(UTC)
                    )
                )
        except exc.IntegrityError as error:
            raise InputError(f"an API key named {name!r} already exists (names are unique)") from error
    log.info("API key %r created with role %r", name, role)
    return plaintext


def authenticate(engine: sa.Engine, key: str) -> ApiKey | None:
    """The active (not revoked) key matching ``key``, or None."""
    if not key:
        return None
    return authenticate_digest(engine, hash_key(key))


def authenticate_digest(engine: sa.Engine, digest: str) -> ApiKey | None:
    """The active (not revoked) key whose :func:`hash_key` is ``digest``, or None (a dashboard session
    keeps the digest, never the key, and re-checks it on every page so a revoked key ends the session)."""
    with translate_errors("check an API key"), engine.connect() as connection:
        row = connection.execute(
            sa.select(ApiKeyRow).where(ApiKeyRow.key_hash == digest, ApiKeyRow.revoked_at.is_(None))
        ).first()
    # The lookup is by digest; compare again in constant time so no code path branches on a partial match.
    if row is None or not hmac.compare_digest(row.key_hash.encode(), digest.encode()):
        return None
    return ApiKey(name=row.name, role=row.role, created_at=row.created_at, revoked_at=row.revoked_at)


def list_keys(engine: sa.Engine) -> list[ApiKey]:
    """Every key, revoked ones included, by name (never the hashes)."""
    with translate_errors("list API keys"), engine.connect() as connection:
        rows = connection.execute(sa.select(ApiKeyRow).order_by(ApiKeyRow.name)).all()
    return [ApiKey(name=r.name, role=r.role, created_at=r.created_at, revoked_at=r.revoked_at) for r in rows]


def revoke_key(engine: sa.Engine, *, name: str) -> None:
    """Revoke the key ``name`` (it stays listed, with ``revoked_at``); revoking twice keeps the first time."""
    with translate_errors("revoke an API key"), engine.begin() as connection:
        row = connection.execute(sa.select(ApiKeyRow).where(ApiKeyRow.name == name)).first()
        if row is None:
            known = connection.execute(sa.select(ApiKeyRow.name).order_by(ApiKeyRow.name)).scalars().all()
            raise InputError(f"no API key named {name!r}; existing keys: {', '.join(known) or '(none)'}")
        if row.revoked_at is not None:
            log.info("API key %r was already revoked at %s", name, row.revoked_at.isoformat())
            return
        connection.execute(
            sa.update(ApiKeyRow).where(ApiKeyRow.id == row.id).values(revoked_at=datetime.now(UTC))
        )
    log.info("API key %r revoked", name)
