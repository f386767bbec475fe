"""Inference in the service: admission (a bound on requests in inference, 503 at once beyond it) and dynamic
batching across requests (:mod:`engine.batching`), configured by the settings.

- :meth:`Inference.admit` is entered by ``POST /predict`` on the event loop, before the use case goes to a
  worker thread: at most ``queue_bound`` requests are in inference (running or waiting for a batch); one
  more raises :class:`core.errors.Overloaded` (503 with ``Retry-After``) without waiting for anything, so an
  overloaded service answers in about the time the request took to arrive instead of growing a queue
  (the threadpool included: a request over the bound never takes a thread).
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
from collections.abc import Iterator
from contextlib import contextmanager

from core.errors import Overloaded
from engine.batching import BatchConfig, BatchedPair
from engine.runtime import ModelPair
from service.app.metrics import Metrics
from service.app.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["Inference"]

RETRY_AFTER_S = 1


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
        batched = BatchedPair(pair, config=self.config, observer=self.metrics)
        log.info("batching %s: %s", pair.name, self.config)
        return batched

    @staticmethod
    def detach(pair: ModelPair, timeout: float | None = 30.0) -> None:
        """Stop ``pair``'s batchers, if it has any (queued work is finished first)."""
        if isinstance(pair, BatchedPair):
            pair.close(timeout)
