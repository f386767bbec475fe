"""The study's inputs and its per-image table: model pairs from folders, the images of one split, one row per
model x method x image (:func:`collect`), the image shown in the example panel, and the CSV.

Each row holds the predictions, agreement, every drift metric (``iou_at_K`` for the whole k grid), drift
score and severity; on data with lesion masks also the evidence on the lesion per checkpoint
(:func:`engine.study.lesion.lesion_columns`; empty for ``normal`` images, whose masks are empty).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from core.dataset import Sample
from core.errors import ArtifactError, UsageError
from core.imageio import read_image
from core.manifest import manifest_key_from_env
from engine.metrics import zone_shift
from engine.report import DriftReport, drift_reports
from engine.runtime import ModelPair
from engine.study.lesion import lesion_columns
from engine.subsets import SUBSET_ALIASES, in_subset
from engine.subsets import SUBSETS as SUBSETS_CANONICAL

log = logging.getLogger(__name__)

__all__ = [
    "SUBSETS",
    "TARGETS",
    "Example",
    "build_example",
    "collect",
    "image_counts",
    "load_pairs",
    "pair_folders",
    "read_mask",
    "resize_mask",
    "write_csv",
]

# Images the statistics use: fine-tuned prediction == label (the paper), or every image.
SUBSETS: tuple[str, ...] = (*SUBSETS_CANONICAL, *SUBSET_ALIASES)
# Class whose evidence is compared: the true label, or the fine-tuned model's prediction (as the service).
TARGETS: tuple[str, ...] = ("label", "prediction")


# ------------------------------------------------------------------------------------------------ inputs


def pair_folders(artifacts: Path | None, model_dirs: Sequence[Path]) -> list[Path]:
    """The model-pair folders to study: ``artifacts`` (one pair folder, or a folder of them) and
    ``model_dirs``, resolved, without duplicates."""
    folders: list[Path] = []
    if artifacts is not None:
        if not artifacts.is_dir():
            raise ArtifactError(f"artifacts folder {str(artifacts)!r} does not exist or is not a folder")
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
            raise ArtifactError(f"model folder {str(folder)!r} has no manifest.json (or does not exist)")
        folders.append(folder)
    if not folders:
        raise UsageError("no model pairs given: pass --artifacts DIR or --model-dir DIR")
    return list(dict.fromkeys(f.resolve() for f in folders))


def load_pairs(folders: Sequence[Path], threads: int | None) -> dict[str, ModelPair]:
    """The pairs by label: the architecture, or the folder name when two pairs share an architecture."""
    pairs: list[ModelPair] = []
    for folder in folders:
        try:
            pairs.append(ModelPair.load(folder, threads=threads, manifest_key=manifest_key_from_env()))
        except ArtifactError as exc:
            raise UsageError(f"cannot load the model pair in {str(folder)!r}: {exc}") from exc
    names = [p.architecture for p in pairs]
    # two pairs of one architecture (e.g. two seeds) are told apart by their folder names
    labels = [p.architecture if names.count(p.architecture) == 1 else p.folder.name for p in pairs]
    for pair, label in zip(pairs, labels, strict=True):
        pair.name = label  # the reports and tables name each pair by its label
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


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def read_mask(sample: Sample, root: Path, *, kind: str = "lesion_mask") -> np.ndarray | None:
    """A mask (bool, image resolution) of a synthetic sample, ``kind`` "lesion_mask" or "lung_mask"; None
    when it is empty or absent."""
    name = sample.extra.get(kind, "")
    if not name:
        return None
    path = Path(name) if Path(name).is_absolute() else root / name
    mask = read_image(path) > 0.5
    return mask if mask.any() else None


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """The mask on the model's input grid, resized as the image is (PIL bilinear, float): a soft mask."""
    if mask.shape == (size, size):
        return mask.astype(np.float64)
    image = Image.fromarray(mask.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ example


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
        mask=read_mask(sample, root) if "lesion_mask" in sample.extra else None,
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


# ------------------------------------------------------------------------------------------------ per image


def _row(
    model: str,
    method: str,
    image: str,
    label: int,
    class_names: Sequence[str],
    report: DriftReport,
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
        "included": in_subset(subset, label=label, transfer=transfer["index"], finetuned=finetuned["index"]),
        "transfer_p_target": transfer["probabilities"][target],
        "finetuned_p_target": finetuned["probabilities"][target],
    }
    row.update({k: v for k, v in metrics.items() if k != "iou_k"})
    row.update({f"iou_at_{k}": v for k, v in metrics.get("iou_k", {}).items()})
    row.update(
        drift_score=entry["drift_score"],
        drift_index=entry["drift_index"],
        severity=entry["severity"],
        flagged=entry["flagged"],
        flags=";".join(entry["flags"]),
    )
    control = entry["diagnostics"].get("head_scale_control")
    if control is not None:
        # GradCAM++ with the transfer head matched to the fine-tuned head's norm: the IoU that remains
        # between the control map and the fine-tuned map (the ranking's head-scale control)
        row["head_scale_control_iou"] = 1.0 - control["residual_drift_score"]
    return row


def collect(
    pairs: Mapping[str, ModelPair],
    samples: Sequence[Sample],
    root: Path,
    *,
    subset: str = "both_correct",
    target: str = "label",
    topk: float = 20.0,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], bool]:
    """Per-image rows for every pair x image x method (sorted by model, method, image), and whether the
    data has lesion masks."""
    class_names = next(iter(pairs.values())).class_names
    has_masks = any("lesion_mask" in s.extra for s in samples)
    has_lungs = any("lung_mask" in s.extra for s in samples)
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
            masks = [read_mask(samples[i], root) for i in batch] if has_masks else [None] * len(batch)
            lungs = [read_mask(samples[i], root, kind="lung_mask") if has_lungs else None for i in batch]
            for model, pair in pairs.items():
                reports = drift_reports(
                    pair,
                    grays,
                    target_class=samples[batch[0]].label if target == "label" else None,
                    topk_percent=topk,
                    include_maps=has_masks or has_lungs,
                )
                resized: dict[int, np.ndarray] = {}
                for j, (i, report) in enumerate(zip(batch, reports, strict=True)):
                    sample = samples[i]
                    mask = masks[j]
                    if mask is not None:
                        resized[j] = resize_mask(mask, pair.input_size)
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
                            row.update(lesion_columns(report, method, resized.get(j), topk))
                        row["zones"] = "image"
                        lung = lungs[j]
                        if lung is not None and report.maps is not None:  # lung zones, not image thirds
                            on_grid = resize_mask(lung, pair.input_size) > 0.5
                            maps = report.maps[method]
                            row["zone_shift"] = zone_shift(
                                maps["transfer"], maps["finetuned"], lung_mask=on_grid
                            )
                            row["zones"] = "lung"
                        keyed.append(((model, method, i), row))
                bar.update(len(batch))
    finally:
        bar.close()
    methods = list(dict.fromkeys(key[1] for key, _ in keyed))
    models = list(pairs)
    keyed.sort(key=lambda item: (models.index(item[0][0]), methods.index(item[0][1]), item[0][2]))
    return [row for _, row in keyed], has_masks


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


# ------------------------------------------------------------------------------------------------ CSV


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """The long table, one column per key (in first-seen order); ``None`` as empty, floats as ``%.6g``."""
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
