"""One JSON error model for every 4xx/5xx answer: ``{"error": {"code", "message", "details"}}``.

Handlers turn :class:`ApiError`, the domain errors of :mod:`core.errors` (the input or an artifact is
wrong), Starlette/FastAPI ``HTTPException`` and request validation errors into that shape. Any other
exception is a bug: a 500 whose details carry the request id (also in the ``X-Request-ID`` header) and whose
traceback is logged under that id, so a client never has to parse HTML or a bare string and a bug never
looks like the client's fault.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import ArtifactError, DomainError, Overloaded
from core.imageio import ImageTooLargeError, UnsupportedFormatError, scrub_reprs
from service.app.headers import headers_for
from service.audit.db import DatabaseUnavailable

log = logging.getLogger(__name__)

__all__ = [
    "REQUEST_ID_HEADER",
    "ApiError",
    "ErrorBody",
    "ErrorResponse",
    "RequestIdMiddleware",
    "error_responses",
    "install_error_handlers",
    "request_id_of",
]

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_KEY = "request_id"

# Domain error class -> (status, default code); the first match wins, so subclasses come first.
_DOMAIN_STATUS: tuple[tuple[type[DomainError], int, str], ...] = (
    (ImageTooLargeError, 413, "image_too_large"),
    (UnsupportedFormatError, 415, "unsupported_media_type"),
    (ArtifactError, 503, "artifact_unavailable"),
    (Overloaded, 503, "overloaded"),
    (DomainError, 422, "invalid_input"),
)

# status -> default code when an HTTPException carries no code of its own
_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorBody


class ApiError(Exception):
    """An error meant for the client: HTTP status, a stable machine code, a message and optional details."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def error_json(
    status_code: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": jsonable_encoder(details)}}
    return JSONResponse(body, status_code=status_code, headers=headers)


_DESCRIPTIONS = {
    401: "missing or invalid API key",
    403: "the API key's role does not allow this route",
    404: "not found",
    408: "the request body did not arrive within the body read timeout",
    413: "request body or image too large",
    415: "unsupported image format",
    422: "invalid input",
    503: "a dependency (database, models) is unavailable, or every decode slot is busy (Retry-After)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting the error model for ``statuses``."""
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS.get(s, "error")} for s in statuses}


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_json(exc.status_code, exc.code, exc.message, exc.details, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    details = None if isinstance(exc.detail, str) else exc.detail
    return error_json(exc.status_code, code, message, details, getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]
    summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
    return error_json(422, "validation_error", scrub_reprs(f"invalid request: {summary}"), errors)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    status, code = next((s, c) for cls, s, c in _DOMAIN_STATUS if isinstance(exc, cls))
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
    # The client's error, not the server's: one INFO line, no traceback, no message (it may quote the input).
    log.info(
        "request %s: %s %s -> %d %s",
        request_id_of(request.scope),
        request.method,
        request.url.path,
        status,
        exc.code or code,
    )
    return error_json(status, exc.code or code, scrub_reprs(str(exc)), exc.details, headers)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    request_id = request_id_of(request.scope)
    log.error(
        "unhandled error (request %s) on %s %s", request_id, request.method, request.url.path, exc_info=exc
    )
    return error_json(
        500,
        "internal_error",
        f"internal server error; the event was logged under request id {request_id}",
        {"request_id": request_id},
        # this answer is made outside the middleware stack: give it the security headers here
        {REQUEST_ID_HEADER: request_id, **dict(headers_for(request.url.path))},
    )


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """An outage (unreachable, stalled, read-only, timed out): 503; the reason (hosts...) only in the log."""
    request_id = request_id_of(request.scope)
    log.warning("audit database unavailable (request %s) on %s: %s", request_id, request.url.path, exc)
    return error_json(
        503,
        "database_unavailable",
        "the audit database is unavailable; retry later",
        {"request_id": request_id},
        {REQUEST_ID_HEADER: request_id, "Retry-After": "5"},
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A database error that is not an outage. Registered per class, so Starlette's ExceptionMiddleware
    answers it and the connection stays open (a handler for ``Exception`` answers from the outermost
    middleware and re-raises, which makes the server close a keep-alive connection)."""
    request_id = request_id_of(request.scope)
    if isinstance(exc, sa_exc.DataError):
        # the database refused a value of the request (out of range, malformed): the client's input
        log.info("database refused a value (request %s) on %s: %s", request_id, request.url.path, exc)
        return error_json(
            422,
            "invalid_input",
            "the database refused a value of this request (out of range or malformed)",
            {"request_id": request_id},
            {REQUEST_ID_HEADER: request_id},
        )
    return await _unhandled(request, exc)


def request_id_of(scope: Scope) -> str:
    """The id :class:`RequestIdMiddleware` gave this request (a new one if it did not run)."""
    state = scope.setdefault("state", {})
    if _REQUEST_ID_KEY not in state:
        state[_REQUEST_ID_KEY] = uuid.uuid4().hex
    return str(state[_REQUEST_ID_KEY])


class RequestIdMiddleware:
    """Give every HTTP request an id (``request.state.request_id``) and answer it in ``X-Request-ID``.

    Pure ASGI, so it sees the scope before every other middleware and the handlers of the app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DatabaseUnavailable, _database_unavailable)
    app.add_exception_handler(sa_exc.SQLAlchemyError, _database_error)
    app.add_exception_handler(Exception, _unhandled)
