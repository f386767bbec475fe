"""Security headers on every answer, chosen per path: :class:`SecurityHeadersMiddleware` (pure ASGI).

Every answer gets ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``, ``Referrer-Policy:
no-referrer``, ``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Resource-Policy: same-origin``.
``Content-Security-Policy`` and ``Cache-Control`` come from the first :class:`PathPolicy` whose prefix the
path starts with (:data:`PATH_POLICIES`), else from :data:`DEFAULT_POLICY`:

- the JSON API (default): ``default-src 'none'; frame-ancestors 'none'`` (a JSON answer loads nothing) and
  ``Cache-Control: no-store`` (answers may hold audit data; keys travel in headers);
- ``/docs`` (the locally served Swagger UI): scripts, styles, images and fetches from the same origin only
  (Swagger UI also needs inline ``style`` attributes and ``data:`` images; no inline script is used);
  its versioned assets may be cached;
- ``/dashboard``: same-origin scripts, styles, images and fetches.

To serve another kind of page, add a :class:`PathPolicy` (longest prefix first) to :data:`PATH_POLICIES` or
pass ``policies=`` to the middleware. A ``Cache-Control`` the route set itself is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "API_CSP",
    "COMMON_HEADERS",
    "DEFAULT_POLICY",
    "PAGE_CSP",
    "PATH_POLICIES",
    "PathPolicy",
    "SecurityHeadersMiddleware",
    "headers_for",
]

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# a same-origin browser page: its own scripts, styles, images and API calls, nothing from elsewhere
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; manifest-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# Swagger UI renders with inline style attributes (React); its script is loaded from 'self' only
DOCS_CSP = PAGE_CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")

COMMON_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
)


@dataclass(frozen=True)
class PathPolicy:
    """The CSP and Cache-Control of the paths starting with ``prefix`` (``/docs`` matches ``/docs`` and
    ``/docs/...``, not ``/docsx``)."""

    prefix: str
    csp: str
    cache_control: str = "no-store"

    def matches(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix.rstrip("/") + "/")


DEFAULT_POLICY = PathPolicy(prefix="/", csp=API_CSP, cache_control="no-store")
PATH_POLICIES: tuple[PathPolicy, ...] = (
    PathPolicy("/docs/assets", DOCS_CSP, "public, max-age=86400"),
    PathPolicy("/docs", DOCS_CSP, "no-store"),
    PathPolicy("/dashboard", PAGE_CSP, "no-store"),
)


def headers_for(path: str, policies: Sequence[PathPolicy] = PATH_POLICIES) -> list[tuple[str, str]]:
    """The security headers of an answer to ``path`` (Cache-Control included)."""
    policy = next((p for p in policies if p.matches(path)), DEFAULT_POLICY)
    return [
        *COMMON_HEADERS,
        ("content-security-policy", policy.csp),
        ("cache-control", policy.cache_control),
    ]


class SecurityHeadersMiddleware:
    """Add :func:`headers_for` the request path to every HTTP answer; a header the app already set wins."""

    def __init__(self, app: ASGIApp, *, policies: Sequence[PathPolicy] = PATH_POLICIES) -> None:
        self.app = app
        self.policies = tuple(policies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers_for(scope["path"], self.policies)
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers.extend((k, v) for k, v in extra if k not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
