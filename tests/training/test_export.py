"""Export: artifact folder contents, hashes, ONNX parity with a dynamic batch, torch-free loading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main as cli_main
from core.manifest import sha256_file
from core.registry import get_arch
from tests.pairs import CLASS_NAMES, SMALL_SIZE, export_small_pair, make_pair
from training.export import ExportError, export_pair, load_checkpoint
from training.models import LogitsAndFeatures


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_small_pair("densenet201", tmp_path_factory.mktemp("pair") / "densenet201")


def test_folder_holds_the_contract_files(pair_dir: Path) -> None:
    names = {p.name for p in pair_dir.iterdir()}
    assert {
        "manifest.json",
        "transfer.safetensors",
        "finetuned.safetensors",
        "transfer.onnx",
        "finetuned.onnx",
    } <= names
    manifest = json.loads((pair_dir / "manifest.json").read_text())
    spec = get_arch("densenet201")
    assert manifest["schema_version"] == 1
    assert manifest["architecture"] == "densenet201"
    assert manifest["class_names"] == CLASS_NAMES
    assert manifest["input_size"] == SMALL_SIZE["densenet201"]
    assert manifest["mean"] == list(spec.mean) and manifest["std"] == list(spec.std)
    assert manifest["target_layer"] == "feature_act"
    assert manifest["features"] == {
        "onnx_output": "features",
        "post_relu": True,
        "channels": 1920,
        "grid": [3, 3],
        "taken_after": "non-inplace ReLU after the backbone's forward_features",
    }
    assert manifest["drift_calibration"] is None
    assert manifest["checkpoints"]["finetuned"]["metrics"] == {"accuracy": 0.6}
    for name in ("transfer", "finetuned"):
        assert manifest["checkpoints"][name]["onnx_parity_max_abs_diff"] <= 1e-4
        assert manifest["checkpoints"][name]["onnx_parity"]["torch_float32_logits_error"] >= 0


def test_manifest_hashes_every_served_file(pair_dir: Path) -> None:
    manifest = json.loads((pair_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "transfer.safetensors",
        "finetuned.safetensors",
        "transfer.onnx",
        "finetuned.onnx",
    }
    for name, digest in manifest["files"].items():
        assert sha256_file(pair_dir / name) == digest


def test_onnx_matches_torch_for_any_batch(pair_dir: Path) -> None:
    import onnxruntime as ort

    transfer, finetuned = make_pair("densenet201")
    for name, model in (("transfer", transfer), ("finetuned", finetuned)):
        session = ort.InferenceSession(str(pair_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        for batch in (1, 5):
            x = torch.randn(batch, 3, SMALL_SIZE["densenet201"], SMALL_SIZE["densenet201"])
            with torch.no_grad():
                ref_logits, ref_feats = LogitsAndFeatures(model)(x)
            logits, feats = session.run(["logits", "features"], {"input": x.numpy()})
            assert logits.shape == (batch, 5) and feats.shape == (batch, 1920, 3, 3)
            np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4)
            np.testing.assert_allclose(feats, ref_feats.numpy(), atol=1e-4)


def test_safetensors_round_trip(pair_dir: Path) -> None:
    _, finetuned = make_pair("densenet201")
    loaded = load_checkpoint(pair_dir / "finetuned.safetensors", arch="densenet201", num_classes=5)
    expected, actual = finetuned.state_dict(), loaded.state_dict()
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=0, msg=key)
    assert not torch.equal(actual["head.weight"], make_pair("densenet201")[0].state_dict()["head.weight"])


def test_incompatible_checkpoint_is_a_clear_error(pair_dir: Path) -> None:
    with pytest.raises(ValueError, match="does not fit resnet50v2 with 5 classes"):
        load_checkpoint(pair_dir / "finetuned.safetensors", arch="resnet50v2", num_classes=5)
    with pytest.raises(ValueError, match="does not fit densenet201 with 3 classes"):
        load_checkpoint(pair_dir / "finetuned.safetensors", arch="densenet201", num_classes=3)
    junk = pair_dir.parent / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        load_checkpoint(junk, arch="densenet201", num_classes=5)


def test_pair_checks(tmp_path: Path) -> None:
    transfer, finetuned = make_pair("densenet201")
    with pytest.raises(ExportError, match="expected 5 unique class names"):
        export_pair(
            transfer, finetuned, out_dir=tmp_path, class_names=["a", "a", "b", "c", "d"], input_size=64
        )
    other, _ = make_pair("resnet50v2")
    with pytest.raises(ExportError, match="one architecture"):
        export_pair(transfer, other, out_dir=tmp_path, class_names=CLASS_NAMES, input_size=64)


def test_loads_and_runs_from_onnx_without_torch(pair_dir: Path) -> None:
    """A fresh process serves the pair from ONNX + safetensors (NumPy) alone: torch is never imported."""
    code = textwrap.dedent(
        f"""
        import hashlib, json, sys
        from pathlib import Path
        import numpy as np, onnxruntime as ort
        from safetensors.numpy import load_file
        folder = Path({str(pair_dir)!r})
        manifest = json.loads((folder / "manifest.json").read_text())
        for name, digest in manifest["files"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
        for ckpt in ("transfer", "finetuned"):
            s = ort.InferenceSession(str(folder / manifest["checkpoints"][ckpt]["onnx"]), providers=["CPUExecutionProvider"])
            x = np.random.default_rng(0).standard_normal((2, 3, manifest["input_size"], manifest["input_size"])).astype("float32")
            logits, feats = s.run(["logits", "features"], {{"input": x}})
            w = load_file(str(folder / manifest["checkpoints"][ckpt]["safetensors"]))["head.weight"]
            b = load_file(str(folder / manifest["checkpoints"][ckpt]["safetensors"]))["head.bias"]
            np.testing.assert_allclose(feats.mean(axis=(2, 3)) @ w.T + b, logits, atol=1e-4)
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_export_cli_reexports_a_folder(pair_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(pair_dir, folder)
    (folder / "transfer.onnx").unlink()
    assert cli_main(["export", "--model-dir", str(folder)]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sha256_file(folder / "transfer.onnx") == manifest["files"]["transfer.onnx"]
    assert manifest["checkpoints"]["finetuned"]["metrics"] == {"accuracy": 0.6}


def test_export_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["export", "--model-dir", str(tmp_path / "missing")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model folder not found" in err
    (tmp_path / "empty").mkdir()
    assert cli_main(["export", "--model-dir", str(tmp_path / "empty"), "--arch", "vgg"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot tell" in err


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50v2", "inceptionv3"])
def test_other_architectures_export(arch: str, tmp_path: Path) -> None:
    folder = export_small_pair(arch, tmp_path / arch)
    manifest = json.loads((folder / "manifest.json").read_text())
    grid = get_arch(arch).feature_grid(SMALL_SIZE[arch])
    assert manifest["features"]["grid"] == [grid, grid]
    for name in ("transfer", "finetuned"):
        parity = manifest["checkpoints"][name]["onnx_parity"]
        assert parity["logits_max_abs_diff"] <= max(1e-4, 4 * parity["torch_float32_logits_error"])


def test_parity_on_sample_images(tmp_path: Path) -> None:
    from core.preprocess import preprocess

    transfer, finetuned = make_pair("densenet201")
    spec = get_arch("densenet201")
    rng = np.random.default_rng(0)
    images = np.stack(
        [preprocess(rng.random((80, 80)), input_size=64, mean=spec.mean, std=spec.std) for _ in range(2)]
    )
    folder = export_pair(
        transfer,
        finetuned,
        out_dir=tmp_path / "p",
        class_names=CLASS_NAMES,
        input_size=64,
        sample_inputs=images,
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["checkpoints"]["transfer"]["onnx_parity"]["inputs"] == "sample images"
    with pytest.raises(
        ExportError, match=r"sample_inputs must have shape \(B, 3, 64, 64\), got \(2, 3, 32, 32\)"
    ):
        export_pair(
            transfer,
            finetuned,
            out_dir=tmp_path / "q",
            class_names=CLASS_NAMES,
            input_size=64,
            sample_inputs=images[:, :, :32, :32],
        )
