"""One offline study from folders to files (:func:`run_study`): load the pairs, collect the per-image table
of one split, summarize it, and write the tables, the statistics and (optionally) the figures."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.dataset import load_split
from core.errors import UsageError
from core.vocabulary import SPLITS
from engine.study.collect import (
    SUBSETS,
    TARGETS,
    build_example,
    collect,
    image_counts,
    load_pairs,
    pair_folders,
    write_csv,
)
from engine.study.html import render_html
from engine.study.lesion import LESION_COLUMNS
from engine.study.markdown import render_markdown, study_preamble
from engine.study.statistics import DEFAULT_STUDY_METRICS, summarize
from engine.subsets import SUBSET_DEFINITIONS, resolve_subset

log = logging.getLogger(__name__)

__all__ = ["StudyResult", "run_study"]


@dataclass(frozen=True)
class StudyResult:
    """What a study wrote: ``written`` (file names in ``out``, then the combined figure's path) and its
    ``summary`` (the content of ``summary.json``)."""

    out: Path
    n_pairs: int
    n_images: int
    written: list[str]
    summary: dict[str, Any]


def run_study(
    data: str | Path,
    out: Path,
    *,
    artifacts: Path | None = None,
    model_dirs: Sequence[Path] = (),
    split: str = "test",
    subset: str = "both_correct",
    target: str = "label",
    topk: float = 20.0,
    limit: int | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    batch_size: int = 16,
    threads: int | None = None,
    plots: bool = True,
    figure: Path | None = None,
    note: str = "",
    progress: bool = True,
    compare_artifacts: Path | None = None,
    compare_model_dirs: Sequence[Path] = (),
) -> StudyResult:
    """The study of the pairs in ``artifacts`` and ``model_dirs`` on ``split`` of ``data``, written to ``out``:
    ``per_image.csv``, ``summary.json``, ``summary.md``, with ``plots`` the figures of
    :mod:`engine.study.plots` (``figure``: also the combined one, at that path), and ``report.html``: the
    summary and the figures in one self-contained file.

    Raises :class:`~core.errors.UsageError` when no image is in ``subset`` (the CSV is written first).
    """
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    if n_boot < 1:
        raise UsageError(f"--bootstrap must be >= 1, got {n_boot}")
    if not 0 < topk <= 100:
        raise UsageError(f"--topk must be a percentage in (0, 100], got {topk}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    for name, value, valid in (
        ("split", split, SPLITS),
        ("subset", subset, SUBSETS),
        ("target", target, TARGETS),
    ):
        if value not in valid:
            raise UsageError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
    pairs = load_pairs(pair_folders(artifacts, model_dirs), threads)
    class_names = next(iter(pairs.values())).class_names
    samples, root = load_split(data, class_names=class_names, split=split, limit=limit)
    log.info("study: %d model pair(s) x %d image(s) of split %r", len(pairs), len(samples), split)
    rows, has_masks = collect(
        pairs,
        samples,
        root,
        subset=subset,
        target=target,
        topk=topk,
        batch_size=batch_size,
        progress=progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "per_image.csv")
    included = [r for r in rows if r["included"]]
    if not included:
        raise UsageError(
            f"no image in subset {subset!r} ({SUBSET_DEFINITIONS[resolve_subset(subset)]}) among the "
            f"{len(samples)} images of split {split!r}; the per-image table is in {out / 'per_image.csv'}; "
            "rerun with another --subset (a sensitivity analysis)"
        )
    metrics = [*DEFAULT_STUDY_METRICS, *(LESION_COLUMNS if has_masks else ())]
    summary = summarize(included, metrics=metrics, n_boot=n_boot, seed=seed)
    summary["study"] = {
        "data": str(data),
        "split": split,
        "subset": subset,
        "subset_definition": SUBSET_DEFINITIONS[resolve_subset(subset)],
        "target": "true label" if target == "label" else "fine-tuned prediction",
        "topk_percent": topk,
        "n_images": len(samples),
        "synthetic_lesion_masks": has_masks,
        "models": {name: str(pair.folder) for name, pair in pairs.items()},
        "counts": image_counts(rows, subset),
        "note": note,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    markdown = render_markdown(summary, title="Drift study", preamble=study_preamble(summary["study"]))
    (out / "summary.md").write_text(markdown, encoding="utf-8")
    written = ["per_image.csv", "summary.json", "summary.md"]
    plotted: list[str] = []
    if plots:
        from engine.study import plots as figures  # matplotlib: only when plotting

        example = build_example(pairs, samples, rows, root, target=target, topk=topk)
        plotted = figures.write_plots(included, summary, example, out, note=note, has_masks=has_masks)
        written += plotted
        if figure is not None:
            figures.write_combined_figure(included, summary, example, figure, note=note, has_masks=has_masks)
            written.append(str(figure))
    # the figures written into ``out`` (the combined --figure lives wherever the caller put it)
    pngs = {Path(name).stem.replace("_", " "): out / name for name in plotted}
    (out / "report.html").write_text(
        render_html(markdown, title="Drift study", figures=pngs), encoding="utf-8"
    )
    written.append("report.html")
    if compare_artifacts is not None or compare_model_dirs:
        # another set of pairs (e.g. the previous versions) on the same images: engine.versions
        from engine.versions import compare_study_versions

        baseline = load_pairs(pair_folders(compare_artifacts, list(compare_model_dirs)), threads)
        baseline_rows, _ = collect(
            baseline,
            samples,
            root,
            subset=subset,
            target=target,
            topk=topk,
            batch_size=batch_size,
            progress=progress,
        )
        versions = compare_study_versions(
            {label: pair.architecture for label, pair in baseline.items()},
            baseline_rows,
            {label: pair.architecture for label, pair in pairs.items()},
            rows,
            n_boot=n_boot,
            seed=seed,
        )
        summary["versions"] = versions
        (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n", encoding="utf-8")
        written.append("versions.json")
    return StudyResult(out=out, n_pairs=len(pairs), n_images=len(samples), written=written, summary=summary)
