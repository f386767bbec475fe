"""Prometheus metrics, one registry per app (so two apps in one process, e.g. in tests, never collide).

- ``cxr_drift_http_requests_total{method, route, status}``: every answered request, by route template;
- ``cxr_drift_http_request_duration_seconds{method, route}``: latency histogram;
- ``cxr_drift_predictions_total{model}``: audited predictions per model pair;
- ``cxr_drift_drift_flags_total{model, method, severity}``: drift reports per severity, and
  ``cxr_drift_drift_flagged_total{model, method}`` those flagged;
- ``cxr_drift_audit_write_failures_total``: predictions refused (503): the audit row could not be written.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.report import DriftReport

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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

    def record_report(self, report: DriftReport) -> None:
        """Count one drift report by model, method, severity and flag."""
        self.predictions.labels(model=report.model).inc()
        for method, result in report.methods.items():
            self.drift_reports.labels(model=report.model, method=method, severity=result["severity"]).inc()
            if result["flagged"]:
                self.drift_flagged.labels(model=report.model, method=method).inc()

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
