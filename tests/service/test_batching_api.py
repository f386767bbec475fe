"""Batching and overload in the service: concurrent /predict calls share forwards and answer what the engine
computes alone; at the inference bound a request is answered 503 overloaded (Retry-After) and no audit row
is written; /metrics shows queue depth, batch sizes and stage latencies; the lifespan's end stops every
batcher thread."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from core.cpus import usable_cores
from engine.batching import BatchedPair
from engine.predict import decode_image
from engine.report import drift_report
from engine.runtime import ModelPair
from service.app import inference
from service.app.inference import AdmissionMiddleware, Inference, session_threads
from service.app.metrics import Metrics
from service.audit import chain
from tests.api_fixtures import (
    ApiClient,
    chest_like,
    copy_pairs,
    error_of,
    headers,
    make_settings,
    png_bytes,
    sqlite_url,
    started,
    upload,
)
from tests.engine.test_batching import assert_same

BOUND = 6


@pytest.fixture(scope="module")
def api(api_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    folder = tmp_path_factory.mktemp("batch-sqlite")
    settings = make_settings(
        api_artifacts, sqlite_url(folder), batch_window_ms=1000.0, max_batch=3, queue_bound=BOUND
    )
    with started(settings) as client:
        yield client


def _post(api: ApiClient, data: bytes, form: dict[str, Any]) -> Any:
    return api.client.post(
        "/predict", files=upload(data), data={k: str(v) for k, v in form.items()}, headers=headers("predict")
    )


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (labels in any order)."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if found == labels:
            return float(match.group(2))
    raise AssertionError(f"no sample {name}{labels} in /metrics")


def test_concurrent_requests_share_forwards_and_match_the_engine_alone(
    api: ApiClient, api_artifacts: Path
) -> None:
    cases: list[dict[str, Any]] = [
        {"methods": "layercam,gradcampp"},
        {"models": "resnet50v2", "methods": "layercam", "target_class": "2"},
        {"models": "densenet201", "methods": "gradcampp", "target_class": "normal", "topk": 10},
        {"methods": "gradcampp,layercam", "target_class": "4"},
        {"models": "resnet50v2", "methods": "layercam", "target_class": "99"},  # bad: 422, alone
    ]
    images = [png_bytes(chest_like(96, seed=300 + i)) for i in range(len(cases))]

    async def run() -> list[httpx.Response]:
        return list(await asyncio.gather(*[_post(api, images[i], cases[i]) for i in range(len(cases))]))

    responses = api.run(run())
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 422]
    assert error_of(responses[-1])["code"] == "unknown_class"
    pairs = {name: ModelPair.load(api_artifacts / name, threads=1) for name in ("densenet201", "resnet50v2")}
    for data, case, response in zip(images[:-1], cases[:-1], responses[:-1], strict=True):
        body = response.json()
        gray = decode_image(data, max_pixels=10**8).gray
        target = case.get("target_class")
        for result in body["results"]:
            alone = drift_report(
                pairs[result["model"]],
                gray,
                methods=tuple(case["methods"].split(",")),
                target_class=int(target) if target and target.isdigit() else target,
                topk_percent=float(case.get("topk", 20.0)),
            ).to_dict()
            assert_same(
                {k: v for k, v in result.items() if k not in ("timings_ms", "maps")},
                {k: v for k, v in alone.items() if k != "timings_ms"},
                result["model"],
            )
    text = api.get("/metrics", headers=headers("audit")).text
    count = sum(
        _metric(text, "cxr_drift_batch_size_count", model=m, checkpoint=c)
        for m in pairs
        for c in ("transfer", "finetuned")
    )
    rows = sum(
        _metric(text, "cxr_drift_batch_size_sum", model=m, checkpoint=c)
        for m in pairs
        for c in ("transfer", "finetuned")
    )
    assert rows > count  # at least one forward ran several requests' images


def test_at_the_inference_bound_the_answer_is_503_overloaded_and_nothing_is_audited(api: ApiClient) -> None:
    state = api.app.state.cxr
    before = chain.verify(state.engine).checked
    data = png_bytes(chest_like(96, seed=7))
    with contextlib.ExitStack() as held:
        for _ in range(BOUND):  # every inference slot is taken (as by BOUND requests in flight)
            held.enter_context(state.inference.admit())
        response = api.post("/predict", files=upload(data), headers=headers("predict"))
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        error = error_of(response)
        assert error["code"] == "overloaded"
        assert error["details"] == {"in_flight": BOUND, "bound": BOUND}
        assert "results" not in response.text
        # shedding comes before the key lookup (which needs a worker thread): no key, still 503
        assert api.post("/predict", files=upload(data)).status_code == 503
    assert chain.verify(state.engine).checked == before  # no audit row for a refused request
    text = api.get("/metrics", headers=headers("audit")).text
    assert _metric(text, "cxr_drift_overloaded_total", where="admission") >= 1
    assert _metric(text, "cxr_drift_inference_in_flight") == 0
    # the slots are back: a request without a key gets its 401 and gives its slot back, a good one goes through
    assert api.post("/predict", files=upload(data)).status_code == 401
    assert state.inference.in_flight == 0
    assert api.post("/predict", files=upload(data), headers=headers("predict")).status_code == 200


def test_overload_is_answered_from_the_headers_without_reading_the_body(api: ApiClient) -> None:
    state = api.app.state.cxr
    sent: list[MutableMapping[str, Any]] = []
    inner_called = False

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        nonlocal inner_called
        inner_called = True

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body was read")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [], "app": api.app}
    with contextlib.ExitStack() as held:
        for _ in range(BOUND):
            held.enter_context(state.inference.admit())
        api.run(AdmissionMiddleware(inner)(scope, receive, send))
    assert not inner_called
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert b'"overloaded"' in sent[1]["body"]
    # with a free slot the request goes on to the route, and the slot is back afterwards
    api.run(AdmissionMiddleware(inner)(scope, receive, send))
    assert inner_called and state.inference.in_flight == 0


def test_metrics_expose_queue_depth_batch_sizes_and_stage_latencies(api: ApiClient) -> None:
    data = png_bytes(chest_like(96, seed=8))
    response = api.post("/predict", files=upload(data), headers=headers("predict"))
    assert response.status_code == 200
    text = api.get("/metrics", headers=headers("audit")).text
    for stage in ("decode", "preprocess", "queue_wait", "forward", "cams", "metrics", "audit_write"):
        assert _metric(text, "cxr_drift_stage_duration_seconds_count", stage=stage) >= 1, stage
    for model in ("densenet201", "resnet50v2"):
        for checkpoint in ("transfer", "finetuned"):
            assert _metric(text, "cxr_drift_inference_queue_depth", model=model, checkpoint=checkpoint) == 0
            assert _metric(text, "cxr_drift_batch_size_count", model=model, checkpoint=checkpoint) >= 1
            assert (
                _metric(text, "cxr_drift_batch_forward_seconds_count", model=model, checkpoint=checkpoint)
                >= 1
            )


def test_lifespan_end_stops_every_batcher_thread(api_artifacts: Path, tmp_path: Path) -> None:
    artifacts = copy_pairs(api_artifacts, tmp_path / "artifacts", ("resnet50v2",))
    with started(make_settings(artifacts, sqlite_url(tmp_path))) as app:
        pairs = dict(app.app.state.cxr.pairs)
        response = app.post(
            "/predict", files=upload(png_bytes(chest_like(96, seed=9))), headers=headers("predict")
        )
        assert response.status_code == 200
    batchers = [b for p in pairs.values() if isinstance(p, BatchedPair) for b in p.batchers.values()]
    assert len(batchers) == 2  # one per checkpoint
    assert not any(b.alive for b in batchers)  # joined, not left running as daemons


def _intra_op_threads(pair: Any) -> set[int]:
    inner = pair.inner if isinstance(pair, BatchedPair) else pair
    return {runner.session.get_session_options().intra_op_num_threads for runner in inner._runners.values()}


def test_each_session_gets_its_share_of_the_cores_per_forward_at_once(
    api_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def settings(**overrides: Any) -> Any:
        return make_settings(api_artifacts, sqlite_url(tmp_path), **{"ort_threads": None, **overrides})

    monkeypatch.setattr(inference, "usable_cores", lambda: 8)
    assert session_threads(settings()) == 1  # the default gate: one forward per core, one thread each
    assert session_threads(settings(concurrent_forwards=2)) == 4
    assert session_threads(settings(concurrent_forwards=3)) == 2  # never more threads than cores
    assert session_threads(settings(concurrent_forwards=16)) == 1
    assert session_threads(settings(ort_threads=3)) == 3  # the setting wins
    assert session_threads(settings(batching=False)) is None  # one forward at a time: the runtime decides

    # the service's sessions are made so: ONNX Runtime reads its options back
    monkeypatch.setattr(inference, "usable_cores", lambda: 2)
    artifacts = copy_pairs(api_artifacts, tmp_path / "artifacts", ("resnet50v2",))
    for overrides, threads in (({}, 1), ({"concurrent_forwards": 1}, 2), ({"ort_threads": 3}, 3)):
        with started(
            make_settings(artifacts, sqlite_url(tmp_path), **{"ort_threads": None, **overrides})
        ) as app:
            (pair,) = app.app.state.cxr.pairs.values()
            assert isinstance(pair, BatchedPair) and _intra_op_threads(pair) == {threads}


def test_predict_does_its_cpu_work_holding_a_compute_slot(
    api_artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifacts = copy_pairs(api_artifacts, tmp_path / "artifacts", ("resnet50v2",))
    with started(make_settings(artifacts, sqlite_url(tmp_path))) as app:
        compute = app.app.state.cxr.inference.compute
        assert compute is not None and compute.slots == 1
        entered: list[str] = []
        held = compute.held

        @contextlib.contextmanager
        def counted() -> Iterator[None]:
            with held():
                entered.append(threading.current_thread().name)
                yield

        monkeypatch.setattr(compute, "held", counted)
        response = app.post(
            "/predict", files=upload(png_bytes(chest_like(96, seed=4))), headers=headers("predict")
        )
        assert response.status_code == 200 and len(entered) == 1
    unbounded = Inference(make_settings(api_artifacts, sqlite_url(tmp_path), concurrent_compute=0), Metrics())
    assert unbounded.compute is None and unbounded.run(lambda a, b=0: a + b, 1, b=2) == 3
    three = Inference(make_settings(api_artifacts, sqlite_url(tmp_path), concurrent_compute=3), Metrics())
    assert three.compute is not None and three.compute.slots == 3


def test_batching_off_serves_the_pair_itself_and_settings_are_checked(
    api_artifacts: Path, tmp_path: Path
) -> None:
    pair = ModelPair.load(api_artifacts / "resnet50v2", threads=1)
    off = Inference(make_settings(api_artifacts, sqlite_url(tmp_path), batching=False), Metrics())
    assert off.attach(pair) is pair
    on = Inference(
        make_settings(api_artifacts, sqlite_url(tmp_path), batch_window_ms=2, max_batch=8), Metrics()
    )
    batched = on.attach(pair)
    other = on.attach(ModelPair.load(api_artifacts / "resnet50v2", threads=1))
    try:
        assert isinstance(batched, BatchedPair) and batched.batch_config.window_s == pytest.approx(0.002)
        assert batched.name == pair.name and batched.head_weights is pair.head_weights
        # one gate for every pair's batchers: the usable cores by default
        assert isinstance(other, BatchedPair)
        gates = {id(b._gate) for p in (batched, other) for b in p.batchers.values()}
        assert gates == {id(on.forward_gate)} and on.forward_slots == usable_cores()
        # and one compute slot for every pair's callers
        assert batched.compute is on.compute and other.compute is on.compute
    finally:
        on.detach(batched)
        on.detach(other)
    assert (
        Inference(
            make_settings(api_artifacts, sqlite_url(tmp_path), concurrent_forwards=3), Metrics()
        ).forward_slots
        == 3
    )
    for bad in (
        {"batch_window_ms": -1},
        {"max_batch": 0},
        {"queue_bound": 0},
        {"device": "tpu"},
        {"concurrent_forwards": 0},
        {"concurrent_compute": -1},
    ):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            make_settings(api_artifacts, sqlite_url(tmp_path), **bad)
    assert make_settings(api_artifacts, sqlite_url(tmp_path), device="CUDA:1").device == "cuda:1"
