"""Synthetic chest radiographs: determinism, layout, masks, class-specific findings, cue, CLI errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, stats

from cli.main import main
from training.synth import (
    DEFAULT_CLASS_NAMES,
    FINDINGS,
    MANIFEST_COLUMNS,
    SynthConfig,
    generate_dataset,
    generate_image,
    parse_class_names,
    parse_split,
)

NORMAL, LOBAR, LOWER, DIFFUSE, NODULES = range(5)


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def samples() -> dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Eight 128 px images per finding (distinct patients)."""
    return {
        f: [generate_image(i, seed=11, label=f, size=128) for i in range(f * 100, f * 100 + 8)]
        for f in range(5)
    }


# ------------------------------------------------------------------------------------------- images & masks


def test_image_and_mask_types(samples) -> None:
    for items in samples.values():
        for image, lesion, lungs in items:
            assert image.shape == lesion.shape == lungs.shape == (128, 128)
            assert image.dtype == np.uint8 and lesion.dtype == bool and lungs.dtype == bool
            # Both lungs present, each a sizeable connected region.
            labels, count = ndimage.label(lungs)
            sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
            assert count >= 2 and sizes[1] > 0.05 * lungs.size


@pytest.mark.parametrize("finding", range(5), ids=FINDINGS)
def test_lesion_inside_lungs_and_empty_only_for_normal(samples, finding: int) -> None:
    for _image, lesion, lungs in samples[finding]:
        assert not (lesion & ~lungs).any(), "lesion pixels outside the lung mask"
        if finding == NORMAL:
            assert not lesion.any()
        else:
            assert lesion.sum() >= 5


def test_lungs_darker_than_mediastinum_and_spine(samples) -> None:
    for items in samples.values():
        for image, _lesion, lungs in items:
            rows = np.flatnonzero(lungs.any(axis=1))
            middle = image[rows[0] : rows[-1] + 1, 60:68].astype(
                float
            )  # the central band (spine, mediastinum)
            assert image[lungs].mean() + 30 < middle.mean()
            # Air outside the patient (the top corners above the shoulders) is darker still.
            assert image[:6, :6].mean() < image[lungs].mean()


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


def test_upper_zone_nodules_lie_in_the_upper_lungs(samples) -> None:
    for _image, lesion, lungs in samples[NODULES]:
        assert _centroid(lesion)[0] < _centroid(lungs)[0] - 5
        rows = np.flatnonzero(lungs.any(axis=1))
        assert np.nonzero(lesion)[0].max() < (rows[0] + rows[-1]) / 2 + 8


def test_bilateral_lower_zone_is_low_and_on_both_sides(samples) -> None:
    for _image, lesion, lungs in samples[LOWER]:
        assert _centroid(lesion)[0] > _centroid(lungs)[0] + 5
        assert lesion[:, :64].sum() > 0 and lesion[:, 64:].sum() > 0
        # Peripheral: the lesion's mean distance from the midline exceeds the lungs'.
        cols_l, cols_g = np.nonzero(lesion)[1], np.nonzero(lungs)[1]
        assert np.abs(cols_l - 63.5).mean() > np.abs(cols_g - 63.5).mean()


def test_lobar_consolidation_is_one_sided_and_dense(samples) -> None:
    sides = set()
    for image, lesion, lungs in samples[LOBAR]:
        left, right = lesion[:, :64].sum(), lesion[:, 64:].sum()
        assert min(left, right) == 0
        sides.add(left > 0)
        # Denser (brighter) than the aerated lung around it.
        assert image[lesion].mean() > image[lungs & ~lesion].mean() + 15
    assert sides == {True, False}, "consolidation should occur in both lungs across images"


def test_diffuse_patchy_covers_both_lungs(samples) -> None:
    fractions = []
    for _image, lesion, lungs in samples[DIFFUSE]:
        assert lesion[:, :64].sum() > 0 and lesion[:, 64:].sum() > 0
        fractions.append(lesion.sum() / lungs.sum())
    nodule_fractions = [lesion.sum() / lungs.sum() for _i, lesion, lungs in samples[NODULES]]
    assert np.median(fractions) > 3 * np.median(nodule_fractions)


def test_anatomy_depends_on_index_not_label_and_cue_only_adds_the_marker() -> None:
    base, _, lungs_a = generate_image(7, seed=3, label="normal", size=96)
    _, _, lungs_b = generate_image(7, seed=3, label="upper_zone_nodules", size=96)
    np.testing.assert_array_equal(lungs_a, lungs_b)
    with_cue, _, _ = generate_image(7, seed=3, label="normal", size=96, cue=True)
    changed = np.argwhere(with_cue != base)
    assert len(changed) > 10
    # The marker sits in the upper right corner and is bright.
    assert changed[:, 0].max() < 96 * 0.2 and changed[:, 1].min() > 96 * 0.7
    assert with_cue[tuple(changed.T)].mean() > 200
    other, _, lungs_c = generate_image(8, seed=3, label="normal", size=96)
    assert not np.array_equal(lungs_a, lungs_c) and not np.array_equal(other, base)


@pytest.mark.parametrize("size", [32, 64, 300])
def test_sizes(size: int) -> None:
    image, lesion, lungs = generate_image(1, seed=0, label=NODULES, size=size)
    assert image.shape == (size, size) and lesion.any() and (lesion <= lungs).all()


def test_generate_image_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="finding"):
        generate_image(0, seed=0, label="pneumonia")
    with pytest.raises(ValueError, match="finding index"):
        generate_image(0, seed=0, label=5)
    with pytest.raises(ValueError, match="size"):
        generate_image(0, seed=0, label=0, size=8)
    with pytest.raises(ValueError, match="non-negative"):
        generate_image(-1, seed=0, label=0, size=64)
    with pytest.raises(ValueError, match="range"):
        SynthConfig(noise=(0.1, 0.0))


# ------------------------------------------------------------------------------------------------- dataset


def test_dataset_layout_manifest_and_stratified_split(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = generate_dataset(out, n=40, size=48, seed=5, split="0.5,0.25,0.25", progress=False)
    assert manifest == out / "manifest.csv"
    header = manifest.read_text().splitlines()[0]
    assert tuple(header.split(",")) == MANIFEST_COLUMNS
    rows = _read_manifest(manifest)
    assert len(rows) == 40
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        counts[row["split"], row["label"]] = counts.get((row["split"], row["label"]), 0) + 1
        image_path = out / row["path"]
        assert image_path.parts[-3:-1] == (row["split"], row["label"])
        with Image.open(image_path) as image:
            assert image.mode == "L" and image.size == (48, 48)
        lesion = np.asarray(Image.open(out / row["lesion_mask"])) > 0
        lungs = np.asarray(Image.open(out / row["lung_mask"])) > 0
        assert (lesion <= lungs).all()
        assert float(row["lesion_fraction"]) == pytest.approx(lesion.sum() / lungs.sum(), abs=1e-6)
        assert (float(row["lesion_fraction"]) == 0) == (row["label"] == "normal")
        assert row["cue"] == "0"
    # 8 images per class -> 4 / 2 / 2 in every class.
    for name in DEFAULT_CLASS_NAMES:
        assert (counts["train", name], counts["val", name], counts["test", name]) == (4, 2, 2)
    config = json.loads((out / "synth_config.json").read_text())
    assert config["n"] == 40 and config["seed"] == 5 and config["class_names"] == list(DEFAULT_CLASS_NAMES)
    assert config["split_counts"]["train"]["normal"] == 4
    assert len(list((out / "masks").iterdir())) == 80


def test_dataset_is_byte_identical_for_same_arguments_and_any_worker_count(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {
        "n": 15,
        "size": 40,
        "seed": 9,
        "split": "0.4,0.3,0.3",
        "cue_class": "normal",
        "cue_rate": 0.5,
        "progress": False,
    }
    generate_dataset(tmp_path / "a", **kwargs)
    generate_dataset(tmp_path / "b", **kwargs)
    generate_dataset(tmp_path / "c", workers=2, **kwargs)
    files_a = _all_files(tmp_path / "a")
    assert len(files_a) == 15 * 3 + 2
    assert files_a == _all_files(tmp_path / "b") == _all_files(tmp_path / "c")
    generate_dataset(tmp_path / "d", **{**kwargs, "seed": 10})
    assert files_a != _all_files(tmp_path / "d")


def test_custom_class_names_and_overwrite(tmp_path: Path) -> None:
    names = ["a", "b", "c", "d", "e"]
    generate_dataset(tmp_path, n=10, size=32, class_names=names, split=(1.0, 0.0, 0.0), progress=False)
    rows = _read_manifest(tmp_path / "manifest.csv")
    assert {r["label"] for r in rows} == set(names) and {r["split"] for r in rows} == {"train"}
    with pytest.raises(ValueError, match="not empty"):
        generate_dataset(tmp_path, n=5, size=32, split=(1, 0, 0), progress=False)
    generate_dataset(tmp_path, n=5, size=32, split=(1, 0, 0), overwrite=True, progress=False)
    # Nothing from the previous run is left behind.
    assert not (tmp_path / "train" / "a").exists()
    assert len(list(tmp_path.rglob("*.png"))) == 5 * 3


def test_cue_rates(tmp_path: Path) -> None:
    n = 500
    generate_dataset(
        tmp_path,
        n=n,
        size=32,
        seed=1,
        cue_class="lobar_consolidation",
        cue_rate=0.7,
        cue_noise_rate=0.05,
        progress=False,
    )
    rows = _read_manifest(tmp_path / "manifest.csv")
    in_class = [r["cue"] == "1" for r in rows if r["label"] == "lobar_consolidation"]
    others = [r["cue"] == "1" for r in rows if r["label"] != "lobar_consolidation"]
    assert stats.binomtest(sum(in_class), len(in_class), 0.7).pvalue > 1e-3
    assert stats.binomtest(sum(others), len(others), 0.05).pvalue > 1e-3
    # The recorded flag matches the pixels: each stored image is the generator's output with that flag.
    for row in rows[:60]:
        index = int(Path(row["path"]).stem.split("_")[1])
        stored = np.asarray(Image.open(tmp_path / row["path"]))
        label = DEFAULT_CLASS_NAMES.index(row["label"])
        flag = row["cue"] == "1"
        np.testing.assert_array_equal(
            stored, generate_image(index, seed=1, label=label, size=32, cue=flag)[0]
        )
        assert not np.array_equal(
            stored, generate_image(index, seed=1, label=label, size=32, cue=not flag)[0]
        )


def test_parsers() -> None:
    assert parse_split("0.8, 0.1, 0.1") == (0.8, 0.1, 0.1)
    assert parse_class_names(None) == DEFAULT_CLASS_NAMES
    for bad in ("0.7,0.3", "0.5,0.5,0.5", "0,0.5,0.5", "a,b,c", "0.9,-0.1,0.2"):
        with pytest.raises(ValueError):
            parse_split(bad)
    for bad in ("a,b,c,d", "a,b,c,d,d", "a,b,c,d,e,f", "a,b,c,d,../x", "a,b,c,d,masks"):
        with pytest.raises(ValueError):
            parse_class_names(bad)


# ----------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--n", "12"], "too small"),
        (["--class-names", "a,b,c,d"], "exactly 5"),
        (["--class-names", "a,b,c,d,a"], "unique"),
        (["--split", "0.7,0.2,0.2"], "sum to 1"),
        (["--split", "x"], "three numbers"),
        (["--cue-class", "pneumonia", "--cue-rate", "0.5"], "not one of the class names"),
        (["--cue-rate", "0.5"], "--cue-class"),
        (["--size", "4"], "size"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, capsys, extra: list[str], needle: str) -> None:
    rc = main(["synth", "--out", str(tmp_path / "out"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_cli_refuses_non_empty_out_then_overwrites(tmp_path: Path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("x")
    args = ["synth", "--out", str(tmp_path), "--n", "5", "--size", "32", "--split", "1,0,0", "--no-progress"]
    assert main(args) != 0
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    assert len(_read_manifest(tmp_path / "manifest.csv")) == 5
