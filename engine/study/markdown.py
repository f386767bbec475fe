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
    if s.get("ci_low") is None:
        return f"{_fmt(s['mean'])} [no CI]"
    return f"{_fmt(s['mean'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]"


def _verdict(test: Mapping[str, Any]) -> str:
    if test["reversal"] is None:
        return "no verdict"
    return "**reversal**" if test["reversal"] else "no reversal"


def _reversal_lines(test: Mapping[str, Any], method_a: str, method_b: str) -> list[str]:
    """The reversal test of one pair of methods: the verdict, the interaction tests, the bootstrap."""
    boot = test["bootstrap"]
    pairs = ", ".join(f"{a} / {b}" for a, b in test["reversed_pairs"]) or "none"
    lines = [
        f"- {method_a} vs {method_b}: {_verdict(test)} (alpha = {_fmt(test['alpha'], 2)}) on "
        f"{test['n_images']} common images ({test['n_images_left_out']} left out); orders of the means "
        f"{'differ' if test['reversal_descriptive'] else 'agree'} (reversed pairs: {pairs}); most stable: "
        f"{test['top_a']} vs {test['top_b']}; Kendall tau = {_fmt(test['tau'])} (p = {_fmt(test['p_value'])}, "
        f"{test['n']} architectures, descriptive).",
        f"- bootstrap over images ({boot['n_boot']} resamples): P(order differs) = "
        f"{_fmt(boot['p_order_differs'])}, P(top changes) = {_fmt(boot['p_top_changes'])}.",
        *([f"- note: {test['note']}."] if test["note"] else []),
        "",
    ]
    if test["interaction_tests"]:
        lines += _table(
            ["pair", "n", f"median d ({method_a} - {method_b} gap change)", "W", "p", "p (Holm)", "note"],
            [
                [
                    f"{t['model_a']} - {t['model_b']}",
                    t["n"],
                    t["median_d"],
                    t["statistic"],
                    t["p_value"],
                    t["p_holm"],
                    t["note"] or "",
                ]
                for t in test["interaction_tests"]
            ],
        )
    return lines


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
    if cfg.get("min_n_for_ci"):
        lines += [
            f"[no CI]: fewer than {cfg['min_n_for_ci']} values, where bootstrap intervals under-cover.",
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
    lines += [
        f"## Stability ranking (mean {rankings['metric']} on the {rankings['n_images']} images common to every "
        "architecture and method, higher = more stable)",
        "",
    ]
    if rankings.get("note"):
        lines += [f"Note: {rankings['note']}.", ""]
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
    lines += [
        f"Reversal verdict: {cfg.get('reversal', 'see summary.json')}.",
        "",
        "d = the gap between two architectures under the first method minus their gap under the second.",
        "",
    ]
    for c in rankings["comparisons"]:
        lines += _reversal_lines(c, c["method_a"], c["method_b"])
        lines += [
            "- relative change of the mean from "
            f"{c['method_a']} to {c['method_b']}: "
            + (
                ", ".join(
                    f"{m} {_fmt(100 * v, 1)}%" if v is not None else f"{m} -"
                    for m, v in c["relative_change"].items()
                )
                or "-"
            ),
            "",
        ]
        control = c.get("control")
        if control:
            lines += [
                f"Under the head-scale control (`{control['column']}` in place of {control['replaces']}):",
                "",
            ]
            lines += _reversal_lines(control, c["method_a"], c["method_b"])

    tests = [t for t in summary["paired_tests"] if t.get("family") == "primary"]
    if tests:
        lines += [
            "## Paired tests between architectures (same images), primary metrics",
            "",
            f"Primary metrics (pre-declared): {', '.join(cfg.get('primary_metrics', []))}; p (Holm) within each "
            "method over these metrics x architecture pairs.",
            "",
        ]
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
        lines += [
            "The other metrics' tests are in summary.json, descriptive (unadjusted p, not in a Holm family).",
            "",
        ]

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
