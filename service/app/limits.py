"""Request body cap and body read timeout as pure ASGI middleware.

A request whose ``Content-Length`` exceeds the cap is answered 413 before any of its body is read. A request
without one (chunked) is counted as it streams: the moment the running total passes the cap the client gets
413 and the application's read fails, so at most one chunk beyond the cap is ever held in memory.

A body that has not fully arrived ``timeout_s`` after the application first asked for it (a client that
declares a body and sends it slowly or never) is answered 408 and the connection closed; the application's
read fails the same way. Requests whose body is never read (a 401 from the headers) are not affected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

__all__ = ["BodyReadTimeout", "BodyReadTimeoutMiddleware", "BodySizeLimitMiddleware", "BodyTooLarge"]


class BodyTooLarge(HTTPException):
    """Raised inside the application's ``receive`` when the streamed body passes the cap.

    It is an ``HTTPException`` so FastAPI's body parsing lets it through unchanged (it re-raises those).
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


def _error_body(limit: int, received: int | None) -> bytes:
    detail = {"limit_bytes": limit}
    if received is not None:
        detail["content_length"] = received
    message = f"request body exceeds the limit of {limit} bytes"
    return json.dumps(
        {"error": {"code": "payload_too_large", "message": message, "details": detail}}
    ).encode()


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        if max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            log.info("413: Content-Length %d exceeds %d bytes (%s)", declared, limit, scope.get("path"))
            await _send_413(send, _error_body(limit, declared))
            return

        received = 0
        response_started = False
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not response_started and not rejected:
                        rejected = True
                        await _send_413(send, _error_body(limit, None))
                    raise BodyTooLarge(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if rejected:
                return  # the 413 is already on the wire; whatever the app answers after it is dropped
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not rejected and not response_started:
                await _send_413(send, _error_body(limit, None))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyReadTimeout(HTTPException):
    """Raised inside the application's ``receive`` when the body does not arrive in time (see BodyTooLarge)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s")
        self.timeout_s = timeout_s


def _timeout_body(timeout_s: float) -> bytes:
    message = f"the request body did not arrive within {timeout_s:g} s"
    return json.dumps(
        {"error": {"code": "request_timeout", "message": message, "details": {"timeout_s": timeout_s}}}
    ).encode()


class BodyReadTimeoutMiddleware:
    def __init__(self, app: ASGIApp, *, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timeout_s = self.timeout_s
        deadline: float | None = None
        body_done = False
        response_started = False
        rejected = False

        async def timed_receive() -> Message:
            nonlocal deadline, body_done, rejected
            if body_done:
                return await receive()  # e.g. waiting for a disconnect while streaming the answer
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout_s
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - now))
            except TimeoutError:
                if not response_started and not rejected:
                    rejected = True
                    log.info("408: request body not received within %g s (%s)", timeout_s, scope.get("path"))
                    await _send_json(send, 408, _timeout_body(timeout_s))
                raise BodyReadTimeout(timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if rejected:
                return  # the 408 is already on the wire
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except BodyReadTimeout:
            if not rejected and not response_started:
                await _send_json(send, 408, _timeout_body(timeout_s))


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
