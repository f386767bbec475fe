"""The paper's offline analysis (``cxr-drift study``) over model pairs and one data split.

For every model pair and every image of the split, the drift report (:func:`engine.report.drift_reports`)
is computed for the **true class** (``target="label"``, the default; ``"prediction"`` uses the fine-tuned
model's prediction, as the service does). With ``subset="true_positive"`` (the default, as the paper) the
statistics use the images whose *fine-tuned* prediction equals the label - the definition
``cxr-drift calibrate`` uses - and each row records whether the transfer checkpoint was right too; with
``subset="all"`` every image counts. The per-image table always holds every image, with an ``included``
column.

Modules:

- :mod:`~engine.study.runner`: :func:`run_study`, folders in, files out (``per_image.csv``,
  ``summary.json``, ``summary.md``, figures);
- :mod:`~engine.study.collect`: model pairs, the split's samples, the per-image rows, the CSV;
- :mod:`~engine.study.lesion`: evidence on the lesion (synthetic data with lesion masks);
- :mod:`~engine.study.statistics`: descriptive statistics with bootstrap CIs, paired Wilcoxon tests with
  Holm adjustment, and :func:`summarize` (the ranking and Kendall tau come from :mod:`engine.ranking`);
- :mod:`~engine.study.markdown`: ``summary.md``;
- :mod:`~engine.study.plots`: the figures (matplotlib). Not imported here: import it to plot.
"""

from __future__ import annotations

from engine.study.collect import (
    SUBSETS,
    TARGETS,
    Example,
    build_example,
    collect,
    image_counts,
    load_pairs,
    pair_folders,
    write_csv,
)
from engine.study.lesion import LESION_COLUMNS, LESION_PAIRS, evidence_on_lesion, lesion_columns
from engine.study.markdown import render_markdown, study_preamble
from engine.study.runner import StudyResult, run_study
from engine.study.statistics import (
    DEFAULT_STUDY_METRICS,
    MIN_PAIRS_FOR_005,
    bootstrap_ci,
    describe,
    holm_adjust,
    paired_wilcoxon,
    summarize,
)

__all__ = [
    "DEFAULT_STUDY_METRICS",
    "LESION_COLUMNS",
    "LESION_PAIRS",
    "MIN_PAIRS_FOR_005",
    "SUBSETS",
    "TARGETS",
    "Example",
    "StudyResult",
    "bootstrap_ci",
    "build_example",
    "collect",
    "describe",
    "evidence_on_lesion",
    "holm_adjust",
    "image_counts",
    "lesion_columns",
    "load_pairs",
    "pair_folders",
    "paired_wilcoxon",
    "render_markdown",
    "run_study",
    "study_preamble",
    "summarize",
    "write_csv",
]
