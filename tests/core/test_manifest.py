"""The manifest seal (core.manifest): an edited manifest is refused, re-sealing is explicit, keys are honest."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from core.errors import ArtifactError
from core.manifest import (
    MANIFEST_FILE,
    UnsealedManifest,
    check_class_names,
    read_manifest,
    reseal,
    sha256_file,
    verify_manifest,
    write_manifest,
)

KEY = b"test-manifest-key"


def _folder(tmp_path: Path, **extra: Any) -> Path:
    folder = tmp_path / "pair"
    folder.mkdir()
    (folder / "transfer.onnx").write_bytes(b"weights-1")
    manifest = {
        "schema_version": 1,
        "architecture": "resnet50v2",
        "class_names": ["normal", "pneumonia", "effusion"],
        "input_size": 96,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "checkpoints": {},
        "files": {"transfer.onnx": sha256_file(folder / "transfer.onnx")},
        "drift_calibration": None,
        **extra,
    }
    write_manifest(folder, manifest)
    return folder


def _edit(folder: Path, change: Any) -> None:
    """Edit manifest.json as a person with write access would: the JSON text, the seal left as it is."""
    path = folder / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def _verify(folder: Path, key: bytes | None = None) -> None:
    verify_manifest(folder, read_manifest(folder), key=key)


def test_sealed_manifest_verifies_and_survives_reformatting(tmp_path: Path) -> None:
    folder = _folder(tmp_path, metrics={"auc": float("nan"), "note": "Ünïcode ✓"})
    _verify(folder)
    # the seal is over the content, not the bytes: re-indenting or reordering keys keeps it valid
    _edit(folder, lambda m: None)
    _verify(folder)
    assert math.isnan(read_manifest(folder)["metrics"]["auc"])


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.__setitem__(
            "class_names", [m["class_names"][1], m["class_names"][0], m["class_names"][2]]
        ),
        lambda m: m.__setitem__("input_size", 128),
        lambda m: m.__setitem__("drift_calibration", {"version": 2}),
        lambda m: m["files"].__setitem__("transfer.onnx", "0" * 64),
        lambda m: m.__setitem__("extra", 1),
    ],
    ids=["swapped-class-names", "input-size", "calibration", "file-hash", "added-key"],
)
def test_any_edit_after_sealing_is_refused_with_a_reason(tmp_path: Path, change: Any) -> None:
    folder = _folder(tmp_path)
    _edit(folder, change)
    with pytest.raises(ArtifactError, match=r"edited after it was sealed.*cxr-drift seal --model-dir"):
        _verify(folder)


def test_unsealed_manifest_is_refused_until_resealed(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    _edit(folder, lambda m: m.pop("seal"))
    with pytest.raises(UnsealedManifest, match=r"is not sealed.*cxr-drift seal --model-dir"):
        _verify(folder)
    assert reseal(folder).startswith(str(folder / MANIFEST_FILE) + " is not sealed")
    _verify(folder)
    assert reseal(folder) == "ok"


def test_reseal_refuses_files_that_do_not_match_the_hash_list(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "transfer.onnx").write_bytes(b"other weights")
    before = (folder / MANIFEST_FILE).read_text()
    with pytest.raises(ArtifactError, match=r"transfer\.onnx does not match its manifest hash"):
        reseal(folder)
    assert (folder / MANIFEST_FILE).read_text() == before


def test_a_key_stops_an_edit_with_a_recomputed_digest(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    write_manifest(folder, read_manifest(folder), key=KEY)
    _verify(folder, key=KEY)
    # an attacker swaps class names and recomputes the plain digest (write_manifest without the key)
    manifest = read_manifest(folder)
    manifest["class_names"] = ["pneumonia", "normal", "effusion"]
    write_manifest(folder, manifest)
    _verify(folder)  # without a key nothing can tell: the documented limit of a plain digest
    with pytest.raises(ArtifactError, match=r"sealed without a key, but CXR_DRIFT_MANIFEST_KEY is set"):
        _verify(folder, key=KEY)
    write_manifest(folder, manifest, key=b"another key")
    with pytest.raises(ArtifactError, match=r"HMAC does not match"):
        _verify(folder, key=KEY)


@pytest.mark.parametrize(
    "name", ["=cmd|' /C calc'!A0", "+1", "-2", "@SUM(A1)", "\tx", "x\ny", "", "a" * 65, 3]
)
def test_formula_like_or_malformed_class_names_are_refused(tmp_path: Path, name: Any) -> None:
    with pytest.raises(ArtifactError, match=r"class name|class_names"):
        check_class_names(["normal", name])
    # even in a sealed manifest: reading it refuses the name
    folder = _folder(tmp_path, class_names=["normal", name])
    with pytest.raises(ArtifactError, match=r"class_names"):
        read_manifest(folder)


def test_ordinary_class_names_pass() -> None:
    names = ["normal", "COVID-19", "Pneumonia (viral)", "3rd_class", "épanchement"]
    assert check_class_names(names) == names
    with pytest.raises(ArtifactError, match="unique"):
        check_class_names(["a", "a"])
