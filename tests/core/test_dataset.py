"""core.preprocess and training.data: preprocessing against torch's resize, dataset indexing, splits,
fingerprints and the torch Dataset, all on small files generated in tmp_path."""

from __future__ import annotations

import csv
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from skimage.transform import resize as skimage_resize

from core.dataset import DatasetError, DatasetIndex, Sample, assign_splits, load_index
from core.imageio import read_image
from core.preprocess import preprocess, preprocess_batch, resize_gray
from tests.images import dicom_bytes
from training.data import ImageDataset

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def write_png(path: Path, seed: int, size: tuple[int, int] = (12, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_jpeg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(12, 16), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


def write_dicom(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        dicom_bytes(np.random.default_rng(seed).integers(0, 4096, size=(10, 14)), bits_stored=12)
    )
    return path


def make_folder(root: Path, per_class: dict[str, int], *, split: str | None = None, seed: int = 0) -> Path:
    base = root / split if split else root
    for c, (name, n) in enumerate(per_class.items()):
        for i in range(n):
            write_png(base / name / f"{name}_{i:03d}.png", seed=seed + 1000 * c + i)
    return root


# ------------------------------------------------------------------------------------------------ preprocess


def test_preprocess_shape_dtype_and_normalization() -> None:
    gray = np.full((30, 20), 0.6, dtype=np.float32)
    out = preprocess(gray, input_size=8, mean=MEAN, std=STD)
    assert out.shape == (3, 8, 8) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(out[c], (0.6 - MEAN[c]) / STD[c], rtol=1e-5)


def test_preprocess_same_size_is_identity_resize_and_channels_replicate() -> None:
    gray = np.random.default_rng(0).random((9, 9)).astype(np.float32)
    out = preprocess(gray, input_size=9, mean=MEAN, std=STD)
    for c in range(3):
        np.testing.assert_allclose(out[c] * STD[c] + MEAN[c], gray, atol=1e-6)


@pytest.mark.parametrize(("shape", "size"), [((13, 17), 40), ((100, 70), 24), ((64, 64), 32)])
def test_resize_matches_torch_antialiased_bilinear(shape: tuple[int, int], size: int) -> None:
    gray = np.random.default_rng(1).random(shape).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(gray)[None, None],
        size=(size, size),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0, 0].numpy()
    np.testing.assert_allclose(resize_gray(gray, size=size), expected, atol=1e-5)


def test_upsampling_matches_skimage() -> None:
    gray = np.random.default_rng(2).random((11, 7))
    expected = skimage_resize(gray, (33, 33), order=1, mode="edge", anti_aliasing=False)
    np.testing.assert_allclose(resize_gray(gray, size=33), expected, atol=1e-5)


def test_preprocess_validates_input() -> None:
    ok = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        preprocess(np.zeros((4, 4, 3)), input_size=4, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="non-empty"):
        preprocess(np.zeros((0, 4)), input_size=4, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="finite"):
        preprocess(np.array([[0.0, np.nan]]), input_size=4, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="input_size"):
        preprocess(ok, input_size=0, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="3 values"):
        preprocess(ok, input_size=4, mean=(0.5,), std=STD)
    with pytest.raises(ValueError, match="std"):
        preprocess(ok, input_size=4, mean=MEAN, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="NumPy"):
        preprocess([[0.0]], input_size=4, mean=MEAN, std=STD)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    gray=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
        elements=st.floats(0.0, 1.0, width=32),
    ),
    size=st.integers(1, 20),
)
def test_resize_is_a_convex_combination(gray: np.ndarray, size: int) -> None:
    """Bilinear weights are non-negative and sum to one: the output stays within the input's range."""
    out = resize_gray(gray, size=size)
    assert out.shape == (size, size) and np.all(np.isfinite(out))
    assert out.min() >= gray.min() - 1e-5 and out.max() <= gray.max() + 1e-5


def test_preprocess_batch_stacks() -> None:
    rng = np.random.default_rng(3)
    images = [rng.random((10, 12)), rng.random((20, 8))]
    batch = preprocess_batch(images, input_size=6, mean=MEAN, std=STD)
    assert batch.shape == (2, 3, 6, 6) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess(images[1], input_size=6, mean=MEAN, std=STD))
    with pytest.raises(ValueError, match="empty"):
        preprocess_batch([], input_size=6, mean=MEAN, std=STD)


# ------------------------------------------------------------------------------------------------ ImageFolder


def test_image_folder_mixed_formats(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_png(root / "normal" / "a.png", 1)
    write_jpeg(root / "normal" / "b.JPG", 2)
    write_dicom(root / "nodule" / "c.dcm", 3)
    write_dicom(root / "nodule" / "sub" / "d.dicom", 4)
    (root / "nodule" / "notes.txt").write_text("not an image")
    (root / "nodule" / ".hidden.png").write_text("ignored")
    index = load_index(root)
    assert index.class_names == ["nodule", "normal"]
    assert [(p.path.name, p.label, p.split) for p in index.samples] == [
        ("c.dcm", 0, None),
        ("d.dicom", 0, None),
        ("a.png", 1, None),
        ("b.JPG", 1, None),
    ]
    assert index.skipped == [] and not index.has_splits
    assert index.counts() == {"unsplit": {"nodule": 2, "normal": 2}, "total": {"nodule": 2, "normal": 2}}
    with pytest.raises(DatasetError, match="assign_splits"):
        index.split("train")


def test_image_folder_with_splits(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_folder(root, {"a": 3, "b": 2}, split="train")
    make_folder(root, {"a": 1, "b": 1}, split="val", seed=50)
    make_folder(root, {"a": 1, "b": 2}, split="test", seed=90)
    index = load_index(root)
    assert index.has_splits and index.class_names == ["a", "b"]
    assert index.counts() == {
        "train": {"a": 3, "b": 2},
        "val": {"a": 1, "b": 1},
        "test": {"a": 1, "b": 2},
        "total": {"a": 5, "b": 5},
    }
    assert {s.path.parent.parent.name for s in index.split("val")} == {"val"}
    with pytest.raises(ValueError, match="train, val, test"):
        index.split("validation")


def test_split_folders_mixed_with_class_folders(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 1}, split="train")
    make_folder(tmp_path, {"stray": 1})
    with pytest.raises(DatasetError, match=r"mixes split folders.*stray"):
        load_index(tmp_path)


def test_class_names_fix_the_order_and_are_checked(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 1, "b": 1, "c": 1})
    index = load_index(tmp_path, class_names=["c", "a", "b"])
    assert {s.path.parent.name: s.label for s in index.samples} == {"c": 0, "a": 1, "b": 2}
    with pytest.raises(DatasetError, match="'c' not in class_names; valid options: a, b"):
        load_index(tmp_path, class_names=["a", "b"])
    with pytest.raises(DatasetError, match="'d'"):
        load_index(tmp_path, class_names=["a", "b", "c", "d"])


def test_empty_class_is_an_error_naming_it(tmp_path: Path) -> None:
    make_folder(tmp_path, {"full": 2})
    (tmp_path / "empty_one").mkdir()
    with pytest.raises(DatasetError, match=r"'empty_one'.*no readable images"):
        load_index(tmp_path)


def test_class_with_only_unreadable_images_is_an_error(tmp_path: Path) -> None:
    make_folder(tmp_path, {"good": 2})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_text("text, not a PNG")
    with pytest.raises(DatasetError, match="'broken'"):
        load_index(tmp_path)


def test_skip_and_fail_on_unreadable_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_folder(tmp_path, {"a": 3, "b": 2})
    bad = tmp_path / "a" / "zz_truncated.png"
    data = write_png(tmp_path / "tmp.png", 9, size=(64, 64)).read_bytes()
    (tmp_path / "tmp.png").unlink()
    bad.write_bytes(data[: len(data) // 2])
    text = tmp_path / "b" / "readme.png"
    text.write_text("hello")

    with caplog.at_level(logging.WARNING, logger="training.data"):
        index = load_index(tmp_path, on_error="skip")
    assert len(index.samples) == 5
    assert sorted(p for p, _ in index.skipped) == sorted([bad, text])
    reasons = dict(index.skipped)
    assert "truncated" in reasons[bad] or "corrupt" in reasons[bad]
    assert "not a recognised image format" in reasons[text]
    assert any("skipped 2" in r.getMessage() for r in caplog.records)

    with pytest.raises(DatasetError, match=r"(zz_truncated|readme)\.png"):
        load_index(tmp_path, on_error="fail")
    with pytest.raises(ValueError, match="'skip' or 'fail'"):
        load_index(tmp_path, on_error="ignore")  # type: ignore[arg-type]


def test_without_validation_nothing_is_decoded(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "b" / "junk.png").write_text("junk")
    index = load_index(tmp_path, validate=False)
    assert len(index.samples) == 3 and index.skipped == []


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_index(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no class folders"):
        load_index(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DatasetError, match="no readable images"):
        load_index(tmp_path)


# ------------------------------------------------------------------------------------------------ CSV


def write_manifest(path: Path, rows: list[dict[str, str]], columns: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def synthetic_like(root: Path) -> Path:
    """A tree as the synthetic generator writes it: images, masks and manifest.csv with extra columns."""
    rows = []
    for i, (label, split) in enumerate(
        [("normal", "train"), ("normal", "val"), ("consolidation", "train"), ("consolidation", "test")]
    ):
        image = write_png(root / "images" / split / label / f"{i}.png", i)
        mask = write_png(root / "masks" / f"{i}_lesion.png", 100 + i)
        rows.append(
            {
                "path": image.relative_to(root).as_posix(),
                "label": label,
                "split": split,
                "lesion_mask": mask.relative_to(root).as_posix(),
                "lung_mask": "",
                "cue": str(i % 2),
                "lesion_fraction": f"{0.1 * i:.2f}",
            }
        )
    columns = ["path", "label", "split", "lesion_mask", "lung_mask", "cue", "lesion_fraction"]
    return write_manifest(root / "manifest.csv", rows, columns)


def test_csv_manifest_with_splits_and_extras(tmp_path: Path) -> None:
    manifest = synthetic_like(tmp_path / "synth")
    index = load_index(manifest)
    assert index.class_names == ["consolidation", "normal"]
    assert index.has_splits and index.root == tmp_path / "synth"
    first = next(s for s in index.samples if s.path.name == "0.png")
    assert first.path == tmp_path / "synth" / "images" / "train" / "normal" / "0.png"
    assert (first.label, first.split) == (1, "train")
    assert first.extra == {
        "lesion_mask": "masks/0_lesion.png",
        "lung_mask": "",
        "cue": "0",
        "lesion_fraction": "0.00",
    }
    assert index.counts()["test"] == {"consolidation": 1, "normal": 0}
    # the folder holding manifest.csv is read through the manifest, not walked as classes
    from_folder = load_index(tmp_path / "synth")
    assert from_folder.source == manifest and len(from_folder.samples) == 4


def test_csv_paths_relative_to_csv_folder_and_extensionless_dicom(tmp_path: Path) -> None:
    write_png(tmp_path / "imgs" / "a.png", 1)
    write_dicom(tmp_path / "imgs" / "IM00001", 2)
    write_png(tmp_path / "imgs" / "c.png", 3)
    (tmp_path / "lists").mkdir()
    rows = [
        {"path": "../imgs/a.png", "label": "0"},
        {"path": "../imgs/IM00001", "label": "1"},
        {"path": str(tmp_path / "imgs" / "c.png"), "label": "1"},
        {"path": "../imgs/missing.png", "label": "0"},
        {"path": "../imgs/scan.tiff", "label": "0"},
    ]
    manifest = write_manifest(tmp_path / "lists" / "m.csv", rows, ["path", "label"])
    index = load_index(manifest, class_names=["healthy", "sick"])
    assert [(s.path.name, s.label) for s in index.samples] == [("a.png", 0), ("IM00001", 1), ("c.png", 1)]
    reasons = {p.name: r for p, r in index.skipped}
    assert set(reasons) == {"missing.png", "scan.tiff"}
    assert "FileNotFoundError" in reasons["missing.png"] and "unsupported extension" in reasons["scan.tiff"]
    with pytest.raises(DatasetError, match=r"missing\.png|scan\.tiff"):
        load_index(manifest, class_names=["healthy", "sick"], on_error="fail")


def test_csv_errors(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", 1)
    write_png(tmp_path / "b.png", 2)
    no_label = write_manifest(tmp_path / "x.csv", [{"path": "a.png", "file": "1"}], ["path", "file"])
    with pytest.raises(DatasetError, match=r"lacks column.*label.*found path,file"):
        load_index(no_label)
    bad_label = write_manifest(
        tmp_path / "y.csv",
        [{"path": "a.png", "label": "a"}, {"path": "b.png", "label": "zebra"}],
        ["path", "label"],
    )
    with pytest.raises(DatasetError, match="line 3: label 'zebra' is not a class; valid options: a, b"):
        load_index(bad_label, class_names=["a", "b"])
    bad_split = write_manifest(
        tmp_path / "z.csv",
        [
            {"path": "a.png", "label": "a", "split": "train"},
            {"path": "b.png", "label": "b", "split": "holdout"},
        ],
        ["path", "label", "split"],
    )
    with pytest.raises(DatasetError, match="unknown split 'holdout'; valid options: train, val, test"):
        load_index(bad_split)
    partial = write_manifest(
        tmp_path / "p.csv",
        [{"path": "a.png", "label": "a", "split": "train"}, {"path": "b.png", "label": "b", "split": ""}],
        ["path", "label", "split"],
    )
    with pytest.raises(DatasetError, match="line 3"):
        load_index(partial)
    dup = write_manifest(
        tmp_path / "d.csv",
        [{"path": "a.png", "label": "a"}, {"path": "a.png", "label": "b"}],
        ["path", "label"],
    )
    with pytest.raises(DatasetError, match="more than once"):
        load_index(dup)
    empty = write_manifest(tmp_path / "e.csv", [], ["path", "label"])
    with pytest.raises(DatasetError, match="no rows"):
        load_index(empty)


# ------------------------------------------------------------------------------------------------ splits


def test_assign_splits_is_stratified_and_deterministic(tmp_path: Path) -> None:
    make_folder(tmp_path, {"big": 40, "mid": 20, "small": 3}, seed=0)
    index = load_index(tmp_path, validate=False)
    split = assign_splits(index, val=0.15, test=0.15, seed=7)
    counts = split.counts()
    assert counts["test"] == {"big": 6, "mid": 3, "small": 1}
    assert counts["val"] == {"big": 6, "mid": 3, "small": 1}
    assert counts["train"] == {"big": 28, "mid": 14, "small": 1}
    assert sorted(s.path for s in split.samples) == sorted(s.path for s in index.samples)
    assert {s.path: s.label for s in split.samples} == {s.path: s.label for s in index.samples}
    again = assign_splits(index, val=0.15, test=0.15, seed=7)
    assert [s.split for s in again.samples] == [s.split for s in split.samples]
    other = assign_splits(index, val=0.15, test=0.15, seed=8)
    assert [s.split for s in other.samples] != [s.split for s in split.samples]
    assert index.samples[0].split is None  # the input is not modified


def test_assign_splits_refuses_bad_fractions_and_existing_splits(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 4, "b": 4})
    index = load_index(tmp_path, validate=False)
    with pytest.raises(ValueError, match="val fraction"):
        assign_splits(index, val=-0.1)
    with pytest.raises(ValueError, match="leave images for training"):
        assign_splits(index, val=0.5, test=0.5)
    split = assign_splits(index)
    with pytest.raises(DatasetError, match="already has splits"):
        assign_splits(split)
    assert assign_splits(split, overwrite=True, seed=1).has_splits


# ------------------------------------------------------------------------------------------------ fingerprint


def test_fingerprint_is_stable_and_location_independent(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "one", {"a": 3, "b": 3})
    first = load_index(root).fingerprint()
    assert first == load_index(root).fingerprint()
    assert first == load_index(root, validate=False).fingerprint()  # hashes computed lazily agree
    copy = tmp_path / "elsewhere" / "two"
    shutil.copytree(root, copy)
    assert load_index(copy).fingerprint() == first
    assert len(first) == 64 and int(first, 16) >= 0


def test_fingerprint_independent_of_manifest_row_order(tmp_path: Path) -> None:
    manifest = synthetic_like(tmp_path)
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = list(reader.fieldnames or []), list(reader)
    random.Random(0).shuffle(rows)
    shuffled = write_manifest(tmp_path / "shuffled.csv", rows[::-1], columns)
    assert load_index(shuffled).fingerprint() == load_index(manifest).fingerprint()


def test_fingerprint_sensitive_to_content_label_split_and_files(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    base = load_index(root).fingerprint()

    one_file = root / "a" / "a_000.png"
    original = one_file.read_bytes()
    pixels = np.asarray(Image.open(one_file)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(one_file)
    assert load_index(root).fingerprint() != base
    one_file.write_bytes(original)
    assert load_index(root).fingerprint() == base

    moved = root / "b" / "a_000.png"  # same bytes, other label
    one_file.rename(moved)
    assert load_index(root).fingerprint() != base
    moved.rename(one_file)

    extra = write_png(root / "a" / "a_999.png", 999)
    assert load_index(root).fingerprint() != base
    extra.unlink()

    index = load_index(root)
    assert assign_splits(index, seed=0).fingerprint() != base
    assert assign_splits(index, seed=0).fingerprint() != assign_splits(index, seed=1).fingerprint()
    reordered = load_index(root, class_names=["b", "a"]).fingerprint()
    assert reordered != base


# ------------------------------------------------------------------------------------------------ ImageDataset


def test_dataset_item_equals_service_path(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_png(root / "a" / "x.png", 1, size=(30, 40))
    write_dicom(root / "b" / "y.dcm", 2)
    write_jpeg(root / "b" / "z.jpg", 3)
    index = load_index(root)
    dataset = ImageDataset(index, input_size=24, mean=MEAN, std=STD)
    assert len(dataset) == 3 and dataset.targets == [0, 1, 1]
    for i, sample in enumerate(index.samples):
        tensor, label = dataset[i]
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
        assert tensor.shape == (3, 24, 24) and label == sample.label
        expected = preprocess(read_image(sample.path), input_size=24, mean=MEAN, std=STD)
        np.testing.assert_array_equal(tensor.numpy(), expected)
    assert len(dataset._cache) == 3
    # a cached item is a copy: modifying it does not change the cache
    tensor, _ = dataset[0]
    tensor.zero_()
    assert dataset[0][0].abs().sum() > 0
    assert dataset[-1][1] == 1
    with pytest.raises(IndexError):
        dataset[3]


def test_dataset_without_cache_and_with_dataloader(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 3, "b": 2})
    index = load_index(tmp_path)
    dataset = ImageDataset(index.samples, input_size=16, mean=MEAN, std=STD, cache=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False, num_workers=0)
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 16, 16), (1, 3, 16, 16)]
    assert batches[0][1].tolist() == [0, 0, 0, 1]
    assert dataset._cache == {}


def test_dataset_augmentation_is_light_seeded_and_keeps_channels_equal(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:48, 0:48]
    smooth = (255 * (0.3 + 0.4 * np.sin(xx / 9.0) * np.cos(yy / 11.0))).astype(np.uint8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(smooth).save(tmp_path / "a" / "x.png")
    Image.fromarray(255 - smooth).save(tmp_path / "b" / "y.png")
    samples = load_index(tmp_path).samples
    plain = ImageDataset(samples, input_size=32, mean=MEAN, std=STD)
    augmented = ImageDataset(samples, input_size=32, mean=MEAN, std=STD, augment=True)
    torch.manual_seed(0)
    first, label = augmented[0]
    torch.manual_seed(0)
    again, _ = augmented[0]
    torch.manual_seed(1)
    other, _ = augmented[0]
    reference = plain[0][0]
    assert label == 0 and first.shape == reference.shape
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other) and not torch.equal(first, reference)
    gray = [first[c] * STD[c] + MEAN[c] for c in range(3)]
    torch.testing.assert_close(gray[0], gray[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(gray[0], gray[2], atol=1e-5, rtol=0)
    assert float(gray[0].min()) >= -1e-5 and float(gray[0].max()) <= 1 + 1e-5
    ref_gray = reference[0] * STD[0] + MEAN[0]
    assert float((gray[0] - ref_gray).abs().mean()) < 0.15  # light: the image stays recognisable
    corr = np.corrcoef(gray[0].flatten().numpy(), ref_gray.flatten().numpy())[0, 1]
    assert corr > 0.8
    np.testing.assert_array_equal(plain[0][0].numpy(), reference.numpy())  # cache holds unaugmented arrays


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        ImageDataset([], input_size=8, mean=MEAN, std=STD)
    ghost = Sample(path=tmp_path / "gone.png", label=0)
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    dataset = ImageDataset([ghost, Sample(path=bad, label=1)], input_size=8, mean=MEAN, std=STD)
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        dataset[0]
    with pytest.raises(DatasetError, match=r"bad\.png.*not a recognised image format"):
        dataset[1]


def test_index_is_plain_data(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 1, "b": 1})
    index = load_index(tmp_path)
    assert isinstance(index, DatasetIndex)
    assert index.source == tmp_path.absolute()
    described = index.describe()
    assert described["fingerprint"] == index.fingerprint() and described["source"] == str(tmp_path.absolute())
    assert described["counts"] == index.counts()
    assert Sample(path=Path("x"), label=1, split="train", extra={"k": "v"}) == Sample(Path("x"), 1, "train")


def test_reads_the_synthetic_generator_output(tmp_path: Path) -> None:
    """The contract with training.synth: its folder (splits, masks/, manifest.csv) loads through the manifest."""
    from training.synth import FINDINGS, generate_dataset

    manifest = generate_dataset(tmp_path / "synth", n=35, size=48, seed=3, progress=False)
    index = load_index(tmp_path / "synth", class_names=list(FINDINGS))
    assert index.source == manifest.absolute() and index.skipped == []
    assert len(index.samples) == 35 and index.has_splits
    assert all(sum(per_class.values()) > 0 for per_class in index.counts().values())
    sample = index.samples[0]
    assert {"lesion_mask", "lung_mask", "cue", "lesion_fraction"} <= set(sample.extra)
    assert (index.root / sample.extra["lung_mask"]).is_file()
    assert sample.path.parent.name == FINDINGS[sample.label]
    assert sample.path.parent.parent.name == sample.split
