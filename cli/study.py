"""``cxr-drift study``: the paper's analysis, offline, over model pairs and one data split.

For every model pair and every image of the split, the drift report (:func:`engine.report.drift_reports`)
is computed for the **true class** (``--target label``, the default; ``prediction`` uses the fine-tuned
model's prediction, as the service does). With ``--subset true_positive`` (the default, as the paper) the
statistics use the images whose *fine-tuned* prediction equals the label - the definition
``cxr-drift calibrate`` uses - and each row records whether the transfer checkpoint was right too; with
``--subset all`` every image counts. The per-image table always holds every image, with an ``included``
column.

Outputs in ``--out``:

- ``per_image.csv``: one row per model x method x image: predictions, agreement, every drift metric
  (``iou_at_K`` for the whole k grid), drift score and severity; on the synthetic set (a ``manifest.csv``
  with a ``lesion_mask`` column) also the evidence on the lesion per checkpoint
  (:func:`engine.study.evidence_on_lesion`; empty for ``normal`` images, whose masks are empty);
- ``summary.json`` / ``summary.md``: :func:`engine.study.summarize` (descriptive statistics with
  bootstrap CIs per architecture x method x class, paired Wilcoxon tests between architectures, the
  stability ranking per method and its Kendall tau) plus the image counts;
- plots: ``iou_<method>.png`` (IoU and drift score per architecture), ``ranking.png`` (mean IoU per method,
  one line per architecture: crossing lines are a ranking reversal), ``lesion_evidence.png`` (synthetic data)
  and ``example.png`` (one image, its lesion contour, and both checkpoints' maps for both methods);
  ``--figure PATH`` also writes all of them as one small figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from core.errors import InputError, UsageError
from core.vocabulary import CHECKPOINTS

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from core.dataset import Sample
    from engine.runtime import ModelPair

log = logging.getLogger(__name__)

__all__ = ["configure_parser", "run"]

SUBSETS = ("true_positive", "all")
TARGETS = ("label", "prediction")
METHOD_LABELS = {"layercam": "LayerCAM", "gradcampp": "GradCAM++"}


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="folder of model-pair folders (each with manifest.json), or one model-pair folder",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        action="append",
        default=[],
        help="a model-pair folder (repeatable; with or instead of --artifacts)",
    )
    p.add_argument(
        "--data", required=True, help="ImageFolder tree, CSV manifest, or synthetic dataset folder"
    )
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split (default test)")
    p.add_argument(
        "--subset",
        default="true_positive",
        choices=SUBSETS,
        help="images the statistics use: true_positive (fine-tuned prediction == label; the paper) or all",
    )
    p.add_argument(
        "--target",
        default="label",
        choices=TARGETS,
        help="class whose evidence is compared: the true label (default) or the fine-tuned prediction",
    )
    p.add_argument("--topk", type=float, default=20.0, help="top-k percent of IoU, score and lesion hit (20)")
    p.add_argument("--limit", type=int, default=None, help="use at most N images of the split (in order)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs (2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-plots", action="store_true", help="tables and statistics only")
    p.add_argument("--figure", type=Path, default=None, help="also write one combined figure to this PNG")
    p.add_argument(
        "--note",
        default="",
        help="a line added to the figures' titles and summary.md (e.g. the models' origin)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")


# ------------------------------------------------------------------------------------------------ inputs


def _pair_folders(artifacts: Path | None, model_dirs: Sequence[Path]) -> list[Path]:
    folders: list[Path] = []
    if artifacts is not None:
        if not artifacts.is_dir():
            raise FileNotFoundError(f"artifacts folder {str(artifacts)!r} does not exist or is not a folder")
        if (artifacts / "manifest.json").is_file():
            folders.append(artifacts)
        else:
            found = sorted(d for d in artifacts.iterdir() if (d / "manifest.json").is_file())
            if not found:
                raise UsageError(
                    f"no model-pair folders in {str(artifacts)!r}: expected sub-folders with a manifest.json "
                    "(as written by cxr-drift train/export)"
                )
            folders.extend(found)
    for folder in model_dirs:
        if not (folder / "manifest.json").is_file():
            raise FileNotFoundError(f"model folder {str(folder)!r} has no manifest.json (or does not exist)")
        folders.append(folder)
    if not folders:
        raise UsageError("no model pairs given: pass --artifacts DIR or --model-dir DIR")
    unique = list(dict.fromkeys(f.resolve() for f in folders))
    return unique


def _load_pairs(folders: Sequence[Path], threads: int | None) -> dict[str, ModelPair]:
    from core.errors import ArtifactError
    from engine.runtime import ModelPair

    pairs: list[ModelPair] = []
    for folder in folders:
        try:
            pairs.append(ModelPair.load(folder, threads=threads))
        except ArtifactError as exc:
            raise UsageError(f"cannot load the model pair in {str(folder)!r}: {exc}") from exc
    names = [p.name for p in pairs]
    # two pairs of one architecture (e.g. two seeds) are told apart by their folder names
    labels = [p.name if names.count(p.name) == 1 else p.folder.name for p in pairs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"model pairs need distinct architectures or folder names, got {labels}")
    first = pairs[0]
    for pair in pairs[1:]:
        if pair.class_names != first.class_names:
            raise UsageError(
                f"model pairs disagree on the classes: {first.folder.name} has {first.class_names}, "
                f"{pair.folder.name} has {pair.class_names}"
            )
    return dict(zip(labels, pairs, strict=True))


def _split_samples(
    data: str, class_names: Sequence[str], split: str, limit: int | None
) -> tuple[list[Sample], Path]:
    from core.dataset import assign_splits, load_index

    index = load_index(data, class_names=class_names)
    if not index.has_splits:
        log.info("%s has no split information: assigning the default stratified split", data)
        index = assign_splits(index)
    samples = index.split(split)
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise InputError(f"split {split!r} of {data} has no images")
    return samples, index.root


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read_mask(sample: Sample, root: Path) -> np.ndarray | None:
    """The lesion mask (bool, image resolution) of a synthetic sample; None when it is empty or absent."""
    from core.imageio import read_image

    name = sample.extra.get("lesion_mask", "")
    if not name:
        return None
    path = Path(name) if Path(name).is_absolute() else root / name
    mask = read_image(path) > 0.5
    return mask if mask.any() else None


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """The mask on the model's input grid, resized as the image is (PIL bilinear, float): a soft mask."""
    from PIL import Image

    if mask.shape == (size, size):
        return mask.astype(np.float64)
    image = Image.fromarray(mask.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ per image


@dataclass
class Example:
    """One image shown in the example panel: its pixels, lesion mask and every model's maps."""

    image: str
    label: str
    gray: np.ndarray
    mask: np.ndarray | None
    target: str = "the true class"
    maps: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)  # model -> method -> ckpt
    correct: dict[str, bool] = field(default_factory=dict)
    iou: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> method -> top-k IoU


def _lesion_fraction(sample: Sample) -> float:
    try:
        value = float(sample.extra.get("lesion_fraction", "") or "nan")
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def build_example(
    pairs: Mapping[str, ModelPair],
    samples: Sequence[Sample],
    rows: Sequence[Mapping[str, Any]],
    root: Path,
    *,
    target: str = "label",
    topk: float = 20.0,
) -> Example:
    """The example panel's image: the one included for the most models, then with the largest lesion (so
    the finding is visible), then the first; its maps are recomputed for every model (one image each)."""
    from core.imageio import read_image
    from engine.report import drift_reports

    included: dict[str, int] = {}
    for row in rows:
        if row["method"] == rows[0]["method"] and row["included"]:
            included[row["image"]] = included.get(row["image"], 0) + 1

    def preference(i: int) -> tuple[int, float, int]:
        fraction = _lesion_fraction(samples[i])
        return (
            -included.get(_relative(samples[i].path, root), 0),
            -(0.0 if math.isnan(fraction) else fraction),
            i,
        )

    sample = samples[min(range(len(samples)), key=preference)]
    class_names = next(iter(pairs.values())).class_names
    gray = read_image(sample.path)
    example = Example(
        image=_relative(sample.path, root),
        label=class_names[sample.label],
        gray=gray,
        mask=_read_mask(sample, root) if "lesion_mask" in sample.extra else None,
        target="the true class" if target == "label" else "the fine-tuned prediction",
    )
    for model, pair in pairs.items():
        (report,) = drift_reports(
            pair,
            [gray],
            target_class=sample.label if target == "label" else None,
            topk_percent=topk,
            include_maps=True,
        )
        example.maps[model] = report.maps or {}
        example.correct[model] = bool(report.predictions["finetuned"]["index"] == sample.label)
        example.iou[model] = {m: float(e["metrics"]["iou"]) for m, e in report.methods.items()}
    return example


def _row(
    model: str,
    method: str,
    image: str,
    label: int,
    class_names: Sequence[str],
    report: Any,
    *,
    subset: str,
) -> dict[str, Any]:
    entry = report.methods[method]
    metrics = entry["metrics"]
    transfer = report.predictions["transfer"]
    finetuned = report.predictions["finetuned"]
    target = report.target_class["name"]
    row: dict[str, Any] = {
        "model": model,
        "method": method,
        "image": image,
        "label": class_names[label],
        "target_class": target,
        "transfer_prediction": transfer["class"],
        "finetuned_prediction": finetuned["class"],
        "transfer_correct": transfer["index"] == label,
        "finetuned_correct": finetuned["index"] == label,
        "agreement": report.agreement,
        "included": subset == "all" or finetuned["index"] == label,
        "transfer_p_target": transfer["probabilities"][target],
        "finetuned_p_target": finetuned["probabilities"][target],
    }
    row.update({k: v for k, v in metrics.items() if k != "iou_k"})
    row.update({f"iou_at_{k}": v for k, v in metrics.get("iou_k", {}).items()})
    row.update(
        drift_score=entry["drift_score"],
        severity=entry["severity"],
        flagged=entry["flagged"],
        flags=";".join(entry["flags"]),
    )
    return row


def collect(
    pairs: Mapping[str, ModelPair],
    samples: Sequence[Sample],
    root: Path,
    *,
    subset: str = "true_positive",
    target: str = "label",
    topk: float = 20.0,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], bool]:
    """Per-image rows for every pair x image x method (sorted by model, method, image), and whether the
    data has lesion masks."""
    from tqdm.auto import tqdm

    from core.imageio import read_image
    from engine.report import drift_reports

    class_names = next(iter(pairs.values())).class_names
    has_masks = any("lesion_mask" in s.extra for s in samples)
    # target = label needs one class per drift_reports call: batch the images of each label together
    order = (
        sorted(range(len(samples)), key=lambda i: (samples[i].label, i))
        if target == "label"
        else list(range(len(samples)))
    )
    batches: list[list[int]] = []
    for i in order:
        if (
            batches
            and len(batches[-1]) < batch_size
            and (target != "label" or samples[batches[-1][0]].label == samples[i].label)
        ):
            batches[-1].append(i)
        else:
            batches.append([i])

    keyed: list[tuple[tuple[str, str, int], dict[str, Any]]] = []
    bar = tqdm(total=len(samples) * len(pairs), desc="study", unit="img", disable=not progress)
    try:
        for batch in batches:
            grays = [read_image(samples[i].path) for i in batch]
            masks = [_read_mask(samples[i], root) for i in batch] if has_masks else [None] * len(batch)
            for model, pair in pairs.items():
                reports = drift_reports(
                    pair,
                    grays,
                    target_class=samples[batch[0]].label if target == "label" else None,
                    topk_percent=topk,
                    include_maps=has_masks,
                )
                resized: dict[int, np.ndarray] = {}
                for j, (i, report) in enumerate(zip(batch, reports, strict=True)):
                    sample = samples[i]
                    mask = masks[j]
                    if mask is not None:
                        resized[j] = _resize_mask(mask, pair.input_size)
                    for method in report.methods:
                        row = _row(
                            model,
                            method,
                            _relative(sample.path, root),
                            sample.label,
                            class_names,
                            report,
                            subset=subset,
                        )
                        if has_masks:
                            row.update(_lesion_columns(report, method, resized.get(j), topk))
                        keyed.append(((model, method, i), row))
                bar.update(len(batch))
    finally:
        bar.close()
    methods = list(dict.fromkeys(key[1] for key, _ in keyed))
    models = list(pairs)
    keyed.sort(key=lambda item: (models.index(item[0][0]), methods.index(item[0][1]), item[0][2]))
    return [row for _, row in keyed], has_masks


def _lesion_columns(report: Any, method: str, mask: np.ndarray | None, topk: float) -> dict[str, Any]:
    """Evidence on the lesion per checkpoint (empty for an image without a lesion)."""
    from engine.study import LESION_COLUMNS, evidence_on_lesion

    out: dict[str, Any] = dict.fromkeys(LESION_COLUMNS)
    if mask is None or report.maps is None or not mask.any():
        return out
    values = {
        name: evidence_on_lesion(report.maps[method][name], mask, topk_percent=topk) for name in CHECKPOINTS
    }
    out["lesion_area"] = values["transfer"]["lesion_area"]
    for kind in ("topk_in_lesion", "mass_in_lesion"):
        out[f"transfer_{kind}"] = values["transfer"][kind]
        out[f"finetuned_{kind}"] = values["finetuned"][kind]
        out[f"{kind}_change"] = values["finetuned"][kind] - values["transfer"][kind]
    return out


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def image_counts(rows: Sequence[Mapping[str, Any]], subset: str) -> dict[str, dict[str, Any]]:
    """Per model: images, included images, how many each checkpoint got right, agreement."""
    counts: dict[str, dict[str, Any]] = {}
    seen: set[tuple[str, str]] = set()
    for row in rows:
        key = (row["model"], row["image"])
        if key in seen:
            continue
        seen.add(key)
        c = counts.setdefault(
            row["model"],
            {
                "images": 0,
                "included": 0,
                "finetuned_correct": 0,
                "transfer_correct": 0,
                "both_correct": 0,
                "agreement": 0,
                "included_transfer_correct": 0,
            },
        )
        c["images"] += 1
        c["included"] += int(row["included"])
        c["finetuned_correct"] += int(row["finetuned_correct"])
        c["transfer_correct"] += int(row["transfer_correct"])
        c["both_correct"] += int(row["finetuned_correct"] and row["transfer_correct"])
        c["agreement"] += int(row["agreement"])
        c["included_transfer_correct"] += int(row["included"] and row["transfer_correct"])
    for c in counts.values():
        c["subset"] = subset
    return counts


# ------------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> int:
    from engine.study import render_markdown, summarize

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.bootstrap < 1:
        raise UsageError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    if not 0 < args.topk <= 100:
        raise UsageError(f"--topk must be a percentage in (0, 100], got {args.topk}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    pairs = _load_pairs(_pair_folders(args.artifacts, args.model_dir), args.threads)
    class_names = next(iter(pairs.values())).class_names
    samples, root = _split_samples(args.data, class_names, args.split, args.limit)
    log.info("study: %d model pair(s) x %d image(s) of split %r", len(pairs), len(samples), args.split)
    rows, has_masks = collect(
        pairs,
        samples,
        root,
        subset=args.subset,
        target=args.target,
        topk=args.topk,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "per_image.csv")
    included = [r for r in rows if r["included"]]
    if not included:
        raise UsageError(
            f"no true-positive images (fine-tuned prediction == label) among the {len(samples)} images of "
            f"split {args.split!r}; the per-image table is in {out / 'per_image.csv'}; rerun with --subset all"
        )
    from engine.study import DEFAULT_STUDY_METRICS, LESION_COLUMNS

    metrics = [*DEFAULT_STUDY_METRICS, *(LESION_COLUMNS if has_masks else ())]
    summary = summarize(included, metrics=metrics, n_boot=args.bootstrap, seed=args.seed)
    counts = image_counts(rows, args.subset)
    summary["study"] = {
        "data": str(args.data),
        "split": args.split,
        "subset": args.subset,
        "subset_definition": "fine-tuned prediction == label"
        if args.subset == "true_positive"
        else "all images",
        "target": "true label" if args.target == "label" else "fine-tuned prediction",
        "topk_percent": args.topk,
        "n_images": len(samples),
        "synthetic_lesion_masks": has_masks,
        "models": {name: str(pair.folder) for name, pair in pairs.items()},
        "counts": counts,
        "note": args.note,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(
        render_markdown(summary, title="Drift study", preamble=_preamble(summary["study"])), encoding="utf-8"
    )
    written = ["per_image.csv", "summary.json", "summary.md"]
    if not args.no_plots:
        example = build_example(pairs, samples, rows, root, target=args.target, topk=args.topk)
        written += write_plots(included, summary, example, out, note=args.note, has_masks=has_masks)
        if args.figure is not None:
            write_combined_figure(
                included, summary, example, args.figure, note=args.note, has_masks=has_masks
            )
            written.append(str(args.figure))
    print(
        f"study of {len(pairs)} model pair(s) x {len(samples)} image(s) ({args.subset}): wrote {', '.join(written)} to {out}"
    )
    for comparison in summary["rankings"]["comparisons"]:
        print(
            f"  ranking {comparison['method_a']} vs {comparison['method_b']}: Kendall tau = "
            f"{'-' if comparison['tau'] is None else format(comparison['tau'], '.3f')}"
            f"{' (the most stable architecture changes)' if comparison['top_changes'] else ''}"
        )
    return 0


def _preamble(study: Mapping[str, Any]) -> str:
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


# ------------------------------------------------------------------------------------------------ plots


def _save(fig: Any, path: Path, *, dpi: int) -> None:
    """PNG with an adaptive 256-colour palette: a fraction of the size of matplotlib's RGBA output."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
        palette.save(path, optimize=True)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # a bare Figure renders with Agg; no pyplot global state

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
        low = y - np.array([p[1]["ci_low"] for p in points])
        high = np.array([p[1]["ci_high"] for p in points]) - y
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
    taus = [c for c in summary["rankings"]["comparisons"]]
    tau_text = "; ".join(
        f"Kendall tau = {'-' if c['tau'] is None else format(c['tau'], '.2f')}" for c in taus
    )
    ax.set_title(f"Stability ranking (mean IoU)\n{tau_text}; crossing = reversal", fontsize=9)
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
