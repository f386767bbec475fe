"""Inference in the service: admission (a bound on requests in inference, 503 at once beyond it) and dynamic
batching across requests (:mod:`engine.batching`), configured by the settings.

- :class:`AdmissionMiddleware` holds one :meth:`Inference.admit` slot for each ``POST /predict`` from its
  headers to its last byte: at most ``queue_bound`` predictions are in the service at once (decoding,
  waiting for a batch, running, writing the audit row); one more is answered 503 ``overloaded`` with
  ``Retry-After`` before its body is read or parsed and without taking a worker thread, so an overloaded
  service answers in about the time the request took to arrive instead of growing a queue. It runs before
  the upload authentication, whose key lookup needs a worker thread (and a database read for stored keys):
  shedding must cost less than the work it sheds. A request that then fails authentication gives its slot
  back at once.
- :meth:`Inference.attach` turns a loaded :class:`ModelPair` into the pair the request path uses: with
  ``batching`` on, a :class:`engine.batching.BatchedPair` (one batcher per checkpoint, a window of
  ``batch_window_ms``, ``max_batch`` images, each queue bounded by ``queue_bound`` as an engine-level guard);
  off, the pair itself. :meth:`Inference.detach` stops a pair's batchers (finishing what is queued): the
  registry calls ``attach`` when it loads a pair and ``detach`` when it retires one; :meth:`AppState.close`
  detaches every pair at the end of the lifespan.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

from core.cpus import usable_cores
from core.errors import Overloaded
from engine.batching import BatchConfig, BatchedPair, ComputeSlot
from engine.runtime import ModelPair
from service.app.errors import error_json
from service.app.metrics import Metrics
from service.app.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["ADMITTED_ROUTES", "AdmissionMiddleware", "Inference", "forward_slots", "session_threads"]

RETRY_AFTER_S = 1
T = TypeVar("T")


def forward_slots(settings: Settings) -> int:
    """Batched forwards allowed at once across every pair and checkpoint (the gate): the setting, else the
    usable cores."""
    return int(settings.concurrent_forwards or usable_cores())


def session_threads(settings: Settings) -> int | None:
    """Intra-op threads for each model session: ``ort_threads`` when set; unset with batching on, the usable
    cores shared among the forwards the gate lets run at once (so those forwards ask for no more threads
    than there are cores: 1 with the default gate); unset with batching off, the runtime's default. The torch
    backend applies it with ``torch.set_num_threads`` (process-wide).

    Measured (BENCHMARKS.md, issue 12): three demo pairs on 2 cores, 16 clients, batching on: 5.5 req/s with
    the runtime's default (2 threads per session, 2 forwards at once: 4 threads on 2 cores) against 7.4 with 1.
    """
    if settings.ort_threads is not None:
        return int(settings.ort_threads)
    if not settings.batching:
        return None
    return max(1, usable_cores() // forward_slots(settings))


ADMITTED_ROUTES: frozenset[tuple[str, str]] = frozenset({("POST", "/predict")})


class Inference:
    """Admission and batching for one app (module docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limit = int(settings.queue_bound)
        self.config = BatchConfig(
            window_s=float(settings.batch_window_ms) / 1000.0,
            max_batch=int(settings.max_batch),
            queue_bound=int(settings.queue_bound),
            retry_after_s=RETRY_AFTER_S,
        )
        self._lock = threading.Lock()
        self._in_flight = 0
        # shared by every pair's batchers: at most this many batched forwards at once
        self.forward_slots = forward_slots(settings)
        self.forward_gate = threading.BoundedSemaphore(self.forward_slots)
        # shared by every request: ``concurrent_compute`` at a time do their own CPU work (none while waiting
        # for a forward); None: no bound (or batching off: the request thread runs its forwards itself)
        bounded = settings.batching and settings.concurrent_compute
        self.compute = ComputeSlot(settings.concurrent_compute) if bounded else None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one inference slot; :class:`Overloaded` at once when all ``queue_bound`` are taken."""
        with self._lock:
            if self._in_flight >= self.limit:
                busy = self._in_flight
            else:
                busy = -1
                self._in_flight += 1
        if busy >= 0:
            self.metrics.overloaded.labels(where="admission").inc()
            raise Overloaded(
                f"the service is at its inference bound ({busy} requests in inference); retry later",
                retry_after=RETRY_AFTER_S,
                details={"in_flight": busy, "bound": self.limit},
            )
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
            self.metrics.in_flight.dec()

    def attach(self, pair: ModelPair) -> ModelPair:
        """The pair requests should call: batched (batching on) or ``pair`` itself."""
        if not self.settings.batching or isinstance(pair, BatchedPair):
            return pair
        batched = BatchedPair(
            pair, config=self.config, observer=self.metrics, gate=self.forward_gate, compute=self.compute
        )
        log.info(
            "batching %s: %s, %d forwards at once, %s intra-op threads each",
            pair.name,
            self.config,
            self.forward_slots,
            session_threads(self.settings) or "the runtime's default",
        )
        return batched

    def run(self, work: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``work(*args, **kwargs)`` holding a compute slot (batching on; its batched forwards give it up while
        they wait), so at most ``concurrent_compute`` request threads do CPU work at once
        (engine.batching.ComputeSlot)."""
        if self.compute is None:
            return work(*args, **kwargs)
        with self.compute.held():
            return work(*args, **kwargs)

    @staticmethod
    def detach(pair: ModelPair, timeout: float | None = 30.0) -> None:
        """Stop ``pair``'s batchers, if it has any (queued work is finished first)."""
        if isinstance(pair, BatchedPair):
            pair.close(timeout)


class AdmissionMiddleware:
    """One inference slot per request to :data:`ADMITTED_ROUTES`, held until the answer is sent; 503 at once
    when none is free (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("method", ""), scope.get("path", "")) not in ADMITTED_ROUTES:
            await self.app(scope, receive, send)
            return
        cxr = getattr(getattr(scope.get("app"), "state", None), "cxr", None)
        inference = getattr(cxr, "inference", None)
        if inference is None:  # not started: the route answers 503 not_started
            await self.app(scope, receive, send)
            return
        try:
            slot = inference.admit()
            slot.__enter__()
        except Overloaded as exc:
            response = error_json(
                503, exc.code or "overloaded", str(exc), exc.details, {"Retry-After": str(exc.retry_after)}
            )
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            slot.__exit__(None, None, None)
