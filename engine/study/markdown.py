"""The study's ``summary.md``: :func:`engine.study.statistics.summarize`'s output as Markdown tables
(:func:`render_markdown`), after a preamble that says what was studied (:func:`study_preamble`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from engine.study.statistics import ALL_CLASSES

__all__ = ["render_markdown", "study_preamble"]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if v != 0 and abs(v) < 10 ** (-digits):
            return f"{v:.1e}"
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return [*lines, ""]


def _mean_ci(s: Mapping[str, Any]) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{_fmt(s['mean'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]"


def render_markdown(summary: Mapping[str, Any], *, title: str = "Drift study", preamble: str = "") -> str:
    """A human-readable report of :func:`~engine.study.statistics.summarize`'s output (Markdown tables)."""
    cfg = summary["config"]
    level = round(100 * cfg["confidence"])
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble.rstrip(), ""]
    lines += [
        f"Mean [{level}% {cfg['ci']}, {cfg['n_boot']} resamples, seed {cfg['seed']}]. "
        f"Paired test: {cfg['paired_test']}.",
        "",
    ]
    overall = [g for g in summary["groups"] if g["class"] == ALL_CLASSES]
    headline = [
        m for m in ("iou", "drift_score", "ssim", "pearson", "centroid_shift", "emd") if m in cfg["metrics"]
    ]
    for method in summary["methods"]:
        lines += [f"## {method}", ""]
        rows = []
        for g in (g for g in overall if g["method"] == method):
            iou = g["metrics"].get("iou", {})
            rows.append(
                [g["model"], g["n_images"]]
                + [_mean_ci(g["metrics"][m]) for m in headline]
                + ([f"{_fmt(iou.get('median'))} ({_fmt(iou.get('iqr'))})"] if iou else [])
            )
        header = ["model", "n", *(f"{m} mean [CI]" for m in headline)] + (
            ["iou median (IQR)"] if "iou" in headline else []
        )
        lines += _table(header, rows)
        if summary["classes"] and any(g["class"] != ALL_CLASSES for g in summary["groups"]):
            lines += [f"IoU per class ({method}): mean [CI] (n)", ""]
            per_class = {
                (g["model"], g["class"]): g
                for g in summary["groups"]
                if g["method"] == method and g["class"] != ALL_CLASSES
            }
            class_rows = []
            for model in summary["models"]:
                cells = []
                for cls in summary["classes"]:
                    g = per_class.get((model, cls))
                    s = g["metrics"].get("iou", {}) if g else {}
                    cells.append(f"{_mean_ci(s)} ({s.get('n', 0)})" if s else "-")
                class_rows.append([model, *cells])
            lines += _table(["model", *summary["classes"]], class_rows)

    rankings = summary["rankings"]
    lines += [f"## Stability ranking (mean {rankings['metric']}, higher = more stable)", ""]
    methods = list(rankings["methods"])
    depth = max((len(v) for v in rankings["methods"].values()), default=0)
    rank_rows = []
    for i in range(depth):
        row: list[Any] = [i + 1]
        for method in methods:
            entries = rankings["methods"][method]
            row.append(f"{entries[i]['model']} ({_fmt(entries[i]['mean'])})" if i < len(entries) else "-")
        rank_rows.append(row)
    lines += _table(["rank", *methods], rank_rows)
    for c in rankings["comparisons"]:
        pairs = ", ".join(f"{a} / {b}" for a, b in c["reversed_pairs"]) or "none"
        lines += [
            f"- {c['method_a']} vs {c['method_b']}: Kendall tau = {_fmt(c['tau'])} (p = {_fmt(c['p_value'])}, "
            f"n = {c['n']}); most stable: {c['top_a']} vs {c['top_b']}"
            f"{' (the top changes)' if c['top_changes'] else ''}; reversed pairs: {pairs}."
            + (f" Note: {c['note']}." if c["note"] else ""),
            "- relative change of the mean from "
            f"{c['method_a']} to {c['method_b']}: "
            + ", ".join(
                f"{m} {_fmt(100 * v, 1)}%" if v is not None else f"{m} -"
                for m, v in c["relative_change"].items()
            ),
            "",
        ]

    tests = [t for t in summary["paired_tests"] if t["metric"] in ("iou", "drift_score", "ssim", "pearson")]
    if tests:
        lines += ["## Paired tests between architectures (same images)", ""]
        lines += _table(
            ["method", "metric", "A vs B", "n", "median A-B", "effect", "W", "p", "p (Holm)", "note"],
            [
                [
                    t["method"],
                    t["metric"],
                    f"{t['model_a']} vs {t['model_b']}",
                    t["n_pairs"],
                    t["median_difference"],
                    t["effect_size"],
                    t["statistic"],
                    t["p_value"],
                    t["p_holm"],
                    t["note"] or "",
                ]
                for t in tests
            ],
        )
        lines += ["All metrics' tests are in summary.json.", ""]

    if summary["lesion_tests"]:
        lines += [
            "## Evidence on the lesion: fine-tuned vs transfer (lesion images only)",
            "",
            "Share of the top-k% region inside the lesion (topk) and attribution mass inside it (mass); "
            "chance level = lesion area. Positive change: fine-tuning moved evidence onto the lesion.",
            "",
        ]
        stats_of = {(g["model"], g["method"]): g["metrics"] for g in overall}
        rows = []
        for t in summary["lesion_tests"]:
            s = stats_of.get((t["model"], t["method"]), {})
            kind = "topk" if "topk" in t["finetuned"] else "mass"
            rows.append(
                [
                    t["model"],
                    t["method"],
                    kind,
                    t["n_pairs"],
                    _mean_ci(s.get(t["transfer"], {})),
                    _mean_ci(s.get(t["finetuned"], {})),
                    _mean_ci(s.get("lesion_area", {})),
                    t["mean_difference"],
                    t["p_value"],
                    t["note"] or "",
                ]
            )
        lines += _table(
            [
                "model",
                "method",
                "measure",
                "n",
                "transfer",
                "fine-tuned",
                "chance",
                "mean change",
                "p",
                "note",
            ],
            rows,
        )
    return "\n".join(lines).rstrip() + "\n"


def study_preamble(study: Mapping[str, Any]) -> str:
    """What a study used (the ``study`` block of its summary): data, split, subset, target, image counts."""
    lines = [
        f"Data: `{study['data']}`, split `{study['split']}` ({study['n_images']} images); subset "
        f"`{study['subset']}` ({study['subset_definition']}); evidence compared for the {study['target']}; "
        f"top-k = {study['topk_percent']:g}%.",
    ]
    if study.get("note"):
        lines.append(f"Note: {study['note']}")
    lines.append("")
    header = (
        "| model | images | included | fine-tuned correct | transfer correct | both correct | agreement |"
    )
    lines += [header, "|---|---|---|---|---|---|---|"]
    for model, c in study["counts"].items():
        lines.append(
            f"| {model} | {c['images']} | {c['included']} | {c['finetuned_correct']} | {c['transfer_correct']} "
            f"| {c['both_correct']} | {c['agreement']} |"
        )
    return "\n".join(lines)
