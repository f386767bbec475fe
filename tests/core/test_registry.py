"""Registry-parametrized model tests: every registered architecture gets them without anyone writing a new test."""

from __future__ import annotations

import pytest
import timm
import torch

from core.registry import ArchSpec, get_arch, list_archs, register_arch
from training.models import CxrClassifier, LogitsAndFeatures, build_model

ARCHS = list_archs()
# small inputs keep the suite fast on 2 cores; each stays above the architecture's minimum
SMALL = {"densenet201": 64, "resnet50v2": 64, "inceptionv3": 96}


def test_registry_lists_the_paper_architectures() -> None:
    assert ARCHS == ["densenet201", "inceptionv3", "resnet50v2"]


def test_unknown_architecture_lists_valid_options() -> None:
    with pytest.raises(
        ValueError, match=r"unknown architecture 'vgg16'.*densenet201, inceptionv3, resnet50v2"
    ):
        get_arch("vgg16")


def test_aliases_resolve() -> None:
    assert get_arch("resnetv2_50").name == "resnet50v2"
    assert get_arch("inception_v3").name == "inceptionv3"


def test_duplicate_registration_fails_loudly() -> None:
    spec = get_arch("densenet201")
    with pytest.raises(ValueError, match="already registered"):
        register_arch(spec, lambda s: s)
    clash = ArchSpec(**{**spec.__dict__, "name": "other", "aliases": ("resnetv2_50",)})
    with pytest.raises(ValueError, match="'resnetv2_50' is already registered"):
        register_arch(clash, lambda s: s)


@pytest.mark.parametrize("name", ARCHS)
def test_preprocessing_matches_timm_defaults(name: str) -> None:
    spec = get_arch(name)
    cfg = timm.models.get_pretrained_cfg(spec.timm_name)
    assert cfg is not None
    assert tuple(cfg.mean) == pytest.approx(spec.mean)
    assert tuple(cfg.std) == pytest.approx(spec.std)
    assert cfg.input_size[-1] == spec.native_input_size


@pytest.mark.parametrize("name", ARCHS)
def test_forward_shapes_and_target_layer(name: str) -> None:
    torch.manual_seed(0)
    spec = get_arch(name)
    size = SMALL[name]
    model = build_model(name, num_classes=5).eval()
    assert isinstance(model, CxrClassifier)
    assert isinstance(model.get_submodule(spec.target_layer), torch.nn.ReLU)
    assert not model.get_submodule(spec.target_layer).inplace
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, feats = LogitsAndFeatures(model)(x)
    grid = spec.feature_grid(size)
    assert logits.shape == (2, 5)
    assert feats.shape == (2, spec.num_features, grid, grid)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
    assert feats.min() >= 0, "target features must be post-ReLU"
    assert model.classifier_weight().shape == (5, spec.num_features)
    # nothing but avgpool -> linear between target and logits (eval: dropout is identity)
    expected = feats.mean(dim=(2, 3)) @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ARCHS)
def test_native_feature_grid(name: str) -> None:
    spec = get_arch(name)
    assert (
        spec.feature_grid(spec.native_input_size)
        == {"densenet201": 7, "resnet50v2": 7, "inceptionv3": 8}[name]
    )


@pytest.mark.parametrize("name", ARCHS)
def test_stage1_freezes_backbone_params_and_batchnorm(name: str) -> None:
    torch.manual_seed(0)
    size = SMALL[name]
    model = build_model(name, num_classes=3)
    model.freeze_backbone(True)
    model.train()
    assert not model.backbone.training and model.head.training
    bn_before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    logits = model(torch.randn(2, 3, size, size))
    logits.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    for k, v in model.backbone.state_dict().items():
        if k in bn_before:
            torch.testing.assert_close(v, bn_before[k], msg=f"BatchNorm statistic {k} moved in stage 1")


@pytest.mark.parametrize("name", ARCHS)
def test_stage2_trains_everything(name: str) -> None:
    torch.manual_seed(0)
    size = SMALL[name]
    model = build_model(name, num_classes=3)
    model.freeze_backbone(True)
    model.freeze_backbone(False)
    model.train()
    assert model.backbone.training
    model(torch.randn(2, 3, size, size)).sum().backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:5])
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_input_size_below_minimum_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="inceptionv3 needs an input of at least 75 px, got 64 px"):
        get_arch("inceptionv3").check_input_size(64)
