"""``cxr-drift seal``: check a manifest's seal, re-seal a reviewed one; the demo seals its own old pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli.main import main as cli_main
from core.manifest import MANIFEST_FILE, MANIFEST_KEY_ENV
from engine.runtime import ModelPair


@pytest.fixture
def folder(api_artifacts: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(api_artifacts / "resnet50v2", tmp_path / "resnet50v2"))


def _edit(folder: Path, change: object) -> None:
    path = folder / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)  # type: ignore[operator]
    path.write_text(json.dumps(manifest, indent=2))


def _swap(manifest: dict) -> None:
    manifest["class_names"][:2] = manifest["class_names"][1::-1]


def test_check_then_reseal_an_edited_manifest(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MANIFEST_KEY_ENV, raising=False)
    assert cli_main(["seal", "--model-dir", str(folder), "--check"]) == 0
    _edit(folder, _swap)
    capsys.readouterr()
    assert cli_main(["seal", "--model-dir", str(folder), "--check"]) == 1
    assert "edited after it was sealed" in capsys.readouterr().err
    with pytest.raises(Exception, match="edited after it was sealed"):
        ModelPair.load(folder)
    assert cli_main(["seal", "--model-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    names = json.loads((folder / MANIFEST_FILE).read_text())["class_names"]
    assert f"class names (in output order): {', '.join(names)}" in out and "previous seal:" in out
    assert ModelPair.load(folder).class_names == names


def test_a_key_is_required_once_configured(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MANIFEST_KEY_ENV, "a secret kept away from the artifacts")
    assert cli_main(["seal", "--model-dir", str(folder), "--check"]) == 1
    assert "sealed without a key" in capsys.readouterr().err
    assert cli_main(["seal", "--model-dir", str(folder)]) == 0
    assert cli_main(["seal", "--model-dir", str(folder), "--check"]) == 0
    assert "hmac_sha256" in json.loads((folder / MANIFEST_FILE).read_text())["seal"]
    monkeypatch.setenv(MANIFEST_KEY_ENV, "another key")
    assert cli_main(["seal", "--model-dir", str(folder), "--check"]) == 1


def test_reseal_refuses_altered_weights(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (folder / MANIFEST_FILE).read_text()
    onnx = folder / "finetuned.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-4] + b"XXXX")
    assert cli_main(["seal", "--model-dir", str(folder)]) == 1
    assert "finetuned.onnx does not match its manifest hash" in capsys.readouterr().err
    assert (folder / MANIFEST_FILE).read_text() == before


def test_the_demo_seals_its_own_unsealed_pair_but_not_an_edited_one(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.demo import _reseal_own_artifact, _trained

    monkeypatch.delenv(MANIFEST_KEY_ENV, raising=False)
    said: list[str] = []
    _edit(folder, lambda m: m.pop("seal"))
    assert "is not sealed" in _trained(folder)[1]
    _reseal_own_artifact(folder, say=said.append)
    assert said and "sealed the manifest of the earlier demo pair" in said[0]
    assert _trained(folder) == (True, "ok")
    _edit(folder, _swap)
    _reseal_own_artifact(folder, say=said.append)
    assert len(said) == 1 and "edited after it was sealed" in _trained(folder)[1]
