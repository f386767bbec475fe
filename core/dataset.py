"""Real datasets: an index of labelled image files (ImageFolder tree or CSV manifest); no torch.

Layouts understood by :func:`load_index`:

- ImageFolder, ``root/<class>/**/<image>``, or with splits ``root/<split>/<class>/**/<image>`` where every
  top-level folder is one of ``train``, ``val``, ``test`` (detected);
- a CSV manifest with columns ``path,label`` and optionally ``split``; paths are relative to the CSV's
  folder (absolute paths are kept); other columns are kept per sample in :attr:`Sample.extra` (the synthetic
  generator writes ``lesion_mask,lung_mask,cue,lesion_fraction``). A folder holding a ``manifest.csv`` is
  read through that manifest, since it carries splits and masks a folder walk would misread as classes.

``training.data.ImageDataset`` turns an index into tensors.

One module (over 500 lines) because it is one thing: reading, validating and splitting an index.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from core.errors import InputError
from core.imageio import ImageDecodeError, read_image
from core.manifest import sha256_file
from core.vocabulary import SPLITS

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DatasetError",
    "DatasetIndex",
    "Sample",
    "assign_splits",
    "load_index",
    "load_split",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MANIFEST_NAME = "manifest.csv"
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

OnError = Literal["skip", "fail"]


class DatasetError(InputError):
    """The dataset cannot be used as it is (missing class, unreadable image with on_error="fail", ...)."""


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``split`` is ``None`` until known; ``extra`` holds a manifest's other columns."""

    path: Path
    label: int
    split: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class DatasetIndex:
    """The samples of a dataset, its ordered class names, its source, and what was skipped (and why)."""

    samples: list[Sample]
    class_names: list[str]
    source: Path
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    _file_hashes: dict[Path, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def root(self) -> Path:
        """The folder sample paths are relative to (the tree's root, or the CSV's folder)."""
        return self.source if self.source.is_dir() else self.source.parent

    @property
    def has_splits(self) -> bool:
        return bool(self.samples) and all(s.split is not None for s in self.samples)

    def split(self, name: str) -> list[Sample]:
        """The samples of split ``name`` (one of ``train``, ``val``, ``test``)."""
        if name not in SPLITS:
            raise InputError(f"unknown split {name!r}; valid options: {', '.join(SPLITS)}")
        if not self.has_splits:
            raise DatasetError(
                f"dataset {str(self.source)!r} has no split information; call assign_splits(index) first"
            )
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class, per split and in total: ``{"train": {"normal": 12, ...}, ..., "total": {...}}``.

        Samples without a split are counted under ``"unsplit"``; every class appears in every entry.
        """
        out: dict[str, dict[str, int]] = {}
        for sample in self.samples:
            for key in (sample.split or "unsplit", "total"):
                per_class = out.setdefault(key, dict.fromkeys(self.class_names, 0))
                per_class[self.class_names[sample.label]] += 1
        order = [*SPLITS, "unsplit", "total"]
        return {key: out[key] for key in order if key in out}

    def describe(self) -> dict[str, object]:
        """The ``dataset`` entry of a model pair's manifest.json: fingerprint, source and counts."""
        return {"fingerprint": self.fingerprint(), "source": str(self.source), "counts": self.counts()}

    def file_sha256(self, path: Path) -> str:
        digest = self._file_hashes.get(path)
        if digest is None:
            digest = sha256_file(path)
            self._file_hashes[path] = digest
        return digest

    def fingerprint(self) -> str:
        """SHA-256 identifying the dataset's content, labels and splits.

        ``sha256(json(class_names) + sorted lines "relative path \\t class name \\t split \\t file sha256")``:
        independent of where the dataset lives and of discovery order; changes when a file's bytes, a label,
        a split assignment, the class order, or the set of files changes.
        """
        lines = sorted(
            "\t".join(
                (
                    _relative(sample.path, self.root),
                    self.class_names[sample.label],
                    sample.split or "",
                    self.file_sha256(sample.path),
                )
            )
            for sample in self.samples
        )
        digest = hashlib.sha256()
        digest.update(json.dumps(self.class_names).encode())
        for line in lines:
            digest.update(b"\n" + line.encode())
        return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ loading


def load_index(
    source: str | os.PathLike[str],
    *,
    class_names: Sequence[str] | None = None,
    on_error: OnError = "skip",
    validate: bool = True,
    max_pixels: int | None = None,
) -> DatasetIndex:
    """Index an ImageFolder tree or a CSV manifest (see the module docstring for the layouts).

    ``class_names`` fixes the class order (label = position); by default the sorted folder names / labels.
    With ``validate`` every image is decoded once (and hashed, for :meth:`DatasetIndex.fingerprint`); a
    file that cannot be read is skipped with a warning (``on_error="skip"``) and listed in
    ``index.skipped`` with the reason, or raises :class:`DatasetError` (``on_error="fail"``).
    A class left without images, an empty dataset or a missing source are errors.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    path = Path(source).absolute()
    if not path.exists():
        raise FileNotFoundError(
            f"dataset source {str(path)!r} does not exist (expected a folder or a CSV file)"
        )
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        log.info("%s contains %s: reading the dataset through it", path, MANIFEST_NAME)
        path = path / MANIFEST_NAME
    if path.is_dir():
        entries, names, problems = _scan_image_folder(path, class_names)
    else:
        entries, names, problems = _read_manifest(path, class_names)

    index = DatasetIndex(samples=[], class_names=names, source=path)
    failed: list[tuple[Path, str]] = list(problems)
    if validate:
        entries = _validate(entries, index=index, failed=failed, on_error=on_error, max_pixels=max_pixels)
    elif failed and on_error == "fail":
        _raise_failed(failed)
    if failed:
        log.warning(
            "skipped %d unreadable or missing file(s) of %s; first: %s (%s)",
            len(failed),
            path,
            failed[0][0],
            failed[0][1],
        )
    index.samples = entries
    index.skipped = failed
    _check_classes(index)
    return index


def _scan_image_folder(
    root: Path, class_names: Sequence[str] | None
) -> tuple[list[Sample], list[str], list[tuple[Path, str]]]:
    top = _visible_dirs(root)
    split_dirs = [d for d in top if d.name in SPLITS]
    if split_dirs and len(split_dirs) != len(top):
        others = sorted(d.name for d in top if d.name not in SPLITS)
        raise DatasetError(
            f"{str(root)!r} mixes split folders ({', '.join(d.name for d in split_dirs)}) with other folders "
            f"({', '.join(others)}); expected either root/<class>/ or root/<split>/<class>/ with splits "
            f"among {', '.join(SPLITS)}"
        )
    # (split, class folder) pairs
    groups: list[tuple[str | None, Path]] = (
        [(d.name, c) for d in split_dirs for c in _visible_dirs(d)]
        if split_dirs
        else [(None, c) for c in top]
    )
    if not groups:
        raise DatasetError(
            f"{str(root)!r} has no class folders; "
            "expected root/<class>/<images> or root/<split>/<class>/<images>"
        )
    found = sorted({c.name for _, c in groups})
    names = _resolve_class_names(found, class_names, where=str(root))
    label_of = {name: i for i, name in enumerate(names)}

    samples: list[Sample] = []
    for split, class_dir in groups:
        if class_dir.name not in label_of:
            continue
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(p, class_dir)
        )
        if split_dirs and not files:
            log.warning("split %r has no images of class %r", split, class_dir.name)
        samples.extend(Sample(path=p, label=label_of[class_dir.name], split=split) for p in files)
    if split_dirs:
        for split in SPLITS:
            present = {c.name for s, c in groups if s == split}
            missing = [n for n in names if n not in present]
            if (root / split).is_dir() and missing:
                log.warning("split %r has no folder for class(es) %s", split, ", ".join(missing))
    return samples, names, []


def _read_manifest(
    csv_path: Path, class_names: Sequence[str] | None
) -> tuple[list[Sample], list[str], list[tuple[Path, str]]]:
    base = csv_path.parent
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{str(csv_path)!r} is not a UTF-8 CSV file: {exc}") from exc
    except csv.Error as exc:
        raise DatasetError(f"{str(csv_path)!r} is not a valid CSV file: {exc}") from exc
    missing_columns = [c for c in ("path", "label") if c not in columns]
    if missing_columns:
        raise DatasetError(
            f"CSV manifest {str(csv_path)!r} lacks column(s) {', '.join(missing_columns)}; "
            f"expected path,label[,split,...], found {','.join(columns) or 'no header'}"
        )
    if not rows:
        raise DatasetError(f"CSV manifest {str(csv_path)!r} has no rows")

    labels = [row["label"] for row in rows]
    for line_no, (row, label) in enumerate(zip(rows, labels, strict=True), start=2):
        if not row["path"] or not label:
            raise DatasetError(f"{str(csv_path)!r} line {line_no}: empty path or label")
    # integer labels with explicit class names are positions in class_names
    use_indices = (
        class_names is not None and not (set(labels) & set(class_names)) and all(_is_int(x) for x in labels)
    )
    if class_names is not None and not use_indices:
        for line_no, label in enumerate(labels, start=2):
            if label not in class_names:
                raise DatasetError(
                    f"{str(csv_path)!r} line {line_no}: label {label!r} is not a class; "
                    f"valid options: {', '.join(class_names)}"
                )
    names = _resolve_class_names(
        sorted(set(labels), key=_natural_key),
        class_names,
        where=str(csv_path),
        labels_may_be_indices=bool(use_indices),
    )
    label_of = {name: i for i, name in enumerate(names)}

    has_split_column = "split" in columns
    split_values = [row.get("split", "") for row in rows] if has_split_column else []
    if has_split_column and any(split_values) and not all(split_values):
        empty_line = next(i for i, v in enumerate(split_values, start=2) if not v)
        raise DatasetError(
            f"{str(csv_path)!r}: some rows have a split and others not (line {empty_line} is empty); "
            "give every row a split or none"
        )
    extra_columns = [c for c in columns if c not in ("path", "label", "split")]

    seen_paths = Counter(row["path"] for row in rows)
    duplicates = sorted(p for p, n in seen_paths.items() if n > 1)
    if duplicates:
        raise DatasetError(
            f"{str(csv_path)!r} lists {len(duplicates)} path(s) more than once, e.g. {duplicates[0]!r}"
        )

    samples: list[Sample] = []
    problems: list[tuple[Path, str]] = []
    for line_no, row in enumerate(rows, start=2):
        raw_label = row["label"]
        if use_indices:
            label = int(raw_label)
            if not 0 <= label < len(names):
                raise DatasetError(
                    f"{str(csv_path)!r} line {line_no}: label index {label} out of range 0..{len(names) - 1}"
                )
        elif raw_label in label_of:
            label = label_of[raw_label]
        else:
            raise DatasetError(
                f"{str(csv_path)!r} line {line_no}: label {raw_label!r} is not a class; "
                f"valid options: {', '.join(names)}"
            )
        split: str | None = None
        if has_split_column and row.get("split"):
            split = _SPLIT_ALIASES.get(row["split"].lower())
            if split is None:
                raise DatasetError(
                    f"{str(csv_path)!r} line {line_no}: unknown split {row['split']!r}; "
                    f"valid options: {', '.join(SPLITS)}"
                )
        path = Path(row["path"])
        path = path if path.is_absolute() else base / path
        if path.suffix and path.suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append(
                (path, f"unsupported extension {path.suffix!r}; valid: {', '.join(IMAGE_EXTENSIONS)} or none")
            )
            continue
        extra = {c: row.get(c, "") for c in extra_columns}
        samples.append(Sample(path=path, label=label, split=split, extra=extra))
    return samples, names, problems


def _validate(
    entries: list[Sample],
    *,
    index: DatasetIndex,
    failed: list[tuple[Path, str]],
    on_error: OnError,
    max_pixels: int | None,
) -> list[Sample]:
    from tqdm.auto import tqdm

    kept: list[Sample] = []
    if failed and on_error == "fail":
        _raise_failed(failed)
    for sample in tqdm(entries, desc="checking images", unit="img", disable=len(entries) < 500, leave=False):
        try:
            data = sample.path.read_bytes()
            read_image(data, max_pixels=max_pixels)
        except (OSError, ImageDecodeError) as exc:
            reason = exc.reason if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {exc}"
            failed.append((sample.path, reason))
            if on_error == "fail":
                _raise_failed(failed)
            continue
        index._file_hashes[sample.path] = hashlib.sha256(data).hexdigest()
        kept.append(sample)
    return kept


def _raise_failed(failed: list[tuple[Path, str]]) -> None:
    path, reason = failed[0]
    raise DatasetError(f"cannot read image {str(path)!r}: {reason} (on_error='fail'; use 'skip' to skip it)")


def _check_classes(index: DatasetIndex) -> None:
    if not index.samples:
        raise DatasetError(
            f"dataset {str(index.source)!r} has no readable images "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)}; {len(index.skipped)} skipped)"
        )
    per_class = Counter(s.label for s in index.samples)
    empty = [name for i, name in enumerate(index.class_names) if per_class[i] == 0]
    if empty:
        raise DatasetError(
            f"class(es) {', '.join(repr(n) for n in empty)} of {str(index.source)!r} have no readable images"
        )
    splits = {s.split for s in index.samples}
    if None in splits and len(splits) > 1:
        raise DatasetError(f"dataset {str(index.source)!r} mixes samples with and without a split")


def _resolve_class_names(
    found: list[str], class_names: Sequence[str] | None, *, where: str, labels_may_be_indices: bool = False
) -> list[str]:
    if class_names is None:
        return list(found)
    names = list(class_names)
    if len(set(names)) != len(names):
        raise InputError(f"class_names has duplicates: {names}")
    if len(names) < 2:
        raise InputError(f"class_names needs at least 2 classes, got {names}")
    unknown = [f for f in found if f not in names]
    if unknown and not (labels_may_be_indices and all(_is_int(f) for f in found)):
        raise DatasetError(
            f"{where} has class(es) {', '.join(repr(u) for u in unknown)} not in class_names; "
            f"valid options: {', '.join(names)}"
        )
    return names


# ------------------------------------------------------------------------------------------------ splits


def assign_splits(
    index: DatasetIndex,
    *,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    overwrite: bool = False,
) -> DatasetIndex:
    """A copy of ``index`` with a stratified train/val/test split.

    Per class of n images (ordered by path, then shuffled with ``seed``): ``round(n * test)`` to test,
    ``round(n * val)`` to val, the rest to train; with n >= 3 every split with a positive fraction gets at
    least one image and train keeps at least one. Deterministic for a given set of files and seed.
    """
    for name, fraction in (("val", val), ("test", test)):
        if not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
            raise InputError(f"{name} fraction must be in [0, 1), got {fraction}")
    if val + test >= 1.0:
        raise InputError(f"val + test must leave images for training, got val={val} test={test}")
    if index.has_splits and not overwrite:
        raise DatasetError(
            f"dataset {str(index.source)!r} already has splits; pass overwrite=True to replace"
        )
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Sample]] = {}
    for sample in sorted(index.samples, key=lambda s: (s.label, _relative(s.path, index.root))):
        by_class.setdefault(sample.label, []).append(sample)

    new_samples: list[Sample] = []
    for label in sorted(by_class):
        group = by_class[label]
        n = len(group)
        n_test, n_val = _split_sizes(n, val=val, test=test)
        order = rng.permutation(n)
        for rank, position in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            new_samples.append(replace(group[position], split=split))
        if n < 3:
            log.warning("class %r has only %d image(s): all in train", index.class_names[label], n)
    position_of = {s.path: i for i, s in enumerate(index.samples)}
    new_samples.sort(key=lambda s: position_of[s.path])
    return DatasetIndex(
        samples=new_samples,
        class_names=list(index.class_names),
        source=index.source,
        skipped=list(index.skipped),
        _file_hashes=dict(index._file_hashes),
    )


def load_split(
    data: str | Path, *, class_names: Sequence[str] | None, split: str, limit: int | None = None
) -> tuple[list[Sample], Path]:
    """The first ``limit`` samples of ``split`` of ``data`` (the default stratified split when the data has
    none) and the data's root folder; an empty result is an :class:`InputError`."""
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    index = load_index(Path(data), class_names=class_names)
    if not index.has_splits:
        log.info("%s has no split information: assigning the default stratified split", data)
        index = assign_splits(index)
    samples = index.split(split)[:limit]
    if not samples:
        raise InputError(f"split {split!r} of {data} has no images")
    return samples, index.root


def _split_sizes(n: int, *, val: float, test: float) -> tuple[int, int]:
    if n < 3:
        return 0, 0
    n_test, n_val = round(n * test), round(n * val)
    if test > 0:
        n_test = max(n_test, 1)
    if val > 0:
        n_val = max(n_val, 1)
    while n_test + n_val > n - 1:  # keep at least one training image
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


# ------------------------------------------------------------------------------------------------ helpers


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _hidden(path: Path, under: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(under).parts)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, root)).as_posix()


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _natural_key(text: str) -> tuple[int, int | str]:
    return (0, int(text)) if _is_int(text) else (1, text)
