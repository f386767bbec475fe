"""The dashboard's browser session: HMAC-signed cookies and CSRF tokens (standard library only).

A session cookie is ``base64url(json payload) "." base64url(HMAC-SHA256(secret, "session." payload))``. The
payload holds the key's name and role, the SHA-256 of the key (never the key: each page re-checks that the
key is still active, so revoking it ends the session), the expiry (Unix seconds) and the session's CSRF
token. The cookie is HttpOnly, SameSite=Strict, Path=/dashboard and Secure when configured.

Before a session exists, the sign-in form is protected by a double-submit token: a signed pre-session
cookie and the same token in a hidden field. Every state-changing form of a session carries the session's
CSRF token. Tokens are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COOKIE_PATH",
    "PRESESSION_COOKIE",
    "SESSION_COOKIE",
    "Session",
    "SessionSigner",
    "tokens_match",
]

SESSION_COOKIE = "cxr_dashboard_session"
PRESESSION_COOKIE = "cxr_dashboard_csrf"
COOKIE_PATH = "/dashboard"
_VERSION = 1


@dataclass(frozen=True)
class Session:
    """A signed-in browser: the key's name (None when auth is disabled), role and digest, expiry, CSRF token."""

    name: str | None
    role: str
    key_sha256: str
    expires: int
    csrf: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def tokens_match(a: str | None, b: str | None) -> bool:
    """Both tokens present and equal (constant time)."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


class SessionSigner:
    """Signs and reads the dashboard's cookies with one secret (``purpose`` separates the cookie kinds)."""

    def __init__(self, secret: bytes, *, lifetime_s: int) -> None:
        if len(secret) < 32:
            raise ValueError("the session secret must be at least 32 bytes")
        self._secret = secret
        self.lifetime_s = lifetime_s

    @property
    def open_csrf(self) -> str:
        """The CSRF token of the forms when auth is disabled (no session): fixed per secret."""
        return self._mac("open", "csrf")

    def _mac(self, purpose: str, body: str) -> str:
        return _b64(hmac.new(self._secret, f"{purpose}.{body}".encode(), hashlib.sha256).digest())

    def _sign(self, purpose: str, payload: dict[str, Any]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{self._mac(purpose, body)}"

    def _read(self, purpose: str, value: str | None) -> dict[str, Any] | None:
        if not value or value.count(".") != 1:
            return None
        body, mac = value.split(".")
        if not hmac.compare_digest(mac.encode("ascii", "replace"), self._mac(purpose, body).encode()):
            return None
        try:
            payload = json.loads(_unb64(body))
        except (binascii.Error, ValueError):
            return None
        return payload if isinstance(payload, dict) else None

    # ------------------------------------------------------------------------------------ the session

    def new_session(
        self, *, name: str | None, role: str, key_sha256: str, now: float | None = None
    ) -> Session:
        now = time.time() if now is None else now
        return Session(
            name=name,
            role=role,
            key_sha256=key_sha256,
            expires=int(now) + self.lifetime_s,
            csrf=secrets.token_urlsafe(32),
        )

    def dumps(self, session: Session) -> str:
        return self._sign(
            "session",
            {
                "v": _VERSION,
                "name": session.name,
                "role": session.role,
                "kh": session.key_sha256,
                "exp": session.expires,
                "csrf": session.csrf,
            },
        )

    def loads(self, value: str | None, *, now: float | None = None) -> Session | None:
        """The session in ``value``; None when missing, tampered with, malformed or expired."""
        payload = self._read("session", value)
        if payload is None or payload.get("v") != _VERSION:
            return None
        try:
            session = Session(
                name=None if payload["name"] is None else str(payload["name"]),
                role=str(payload["role"]),
                key_sha256=str(payload["kh"]),
                expires=int(payload["exp"]),
                csrf=str(payload["csrf"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        now = time.time() if now is None else now
        return session if now < session.expires else None

    # -------------------------------------------------------------------------- before the session

    def new_presession(self) -> tuple[str, str]:
        """(cookie value, token for the form's hidden field) for the sign-in form."""
        token = secrets.token_urlsafe(32)
        return self._sign("presession", {"t": token}), token

    def presession_token(self, value: str | None) -> str | None:
        payload = self._read("presession", value)
        token = payload.get("t") if payload else None
        return token if isinstance(token, str) else None
