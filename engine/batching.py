"""Dynamic batching across requests: concurrent callers of one checkpoint share one forward pass.

:class:`MicroBatcher` is a bounded queue in front of one worker thread. ``submit(item)`` returns a
:class:`concurrent.futures.Future` at once, or raises :class:`core.errors.Overloaded` at once when
``queue_bound`` items are already waiting (it never blocks, so an overloaded caller is told so in
microseconds instead of joining a queue that only grows). The worker takes the oldest item, then every item
that arrives until ``window_s`` after that item was *submitted* (items that queued while the previous batch
ran are already past their window: no extra wait under load) or until ``max_batch`` rows are gathered, runs
them as one batch and hands each future its own slice.

Batchers may share a ``gate`` (a semaphore): a worker holds a slot while it gathers and runs a batch, so at
most that many forwards run at once across them; the others' items queue meanwhile and go as bigger
batches. On CPU, as many slots as cores (each session then needs no more threads) made 16 clients over three
pairs 8% faster than six sessions running at once (BENCHMARKS.md).

A failing batch never poisons its neighbours: when a batch of several items raises, each item is run again
on its own and only the items that fail alone get the exception. ``close()`` refuses new items, lets the
worker finish what is queued and joins the thread.

:class:`BatchedPair` is a :class:`engine.runtime.ModelPair` whose ``forward`` goes through one batcher per
checkpoint (so a request for the transfer checkpoint only, as calibration makes, never waits for the
fine-tuned one). It validates each request's batch *before* it is queued (a bad request is refused alone)
and splits the batched outputs per request: the closed-form CAMs and metrics stay per request, computed by
the caller's thread from its own rows. Everything else (names, manifest, head weights, sessions) is the
wrapped pair's.

A :class:`ComputeSlot` lets one caller thread at a time (or a few) do its own CPU work (preprocessing, the CAMs and
metrics: NumPy on small arrays, mostly holding the GIL); a caller gives it up while it waits for a batched
forward. Sixteen request threads trading the GIL back and forth cost more CPU than the same work done one
after the other: 16 clients over three pairs on 2 cores, side by side, +6% and +1.4% req/s in two runs, p50
and p99 lower in every round (BENCHMARKS.md).

No web imports here: the service (``service/app/inference.py``) supplies the settings and a
:class:`BatchObserver` that turns batch sizes, queue waits and depths into metrics.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

from core.errors import Overloaded
from core.vocabulary import CHECKPOINTS
from engine.runtime import Forward, ModelPair

log = logging.getLogger(__name__)

__all__ = ["BatchConfig", "BatchObserver", "BatchedPair", "ComputeSlot", "MicroBatcher"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchConfig:
    """``window_s``: how long the oldest item may wait for company; ``max_batch``: rows per forward;
    ``queue_bound``: items waiting (not yet in a running batch) before ``submit`` answers Overloaded."""

    window_s: float = 0.005
    max_batch: int = 16
    queue_bound: int = 32
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.window_s <= 1.0:
            raise ValueError(f"window_s must be in [0, 1] seconds, got {self.window_s}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.queue_bound < 1:
            raise ValueError(f"queue_bound must be >= 1, got {self.queue_bound}")


class BatchObserver(Protocol):
    """What a batcher reports (the service turns it into Prometheus metrics); every call is cheap."""

    def on_depth(self, labels: Mapping[str, str], depth: int) -> None: ...

    def on_batch(
        self, labels: Mapping[str, str], *, rows: int, items: int, waits_s: Sequence[float], run_s: float
    ) -> None: ...

    def on_rejected(self, labels: Mapping[str, str]) -> None: ...


@dataclass
class _Item(Generic[T, R]):
    value: T
    rows: int
    future: Future[R]
    submitted: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[T, R]):
    """See the module docstring. ``run(items)`` must return one result per item, in order."""

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        *,
        config: BatchConfig,
        rows: Callable[[T], int] = lambda item: 1,
        name: str = "batcher",
        labels: Mapping[str, str] | None = None,
        observer: BatchObserver | None = None,
        gate: threading.Semaphore | None = None,
    ) -> None:
        self._run = run
        self._gate = gate
        self.config = config
        self._rows = rows
        self.name = name
        self.labels: dict[str, str] = dict(labels or {})
        self._observer = observer
        self._queue: deque[_Item[T, R]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._worker, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch being run)."""
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, value: T) -> Future[R]:
        """Queue ``value``; its future gets its own result or exception. Never blocks: a full queue (or a
        closed batcher) raises :class:`Overloaded` at once."""
        item: _Item[T, R] = _Item(value=value, rows=max(1, int(self._rows(value))), future=Future())
        with self._cond:
            if self._closed:
                raise Overloaded(
                    f"{self.name}: shutting down, not accepting work",
                    retry_after=self.config.retry_after_s,
                    details={"queue": self.name, "reason": "shutting_down"},
                )
            if len(self._queue) >= self.config.queue_bound:
                depth = len(self._queue)
            else:
                depth = -1
                self._queue.append(item)
                self._cond.notify()
        if depth >= 0:
            if self._observer is not None:
                self._observer.on_rejected(self.labels)
            raise Overloaded(
                f"{self.name}: the inference queue is full ({depth} waiting); retry later",
                retry_after=self.config.retry_after_s,
                details={"queue": self.name, "depth": depth, "bound": self.config.queue_bound},
            )
        self._report_depth()
        return item.future

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new items, finish the queued ones, join the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("batcher %s did not stop within %s s", self.name, timeout)

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.on_depth(self.labels, len(self._queue))

    def _next_batch(self) -> list[_Item[T, R]] | None:
        """The next batch (None once closed and drained): the oldest item plus what joins it in its window."""
        cfg = self.config
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            deadline = batch[0].submitted + cfg.window_s
            while rows < cfg.max_batch:
                if self._queue:
                    if rows + self._queue[0].rows > cfg.max_batch:
                        break
                    nxt = self._queue.popleft()
                    batch.append(nxt)
                    rows += nxt.rows
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
        self._report_depth()
        # a future cancelled while it waited (its caller gave up, e.g. the other checkpoint was full) is dropped
        return [item for item in batch if item.future.set_running_or_notify_cancel()]

    def _worker(self) -> None:
        while True:
            if self._gate is None:
                if not self._gather_and_run():
                    return
                continue
            with self._cond:  # a slot is taken only for work: wait for an item first
                while not self._queue and not self._closed:
                    self._cond.wait()
            with self._gate:
                if not self._gather_and_run():
                    return

    def _gather_and_run(self) -> bool:
        """Run the next batch; False once closed and drained."""
        batch = self._next_batch()
        if batch is None:
            return False
        if batch:
            started = time.perf_counter()
            waits = [started - item.submitted for item in batch]
            self._execute(batch)
            if self._observer is not None:
                try:
                    self._observer.on_batch(
                        self.labels,
                        rows=sum(item.rows for item in batch),
                        items=len(batch),
                        waits_s=waits,
                        run_s=time.perf_counter() - started,
                    )
                except Exception:  # metrics must never take the worker down
                    log.exception("batch observer failed")
        return True

    def _execute(self, batch: list[_Item[T, R]]) -> None:
        try:
            results = self._run([item.value for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: run returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # every error goes to the futures; the worker lives on
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.warning(
                "%s: a batch of %d failed (%s); running its items one by one", self.name, len(batch), exc
            )
            for item in batch:
                try:
                    item.future.set_result(self._run([item.value])[0])
                except Exception as item_exc:
                    item.future.set_exception(item_exc)
            return
        for item, result in zip(batch, results, strict=True):
            item.future.set_result(result)


def _forward_items(pair: ModelPair, checkpoint: str) -> Callable[[list[np.ndarray]], list[Forward]]:
    """One checkpoint's forward over the concatenated items, split back into one Forward per item."""

    def run(items: list[np.ndarray]) -> list[Forward]:
        x = items[0] if len(items) == 1 else np.concatenate(items, axis=0)
        out = pair.forward(x, (checkpoint,))[checkpoint]
        if len(items) == 1:
            return [out]
        bounds = np.cumsum([0, *(len(item) for item in items)])
        return [
            Forward(logits=out.logits[a:b].copy(), features=out.features[a:b].copy())
            for a, b in itertools.pairwise(bounds)
        ]

    return run


class ComputeSlot:
    """At most ``slots`` caller threads at once do their CPU work (module docstring): :meth:`held` around a
    caller's work, :meth:`released` around a wait inside it (a no-op in a thread that does not hold one)."""

    def __init__(self, slots: int = 1) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self._lock = threading.BoundedSemaphore(slots)
        self._holder = threading.local()

    def holding(self) -> bool:
        return bool(getattr(self._holder, "on", False))

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self.holding():  # re-entered by the same thread: already held
            yield
            return
        self._lock.acquire()
        self._holder.on = True
        try:
            yield
        finally:
            self._holder.on = False
            self._lock.release()

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        if not self.holding():
            yield
            return
        self._holder.on = False
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._holder.on = True


class BatchedPair(ModelPair):
    """A loaded pair whose forwards are batched across callers (module docstring). ``close()`` stops the
    batchers; the wrapped pair (``inner``) and its sessions stay usable."""

    def __init__(
        self,
        pair: ModelPair,
        *,
        config: BatchConfig,
        observer: BatchObserver | None = None,
        gate: threading.Semaphore | None = None,
        compute: ComputeSlot | None = None,
    ) -> None:
        # the wrapped pair's attributes as they are (whatever a loader attached), sessions shared, not copied
        self.__dict__.update(
            {k: v for k, v in vars(pair).items() if k not in ("inner", "batchers", "compute")}
        )
        self.inner = pair
        self.batch_config = config
        self.compute = compute
        self.batchers: dict[str, MicroBatcher[np.ndarray, Forward]] = {
            name: MicroBatcher(
                _forward_items(pair, name),
                config=config,
                rows=len,
                name=f"{pair.name}/{name}",
                labels={"model": pair.name, "checkpoint": name},
                observer=observer,
                gate=gate,
            )
            for name in CHECKPOINTS
        }

    def forward(self, batch: np.ndarray, checkpoints: Sequence[str] = CHECKPOINTS) -> dict[str, Forward]:
        """Like :meth:`ModelPair.forward`, through the batchers: blocks until this request's rows are done;
        :class:`Overloaded` at once when a checkpoint's queue is full."""
        x = self.inner.checked_batch(batch)
        futures: dict[str, Future[Forward]] = {}
        try:
            for name in checkpoints:
                futures[name] = self.batchers[name].submit(x)
        except Overloaded:
            for future in futures.values():
                future.cancel()  # not run if still queued
            raise
        # another caller computes while this one waits
        with self.compute.released() if self.compute is not None else contextlib.nullcontext():
            return {name: future.result() for name, future in futures.items()}

    def close(self, timeout: float | None = 30.0) -> None:
        for batcher in self.batchers.values():
            batcher.close(timeout)

    def __repr__(self) -> str:
        return f"BatchedPair({self.name!r}, {self.batch_config})"
