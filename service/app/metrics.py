"""Prometheus metrics, one registry per app (so two apps in one process, e.g. in tests, never collide).

- ``cxr_drift_http_requests_total{method, route, status}``: every answered request, by route template;
- ``cxr_drift_http_request_duration_seconds{method, route}``: latency histogram;
- ``cxr_drift_predictions_total{model}``: audited predictions per model pair;
- ``cxr_drift_drift_flags_total{model, method, severity}``: drift reports per severity, and
  ``cxr_drift_drift_flagged_total{model, method}`` those flagged;
- ``cxr_drift_audit_write_failures_total``: predictions refused (503): the audit row could not be written;
- ``cxr_drift_stage_duration_seconds{stage}``: per-stage latency of ``/predict``: ``decode``, ``preprocess``,
  ``queue_wait`` (in a batcher's queue until its batch starts; batching only), ``forward`` (as the request
  sees it: with batching, queue wait + its batch's forward), ``cams``, ``metrics``, ``audit_write``;
- ``cxr_drift_batch_size{model, checkpoint}``: images per batched forward, and
  ``cxr_drift_batch_forward_seconds{model, checkpoint}`` how long each took;
- ``cxr_drift_inference_queue_depth{model, checkpoint}``: requests waiting in a batcher's queue;
- ``cxr_drift_inference_in_flight``: requests admitted to inference (running or waiting);
- ``cxr_drift_overloaded_total{where}``: requests answered 503 overloaded (``admission``: the inference bound
  was reached; ``queue``: a batcher's queue was full).

:class:`Metrics` is also the batchers' :class:`engine.batching.BatchObserver`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.report import DriftReport

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
# report timings (engine.report, ms per image) and request timings (routes/predict.py) -> stage names
_REPORT_STAGES = ("preprocess", "forward", "cams", "metrics")
_REQUEST_STAGES = {"decode_ms": "decode", "audit_ms": "audit_write"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cxr_drift_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cxr_drift_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "cxr_drift_predictions", "audited predictions per model pair", ["model"], registry=self.registry
        )
        self.drift_reports = Counter(
            "cxr_drift_drift_reports",
            "drift reports per model pair, method and severity",
            ["model", "method", "severity"],
            registry=self.registry,
        )
        self.drift_flagged = Counter(
            "cxr_drift_drift_flagged",
            "drift reports flagged, per model pair and method",
            ["model", "method"],
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "cxr_drift_audit_write_failures",
            "predictions refused because the audit row could not be written",
            registry=self.registry,
        )

        self.stage_latency = Histogram(
            "cxr_drift_stage_duration_seconds",
            "per-stage latency of a prediction (module docstring of service/app/metrics.py)",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cxr_drift_batch_size",
            "images per batched forward, per model pair and checkpoint",
            ["model", "checkpoint"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_forward = Histogram(
            "cxr_drift_batch_forward_seconds",
            "duration of each batched forward, per model pair and checkpoint",
            ["model", "checkpoint"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "cxr_drift_inference_queue_depth",
            "requests waiting in a batcher's queue, per model pair and checkpoint",
            ["model", "checkpoint"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "cxr_drift_inference_in_flight",
            "requests admitted to inference (running or waiting)",
            registry=self.registry,
        )
        self.overloaded = Counter(
            "cxr_drift_overloaded",
            "requests answered 503 overloaded, by where the bound was hit",
            ["where"],
            registry=self.registry,
        )

    def record_report(self, report: DriftReport) -> None:
        """Count one drift report by model, method, severity and flag; observe its stage timings."""
        for stage in _REPORT_STAGES:
            if stage in report.timings_ms:
                self.stage_latency.labels(stage=stage).observe(report.timings_ms[stage] / 1000.0)
        self.predictions.labels(model=report.model).inc()
        for method, result in report.methods.items():
            self.drift_reports.labels(model=report.model, method=method, severity=result["severity"]).inc()
            if result["flagged"]:
                self.drift_flagged.labels(model=report.model, method=method).inc()

    def record_stages(self, timings_ms: Mapping[str, float]) -> None:
        """Observe the request-level stages (decode, audit write) of a ``/predict`` answer's timings."""
        for key, stage in _REQUEST_STAGES.items():
            if key in timings_ms:
                self.stage_latency.labels(stage=stage).observe(timings_ms[key] / 1000.0)

    # engine.batching.BatchObserver
    def on_depth(self, labels: Mapping[str, str], depth: int) -> None:
        self.queue_depth.labels(**labels).set(depth)

    def on_batch(
        self, labels: Mapping[str, str], *, rows: int, items: int, waits_s: Sequence[float], run_s: float
    ) -> None:
        self.batch_size.labels(**labels).observe(rows)
        self.batch_forward.labels(**labels).observe(run_s)
        for wait in waits_s:
            self.stage_latency.labels(stage="queue_wait").observe(wait)

    def on_rejected(self, labels: Mapping[str, str]) -> None:
        self.overloaded.labels(where="queue").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts requests and their latency by route template (``/audit/records/{record_id}``, not the path)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method=method, route=template, status=str(status)).inc()
            self.metrics.latency.labels(method=method, route=template).observe(time.perf_counter() - start)
