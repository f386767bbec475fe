"""Architecture registry: every classifier the project can train, with what inference needs to know about it.

A spec carries its preprocessing (native input size, normalization) and the name of the CAM target layer, so
that inference and attribution cannot drift from training (the idea of timm's ``PretrainedCfg`` and
torchvision's ``Weights``). This module does not import torch: ``training.models.build_model`` builds the networks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from core.errors import InputError

__all__ = ["ArchSpec", "get_arch", "list_archs", "register_arch"]


@dataclass(frozen=True)
class ArchSpec:
    """What the project knows about one architecture.

    ``target_layer`` names a module of ``training.models.CxrClassifier`` whose output is the activation
    the CAMs are computed on. It is ``feature_act``: a non-inplace ReLU applied after the backbone's last
    block. The backbones below already end in a ReLU, so this leaves values unchanged, but it makes the
    target tensor post-ReLU *by construction* on every device (docs/DESIGN.md trap 1) and puts nothing but
    "global average pool -> dropout -> linear" between the target and the logits, which the closed-form CAMs
    rely on.
    """

    name: str
    timm_name: str
    native_input_size: int
    min_input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    description: str
    target_layer: str = "feature_act"
    features_post_relu: bool = True
    default_drop_rate: float = 0.2
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def feature_grid(self, input_size: int) -> int:
        """Side of the target-layer feature map for a square input of ``input_size`` pixels."""
        return _grid_fn[self.name](input_size)

    def check_input_size(self, input_size: int) -> None:
        if input_size < self.min_input_size:
            raise InputError(
                f"{self.name} needs an input of at least {self.min_input_size} px, got {input_size} px "
                f"(native size {self.native_input_size})"
            )


_REGISTRY: dict[str, ArchSpec] = {}
_ALIASES: dict[str, str] = {}
_grid_fn: dict[str, Callable[[int], int]] = {}


def register_arch(spec: ArchSpec, grid: Callable[[int], int]) -> ArchSpec:
    """Add ``spec`` to the registry; a name or alias that is already taken is an error, not an override."""
    for key in (spec.name, *spec.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise ValueError(f"architecture name {key!r} is already registered")
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    _grid_fn[spec.name] = grid
    return spec


def list_archs() -> list[str]:
    return sorted(_REGISTRY)


def get_arch(name: str) -> ArchSpec:
    key = _ALIASES.get(name, name)
    try:
        return _REGISTRY[key]
    except KeyError:
        raise InputError(f"unknown architecture {name!r}; valid options: {', '.join(list_archs())}") from None


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _densenet_grid(s: int) -> int:
    # stem conv 7/2 p3, maxpool 3/2 p1, then three transitions each avg-pooling 2/2
    s = _conv_out(_conv_out(s, 7, 2, 3), 3, 2, 1)
    for _ in range(3):
        s //= 2
    return s


def _resnetv2_grid(s: int) -> int:
    # stem conv 7/2 p3, maxpool 3/2 p1, then stages 2..4 with a stride-2 3x3 conv (pad 1)
    s = _conv_out(_conv_out(s, 7, 2, 3), 3, 2, 1)
    for _ in range(3):
        s = _conv_out(s, 3, 2, 1)
    return s


def _inception_grid(s: int) -> int:
    s = _conv_out(s, 3, 2, 0)  # Conv2d_1a_3x3
    s = _conv_out(s, 3, 1, 0)  # Conv2d_2a_3x3
    s = _conv_out(s, 3, 2, 0)  # Pool1
    s = _conv_out(s, 3, 1, 0)  # Conv2d_4a_3x3
    s = _conv_out(s, 3, 2, 0)  # Pool2
    s = _conv_out(s, 3, 2, 0)  # Mixed_6a
    return _conv_out(s, 3, 2, 0)  # Mixed_7a


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

register_arch(
    ArchSpec(
        name="densenet201",
        timm_name="densenet201",
        native_input_size=224,
        min_input_size=32,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_features=1920,
        description="DenseNet-201 (timm, torchvision ImageNet weights); target = ReLU(norm5) features",
    ),
    _densenet_grid,
)
register_arch(
    ArchSpec(
        name="resnet50v2",
        timm_name="resnetv2_50",
        native_input_size=224,
        min_input_size=32,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        num_features=2048,
        description="ResNet-50 v2, pre-activation (timm resnetv2_50); target = ReLU(final norm) features",
        aliases=("resnetv2_50",),
    ),
    _resnetv2_grid,
)
register_arch(
    ArchSpec(
        name="inceptionv3",
        timm_name="inception_v3",
        native_input_size=299,
        min_input_size=75,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        num_features=2048,
        description="Inception-v3 (timm, torchvision ImageNet weights); target = Mixed_7c output",
        aliases=("inception_v3",),
    ),
    _inception_grid,
)
