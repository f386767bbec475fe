"""What the dashboard's pages show, built from the audit layer's answers (pure functions, no I/O).

The route handlers (``service.dashboard.routes``) fetch with the same functions the ``/audit`` API uses
and pass the results here; these functions turn them into tables, SVG charts and links.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from markupsafe import Markup
from pydantic import TypeAdapter, ValidationError

from core.vocabulary import CHECKPOINTS, METHODS
from service.app.errors import ApiError
from service.app.routes.audit import audit_filters
from service.audit.queries import AuditFilters
from service.dashboard.svg import BarChart, LineChart, Point, Series, model_colours

__all__ = [
    "FILTER_FIELDS",
    "ParsedFilters",
    "fmt",
    "model_rows",
    "overview",
    "parse_filters",
    "query_string",
    "record_rows",
]

METHOD_LABELS = {"layercam": "LayerCAM", "gradcampp": "GradCAM++"}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: fixed digits, '—' for missing or not finite."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "—"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {fmt(v, digits)}" for k, v in value.items())
    return str(value)


def p_value(value: float | None) -> str:
    """A p-value: 4 decimals, or '< 0.0001'."""
    if value is None or not math.isfinite(value):
        return "—"
    return "< 0.0001" if value < 1e-4 else f"{value:.4f}"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


# ------------------------------------------------------------------------------------------ filters


def _filter_parameters() -> list[tuple[str, str, Any]]:
    """(query name, parameter name, type) of every filter of ``/audit/records``, read from
    :func:`service.app.routes.audit.audit_filters` itself, so the dashboard can never drift from the API."""
    hints = typing.get_type_hints(audit_filters, include_extras=True)
    fields = []
    for name, hint in hints.items():
        if name == "return":
            continue
        base, *extras = typing.get_args(hint)
        alias = next((getattr(e, "alias", None) for e in extras if getattr(e, "alias", None)), None)
        fields.append((alias or name, name, base))
    return fields


_FILTER_PARAMETERS = _filter_parameters()
FILTER_FIELDS: tuple[str, ...] = tuple(query for query, _, _ in _FILTER_PARAMETERS)


class ParsedFilters:
    """Filters read from a dashboard URL: the raw values (to refill the form), the :class:`AuditFilters`
    (None when a value is invalid) and the messages saying what was wrong."""

    def __init__(self, raw: dict[str, str], filters: AuditFilters | None, errors: list[str]) -> None:
        self.raw = raw
        self.filters = filters
        self.errors = errors


def parse_filters(params: Mapping[str, str]) -> ParsedFilters:
    """The ``/audit/records`` filters from a GET form's query (empty fields mean unset), validated with the
    API's own types and then :func:`audit_filters` (times in UTC, end after start, no NUL)."""
    raw = {name: params[name].strip() for name in FILTER_FIELDS if params.get(name, "").strip()}
    values: dict[str, Any] = {}
    errors: list[str] = []
    for query, parameter, kind in _FILTER_PARAMETERS:
        if query not in raw:
            continue
        try:
            values[parameter] = TypeAdapter(kind).validate_python(raw[query])
        except ValidationError as exc:
            errors.append(f"{query}: {exc.errors()[0]['msg']} (got {raw[query]!r})")
    if errors:
        return ParsedFilters(raw, None, errors)
    try:
        return ParsedFilters(raw, audit_filters(**values), [])
    except ApiError as exc:
        return ParsedFilters(raw, None, [exc.message])


def query_string(params: Mapping[str, Any]) -> str:
    """``?a=1&b=2`` of the set values (datetimes as ISO 8601, booleans as true/false); '' if none."""
    items = []
    for key, value in params.items():
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, datetime):
            value = value.isoformat()
        items.append((key, str(value)))
    return "?" + urlencode(items) if items else ""


# ------------------------------------------------------------------------------------------ overview


def _window_bounds(label: str, window: str) -> tuple[datetime, datetime]:
    start = datetime.combine(date.fromisoformat(label), datetime.min.time(), tzinfo=UTC)
    return start, start + timedelta(days=7 if window == "week" else 1)


def _records_link(
    raw: Mapping[str, str], filters: AuditFilters, label: str, window: str, **extra: Any
) -> str:
    """The records page for one window (intersected with the current time filters) and ``extra``."""
    start, end = _window_bounds(label, window)
    if filters.start is not None:
        start = max(start, filters.start)
    if filters.end is not None:
        end = min(end, filters.end)
    return "/dashboard/records" + query_string({**raw, **extra, "start": start, "end": end})


def overview(
    *,
    raw: Mapping[str, str],
    filters: AuditFilters,
    window: str,
    counts: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    served_models: Sequence[str] = (),
) -> dict[str, Any]:
    """The overview page: requests and flagged rate per window, drift score and IoU per model x method
    per window (mean with the 25-75th percentile band), the tables behind them, and the ranking."""
    labels = [str(c["window"]) for c in counts]
    index = {label: i for i, label in enumerate(labels)}
    window_word = "week (UTC, from Monday)" if window == "week" else "day (UTC)"
    groups = list(summary.get("groups", []))
    models = sorted({str(g["key"]["model"]) for g in groups} | set(served_models))
    colours = model_colours(models)
    methods = [m for m in METHODS if any(g["key"]["method"] == m for g in groups)]
    methods += sorted({str(g["key"]["method"]) for g in groups} - set(methods))

    requests_chart = None
    flagged_chart = None
    if counts:
        requests_chart = BarChart(
            title="Requests per " + window,
            x_title=window_word,
            y_title="requests (count)",
            labels=labels,
            values=[float(c["requests"]) for c in counts],
            titles=[f"{c['window']}: {c['requests']} requests, {c['flagged']} flagged" for c in counts],
            hrefs=[_records_link(raw, filters, str(c["window"]), window) for c in counts],
        ).render()
        flagged_chart = LineChart(
            title="Flagged requests per " + window,
            x_title=window_word,
            y_title="flagged requests (%)",
            labels=labels,
            series=[
                Series(
                    name="flagged",
                    colour="#D55E00",
                    points=[
                        Point(
                            x=index[str(c["window"])],
                            y=100.0 * float(c["flagged_rate"] or 0.0),
                            title=f"{c['window']}: {c['flagged']} of {c['requests']} requests flagged "
                            f"({pct(c['flagged_rate'])})",
                            href=_records_link(raw, filters, str(c["window"]), window, flagged=True),
                        )
                        for c in counts
                    ],
                )
            ],
            y_range=(0.0, 100.0),
        ).render()

    per_method = []
    for method in methods:
        charts = []
        for metric, title, y_title in (
            ("drift_score", "Drift score", "drift score (0 = same evidence, 1 = none shared)"),
            ("iou", "Top-k IoU", "IoU of the top-k regions (0–1)"),
        ):
            series = []
            for model in models:
                points = []
                for g in groups:
                    key = g["key"]
                    if key["model"] != model or key["method"] != method or str(key[window]) not in index:
                        continue
                    stats = g["metrics"].get(metric, {})
                    if stats.get("mean") is None:
                        continue
                    label = str(key[window])
                    points.append(
                        Point(
                            x=index[label],
                            y=float(stats["mean"]),
                            low=stats.get("p25"),
                            high=stats.get("p75"),
                            title=f"{model} · {method_label(method)} · {label}: mean {fmt(stats['mean'])}, "
                            f"median {fmt(stats.get('p50'))}, p25–p75 {fmt(stats.get('p25'))}–"
                            f"{fmt(stats.get('p75'))}, n = {stats.get('n')}",
                            href=_records_link(raw, filters, label, window, model=model, method=method),
                        )
                    )
                if points:
                    series.append(Series(name=model, colour=colours[model], points=points))
            charts.append(
                LineChart(
                    title=f"{title} by model — {method_label(method)}",
                    x_title=window_word,
                    y_title=y_title,
                    labels=labels,
                    series=series,
                    y_range=(0.0, 1.0),
                ).render()
            )
        rows = [
            {
                "window": str(g["key"][window]),
                "model": g["key"]["model"],
                "colour": colours.get(str(g["key"]["model"]), "#000"),
                "n": g["count"],
                "drift_mean": fmt(g["metrics"]["drift_score"].get("mean")),
                "drift_iqr": f"{fmt(g['metrics']['drift_score'].get('p25'))}–"
                f"{fmt(g['metrics']['drift_score'].get('p75'))}",
                "iou_mean": fmt(g["metrics"]["iou"].get("mean")),
                "flagged_rate": pct(g["flagged_rate"]),
                "href": _records_link(
                    raw, filters, str(g["key"][window]), window, model=g["key"]["model"], method=method
                ),
            }
            for g in groups
            if g["key"]["method"] == method
        ]
        per_method.append({"method": method, "label": method_label(method), "charts": charts, "rows": rows})

    return {
        "labels": labels,
        "window": window,
        "total_requests": sum(int(c["requests"]) for c in counts),
        "total_flagged": sum(int(c["flagged"]) for c in counts),
        "requests_chart": requests_chart,
        "flagged_chart": flagged_chart,
        "counts": [
            {
                **c,
                "flagged_pct": pct(c["flagged_rate"]),
                "href": _records_link(raw, filters, str(c["window"]), window),
            }
            for c in counts
        ],
        "legend": [{"model": m, "colour": colours[m]} for m in models],
        "per_method": per_method,
        "ranking": ranking(summary.get("ranking", {}), colours, raw),
    }


def _legend_swatch(colour: str) -> Markup:
    return Markup(
        f'<svg class="swatch" viewBox="0 0 10 10" width="10" height="10" aria-hidden="true">'
        f'<rect width="10" height="10" fill="{colour}"/></svg>'
    )


def _verdict(reversal: bool | None) -> str:
    if reversal is None:
        return "undetermined"
    return "reversal" if reversal else "no reversal"


def ranking(block: Mapping[str, Any], colours: Mapping[str, str], raw: Mapping[str, str]) -> dict[str, Any]:
    """The stability ranking per method and the reversal verdict of each pair of methods (with its tests)."""
    methods = []
    per_method = block.get("per_method") or {}
    known = [m for m in METHODS if m in per_method] + sorted(set(per_method) - set(METHODS))
    for method, entries in ((m, per_method[m]) for m in known):
        methods.append(
            {
                "method": method,
                "label": method_label(method),
                "entries": [
                    {
                        "rank": e.get("rank"),
                        "model": e["model"],
                        "swatch": _legend_swatch(colours.get(e["model"], "#000")),
                        "count": e.get("count"),
                        "mean_iou": fmt(e.get("mean_iou")),
                        "mean_drift_score": fmt(e.get("mean_drift_score")),
                        "href": "/dashboard/records"
                        + query_string({**raw, "model": e["model"], "method": method}),
                    }
                    for e in entries
                ],
            }
        )
    comparisons = []
    for c in block.get("comparisons") or []:
        first, second = c["methods"]
        verdict = _verdict(c.get("reversal"))
        tests = [
            {
                "pair": f"{t.get('model_a')} vs {t.get('model_b')}",
                "p": p_value(t.get("p_value")),
                "p_holm": p_value(t.get("p_holm")),
                "n": t.get("n"),
            }
            for t in c.get("interaction_tests") or []
        ]
        bootstrap = c.get("bootstrap") or {}
        control = c.get("head_scale_control")
        comparisons.append(
            {
                "methods": f"{method_label(first)} vs {method_label(second)}",
                "verdict": verdict,
                "verdict_class": {"reversal": "bad", "no reversal": "ok"}.get(verdict, "unknown"),
                "orders": {method_label(m): " > ".join(o) for m, o in (c.get("order") or {}).items()},
                "rank_changed": c.get("rank_changed"),
                "n_images": c.get("n_images"),
                "n_images_left_out": c.get("n_images_left_out"),
                "kendall_tau": fmt(c.get("kendall_tau")),
                "p_value": p_value(c.get("p_value")),
                "alpha": c.get("alpha"),
                "p_order_differs": fmt(bootstrap.get("p_order_differs")),
                "p_top_changes": fmt(bootstrap.get("p_top_changes")),
                "tests": tests,
                "note": c.get("note"),
                "control": None
                if control is None
                else {
                    "verdict": _verdict(control.get("reversal")),
                    "n_images": control.get("n_images"),
                    "note": control.get("note"),
                },
            }
        )
    return {"methods": methods, "comparisons": comparisons, "rule": block.get("comparison")}


# ------------------------------------------------------------------------------------------- records

_SEVERITY_ORDER = {"low": 0, "moderate": 1, "high": 2}


def record_rows(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One table row per record: when, which models/methods, the worst severity, flagged, class."""
    rows = []
    for item in items:
        drift = list(item.get("drift") or [])
        severities = [d.get("severity") for d in drift if d.get("severity")]
        worst = max(severities, key=lambda s: _SEVERITY_ORDER.get(s, -1)) if severities else None
        scores = [d["drift_score"] for d in drift if d.get("drift_score") is not None]
        created = item["created_at"]
        rows.append(
            {
                "id": item["id"],
                "created_at": created.strftime("%Y-%m-%d %H:%M:%S")
                if isinstance(created, datetime)
                else str(created),
                "models": sorted({str(d["model"]) for d in drift}),
                "methods": sorted({method_label(str(d["method"])) for d in drift}),
                "classes": sorted({str(d["target_class"]) for d in drift if d.get("target_class")}),
                "agreement": all(bool(d.get("agreement")) for d in drift) if drift else None,
                "worst": worst,
                "max_drift": fmt(max(scores)) if scores else "—",
                "flagged": any(bool(d.get("flagged")) for d in drift),
                "flagged_pairs": [
                    f"{d['model']} · {method_label(str(d['method']))}" for d in drift if d.get("flagged")
                ],
            }
        )
    return rows


def record_detail(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's page: per model its predictions and per method its metrics, flags and diagnostics.

    ``maps`` per method: when the record kept its low-resolution attribution maps (``record["maps"]``,
    maps for review, :mod:`engine.review_maps`), a list of (label, URL of the PNG the dashboard serves:
    same origin, the CSP allows 'self' only, so no data: URIs), transfer and fine-tuned first; else None,
    and ``maps_note`` says why none were kept."""
    kept = record.get("maps") or {}
    kept_models = kept.get("models") or {}
    reports = []
    for report in record.get("reports") or []:
        methods = report.get("methods") or {}
        metric_names: list[str] = []
        for result in methods.values():
            for name in result.get("metrics") or {}:
                if name not in metric_names:
                    metric_names.append(name)
        predictions = []
        for checkpoint in CHECKPOINTS:
            p = (report.get("predictions") or {}).get(checkpoint)
            if not p:
                continue
            probabilities = sorted(
                (p.get("probabilities") or {}).items(), key=lambda kv: float(kv[1]), reverse=True
            )
            predictions.append(
                {
                    "checkpoint": checkpoint,
                    "class": p.get("class"),
                    "probabilities": [(name, fmt(float(v))) for name, v in probabilities],
                }
            )
        reports.append(
            {
                "model": report.get("model"),
                "agreement": report.get("agreement"),
                "target": (report.get("target_class") or {}).get("name"),
                "target_source": (report.get("target_class") or {}).get("source"),
                "predictions": predictions,
                "methods": [
                    {
                        "method": m,
                        "label": method_label(m),
                        "drift_score": fmt(r.get("drift_score")),
                        "severity": r.get("severity"),
                        "flagged": bool(r.get("flagged")),
                        "flags": list(r.get("flags") or []),
                        "drift_index": fmt(r.get("drift_index")),
                        "reference_percentile": fmt(r.get("reference_percentile"), 1),
                        "diagnostics": {k: fmt(v) for k, v in (r.get("diagnostics") or {}).items()},
                        "maps": map_links(record["id"], str(report.get("model")), m, kept_models),
                    }
                    for m, r in methods.items()
                ],
                "metrics": [
                    {
                        "name": name,
                        "cells": [fmt((r.get("metrics") or {}).get(name)) for r in methods.values()],
                    }
                    for name in metric_names
                ],
                "calibrated": (report.get("thresholds") or {}).get("calibrated"),
            }
        )
    return {
        "reports": reports,
        "timings": {k: fmt(v, 1) for k, v in (record.get("timings_ms") or {}).items()},
        "maps_note": maps_note(record.get("maps")),
        "maps_grid": kept.get("grid"),
    }


MAP_LABELS = {
    "transfer": "transfer",
    "finetuned": "fine-tuned",
    "transfer_own": "transfer, own prediction",
    "finetuned_own": "fine-tuned, own prediction",
}


def map_links(
    record_id: int, model: str, method: str, kept_models: Mapping[str, Any]
) -> list[tuple[str, str]] | None:
    """(label, PNG URL) of each kept map of ``model`` x ``method``, in :data:`MAP_LABELS` order."""
    by_checkpoint = (kept_models.get(model) or {}).get(method) or {}
    names = [n for n in MAP_LABELS if n in by_checkpoint]
    names += sorted(str(n) for n in by_checkpoint if n not in MAP_LABELS)
    base = f"/dashboard/records/{record_id}/maps/{quote(model, safe='')}/{quote(method, safe='')}"
    links = [(MAP_LABELS.get(n) or n, f"{base}/{quote(n, safe='')}.png") for n in names]
    return links or None


def maps_note(maps: Mapping[str, Any] | None) -> str:
    """Why a record shows no maps (empty when it kept some)."""
    if not maps:
        return (
            "Maps were not kept: CXR_DRIFT_KEEP_MAPS=none at the time (the audit trail keeps maps only when "
            "maps for review are enabled, and never the image)."
        )
    if not maps.get("kept"):
        return (
            f"Maps were not kept: CXR_DRIFT_KEEP_MAPS={maps.get('keep')} at the time and no drift result of "
            "this request was flagged."
        )
    return ""


# -------------------------------------------------------------------------------------------- models


def model_rows(
    manifests: Mapping[str, Mapping[str, Any]],
    folders: Mapping[str, str],
    versions: Mapping[str, tuple[str, datetime]] | None = None,
) -> list[dict[str, Any]]:
    """One row per served pair from its manifest: identity columns (version digest and serving since from
    ``versions``), test metrics per checkpoint, and the drift calibration (or why there is none)."""
    rows = []
    for name in sorted(manifests):
        manifest = manifests[name]
        digest, since = (versions or {}).get(name, ("", None))
        checkpoints = manifest.get("checkpoints") or {}
        calibration = manifest.get("drift_calibration") or None
        rows.append(
            {
                "name": name,
                "columns": [
                    ("architecture", manifest.get("architecture") or "—"),
                    ("version digest", f"{digest[:12]}…" if digest else "—"),
                    ("serving since", since.strftime("%Y-%m-%d %H:%M UTC") if since else "—"),
                    ("input size", f"{manifest.get('input_size', '—')} px"),
                    ("classes", len(manifest.get("class_names") or [])),
                    ("exported", manifest.get("created_at") or "—"),
                    ("package version", manifest.get("cxr_drift_version") or "—"),
                ],
                "folder": folders.get(name, ""),
                "digest": digest,
                "class_names": list(manifest.get("class_names") or []),
                "metrics": [
                    {
                        "checkpoint": checkpoint,
                        "cells": {
                            k: fmt(v)
                            for k, v in ((checkpoints.get(checkpoint) or {}).get("metrics") or {}).items()
                        },
                    }
                    for checkpoint in CHECKPOINTS
                    if checkpoint in checkpoints
                ],
                "calibration": None
                if calibration is None
                else {
                    "subset": calibration.get("subset"),
                    "n": calibration.get("n"),
                    "score": calibration.get("score"),
                    "created_at": calibration.get("created_at"),
                    "bands": fmt((calibration.get("severity") or {}).get("bands")),
                    "methods": [
                        {
                            "label": method_label(m),
                            "noise_floor": fmt(v.get("noise_floor")),
                            "p50": fmt((v.get("reference_percentiles") or {}).get("50")),
                            "p99": fmt((v.get("reference_percentiles") or {}).get("99")),
                        }
                        for m, v in (calibration.get("methods") or {}).items()
                    ],
                },
                "dataset": fmt(
                    {k: v for k, v in (manifest.get("dataset") or {}).items() if k != "fingerprint"}
                ),
            }
        )
    return rows
