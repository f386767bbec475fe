"""A bound on the image decodes running at once (memory: each holds up to ``max_pixels`` float32 pixels).

A request takes a decode slot before it decodes and gives it back when the decode thread has finished (the
thread pool call is not cancelled by a client that goes away, so the slot is held exactly as long as the
memory). When every slot is busy it waits at most ``decode_wait_s``, then gets :class:`core.errors.Overloaded`
(503 with ``Retry-After``). The inference queue is bounded separately (engine/runtime, service/app/state).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from core.errors import Overloaded
from service.app.settings import Settings

__all__ = ["DecodeLimiter", "decode_limiter"]

_APP_STATE_KEY = "decode_limiter"


class DecodeLimiter:
    """At most ``slots`` decodes at once; a caller waits at most ``wait_s`` for one."""

    def __init__(self, slots: int, wait_s: float) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if not wait_s > 0:
            raise ValueError(f"wait_s must be positive, got {wait_s}")
        self.slots = slots
        self.wait_s = wait_s
        self._semaphore = asyncio.Semaphore(slots)
        self.active = 0
        self.refused = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._semaphore.acquire(), timeout=self.wait_s)
        except TimeoutError:
            self.refused += 1
            raise Overloaded(
                f"all {self.slots} image decode slots stayed busy for {self.wait_s:g} s; retry later",
                retry_after=max(1, math.ceil(self.wait_s)),
                details={"max_concurrent_decodes": self.slots, "waited_s": self.wait_s},
            ) from None
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._semaphore.release()


def decode_limiter(app: Any, settings: Settings) -> DecodeLimiter:
    """The app's limiter, made on first use from ``settings`` (one per app, on ``app.state``)."""
    limiter = getattr(app.state, _APP_STATE_KEY, None)
    if limiter is None:
        limiter = DecodeLimiter(settings.max_concurrent_decodes, settings.decode_wait_s)
        setattr(app.state, _APP_STATE_KEY, limiter)
    return limiter
