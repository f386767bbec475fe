"""Model-pair runtime, drift report, overlay and calibration on a real exported pair (random-init, small input)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from core.errors import ArtifactError, InputError
from core.manifest import write_manifest
from core.preprocess import preprocess_batch
from core.registry import get_arch, list_archs
from engine.calibrate import calibrate, write_calibration
from engine.cams import closed_form_cams, head_scale_control
from engine.metrics import topk_iou
from engine.overlay import overlay_png
from engine.regime import HEAD_SCALE_EXPLAINED, HEAD_SCALE_FLAG, SATURATED_PRODUCT
from engine.report import (
    METHODS,
    _method_entry,
    drift_report,
    drift_reports,
)
from engine.runtime import ModelPair
from engine.severity import MethodCalibration, chance_drift, drift_index, severity_of_index
from tests.pairs import GRID3_SIZE, export_head_scaled_pair, export_small_pair
from training.export import export_pair
from training.models import build_model

UNCALIBRATED = MethodCalibration(calibrated=False, noise_floor=0.0, chance=chance_drift(20.0))
ARCH, SIZE = "resnet50v2", 96  # 3x3 feature grid
CLASSES = ["normal", "consolidation", "nodules"]


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    transfer = build_model(ARCH, len(CLASSES)).eval()
    finetuned = build_model(ARCH, len(CLASSES)).eval()
    with torch.no_grad():
        finetuned.load_state_dict(transfer.state_dict())
        for p in finetuned.parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn_like(p))
    out = tmp_path_factory.mktemp("pair") / ARCH
    return export_pair(transfer, finetuned, out_dir=out, class_names=CLASSES, input_size=SIZE)


@pytest.fixture(scope="module")
def pair(pair_dir: Path) -> ModelPair:
    return ModelPair.load(pair_dir, threads=1)


def _grays(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:120, :100]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(20, 100), rng.uniform(20, 80)
        blob = np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / 300.0)
        out.append(np.clip(0.3 + 0.5 * blob + 0.05 * rng.random((120, 100)), 0, 1).astype(np.float32))
    return out


def test_report_has_the_contract_json_shape(pair: ModelPair) -> None:
    report = drift_report(pair, _grays(1)[0])
    assert (report.model, report.architecture, report.model_digest) == tuple(vars(pair.identity).values())
    d = json.loads(json.dumps(report.to_dict()))  # JSON-serializable as it is
    assert set(d) == {
        "model",
        "architecture",
        "model_digest",
        "class_names",
        "predictions",
        "agreement",
        "target_class",
        "methods",
        "thresholds",
        "timings_ms",
    }
    assert d["model"] == ARCH and d["class_names"] == CLASSES
    for name in ("transfer", "finetuned"):
        pred = d["predictions"][name]
        assert set(pred) == {"index", "class", "probabilities"}
        assert pred["class"] == CLASSES[pred["index"]]
        assert sum(pred["probabilities"].values()) == pytest.approx(1.0)
    assert d["agreement"] == (d["predictions"]["transfer"]["index"] == d["predictions"]["finetuned"]["index"])
    assert d["target_class"] == {
        "index": d["predictions"]["finetuned"]["index"],
        "name": d["predictions"]["finetuned"]["class"],
        "source": "finetuned_prediction",
    }
    assert set(d["methods"]) == set(METHODS)
    expected_metrics = {
        "iou",
        "dice",
        "soft_iou",
        "pearson",
        "spearman",
        "ssim",
        "centroid_shift",
        "peak_shift",
        "zone_shift",
        "emd",
        "entropy_change",
        "gini_change",
        "iou_k",
    }
    for entry in d["methods"].values():
        assert set(entry) == {
            "metrics",
            "drift_score",
            "drift_index",
            "severity",
            "reference_percentile",
            "flagged",
            "flags",
            "diagnostics",
            "own_prediction",
        }
        assert set(entry["metrics"]) == expected_metrics
        assert entry["drift_score"] == pytest.approx(1 - entry["metrics"]["iou"])
        assert entry["severity"] in ("low", "moderate", "high")
        # a head-scale dominated drift keeps its severity but is not flagged (engine/report.py docstring)
        assert entry["flagged"] == (entry["severity"] == "high" and HEAD_SCALE_FLAG not in entry["flags"])
        assert entry["metrics"]["iou_k"]["20"] == entry["metrics"]["iou"]
    diagnostics = d["methods"]["gradcampp"]["diagnostics"]
    assert set(diagnostics["eps_fraction"]) == set(diagnostics["saturation"]) == {"transfer", "finetuned"}
    control = diagnostics["head_scale_control"]
    assert set(control) == {
        "norm",
        "norm_ratio",
        "iou",
        "iou_k",
        "drift_score",
        "real_drift_score",
        "head_scale_explained",
        "residual_drift_score",
        "dominated",
    }
    assert control["norm"] == "frobenius" and control["drift_score"] == pytest.approx(1 - control["iou"])
    assert control["real_drift_score"] == d["methods"]["gradcampp"]["drift_score"]
    assert control["iou_k"]["20"] == control["iou"]
    assert (HEAD_SCALE_FLAG in d["methods"]["gradcampp"]["flags"]) == control["dominated"]
    assert not {"saturation", "head_scale_control", "eps_fraction"} & set(
        d["methods"]["layercam"]["diagnostics"]
    )
    assert d["thresholds"]["calibrated"] is False and d["thresholds"]["chance"] == pytest.approx(
        chance_drift(20)
    )
    for entry in d["methods"].values():  # uncalibrated: a noise floor of 0, no percentile
        assert entry["drift_index"] == pytest.approx(
            drift_index(entry["drift_score"], noise_floor=0.0, chance=chance_drift(20))
        )
        assert (
            entry["severity"] == severity_of_index(entry["drift_index"])
            and entry["reference_percentile"] is None
        )
    assert set(d["timings_ms"]) == {"preprocess", "forward", "cams", "metrics"}


def test_fast_report_equals_pytorch_grad_cam_report(pair_dir: Path, pair: ModelPair) -> None:
    """End-to-end parity: ONNX + closed-form CAMs vs torch + pytorch-grad-cam give the same report."""
    torch_pair = ModelPair.load(pair_dir, backend="torch")
    gray = _grays(1, seed=3)[0]
    fast_report = drift_report(pair, gray, include_maps=True)
    slow_report = drift_report(torch_pair, gray, attribution="reference", include_maps=True)
    assert fast_report.maps is not None and slow_report.maps is not None
    for method in METHODS:
        for name in ("transfer", "finetuned"):  # the displayed maps are the library's, to 1e-3
            diff = np.abs(fast_report.maps[method][name] - slow_report.maps[method][name]).max()
            assert diff <= 1e-3, (method, name, diff)
    fast, slow = fast_report.to_dict(), slow_report.to_dict()
    assert fast["target_class"] == slow["target_class"]
    assert fast["agreement"] == slow["agreement"]
    for method in METHODS:
        a, b = fast["methods"][method]["metrics"], slow["methods"][method]["metrics"]
        for key in a:
            # concentration is measured on the raw maps, which only the closed form has (the library
            # returns min-max normalized maps): entropy and Gini are not comparable across the two paths
            if key not in ("iou_k", "entropy_change", "gini_change"):
                assert a[key] == pytest.approx(b[key], abs=2e-3), (method, key)
    # the head-scale control: closed form on the transfer features vs the library on a rescaled head
    fast_control = fast["methods"]["gradcampp"]["diagnostics"]["head_scale_control"]
    slow_control = slow["methods"]["gradcampp"]["diagnostics"]["head_scale_control"]
    for key in ("norm_ratio", "iou", "drift_score", "residual_drift_score"):
        assert fast_control[key] == pytest.approx(slow_control[key], abs=2e-3), key
    assert fast_control["dominated"] == slow_control["dominated"]


def test_requested_target_class_by_name_and_index(pair: ModelPair) -> None:
    gray = _grays(1)[0]
    by_name = drift_report(pair, gray, target_class="nodules")
    by_index = drift_report(pair, gray, target_class=2)
    assert by_name.target_class == {"index": 2, "name": "nodules", "source": "requested"}
    assert by_name.methods["layercam"]["metrics"] == by_index.methods["layercam"]["metrics"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (5, r"target class index 5 is out of range; valid classes: 0=normal, 1=consolidation, 2=nodules"),
        ("effusion", r"unknown target class 'effusion'; valid classes: 0=normal"),
        (True, r"must be a class index or name"),
    ],
)
def test_bad_target_class_lists_valid_classes(pair: ModelPair, target: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        drift_report(pair, _grays(1)[0], target_class=target)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("gray", "message"),
    [
        (
            np.zeros((4, 5, 3), dtype=np.float32),
            r"expected a grayscale \(H, W\) array, got shape \(4, 5, 3\)",
        ),
        (np.full((10, 10), np.nan, dtype=np.float32), r"NaN"),
    ],
)
def test_malformed_image_raises(pair: ModelPair, gray: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        drift_report(pair, gray)


def test_unknown_method_and_bad_batch_shape(pair: ModelPair) -> None:
    with pytest.raises(ValueError, match="valid options: layercam, gradcampp"):
        drift_report(pair, _grays(1)[0], methods=("gradcam",))
    with pytest.raises(ValueError, match=r"batch must have shape \(B, 3, 96, 96\), got \(1, 3, 64, 64\)"):
        pair.forward(np.zeros((1, 3, 64, 64), dtype=np.float32))


def test_batched_reports_equal_single_reports_and_maps(pair: ModelPair) -> None:
    grays = _grays(3, seed=5)
    batched = drift_reports(pair, grays, include_maps=True)
    for gray, report in zip(grays, batched, strict=True):
        single = drift_report(pair, gray)
        for method in METHODS:
            a, b = report.methods[method]["metrics"], single.methods[method]["metrics"]
            assert a["iou"] == pytest.approx(b["iou"], abs=1e-9)
            assert a["emd"] == pytest.approx(b["emd"], abs=1e-6)
        assert report.maps is not None
        for method in METHODS:
            for name in ("transfer", "finetuned"):
                cam = report.maps[method][name]
                assert cam.shape == (SIZE, SIZE) and cam.dtype == np.float32
                assert cam.min() >= 0.0 and cam.max() <= 1.0


def test_batched_reports_do_not_share_mutable_blocks(pair: ModelPair) -> None:
    first, second = drift_reports(pair, _grays(2, seed=6))
    first.thresholds["bands"]["high"] = 0.0  # e.g. a caller annotating one report
    assert second.thresholds["bands"]["high"] == pytest.approx(2 / 3)


def test_flags_tell_an_all_zero_map_from_a_flat_one() -> None:
    flat = np.ones((2, 4, 3, 3))  # spatially constant features: a constant, non-zero raw map
    flat[1] = 0.0  # no mass at all
    weight = np.ones((2, 4))
    res = closed_form_cams(flat, weight, [0, 0], method="gradcampp", input_size=12)
    healthy = closed_form_cams(
        np.arange(36.0).reshape(1, 4, 3, 3).repeat(2, 0), weight, [0, 0], method="gradcampp", input_size=12
    )
    t = UNCALIBRATED
    assert _method_entry(res, healthy, 0, 20.0, t, class_name="a")["flags"] == ["transfer_map_constant"]
    assert _method_entry(res, healthy, 1, 20.0, t, class_name="a")["flags"] == ["transfer_map_all_zero"]
    assert _method_entry(healthy, res, 0, 20.0, t, class_name="a")["flags"] == ["finetuned_map_constant"]
    assert _method_entry(healthy, healthy, 0, 20.0, t, class_name="a")["flags"] == []


def _two_channel_case(moved: bool) -> tuple[Any, Any, Any]:
    """Hand-built GradCAM++ maps where a head x10 swaps the dominant channel (tests/engine/test_cams.py
    test_head_scale_moves_gradcampp_but_never_layercam): transfer, fine-tuned and the head-scale control.
    ``moved``: the fine-tuned features also move the second channel to the bottom left (evidence moved)."""
    feats = np.zeros((1, 2, 4, 4))
    feats[0, 0, :2, :2] = 1.0
    feats[0, 1, 2:, 2:] = 20.0
    weight = np.array([[16e-3, 3.2e-3], [1e-3, 1e-3]])
    ft_feats = feats.copy()
    if moved:
        ft_feats[0, 1] = 0.0
        ft_feats[0, 1, 2:, :2] = 20.0
    transfer = closed_form_cams(feats, weight, [0], method="gradcampp", input_size=16)
    finetuned = closed_form_cams(ft_feats, 10.0 * weight, [0], method="gradcampp", input_size=16)
    control = head_scale_control(feats, weight, 10.0 * weight, [0], input_size=16)
    return transfer, finetuned, control


def test_high_drift_from_head_scale_alone_keeps_severity_but_is_not_flagged() -> None:
    transfer, finetuned, control = _two_channel_case(moved=False)
    t = UNCALIBRATED
    before = _method_entry(
        transfer, finetuned, 0, 20.0, t, class_name="a"
    )  # without the control: the plain drift score
    after = _method_entry(transfer, finetuned, 0, 20.0, t, class_name="a", control=control, norm_ratio=10.0)
    assert before["drift_score"] == after["drift_score"] == 1.0  # disjoint top regions
    assert before["severity"] == after["severity"] == "high"
    assert before["flagged"] and HEAD_SCALE_FLAG not in before["flags"]
    assert not after["flagged"] and HEAD_SCALE_FLAG in after["flags"]
    block = after["diagnostics"]["head_scale_control"]
    assert block["norm_ratio"] == 10.0 and block["drift_score"] == 1.0 and block["real_drift_score"] == 1.0
    assert (
        block["head_scale_explained"] == 1.0 and block["residual_drift_score"] == 0.0 and block["dominated"]
    )


def test_drift_beyond_head_scale_stays_flagged() -> None:
    """Head x10 *and* moved evidence: the rescale alone moves the map as far (explained = 1), but elsewhere
    than the fine-tuned map went, so the residual is high and the entry stays flagged."""
    transfer, finetuned, control = _two_channel_case(moved=True)
    entry = _method_entry(
        transfer, finetuned, 0, 20.0, UNCALIBRATED, class_name="a", control=control, norm_ratio=10.0
    )
    block = entry["diagnostics"]["head_scale_control"]
    assert block["head_scale_explained"] == 1.0 >= HEAD_SCALE_EXPLAINED
    assert block["residual_drift_score"] == 1.0 and not block["dominated"]
    assert entry["severity"] == "high" and entry["flagged"] and HEAD_SCALE_FLAG not in entry["flags"]
    # no real drift at all: the ratio is undefined, never "dominated"
    still = _method_entry(
        transfer, transfer, 0, 20.0, UNCALIBRATED, class_name="a", control=transfer, norm_ratio=1.0
    )
    assert still["diagnostics"]["head_scale_control"]["head_scale_explained"] is None
    assert HEAD_SCALE_FLAG not in still["flags"] and not still["flagged"]


@pytest.fixture(scope="module", params=list_archs())
def head_x2_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelPair:
    """The test pair's transfer checkpoint and a copy whose head (weight and bias) is x2, at a 3x3 grid."""
    arch = str(request.param)
    out = export_head_scaled_pair(arch, tmp_path_factory.mktemp("headx2") / arch, scale=2.0)
    return ModelPair.load(out, threads=1)


def test_head_x2_is_not_reported_as_drift(head_x2_pair: ModelPair) -> None:
    """Same features, head x2: LayerCAM does not move at all; GradCAM++ either does not drift or carries the
    head-scale flag and is not flagged (the issue: GradCAM++ IoU 0.57 on inceptionv3 before)."""
    pair = head_x2_pair
    assert get_arch(pair.name).feature_grid(pair.input_size) >= 3 and pair.input_size == GRID3_SIZE[pair.name]
    for report in drift_reports(pair, _grays(4, seed=11)):
        assert report.agreement and report.predictions["transfer"]["index"] == report.target_class["index"]
        layercam = report.methods["layercam"]
        assert set(layercam["metrics"]["iou_k"].values()) == {1.0} and not layercam["flagged"]
        entry = report.methods["gradcampp"]
        block = entry["diagnostics"]["head_scale_control"]
        assert block["norm_ratio"] == pytest.approx(2.0, rel=1e-6)
        assert block["residual_drift_score"] <= 0.01  # the control is the fine-tuned map
        drifted = entry["metrics"]["iou"] < 0.95
        assert not drifted or (HEAD_SCALE_FLAG in entry["flags"] and not entry["flagged"]), entry


def test_a_fine_tune_like_pair_is_not_all_head_scale(tmp_path: Path) -> None:
    """make_pair moves every weight (head x3): on inceptionv3, whose GradCAM++ is saturated (S g ~ 20) and
    most sensitive to head scale, the control explains part of the drift, not all of it everywhere."""
    pair = ModelPair.load(
        export_small_pair("inceptionv3", tmp_path / "pair", input_size=GRID3_SIZE["inceptionv3"]), threads=1
    )
    reports = drift_reports(pair, _grays(8))
    entries = [r.methods["gradcampp"] for r in reports]
    blocks = [e["diagnostics"]["head_scale_control"] for e in entries]
    assert all(b["norm_ratio"] == pytest.approx(3.0, rel=0.01) for b in blocks)
    assert any(HEAD_SCALE_FLAG not in e["flags"] for e in entries)  # not raised everywhere
    assert any(not b["dominated"] and b["residual_drift_score"] >= 0.15 for b in blocks)  # real drift remains
    for entry in entries:  # the regime flags say what the diagnostics measured
        saturation = entry["diagnostics"]["saturation"]["transfer"]
        assert ("transfer_saturated" in entry["flags"]) == (saturation > SATURATED_PRODUCT)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topk_percent": 0.0}, r"topk_percent must be in \(0, 100\], got 0\.0"),
        ({"metric_size": 0}, r"metric_size must be an int >= 3.*got 0"),
    ],
)
def test_bad_report_options_fail_before_the_forward(
    pair: ModelPair, monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], message: str
) -> None:
    calls: list[np.ndarray] = []
    monkeypatch.setattr(pair, "forward", calls.append)
    with pytest.raises(ValueError, match=message):
        drift_report(pair, _grays(1)[0], **kwargs)
    assert calls == []


def test_files_outside_the_hash_list_or_pre_relu_features_are_refused(pair_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(pair_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    unhashed = {**manifest, "files": {k: v for k, v in manifest["files"].items() if k != "finetuned.onnx"}}
    write_manifest(copy, unhashed)  # sealed: the check under test is the hash list's coverage
    with pytest.raises(
        ArtifactError, match=r"finetuned\.onnx \(checkpoint 'finetuned'\) is not in the manifest's"
    ):
        ModelPair.load(copy)
    pre_relu = {**manifest, "features": {**manifest["features"], "post_relu": False}}
    write_manifest(copy, pre_relu)
    with pytest.raises(ArtifactError, match=r"features are not post-ReLU"):
        ModelPair.load(copy)


def test_tampered_or_missing_file_is_refused(pair_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(pair_dir, copy)
    with (copy / "finetuned.onnx").open("r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match=r"finetuned\.onnx does not match its manifest hash"):
        ModelPair.load(copy)
    (copy / "transfer.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"transfer\.safetensors is listed in the manifest but missing"):
        ModelPair.load(copy)
    with pytest.raises(ArtifactError, match="does not exist"):
        ModelPair.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown backend 'tf'; valid options: onnx, torch"):
        ModelPair.load(pair_dir, backend="tf")


def test_runtime_reads_manifest_and_head_weights(pair: ModelPair) -> None:
    assert pair.name == ARCH and pair.class_names == CLASSES and pair.input_size == SIZE
    assert pair.head_weights["transfer"].shape == (3, 2048)
    out = pair.forward(np.zeros((2, 3, SIZE, SIZE), dtype=np.float32))
    assert out["transfer"].logits.shape == (2, 3) and out["finetuned"].features.shape == (2, 2048, 3, 3)
    # logits are the head applied to the pooled features: the features are the CAM target
    pooled = out["finetuned"].features.mean(axis=(2, 3))
    bias = out["finetuned"].logits - pooled @ pair.head_weights["finetuned"].T
    assert np.ptp(bias, axis=0) == pytest.approx(np.zeros(3), abs=1e-3)


def test_calibration_is_what_the_report_uses(pair_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "pair"
    shutil.copytree(pair_dir, copy)
    pair = ModelPair.load(copy, threads=1)
    grays = _grays(6, seed=7)
    with pytest.raises(InputError, match=r"only 6 of 6 reference images are in subset 'all'.*at least 100"):
        calibrate(pair, grays, labels=[0] * 6, subset="all")
    with pytest.raises(InputError, match="needs a label per image"):
        calibrate(pair, grays, subset="both_correct", min_reference=1)
    reports = drift_reports(pair, grays)
    both = [
        i
        for i, r in enumerate(reports)
        if r.predictions["transfer"]["index"] == r.predictions["finetuned"]["index"] == 0
    ]
    if both:
        chosen = calibrate(pair, grays, labels=[0] * 6, batch_size=4, min_reference=1)
        assert chosen["subset"] == "both_correct" and chosen["n"] == len(both)
    calibration = calibrate(pair, grays, labels=[0] * 6, subset="all", batch_size=4, min_reference=6)
    assert (
        calibration["version"] == 2
        and calibration["n"] == 6
        and calibration["chance"] == pytest.approx(chance_drift(20))
    )
    for method in ("layercam", "gradcampp"):
        block = calibration["methods"][method]
        assert block["reference"] == sorted(r.methods[method]["drift_score"] for r in reports)
        assert block["noise"]["n"] == 3 * 6 and 0.0 <= block["noise_floor"] <= 1.0
        assert block["classes"] == {}  # no class reaches MIN_CLASS_REFERENCE
    write_calibration(copy, calibration)
    reloaded = ModelPair.load(copy)  # write_calibration re-sealed the manifest: it still verifies
    report = drift_report(reloaded, grays[0])
    assert report.thresholds["calibrated"] is True and report.thresholds["subset"] == "all"
    for method, entry in report.methods.items():
        block = calibration["methods"][method]
        expected_index = drift_index(
            entry["drift_score"], noise_floor=block["noise_floor"], chance=chance_drift(20)
        )
        assert entry["drift_index"] == pytest.approx(expected_index)
        assert entry["severity"] == severity_of_index(expected_index)
        expected_pct = stats.percentileofscore(block["reference"], entry["drift_score"], kind="weak")
        assert entry["reference_percentile"] == pytest.approx(expected_pct)
        assert entry["diagnostics"]["reference"] == "pooled"
        assert entry["flagged"] == (entry["severity"] == "high" and HEAD_SCALE_FLAG not in entry["flags"])


def test_overlay_png_is_a_png_of_the_radiograph_size() -> None:
    gray = _grays(1)[0]
    cam = np.zeros((12, 12), dtype=np.float32)
    cam[2:5, 3:6] = 1.0
    data = overlay_png(gray, cam)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (100, 120) and image.mode == "RGB"
    pixels = np.asarray(image).astype(int)
    hot = pixels[int(3.5 * 10), int(4.5 * 100 / 12)]
    cold = pixels[110, 90]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # red where the map is high, blue where it is low
    with pytest.raises(ValueError, match="alpha must be in"):
        overlay_png(gray, cam, alpha=2.0)


class _Relabelled:
    """The same pair with the fine-tuned checkpoint's outputs relabelled (logit columns and head rows rolled by
    one class): still a consistent network, but it now disagrees with the transfer checkpoint."""

    def __init__(self, pair: ModelPair) -> None:
        self._pair = pair
        self.head_weights = {
            **pair.head_weights,
            "finetuned": np.roll(pair.head_weights["finetuned"], 1, axis=0),
        }

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pair, name)

    def forward(self, batch: np.ndarray) -> dict[str, Any]:
        out = dict(self._pair.forward(batch))
        finetuned = out["finetuned"]
        out["finetuned"] = type(finetuned)(
            logits=np.roll(finetuned.logits, 1, axis=1), features=finetuned.features
        )
        return out


def test_disagreeing_checkpoints_also_compare_their_own_predictions(pair: ModelPair) -> None:
    """Where the checkpoints predict different classes, each method also compares each checkpoint's map of
    its own prediction (computed here from the forward outputs with the closed form); elsewhere nothing."""
    grays = _grays(12, seed=11)
    pair = _Relabelled(pair)  # type: ignore[assignment]
    reports = drift_reports(pair, grays, include_maps=True)
    batch = preprocess_batch(grays, input_size=pair.input_size, mean=pair.mean, std=pair.std)
    outputs = pair.forward(batch)
    for i, report in enumerate(reports):
        for method, entry in report.methods.items():
            own = entry["own_prediction"]
            assert (own is None) == report.agreement
            if own is None:
                continue
            maps = [
                closed_form_cams(
                    outputs[name].features[i : i + 1],
                    pair.head_weights[name],
                    [report.predictions[name]["index"]],
                    method=method,
                    input_size=64,
                ).maps[0]
                for name in ("transfer", "finetuned")
            ]
            assert own["iou"] == pytest.approx(topk_iou(maps[0], maps[1], percent=20.0), abs=1e-6)
            assert report.maps is not None and set(report.maps[method]) == {
                "transfer",
                "finetuned",
                "transfer_own",
                "finetuned_own",
            }
            shown = report.maps[method]["transfer_own"]
            assert shown.shape == (pair.input_size, pair.input_size) and 0 <= shown.min() <= shown.max() <= 1
            assert own["drift_score"] == pytest.approx(1 - own["iou"], abs=1e-9)
    assert any(not r.agreement for r in reports), "the test pair must disagree on some image"


def test_calibration_never_reseals_an_edited_manifest(pair_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(pair_dir, copy)
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["class_names"][:2] = manifest["class_names"][1::-1]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"edited after it was sealed"):
        write_calibration(copy, {"version": 2, "methods": {}})
    assert json.loads(path.read_text()) == manifest
    with pytest.raises(ArtifactError, match=r"edited after it was sealed"):
        ModelPair.load(copy)
