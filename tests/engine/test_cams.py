"""Closed-form CAMs against pytorch-grad-cam on every registered architecture (the engine's basis)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from core.registry import get_arch, list_archs
from engine.cams import (
    METHODS,
    closed_form_cams,
    closed_form_cams_all_classes,
    gradcampp_raw,
    gradcampp_saturation,
    head_norm_ratio,
    head_scale_control,
    min_max,
)
from engine.reference import reference_cams, resolve_layers
from tests.pairs import GRID3_SIZE, calibrate_batchnorm
from training.models import CxrClassifier, LogitsAndFeatures, build_model

NUM_CLASSES = 4
PARITY_ATOL = 1e-3
# the smallest inputs whose feature grid is 3x3 (inceptionv3 needs >= 75 px and gives 1x1 below 107 px)
SIZES = GRID3_SIZE


def _features(model: CxrClassifier, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, feats = LogitsAndFeatures(model.eval())(x)
    return logits.numpy(), feats.numpy()


@pytest.fixture(scope="module", params=list_archs())
def model_pair(request: pytest.FixtureRequest) -> tuple[str, CxrClassifier, CxrClassifier]:
    """A random-init "transfer" model and a "fine-tuned" one with perturbed backbone and head.

    BatchNorm statistics are calibrated as training would: with timm's running_var = 1 the activations of a
    random Inception-v3 reach 1e11, every GradCAM++ denominator is S g^3 and neither eps nor the second
    min-max influences the map, so the parity check could not see errors in either.
    """
    name = request.param
    torch.manual_seed(0)
    transfer = build_model(name, NUM_CLASSES).eval()
    calibrate_batchnorm(transfer, size=SIZES[name])
    finetuned = copy.deepcopy(transfer)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in finetuned.backbone.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
        finetuned.head.weight.mul_(3.0).add_(0.01 * torch.randn(finetuned.head.weight.shape, generator=gen))
    return name, transfer, finetuned


@pytest.mark.parametrize("head_scale", [1.0, 1e-3, 100.0], ids=["head_x1", "small_head_eps", "large_head"])
def test_closed_form_matches_pytorch_grad_cam(
    model_pair: tuple[str, CxrClassifier, CxrClassifier], head_scale: float
) -> None:
    name, transfer, finetuned = model_pair
    size = SIZES[name]
    grid = get_arch(name).feature_grid(size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    classes = np.array([0, 3])
    # both checkpoints at the trained scale; the extreme head scales on the fine-tuned one only
    checkpoints = (
        (("transfer", transfer), ("finetuned", finetuned))
        if head_scale == 1.0
        else (("finetuned", finetuned),)
    )
    for label, base in checkpoints:
        model = base
        saved = model.head.weight.detach().clone()
        try:
            with torch.no_grad():
                model.head.weight.mul_(head_scale)
            _check_parity(name, label, model, x, classes, size, grid, head_scale, saved.numpy())
        finally:
            with torch.no_grad():
                model.head.weight.copy_(saved)


def _check_parity(
    name: str,
    label: str,
    model: CxrClassifier,
    x: torch.Tensor,
    classes: np.ndarray,
    size: int,
    grid: int,
    head_scale: float,
    trained_weight: np.ndarray,
) -> None:
    logits, feats = _features(model, x)
    assert feats.shape[2:] == (grid, grid)
    weight = model.head.weight.detach().numpy()
    for method in METHODS:
        fast = closed_form_cams(feats, weight, classes, method=method, input_size=size)
        ref = reference_cams(model, x, classes, method=method)
        assert fast.maps.shape == ref.maps.shape == (2, size, size)
        assert fast.native.shape == ref.native.shape == (2, grid, grid)
        diff = float(np.abs(fast.maps - ref.maps).max())
        assert diff <= PARITY_ATOL, f"{name} {label} {method} x{head_scale}: max abs diff {diff}"
        assert float(np.abs(fast.native - ref.native).max()) <= PARITY_ATOL
        np.testing.assert_allclose(ref.logits, logits, atol=1e-4)
        # the maps are real maps, not a trivially equal all-zero pair
        assert not fast.all_zero.any()
        assert np.allclose(fast.maps.max(axis=(1, 2)), 1.0, atol=1e-5)
        if method == "gradcampp":
            assert fast.eps_fraction is not None
            assert np.all((fast.eps_fraction >= 0) & (fast.eps_fraction <= 1))
            # eps makes up more of the denominator as head weights shrink (docs/DESIGN.md trap 2)
            trained = closed_form_cams(feats, trained_weight, classes, method=method, input_size=size)
            assert trained.eps_fraction is not None
            if head_scale < 1.0:
                assert np.all(fast.eps_fraction > trained.eps_fraction)
            if head_scale > 1.0:
                assert np.all(fast.eps_fraction < trained.eps_fraction)
                assert np.all(fast.eps_fraction < 0.01)  # LayerCAM-like regime
            if head_scale == 1.0 and label == "transfer":
                # the mixed regime, where eps, S_k and the factor 2 all shape the map, is really exercised
                assert np.all((fast.eps_fraction > 0.05) & (fast.eps_fraction < 0.95)), fast.eps_fraction


def test_gradcampp_formula_matches_library_weights() -> None:
    """The library's own weight function on spatially constant gradients is an oracle for ours."""
    from pytorch_grad_cam import GradCAMPlusPlus

    rng = np.random.default_rng(3)
    feats = np.maximum(rng.normal(size=(2, 16, 3, 3)), 0).astype(np.float32)
    grads = (rng.normal(size=(2, 16)) * 2e-3).astype(np.float32)
    full = np.broadcast_to(grads[:, :, None, None], feats.shape).copy()
    weights = GradCAMPlusPlus.get_cam_weights(None, None, None, None, feats, full)
    expected = np.maximum((weights[:, :, None, None] * feats).sum(axis=1), 0)
    ours, fraction = gradcampp_raw(feats, grads.astype(np.float64), eps=1e-6)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-9)
    assert fraction.shape == (2,) and np.all((fraction > 0) & (fraction < 1))


def test_head_scale_control_matches_pytorch_grad_cam_on_a_rescaled_head(
    model_pair: tuple[str, CxrClassifier, CxrClassifier],
) -> None:
    """The closed-form control (transfer features, transfer head scaled to the fine-tuned head's Frobenius
    norm) is the library's GradCAM++ on a copy of the transfer model whose head weight was rescaled."""
    name, transfer, finetuned = model_pair
    size = SIZES[name]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(9))
    classes = np.array([1, 2])
    w_t = transfer.head.weight.detach().numpy()
    w_f = finetuned.head.weight.detach().numpy()
    ratio = head_norm_ratio(w_t, w_f)
    assert ratio == pytest.approx(np.linalg.norm(w_f) / np.linalg.norm(w_t), rel=1e-6)
    assert 2.5 < ratio < 3.5  # the fixture's fine-tuned head is x3 plus noise
    _, feats = _features(transfer, x)
    control = head_scale_control(feats, w_t, w_f, classes, input_size=size)
    scaled = copy.deepcopy(transfer)
    with torch.no_grad():
        scaled.head.weight.mul_(ratio)
    ref = reference_cams(scaled, x, classes, method="gradcampp")
    assert float(np.abs(control.maps - ref.maps).max()) <= PARITY_ATOL
    assert float(np.abs(control.native - ref.native).max()) <= PARITY_ATOL
    assert not control.all_zero.any() and control.method == "gradcampp"
    # with an unchanged head norm the control is the transfer map itself
    same = head_scale_control(feats, w_t, w_t, classes, input_size=size)
    plain = closed_form_cams(feats, w_t, classes, method="gradcampp", input_size=size)
    np.testing.assert_array_equal(same.maps, plain.maps)


def test_saturation_matches_a_hand_computation() -> None:
    """median over channels with g > 0 of S_k g_k, on a 2x2 grid (g = W / 4), by hand."""
    feats = np.zeros((2, 4, 2, 2))
    feats[:, 0] = 1.0  # S_0 = 4
    feats[:, 1] = [[1.0, 2.0], [3.0, 4.0]]  # S_1 = 10
    feats[:, 2] = [[0.0, 0.0], [0.0, 2.0]]  # S_2 = 2
    feats[:, 3] = 5.0  # S_3 = 20, but its weight is negative for class 0: excluded
    weight = np.array(
        [
            [0.8, 0.4, 1.2, -1.0],  # g = 0.2, 0.1, 0.3, -0.25: S g = 0.8, 1.0, 0.6 -> median 0.8
            [0.8, -0.4, 1.2, -1.0],  # S g = 0.8, 0.6 -> median of two = 0.7
            [-1.0, -1.0, 0.0, -2.0],  # no channel with g > 0 -> 0.0, not NaN
        ]
    )
    for classes, expected in (([0, 1], [0.8, 0.7]), ([2, 0], [0.0, 0.8])):
        grads = weight[classes] / 4.0
        np.testing.assert_allclose(gradcampp_saturation(feats, grads), expected, rtol=1e-12)
        res = closed_form_cams(feats, weight, classes, method="gradcampp", input_size=8)
        assert res.saturation is not None
        np.testing.assert_allclose(res.saturation, expected, rtol=1e-12)
    assert closed_form_cams(feats, weight, [0, 1], method="layercam", input_size=8).saturation is None
    every = closed_form_cams_all_classes(feats, weight, method="gradcampp", input_size=8)
    assert every.saturation is not None and every.saturation.shape == (2, 3)
    np.testing.assert_allclose(every.saturation[0], [0.8, 0.7, 0.0], rtol=1e-12)


def test_head_norm_ratio_is_the_frobenius_norm_of_the_whole_head() -> None:
    rng = np.random.default_rng(10)
    w_t = rng.normal(size=(3, 8))
    w_f = rng.normal(size=(3, 8)) * 0.5
    expected = np.sqrt((w_f**2).sum()) / np.sqrt((w_t**2).sum())  # all classes, all channels
    assert head_norm_ratio(w_t, w_f) == pytest.approx(expected, rel=1e-12)
    assert head_norm_ratio(w_t, 2.0 * w_t) == pytest.approx(2.0, rel=1e-12)
    # not the target row's norm: scaling one class only changes the ratio by less than that scale
    one_row = w_t.copy()
    one_row[0] *= 4.0
    assert 1.0 < head_norm_ratio(w_t, one_row) < 4.0
    conv = w_t.reshape(3, 8, 1, 1)  # a 1x1-conv classifier (docs/DESIGN.md trap 5)
    assert head_norm_ratio(conv, 2.0 * conv) == pytest.approx(2.0, rel=1e-12)
    assert head_norm_ratio(np.zeros((3, 8)), w_f) == 1.0  # an all-zero transfer head maps to zero anyway
    with pytest.raises(ValueError, match="same shape"):
        head_norm_ratio(w_t, w_t[:2])
    with pytest.raises(ValueError, match="NaN or infinite"):
        head_norm_ratio(w_t, np.full((3, 8), np.nan))


def test_head_scale_moves_gradcampp_but_never_layercam() -> None:
    """Two channels, one with a large gradient (linear regime), one with a small gradient and larger
    activations (eps regime): scaling the head by 10 swaps which one dominates GradCAM++ (different top
    region), while LayerCAM, linear in ReLU(g), is unchanged."""
    feats = np.zeros((1, 2, 4, 4))
    feats[0, 0, :2, :2] = 1.0  # top left
    feats[0, 1, 2:, 2:] = 20.0  # bottom right
    # g = 1e-3 and 2e-4 on the 4x4 grid; by hand, weights x activations: 5.3e-3 vs 2.4e-3 at scale 1,
    # 0.078 vs 0.27 at scale 10
    weight = np.array([[16e-3, 3.2e-3]])
    maps = {
        (method, scale): closed_form_cams(feats, scale * weight, [0], method=method, input_size=16)
        for method in METHODS
        for scale in (1.0, 10.0)
    }
    np.testing.assert_allclose(maps[("layercam", 1.0)].maps, maps[("layercam", 10.0)].maps, atol=1e-6)
    before, after = maps[("gradcampp", 1.0)].native[0], maps[("gradcampp", 10.0)].native[0]
    assert before[:2, :2].min() > 0.99 and before[2:, 2:].max() < 0.5  # the top-left channel dominates
    assert after[2:, 2:].min() > 0.99 and after[:2, :2].max() < 0.5  # the bottom-right channel dominates
    control = head_scale_control(feats, weight, 10.0 * weight, [0], input_size=16)
    np.testing.assert_allclose(control.maps, maps[("gradcampp", 10.0)].maps, atol=1e-6)


def test_eps_is_configurable_and_changes_the_regime() -> None:
    rng = np.random.default_rng(4)
    feats = np.maximum(rng.normal(size=(1, 32, 4, 4)), 0)
    weight = rng.normal(size=(3, 32)) * 0.05
    small = closed_form_cams(feats, weight, [1], method="gradcampp", input_size=16, eps=1e-12)
    large = closed_form_cams(feats, weight, [1], method="gradcampp", input_size=16, eps=1e-2)
    assert small.eps_fraction is not None and large.eps_fraction is not None
    assert small.eps_fraction[0] < 1e-3 < 0.9 < large.eps_fraction[0]
    # with eps -> 0, GradCAM++ weights are h*w*g^2/(2g^2 + S g^3): a different map from the eps-dominated one
    assert float(np.abs(small.maps - large.maps).max()) > 1e-3


def test_all_zero_features_give_zero_maps_and_a_flag() -> None:
    feats = np.zeros((2, 8, 3, 3), dtype=np.float32)
    weight = np.ones((3, 8))
    for method in METHODS:
        res = closed_form_cams(feats, weight, [0, 1], method=method, input_size=12)
        assert res.all_zero.tolist() == [True, True]
        assert np.all(res.maps == 0) and np.isfinite(res.maps).all()
        if res.eps_fraction is not None:
            assert np.isfinite(res.eps_fraction).all()


def test_negative_class_weights_give_flagged_zero_map() -> None:
    feats = np.abs(np.random.default_rng(5).normal(size=(1, 8, 3, 3)))
    weight = -np.ones((2, 8))
    res = closed_form_cams(feats, weight, [0], method="layercam", input_size=9)
    assert res.all_zero[0] and np.all(res.maps == 0)


def test_all_classes_equals_per_class_and_accepts_conv_weight() -> None:
    rng = np.random.default_rng(6)
    feats = np.maximum(rng.normal(size=(2, 10, 4, 4)), 0).astype(np.float32)
    weight = rng.normal(size=(3, 10, 1, 1))  # a 1x1-conv classifier (docs/DESIGN.md trap 5)
    for method in METHODS:
        every = closed_form_cams_all_classes(feats, weight, method=method, input_size=20)
        assert every.maps.shape == (2, 3, 20, 20)
        for c in range(3):
            one = closed_form_cams(feats, weight, [c, c], method=method, input_size=20)
            np.testing.assert_array_equal(every.maps[:, c], one.maps)


def test_batched_maps_equal_single_image_maps_bit_for_bit() -> None:
    """A map must not depend on how many images share its batch (nor may a large batch fail: OpenCV 5 caps
    one resize call at 128 channels); per-map resizing is also exactly the library's call."""
    import cv2

    rng = np.random.default_rng(8)
    feats = np.maximum(rng.normal(size=(130, 16, 3, 3)), 0).astype(np.float32)
    weight = (rng.normal(size=(3, 16)) * 0.05).astype(np.float32)
    classes = np.arange(130) % 3
    for method in METHODS:
        batched = closed_form_cams(feats, weight, classes, method=method, input_size=(17, 23))
        assert batched.maps.shape == (130, 17, 23)
        for i in (0, 1, 129):
            single = closed_form_cams(
                feats[i : i + 1], weight, classes[i : i + 1], method=method, input_size=(17, 23)
            )
            np.testing.assert_array_equal(batched.maps[i], single.maps[0])
            resized = cv2.resize(batched.native[i], (23, 17))  # the library's call: dsize is (width, height)
            np.testing.assert_array_equal(batched.maps[i], min_max(resized[None])[0])


def test_min_max_matches_library_scaling() -> None:
    from pytorch_grad_cam.utils.image import scale_cam_image

    maps = np.random.default_rng(7).random((3, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(min_max(maps), scale_cam_image(maps), atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": [5]}, r"class index 5 out of range; valid indices are 0\.\.2"),
        ({"classes": [0, 1]}, r"must be 1 integer class indices"),
        ({"method": "gradcam"}, r"unknown CAM method 'gradcam'; valid options: layercam, gradcampp"),
        ({"weight": np.ones((3, 7))}, r"head weight must have shape \(C, 8\).*got \(3, 7\)"),
        ({"features": np.ones((8, 3, 3))}, r"shape \(B, K, h, w\), got shape \(8, 3, 3\)"),
        ({"features": np.full((1, 8, 3, 3), np.nan)}, r"NaN"),
        ({"features": np.full((1, 8, 3, 3), -0.5)}, r"post-ReLU \(non-negative\), got minimum -0\.5"),
        ({"eps": -1e-6}, r"eps must be a finite number >= 0, got -1e-06"),
        ({"input_size": 0}, r"input_size must be a positive int or \(height, width\), got 0"),
    ],
)
def test_malformed_inputs_raise_clear_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "features": np.ones((1, 8, 3, 3)),
        "weight": np.ones((3, 8)),
        "classes": [0],
        "method": "gradcampp",
        "eps": 1e-6,
        "input_size": 12,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        closed_form_cams(
            args["features"],  # type: ignore[arg-type]
            args["weight"],  # type: ignore[arg-type]
            args["classes"],  # type: ignore[arg-type]
            method=str(args["method"]),
            input_size=args["input_size"],  # type: ignore[arg-type]
            eps=args["eps"],  # type: ignore[arg-type]
        )


def test_reference_rejects_unknown_layer_and_class(
    model_pair: tuple[str, CxrClassifier, CxrClassifier],
) -> None:
    _, transfer, _ = model_pair
    with pytest.raises(ValueError, match="target layer 'nope' is not a module"):
        resolve_layers(transfer, "nope")
    x = torch.zeros(1, 3, 96, 96)
    with pytest.raises(ValueError, match=r"out of range; valid indices are 0\.\.3"):
        reference_cams(transfer, x, [7], method="layercam")
    # NumPy float64 input is cast to the model's dtype instead of failing inside torch
    ref = reference_cams(transfer, np.zeros((1, 3, 96, 96)), [1], method="layercam")
    assert ref.maps.shape == (1, 96, 96) and ref.maps.dtype == np.float32
