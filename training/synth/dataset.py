"""The dataset on disk: per-image labels, splits and cue flags; the images and masks; the manifest.

The layout of the folder (ImageFolder tree, ``masks/``, ``manifest.csv``, ``synth_config.json``) is described
in :mod:`training.synth`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import multiprocessing
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from core.errors import InputError
from core.vocabulary import SPLITS
from training.synth.config import MAX_SIZE, MIN_SIZE, SynthConfig
from training.synth.findings import FINDINGS
from training.synth.image import generate_image

__all__ = [
    "DEFAULT_CLASS_NAMES",
    "GENERATOR_VERSION",
    "MANIFEST_COLUMNS",
    "generate_dataset",
    "iter_manifest",
    "parse_class_names",
    "parse_split",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
DEFAULT_CLASS_NAMES: tuple[str, ...] = FINDINGS
MANIFEST_COLUMNS: tuple[str, ...] = (
    "path",
    "label",
    "split",
    "lesion_mask",
    "lung_mask",
    "cue",
    "lesion_fraction",
)
_CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_NAMES = frozenset({"masks"})


def parse_class_names(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Five unique class names (comma-separated text or a sequence), in finding order; None gives defaults."""
    if text is None:
        return DEFAULT_CLASS_NAMES
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else [str(n).strip() for n in text]
    if len(names) != len(FINDINGS):
        raise InputError(
            f"expected exactly {len(FINDINGS)} class names (for the findings {', '.join(FINDINGS)}), "
            f"got {len(names)}: {names!r}"
        )
    bad = [n for n in names if not _CLASS_NAME_RE.match(n) or n in _RESERVED_NAMES]
    if bad:
        raise InputError(
            f"class names must be folder-safe (letters, digits, '_', '-', '.'; not 'masks'), got {bad!r}"
        )
    if len(set(names)) != len(names):
        raise InputError(f"class names must be unique, got {names!r}")
    return tuple(names)


def parse_split(text: str | Sequence[float]) -> tuple[float, float, float]:
    """Train/val/test fractions (``"0.7,0.15,0.15"`` or a sequence): three numbers >= 0, train > 0, sum 1."""
    try:
        parts = [float(p) for p in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        raise InputError(
            f"split must be three numbers like 0.7,0.15,0.15 (train,val,test), got {text!r}"
        ) from None
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or parts[0] <= 0:
        raise InputError(
            f"split must be three non-negative fractions train,val,test with train > 0, got {text!r}"
        )
    if abs(sum(parts) - 1.0) > 1e-6:
        raise InputError(f"split fractions must sum to 1, got {parts} (sum {sum(parts):.6g})")
    return parts[0], parts[1], parts[2]


def _split_counts(count: int, fractions: tuple[float, float, float]) -> list[int]:
    """Largest-remainder allocation of ``count`` items to the three splits."""
    raw = [count * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: count - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class _Item:
    index: int
    finding: int
    class_name: str
    split: str
    cue: bool


def _plan(
    *,
    n: int,
    seed: int,
    class_names: tuple[str, ...],
    split: tuple[float, float, float],
    cue_finding: int | None,
    cue_rate: float,
    cue_noise_rate: float,
) -> list[_Item]:
    """Labels (balanced, interleaved by index), splits (stratified by class) and cue flags of every image."""
    per_class: dict[int, list[int]] = {
        k: list(range(k, n, len(class_names))) for k in range(len(class_names))
    }
    split_of: dict[int, str] = {}
    for finding, indices in per_class.items():
        counts = _split_counts(len(indices), split)
        missing = [SPLITS[i] for i in range(3) if split[i] > 0 and counts[i] == 0]
        if missing:
            needed = math.ceil(len(class_names) / min(f for f in split if f > 0))
            raise InputError(
                f"n={n} is too small for the split {','.join(f'{f:g}' for f in split)}: class "
                f"{class_names[finding]!r} would get no {'/'.join(missing)} image; use at least n={needed}"
            )
        order = np.random.default_rng([seed, 1_000_003, finding]).permutation(indices)
        start = 0
        for name, count in zip(SPLITS, counts, strict=True):
            for index in order[start : start + count]:
                split_of[int(index)] = name
            start += count
    items = []
    for index in range(n):
        finding = index % len(class_names)
        rate = cue_rate if finding == cue_finding else cue_noise_rate
        cue = cue_finding is not None and bool(np.random.default_rng([seed, index, 2]).random() < rate)
        items.append(_Item(index, finding, class_names[finding], split_of[index], cue))
    return items


def _image_id(index: int) -> str:
    return f"synth_{index:06d}"


def _save_png(array: np.ndarray, path: Path) -> None:
    # PIL writes no timestamp into PNGs, so equal pixels give equal bytes. Level 1: 3x faster than the
    # default for noisy radiographs, files ~13% larger.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _render(job: tuple[str, int, int, SynthConfig, _Item]) -> list[str]:
    """Generate and write one image and its masks; return its manifest row."""
    out_dir, seed, size, config, item = job
    root = Path(out_dir)
    image, lesion, lungs = generate_image(
        item.index, seed=seed, label=item.finding, size=size, cue=item.cue, config=config
    )
    image_id = _image_id(item.index)
    rel_image = f"{item.split}/{item.class_name}/{image_id}.png"
    rel_lesion, rel_lungs = f"masks/{image_id}_lesion.png", f"masks/{image_id}_lungs.png"
    _save_png(image, root / rel_image)
    _save_png(lesion.astype(np.uint8) * 255, root / rel_lesion)
    _save_png(lungs.astype(np.uint8) * 255, root / rel_lungs)
    fraction = float(lesion.sum()) / max(int(lungs.sum()), 1)
    return [
        rel_image,
        item.class_name,
        item.split,
        rel_lesion,
        rel_lungs,
        str(int(item.cue)),
        f"{fraction:.6f}",
    ]


def _prepare_out_dir(out_dir: Path, *, class_names: Sequence[str], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output path {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(
                f"output directory {out_dir} is not empty; pass overwrite=True (--overwrite) to replace it"
            )
        # Remove only what a previous run wrote, so that stale images cannot leak into the new dataset.
        for name in (*SPLITS, "masks"):
            if (out_dir / name).is_dir():
                shutil.rmtree(out_dir / name)
        for name in ("manifest.csv", "synth_config.json"):
            (out_dir / name).unlink(missing_ok=True)
    for split in SPLITS:
        for class_name in class_names:
            (out_dir / split / class_name).mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)


def _check_counts(*, n: int, size: int, seed: int, workers: int, num_classes: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < num_classes:
        raise InputError(f"n must be an integer >= {num_classes} (one image per class at least), got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be a positive integer, got {workers!r}")


def _cue_finding(
    names: tuple[str, ...], cue_class: str | None, cue_rate: float, cue_noise_rate: float | None
) -> tuple[int | None, float]:
    """The finding that carries the cue (None: no cue) and the cue rate of the other classes."""
    cue_finding: int | None = None
    if cue_class is not None:
        if cue_class not in names:
            raise InputError(f"cue class {cue_class!r} is not one of the class names: {', '.join(names)}")
        cue_finding = names.index(cue_class)
    elif cue_rate or cue_noise_rate:
        raise InputError("cue_rate/cue_noise_rate need a cue class (--cue-class NAME)")
    if cue_noise_rate is None:
        cue_noise_rate = 0.1 * (1.0 - cue_rate) if cue_class is not None else 0.0
    for label, rate in (("cue_rate", cue_rate), ("cue_noise_rate", cue_noise_rate)):
        if not 0.0 <= rate <= 1.0:
            raise InputError(f"{label} must be a probability in [0, 1], got {rate!r}")
    return cue_finding, cue_noise_rate


def _render_all(
    jobs: list[tuple[str, int, int, SynthConfig, _Item]], *, workers: int, progress: bool
) -> list[list[str]]:
    """The manifest rows of every job, in job order, rendered by ``workers`` processes."""
    n = len(jobs)
    bar = tqdm(total=n, desc="synth", unit="img", disable=not progress)
    rows: list[list[str]] = []
    try:
        if workers == 1:
            for job in jobs:
                rows.append(_render(job))
                bar.update()
        else:
            # spawn: safe whatever the parent holds (torch threads, open DB handles); each job is independent.
            context = multiprocessing.get_context("spawn")
            with context.Pool(processes=workers) as pool:
                for row in pool.imap(_render, jobs, chunksize=max(1, min(64, n // (workers * 8)))):
                    rows.append(row)
                    bar.update()
    finally:
        bar.close()
    return rows


def _config_record(
    *,
    n: int,
    size: int,
    seed: int,
    names: tuple[str, ...],
    fractions: tuple[float, float, float],
    items: list[_Item],
    cue_class: str | None,
    cue_rate: float,
    cue_noise_rate: float,
    config: SynthConfig,
) -> dict[str, Any]:
    """The content of ``synth_config.json``."""
    return {
        "generator": "cxr-drift synth",
        "generator_version": GENERATOR_VERSION,
        "n": n,
        "size": size,
        "seed": seed,
        "class_names": list(names),
        "findings": dict(zip(names, FINDINGS, strict=True)),
        "split": dict(zip(SPLITS, fractions, strict=True)),
        "split_counts": {
            s: {c: sum(1 for i in items if i.split == s and i.class_name == c) for c in names} for s in SPLITS
        },
        "cue_class": cue_class,
        "cue_rate": cue_rate,
        "cue_noise_rate": cue_noise_rate,
        "cue_count": sum(i.cue for i in items),
        "config": asdict(config),
        "manifest_columns": list(MANIFEST_COLUMNS),
        "lesion_fraction": "lesion mask pixels / lung mask pixels",
    }


def _write_manifest(out: Path, rows: list[list[str]]) -> Path:
    manifest = out / "manifest.csv"
    tmp = out / "manifest.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    tmp.replace(manifest)
    return manifest


def generate_dataset(
    out_dir: str | Path,
    *,
    n: int,
    size: int = 256,
    seed: int = 0,
    class_names: Sequence[str] | str | None = None,
    split: Sequence[float] | str = (0.7, 0.15, 0.15),
    cue_class: str | None = None,
    cue_rate: float = 0.0,
    cue_noise_rate: float | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    config: SynthConfig | None = None,
) -> Path:
    """Write a synthetic dataset (ImageFolder tree, masks, manifest.csv, synth_config.json); return the manifest.

    ``n`` images, balanced over the five classes (image ``i`` has finding ``i % 5``), split train/val/test by
    ``split`` within each class. With ``cue_class``, the corner marker appears on images of that class with
    probability ``cue_rate`` and on the others with probability ``cue_noise_rate`` (default
    ``0.1 * (1 - cue_rate)``). The files depend only on the arguments (not on ``workers``).
    """
    names = parse_class_names(class_names)
    fractions = parse_split(split)
    _check_counts(n=n, size=size, seed=seed, workers=workers, num_classes=len(names))
    cue_finding, cue_noise_rate = _cue_finding(names, cue_class, cue_rate, cue_noise_rate)
    config = config or SynthConfig()

    items = _plan(
        n=n,
        seed=seed,
        class_names=names,
        split=fractions,
        cue_finding=cue_finding,
        cue_rate=cue_rate,
        cue_noise_rate=cue_noise_rate,
    )
    out = Path(out_dir)
    _prepare_out_dir(out, class_names=names, overwrite=overwrite)
    logger.info("writing %d synthetic %dx%d radiographs to %s (%d worker(s))", n, size, size, out, workers)
    rows = _render_all(
        [(str(out), seed, size, config, item) for item in items], workers=workers, progress=progress
    )

    record = _config_record(
        n=n, size=size, seed=seed, names=names, fractions=fractions, items=items, cue_class=cue_class,
        cue_rate=cue_rate, cue_noise_rate=cue_noise_rate, config=config,
    )  # fmt: skip
    (out / "synth_config.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    # The manifest is written last: its presence marks a complete dataset.
    manifest = _write_manifest(out, rows)
    logger.info("wrote %s", manifest)
    return manifest


def iter_manifest(manifest: str | Path) -> Iterator[dict[str, str]]:
    """Rows of a synth ``manifest.csv`` as dicts."""
    with Path(manifest).open(newline="", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)
