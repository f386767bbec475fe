"""The study's figures (matplotlib; import this module only to plot, it is the heavy one).

- ``iou_<method>.png``: IoU and drift score per architecture;
- ``ranking.png``: mean IoU per method, one line per architecture (crossing lines are a ranking reversal);
- ``lesion_evidence.png`` (data with lesion masks): evidence on the lesion per checkpoint, against chance;
- ``example.png``: one image, its lesion contour, and both checkpoints' maps for both methods;

and :func:`write_combined_figure`: all of them as one small figure. Each figure is a bare
:class:`matplotlib.figure.Figure` (rendered with Agg, no pyplot global state), saved as a 256-colour PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from core.vocabulary import CHECKPOINTS
from engine.study.collect import Example

__all__ = ["METHOD_LABELS", "write_combined_figure", "write_plots"]

METHOD_LABELS = {"layercam": "LayerCAM", "gradcampp": "GradCAM++"}


def _save(fig: Figure, path: Path, *, dpi: int) -> None:
    """PNG with an adaptive 256-colour palette: a fraction of the size of matplotlib's RGBA output."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
        palette.save(path, optimize=True)


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _by_model(
    rows: Sequence[Mapping[str, Any]], method: str, column: str, models: Sequence[str]
) -> list[np.ndarray]:
    out = []
    for model in models:
        values = [r.get(column) for r in rows if r["model"] == model and r["method"] == method]
        out.append(np.array([float(v) for v in values if v is not None and math.isfinite(float(v))]))
    return out


def _draw_distribution(
    ax: Axes, data: Sequence[np.ndarray], models: Sequence[str], ylabel: str, title: str
) -> None:
    positions = np.arange(1, len(models) + 1)
    filled = [(p, d) for p, d in zip(positions, data, strict=True) if d.size > 1 and np.ptp(d) > 0]
    if filled:
        parts = ax.violinplot([d for _, d in filled], positions=[p for p, _ in filled], showextrema=False)
        for body in cast("list[Any]", parts["bodies"]):
            body.set_alpha(0.3)
    ax.boxplot(
        [d if d.size else np.array([np.nan]) for d in data], positions=positions, widths=0.25, showfliers=True
    )
    ax.set_xticks(positions, [f"{m}\n(n={d.size})" for m, d in zip(models, data, strict=True)], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)


def _draw_ranking(ax: Axes, summary: Mapping[str, Any]) -> None:
    methods = summary["methods"]
    overall = {
        (g["model"], g["method"]): g["metrics"]["iou"] for g in summary["groups"] if g["class"] == "all"
    }
    xs = np.arange(len(methods))
    for model in summary["models"]:
        points: list[tuple[int, Mapping[str, Any]]] = []
        for position, method in enumerate(methods):
            stats = overall.get((model, method))
            if stats and stats.get("mean") is not None:
                points.append((position, stats))
        if not points:
            continue
        x = np.array([p[0] for p in points], dtype=float)
        y = np.array([p[1]["mean"] for p in points])
        # a group too small for a CI (engine.study.statistics.MIN_N_FOR_CI) has none: no error bar
        low = y - np.array([np.nan if p[1]["ci_low"] is None else p[1]["ci_low"] for p in points])
        high = np.array([np.nan if p[1]["ci_high"] is None else p[1]["ci_high"] for p in points]) - y
        line = ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=model)
        ax.annotate(
            model,
            (x[-1], y[-1]),
            xytext=(6, 0),
            textcoords="offset points",
            fontsize=8,
            va="center",
            color=line[0].get_color(),
        )
    ax.set_xticks(xs, [METHOD_LABELS.get(m, m) for m in methods])
    ax.set_xlim(-0.4, len(methods) - 0.4)
    ax.set_ylabel(
        f"mean top-{summary['study']['topk_percent']:g}% IoU (95% CI)" if "study" in summary else "mean IoU"
    )
    verdicts = {True: "yes", False: "no", None: "undecided"}
    verdict_text = "; ".join(
        f"reversal: {verdicts[c['reversal']]} (tau {'-' if c['tau'] is None else format(c['tau'], '.2f')})"
        for c in summary["rankings"]["comparisons"]
    )
    ax.set_title(f"Stability ranking (mean IoU, common images)\n{verdict_text}", fontsize=9)
    ax.legend(fontsize=7, loc="best")


def _draw_lesion(
    ax: Axes, summary: Mapping[str, Any], kind: str = "topk_in_lesion", *, compact: bool = False
) -> None:
    overall = {(g["model"], g["method"]): g["metrics"] for g in summary["groups"] if g["class"] == "all"}
    models, methods = summary["models"], summary["methods"]
    width = 0.8 / (2 * len(methods))
    xs = np.arange(len(models))
    colors = {"transfer": "#9ecae1", "finetuned": "#08519c"}
    hatches = ["", "//", "xx"]
    chance: list[float] = []
    highs: list[float] = []
    for mi, method in enumerate(methods):
        for ci, ckpt in enumerate(CHECKPOINTS):
            offset = (2 * mi + ci - (2 * len(methods) - 1) / 2) * width
            stats = [overall.get((model, method), {}).get(f"{ckpt}_{kind}", {}) for model in models]
            y = np.array([s.get("mean") if s.get("mean") is not None else np.nan for s in stats], dtype=float)
            lo = np.array(
                [s.get("ci_low") if s.get("ci_low") is not None else np.nan for s in stats], dtype=float
            )
            hi = np.array(
                [s.get("ci_high") if s.get("ci_high") is not None else np.nan for s in stats], dtype=float
            )
            ax.bar(
                xs + offset,
                y,
                width,
                color=colors[ckpt],
                hatch=hatches[mi % 3],
                edgecolor="black",
                linewidth=0.5,
                label=f"{METHOD_LABELS.get(method, method)} {('TL' if ckpt == 'transfer' else 'FT') if compact else ckpt}",
            )
            ax.errorbar(xs + offset, y, yerr=[y - lo, hi - y], fmt="none", ecolor="black", capsize=2, lw=0.8)
            highs.extend(float(v) for v in hi if np.isfinite(v))
    for model in models:
        areas = [overall.get((model, m), {}).get("lesion_area", {}).get("mean") for m in methods]
        chance.append(next((a for a in areas if a is not None), np.nan))
    ax.hlines(
        chance,
        xs - 0.45,
        xs + 0.45,
        colors="red",
        linestyles="dashed",
        label="chance" if compact else "chance (lesion area)",
    )
    ax.set_xticks(xs, models, fontsize=8)
    # room for the legend above the bars; the axis starts at 0 so bar heights compare
    tallest = np.nanmax([*highs, *chance, 0.05]) if highs else 0.05
    ax.set_ylim(0, min(1.0, 1.8 * float(tallest)))
    label = (
        "share of top-k% pixels on the lesion"
        if kind == "topk_in_lesion"
        else "attribution mass on the lesion"
    )
    ax.set_ylabel(label, fontsize=9)
    ax.set_title("Evidence on the lesion\ntransfer vs fine-tuned", fontsize=9)
    ax.legend(fontsize=5.5 if compact else 6, loc="upper left", ncol=2)


def _draw_example(axes: Sequence[Axes], example: Example, model: str, methods: Sequence[str]) -> None:
    gray = example.gray
    h, w = gray.shape
    axes[0].imshow(gray, cmap="gray", vmin=0, vmax=1)
    if example.mask is not None:
        axes[0].contour(example.mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
    verdict = "FT correct" if example.correct.get(model) else "FT wrong"
    axes[0].set_title(f"{model}: {example.label}\n({verdict})", fontsize=8)
    panels = [(m, c) for m in methods for c in CHECKPOINTS]
    maps = example.maps.get(model, {})
    for ax, (method, ckpt) in zip(axes[1:], panels, strict=False):
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        if method in maps:
            ax.imshow(
                maps[method][ckpt],
                cmap="jet",
                alpha=0.45,
                vmin=0,
                vmax=1,
                extent=(-0.5, w - 0.5, h - 0.5, -0.5),
            )
        if example.mask is not None:
            ax.contour(example.mask.astype(float), levels=[0.5], colors="white", linewidths=0.6)
        iou = example.iou.get(model, {}).get(method)
        detail = f" (IoU {iou:.2f})" if ckpt == "finetuned" and iou is not None else ""
        ax.set_title(f"{METHOD_LABELS.get(method, method)} {ckpt}{detail}", fontsize=8)
    for ax in axes:
        ax.set_axis_off()


def write_plots(
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    example: Example,
    out: Path,
    *,
    note: str = "",
    has_masks: bool = False,
) -> list[str]:
    """The study's figures in ``out``; returns their file names."""
    models, methods = summary["models"], summary["methods"]
    suffix = f"\n{note}" if note else ""
    written = []
    for method in methods:
        fig = _figure(4 + 1.6 * len(models), 4)
        axes = fig.subplots(1, 2)
        label = METHOD_LABELS.get(method, method)
        _draw_distribution(
            axes[0],
            _by_model(rows, method, "iou", models),
            models,
            "top-k% IoU",
            f"{label}: IoU (higher = stable)",
        )
        _draw_distribution(
            axes[1],
            _by_model(rows, method, "drift_score", models),
            models,
            "drift score",
            f"{label}: drift score",
        )
        if suffix:
            fig.suptitle(note, fontsize=9)
        name = f"iou_{method}.png"
        _save(fig, out / name, dpi=100)
        written.append(name)

    fig = _figure(5.5, 4.5)
    _draw_ranking(fig.subplots(), summary)
    if note:
        fig.suptitle(note, fontsize=9)
    _save(fig, out / "ranking.png", dpi=100)
    written.append("ranking.png")

    if has_masks and summary["lesion_tests"]:
        fig = _figure(4 + 1.5 * len(models), 7)
        top, bottom = fig.subplots(2, 1)
        _draw_lesion(top, summary, "topk_in_lesion")
        _draw_lesion(bottom, summary, "mass_in_lesion")
        bottom.set_title("")
        if note:
            fig.suptitle(note, fontsize=9)
        _save(fig, out / "lesion_evidence.png", dpi=100)
        written.append("lesion_evidence.png")

    cols = 1 + 2 * len(methods)
    fig = _figure(1.9 * cols, 2.1 * len(models) + 0.3)
    grid = np.atleast_2d(fig.subplots(len(models), cols))
    for model, axes in zip(models, grid, strict=True):
        _draw_example(list(axes), example, model, methods)
    fig.suptitle(f"Example: {example.image} (target: {example.target}){suffix}", fontsize=9)
    _save(fig, out / "example.png", dpi=100)
    written.append("example.png")
    return written


def write_combined_figure(
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    example: Example,
    path: Path,
    *,
    note: str = "",
    has_masks: bool = False,
    dpi: int = 72,
) -> Path:
    """One small figure: IoU per architecture and method, the ranking, the lesion evidence, an example."""
    models, methods = summary["models"], summary["methods"]
    show_lesion = has_masks and bool(summary["lesion_tests"])
    cols = 1 + 2 * len(methods)
    fig = _figure(11, 3.6 + 1.9 * len(models))
    outer = fig.add_gridspec(2, 1, height_ratios=[3.6, 1.9 * len(models)])
    top = outer[0].subgridspec(1, 2 + len(methods) - 1 + int(show_lesion))
    for i, method in enumerate(methods):
        ax = fig.add_subplot(top[0, i])
        _draw_distribution(
            ax,
            _by_model(rows, method, "iou", models),
            models,
            "top-k% IoU",
            f"{METHOD_LABELS.get(method, method)}: IoU",
        )
    _draw_ranking(fig.add_subplot(top[0, len(methods)]), summary)
    if show_lesion:
        _draw_lesion(fig.add_subplot(top[0, len(methods) + 1]), summary, "topk_in_lesion", compact=True)
    bottom = outer[1].subgridspec(len(models), cols)
    for r, model in enumerate(models):
        _draw_example([fig.add_subplot(bottom[r, c]) for c in range(cols)], example, model, methods)
    title = "cxr-drift study"
    if note:
        title += f" - {note}"
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path, dpi=dpi)
    return path
