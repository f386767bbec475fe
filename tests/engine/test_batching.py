"""Dynamic batching (engine/batching.py): batched reports equal unbatched ones, a full queue refuses at once,
a failing item never poisons its batch, close() drains and stops; device selection (engine/runtime.py)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.errors import ConfigError, InputError, Overloaded
from engine.batching import BatchConfig, BatchedPair, ComputeSlot, MicroBatcher
from engine.report import drift_report
from engine.runtime import ModelPair, select_providers
from tests.pairs import PAIR_ARCHS, SMALL_SIZE


class Recorder:
    """A BatchObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.batches: list[tuple[dict[str, str], int, int]] = []
        self.rejected = 0
        self.depths: list[int] = []
        self.lock = threading.Lock()

    def on_depth(self, labels: Mapping[str, str], depth: int) -> None:
        with self.lock:
            self.depths.append(depth)

    def on_batch(
        self, labels: Mapping[str, str], *, rows: int, items: int, waits_s: Sequence[float], run_s: float
    ) -> None:
        assert len(waits_s) == items and run_s >= 0
        with self.lock:
            self.batches.append((dict(labels), rows, items))

    def on_rejected(self, labels: Mapping[str, str]) -> None:
        with self.lock:
            self.rejected += 1


def image(seed: int, size: int = 80) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.25, 0.75, 2)
    img = 0.7 - 0.5 * np.exp(-(((xx - cx) / 0.15) ** 2 + ((yy - cy) / 0.2) ** 2))
    return np.clip(img + 0.05 * rng.standard_normal((size, size)), 0, 1).astype(np.float32)


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Equal structure, equal discrete values, floats to 1e-4 (batched BLAS kernels round differently)."""
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float | np.floating) and not isinstance(a, bool):
        assert np.isclose(float(a), float(b), rtol=1e-4, atol=1e-4, equal_nan=True), (path, a, b)
    elif isinstance(a, np.ndarray):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=path)
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def pair(api_artifacts: Path) -> ModelPair:
    return ModelPair.load(api_artifacts / PAIR_ARCHS[1], threads=1)


def test_concurrent_batched_reports_equal_unbatched_ones(pair: ModelPair) -> None:
    # six requests with different images and options arrive together; the window is long enough that they
    # share forwards (max_batch closes the batch as soon as all six are in)
    cases: list[dict[str, Any]] = [
        {"methods": ("layercam", "gradcampp"), "target_class": None},
        {"methods": ("layercam",), "target_class": 2},
        {"methods": ("gradcampp",), "target_class": "normal"},
        {"methods": ("layercam", "gradcampp"), "target_class": 4, "topk_percent": 10.0},
        {"methods": ("gradcampp", "layercam"), "target_class": None, "include_maps": True},
        {"methods": ("layercam",), "target_class": 1},
    ]
    grays = [image(seed) for seed in range(len(cases))]
    recorder = Recorder()
    batched = BatchedPair(
        pair, config=BatchConfig(window_s=1.0, max_batch=len(cases), queue_bound=16), observer=recorder
    )
    barrier = threading.Barrier(len(cases))
    results: dict[int, Any] = {}

    def call(i: int) -> None:
        barrier.wait()
        results[i] = drift_report(batched, grays[i], **cases[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    batched.close()
    assert sorted(results) == list(range(len(cases)))
    for i, case in enumerate(cases):
        alone = drift_report(pair, grays[i], **case)
        got = results[i]
        assert_same(got.to_dict() | {"timings_ms": None}, alone.to_dict() | {"timings_ms": None}, f"case{i}")
        if case.get("include_maps"):
            assert_same(got.maps, alone.maps, f"case{i}.maps")
    # both checkpoints' batchers ran every row, and at least one forward was shared by several requests
    for checkpoint in ("transfer", "finetuned"):
        rows = [r for labels, r, _ in recorder.batches if labels["checkpoint"] == checkpoint]
        assert sum(rows) == len(cases)
    assert max(items for _, _, items in recorder.batches) >= 2


def test_bad_request_is_refused_alone_and_the_batch_goes_on(pair: ModelPair) -> None:
    batched = BatchedPair(pair, config=BatchConfig(window_s=0.0, max_batch=4, queue_bound=4))
    try:
        with pytest.raises(InputError, match="out of range"):
            drift_report(batched, image(0), target_class=99)
        bad = np.full((1, 3, SMALL_SIZE[pair.name], SMALL_SIZE[pair.name]), np.nan, dtype=np.float32)
        with pytest.raises(ValueError, match="NaN"):
            batched.forward(bad)  # refused before it is queued
        assert all(b.depth == 0 for b in batched.batchers.values())
        assert_same(
            drift_report(batched, image(1)).to_dict() | {"timings_ms": None},
            drift_report(pair, image(1)).to_dict() | {"timings_ms": None},
        )
    finally:
        batched.close()


class Gate:
    """A run function for MicroBatcher that blocks on the item 'block' until released, and fails on
    negative items (alone or in a batch)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[list[Any]] = []

    def __call__(self, items: list[Any]) -> list[Any]:
        self.calls.append(list(items))
        if "block" in items:
            self.started.set()
            assert self.release.wait(30), "test never released the batch"
        if any(isinstance(x, int) and x < 0 for x in items):
            raise ValueError(f"negative item in {items}")
        return [x * 10 if isinstance(x, int) else x for x in items]


def test_full_queue_raises_overloaded_without_waiting_for_the_batch() -> None:
    gate = Gate()
    recorder = Recorder()
    batcher: MicroBatcher[Any, Any] = MicroBatcher(
        gate,
        config=BatchConfig(window_s=0.0, max_batch=8, queue_bound=2, retry_after_s=3),
        name="test",
        observer=recorder,
    )
    first = batcher.submit("block")
    assert gate.started.wait(30)  # the worker is inside the first batch and stays there
    waiting = [batcher.submit(1), batcher.submit(2)]
    assert batcher.depth == 2
    with pytest.raises(Overloaded) as info:
        batcher.submit(3)
    # raised while the running batch is still blocked: nobody waited for the queue to drain
    assert not gate.release.is_set() and not first.done()
    assert info.value.retry_after == 3 and info.value.code == "overloaded"
    assert info.value.details == {"queue": "test", "depth": 2, "bound": 2}
    assert recorder.rejected == 1
    gate.release.set()
    assert first.result(30) == "block"
    assert [f.result(30) for f in waiting] == [10, 20]
    assert gate.calls[-1] == [1, 2]  # the two waiting items shared one batch
    batcher.close()
    assert not batcher.alive


def test_a_failing_item_does_not_poison_its_batch() -> None:
    gate = Gate()
    batcher: MicroBatcher[Any, Any] = MicroBatcher(
        gate, config=BatchConfig(window_s=0.0, max_batch=8, queue_bound=8), name="test"
    )
    blocker = batcher.submit("block")
    assert gate.started.wait(30)
    good1, bad, good2 = batcher.submit(1), batcher.submit(-1), batcher.submit(2)
    gate.release.set()
    assert blocker.result(30) == "block"
    assert good1.result(30) == 10 and good2.result(30) == 20
    with pytest.raises(ValueError, match="negative"):
        bad.result(30)
    # the batch of three failed as a whole, then each item ran alone
    assert gate.calls[1:] == [[1, -1, 2], [1], [-1], [2]]
    assert batcher.alive
    assert batcher.submit(5).result(30) == 50  # the worker lives on
    batcher.close()


def test_close_finishes_queued_work_refuses_new_and_stops_the_thread() -> None:
    gate = Gate()
    batcher: MicroBatcher[Any, Any] = MicroBatcher(
        gate, config=BatchConfig(window_s=0.0, max_batch=1, queue_bound=8), name="closing"
    )
    blocker = batcher.submit("block")
    assert gate.started.wait(30)
    queued = [batcher.submit(i) for i in (1, 2, 3)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    gate.release.set()
    closer.join(30)
    assert not closer.is_alive() and not batcher.alive
    assert blocker.result(0) == "block" and [f.result(0) for f in queued] == [10, 20, 30]
    with pytest.raises(Overloaded, match="shutting down"):
        batcher.submit(4)


def test_cancelled_items_are_skipped() -> None:
    gate = Gate()
    batcher: MicroBatcher[Any, Any] = MicroBatcher(
        gate, config=BatchConfig(window_s=0.0, max_batch=8, queue_bound=8), name="test"
    )
    batcher.submit("block")
    assert gate.started.wait(30)
    dropped: Future[Any] = batcher.submit(7)
    kept = batcher.submit(8)
    assert dropped.cancel()
    gate.release.set()
    assert kept.result(30) == 80
    assert [7] not in gate.calls and all(7 not in call for call in gate.calls)
    batcher.close()


@pytest.mark.parametrize("slots", [1, 2])
def test_a_shared_gate_bounds_the_forwards_running_at_once(slots: int) -> None:
    """Three batchers sharing a gate of ``slots`` never run more batches at once; what waits for a slot
    queues and goes as one bigger batch; every item gets its own result; closing still drains."""
    gate = threading.BoundedSemaphore(slots)
    lock = threading.Lock()
    running = [0, 0]  # now, most at once
    sizes: list[int] = []

    def run(items: list[int]) -> list[int]:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
            sizes.append(len(items))
        threading.Event().wait(0.05)
        with lock:
            running[0] -= 1
        return [item * 10 for item in items]

    config = BatchConfig(window_s=0.0, max_batch=16, queue_bound=64)
    batchers: list[MicroBatcher[int, int]] = [
        MicroBatcher(run, config=config, name=f"b{i}", gate=gate) for i in range(3)
    ]
    futures = [(i, batchers[i % 3].submit(i)) for i in range(30)]
    assert all(future.result(30) == i * 10 for i, future in futures)
    assert running[1] == slots
    assert max(sizes) > 1  # items queued while the slots were taken, and went together
    for batcher in batchers:
        batcher.close()
        assert not batcher.alive


def _free(slot: ComputeSlot) -> bool:
    """Every slot is free: take them all without waiting, then give them back."""
    taken = 0
    while taken < slot.slots and slot._lock.acquire(blocking=False):
        taken += 1
    for _ in range(taken):
        slot._lock.release()
    return taken == slot.slots


@pytest.mark.parametrize("slots", [1, 2])
def test_compute_slot_bounds_the_callers_at_work_and_frees_a_waiting_one(slots: int) -> None:
    slot = ComputeSlot(slots)
    lock = threading.Lock()
    inside = [0, 0]  # now, most at once

    def work() -> None:
        with slot.held(), slot.held():  # the same thread again: already held, no deadlock
            with lock:
                inside[0] += 1
                inside[1] = max(inside[1], inside[0])
            threading.Event().wait(0.02)
            with lock:
                inside[0] -= 1
        assert not slot.holding()

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work) for _ in range(8)]:
            future.result(30)  # an assertion inside a thread fails here
    assert inside[1] == slots and _free(slot)
    with slot.released():  # a thread that does not hold one: nothing to give up
        assert not slot.holding()
    assert _free(slot)

    # holders waiting inside released() let other threads take every slot meanwhile, and get one back after
    waiting = threading.Barrier(slots + 1)
    other_done = threading.Event()

    def holder() -> bool:
        with slot.held():
            with slot.released():
                waiting.wait(30)
                assert other_done.wait(30)
            held_again = slot.holding()
        return held_again and not slot.holding()

    with ThreadPoolExecutor(slots) as pool:
        futures = [pool.submit(holder) for _ in range(slots)]
        waiting.wait(30)
        took = [slot._lock.acquire(timeout=30) for _ in range(slots)]  # every slot is free while they wait
        for _ in took:
            slot._lock.release()
        other_done.set()
        assert all(took) and all(future.result(30) for future in futures)
    assert _free(slot)
    with pytest.raises(ValueError, match="slots"):
        ComputeSlot(0)


def test_callers_holding_the_compute_slot_still_share_a_batch(pair: ModelPair) -> None:
    """A caller gives the slot up while its forward waits: the next caller gets in and joins the batch (kept,
    every batch would hold one request and wait out its window alone)."""
    size = SMALL_SIZE[pair.name]
    x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    recorder = Recorder()
    slot = ComputeSlot()
    batched = BatchedPair(
        pair, config=BatchConfig(window_s=0.5, max_batch=8, queue_bound=8), observer=recorder, compute=slot
    )

    def caller() -> Any:
        with slot.held():
            out = batched.forward(x, ("transfer",))
            assert slot.holding()  # given back to this caller after the wait
            return out

    try:
        with ThreadPoolExecutor(4) as pool:
            outs = [future.result(60) for future in [pool.submit(caller) for _ in range(4)]]
    finally:
        batched.close()
    assert len(outs) == 4 and _free(slot)
    assert max(rows for _, rows, _ in recorder.batches) > 1


def test_max_batch_counts_rows_and_splits_results_per_item(pair: ModelPair) -> None:
    size = SMALL_SIZE[pair.name]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 3, size, size)).astype(np.float32) for n in (1, 2, 3)]
    recorder = Recorder()
    batched = BatchedPair(
        pair, config=BatchConfig(window_s=0.5, max_batch=3, queue_bound=8), observer=recorder
    )
    try:
        outs: dict[int, Any] = {}
        threads = [
            threading.Thread(target=lambda i=i: outs.__setitem__(i, batched.forward(xs[i], ("transfer",))))
            for i in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        batched.close()
    for i, x in enumerate(xs):
        alone = pair.forward(x, ("transfer",))["transfer"]
        assert set(outs[i]) == {"transfer"}
        np.testing.assert_allclose(outs[i]["transfer"].logits, alone.logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(outs[i]["transfer"].features, alone.features, rtol=1e-4, atol=1e-4)
    assert all(rows <= 3 for _, rows, _ in recorder.batches)  # no batch over max_batch rows
    assert {labels["checkpoint"] for labels, _, _ in recorder.batches} == {"transfer"}


# ---------------------------------------------------------------------------------------------- devices


def test_provider_selection() -> None:
    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    with_cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("cpu", with_cuda) == ["CPUExecutionProvider"]
    assert select_providers("auto", cpu_only) == ["CPUExecutionProvider"]
    assert select_providers("auto", with_cuda) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("cuda:1", with_cuda) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="onnxruntime-gpu") as info:
        select_providers("cuda", cpu_only)
    assert info.value.code == "cuda_unavailable"
    with pytest.raises(ConfigError, match="valid options: cpu, cuda, auto"):
        select_providers("tpu", with_cuda)


def _has_cuda_ep() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_has_cuda_ep(), reason="this machine has ONNX Runtime's CUDA provider")
def test_onnx_pair_on_cuda_without_one_is_a_clear_error_and_auto_falls_back(api_artifacts: Path) -> None:
    folder = api_artifacts / PAIR_ARCHS[1]
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        ModelPair.load(folder, device="cuda")
    assert ModelPair.load(folder, device="auto", threads=1).device == "cpu"


def test_torch_pair_on_cuda_without_a_gpu_is_a_clear_error(api_artifacts: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    folder = api_artifacts / PAIR_ARCHS[1]
    with pytest.raises(ConfigError, match="no usable GPU"):
        ModelPair.load(folder, backend="torch", device="cuda")
