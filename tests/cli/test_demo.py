"""The one-command demo: first run builds data + a calibrated, verified model pair and a key; a second run
reuses everything (no retraining) and prints a fresh key that the audit database accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cli.main import main as cli_main


def _demo(tmp: Path) -> list[str]:
    return [
        "demo",
        "--dir",
        str(tmp),
        "--n",
        "50",
        "--image-size",
        "128",
        "--archs",
        "resnet50v2",
        "--epochs-transfer",
        "2",
        "--epochs-finetune",
        "1",
        "--no-serve",
    ]


@pytest.mark.slow
def test_demo_prepares_then_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.runtime import ModelPair
    from service.app.keys import authenticate
    from service.audit.db import make_engine

    assert cli_main(_demo(tmp_path)) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "artifacts" / "resnet50v2"
    pair = ModelPair.load(folder, verify=True)
    assert pair.manifest["drift_calibration"]["methods"].keys() == {"layercam", "gradcampp"}
    assert pair.manifest["drift_calibration"]["version"] == 2
    assert (tmp_path / "sample.png").is_file()
    key = re.search(r"API key \(role admin, shown once\):\s+(\S+)", out)
    assert key, out
    assert f"-F file=@{tmp_path / 'sample.png'} http://127.0.0.1:8000/predict" in out
    assert "Dashboard (sign in with the key above): http://127.0.0.1:8000/dashboard" in out

    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}
    manifest_before = json.loads((folder / "manifest.json").read_text())
    assert cli_main(_demo(tmp_path)) == 0
    out2 = capsys.readouterr().out
    assert "resnet50v2: reusing verified model pair" in out2
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()} == stamp
    assert json.loads((folder / "manifest.json").read_text()) == manifest_before

    key2 = re.search(r"API key \(role admin, shown once\):\s+(\S+)", out2)
    assert key2 and key2.group(1) != key.group(1)
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        for k in (key.group(1), key2.group(1)):
            found = authenticate(engine, k)
            assert found is not None and found.role == "admin"
    finally:
        engine.dispose()


def test_a_tampered_or_uncalibrated_pair_is_not_reused(tmp_path: Path) -> None:
    from engine.calibrate import write_calibration
    from service.demo import pair_is_usable as _pair_is_usable
    from tests.pairs import export_small_pair

    folder = export_small_pair("resnet50v2", tmp_path / "resnet50v2")
    assert _pair_is_usable(tmp_path / "missing") == (False, "not trained yet")
    assert _pair_is_usable(folder) == (False, "drift not calibrated (or calibrated by an older version)")
    write_calibration(folder, {"version": 1, "methods": {}})
    assert _pair_is_usable(folder)[0] is False, "a calibration of another version is not current"
    write_calibration(folder, {"version": 2, "score": "1 - top-20% IoU", "methods": {}})
    assert _pair_is_usable(folder)[0] is False, "a calibration without every method is not used"
    block = {"noise_floor": 0.1, "reference": [0.2, 0.3]}
    write_calibration(
        folder, {"version": 2, "score": "1 - top-20% IoU", "methods": {"layercam": block, "gradcampp": block}}
    )
    assert _pair_is_usable(folder) == (True, "ok")
    onnx = folder / "finetuned.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789")
    usable, why = _pair_is_usable(folder)
    assert not usable and "finetuned.onnx" in why


@pytest.mark.slow
def test_demo_serves_the_first_pair_and_loads_the_others_as_they_finish(
    api_artifacts: Path, tmp_path: Path
) -> None:
    """The served app gets a pair trained after it started, through the registry's reload, recorded."""
    import shutil

    from cli.demo import _train_then_serve
    from service.demo import create_demo_key, prepare_data
    from tests.api_fixtures import chest_like, headers, make_settings, png_bytes, started, upload

    prepare_data(tmp_path, n=50, image_size=128)
    shutil.copytree(api_artifacts / "densenet201", tmp_path / "artifacts" / "densenet201")
    url, _ = create_demo_key(tmp_path)
    settings = make_settings(tmp_path / "artifacts", url, strict_models=False, migrate_on_start=False)
    with started(settings) as app:
        assert app.get("/readyz").json()["models_ready"] == ["densenet201"]
        options = {"seed": 0, "epochs_transfer": 2, "epochs_finetune": 1, "retrain": False, "say": print}
        _train_then_serve(app.app, tmp_path, ["resnet50v2"], options)
        assert app.get("/readyz").json()["models_ready"] == ["densenet201", "resnet50v2"]
        assert not (tmp_path / "staging" / "resnet50v2").exists()
        answer = app.post(
            "/predict",
            files=upload(png_bytes(chest_like(128, seed=1))),
            data={"models": "resnet50v2", "methods": "layercam"},
            headers=headers("predict"),
        )
        assert answer.status_code == 200, answer.text
        events = app.get("/audit/model-events", headers=headers("audit")).json()["items"]
        assert (events[0]["event"], events[0]["model"], events[0]["reason"]) == (
            "load",
            "resnet50v2",
            "demo: resnet50v2 trained",
        )


def test_the_demo_recipe_fine_tunes_the_first_served_pair_for_fewer_epochs(tmp_path: Path) -> None:
    """InceptionV3 (trained and served first) fine-tunes for 2 epochs, the others for train's default;
    ``--epochs-*`` win; every pair is still a transfer + fine-tune pair from a random init."""
    from service.demo import DEMO_INPUT_SIZE, DEMO_TRAIN_MINUTES, demo_archs, demo_train_config
    from training.config import TrainConfig

    default = TrainConfig(arch="x", data="d", out="o").epochs_finetune
    configs = {arch: demo_train_config(tmp_path, arch) for arch in demo_archs("all")}
    assert min(DEMO_TRAIN_MINUTES, key=DEMO_TRAIN_MINUTES.__getitem__) == "inceptionv3"
    assert configs["inceptionv3"].epochs_finetune == 2 < default
    assert {a: c.epochs_finetune for a, c in configs.items() if a != "inceptionv3"} == {
        "densenet201": default,
        "resnet50v2": default,
    }
    for arch, config in configs.items():
        assert config.epochs_transfer > 0 and config.epochs_finetune > 0
        assert (config.pretrained, config.device) == ("none", "cpu")
        assert config.input_size == DEMO_INPUT_SIZE[arch]
        assert (config.data, config.out) == (str(tmp_path / "data"), str(tmp_path / "staging" / arch))
    chosen = demo_train_config(tmp_path, "inceptionv3", epochs_transfer=3, epochs_finetune=5)
    assert (chosen.epochs_transfer, chosen.epochs_finetune) == (3, 5)
