"""The torch side of a dataset: :class:`ImageDataset` turns a :class:`core.dataset.DatasetIndex` into tensors.

Images are decoded by :func:`core.imageio.read_image` and preprocessed by :func:`core.preprocess.preprocess`,
the exact path the service takes at inference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from core.dataset import DatasetError, DatasetIndex, Sample
from core.imageio import ImageDecodeError, read_image
from core.preprocess import preprocess

__all__ = ["ImageDataset"]


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """``(image, label)`` pairs: float32 (3, S, S) from ``preprocess(read_image(path))`` and the class index.

    ``cache`` keeps the preprocessed arrays in memory (per process: with DataLoader workers each fills its
    own, unless :meth:`preload` ran before they were started). ``augment`` applies a light random
    augmentation on top (affine: rotation +-5 deg, scale 0.95..1.05, shift +-3 %; brightness +-0.05 and
    contrast 0.9..1.1 on the [0, 1] gray values), drawn from torch's global RNG, which DataLoader seeds per
    worker; the cache always holds the unaugmented arrays.
    """

    def __init__(
        self,
        samples: Sequence[Sample] | DatasetIndex,
        *,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        cache: bool = True,
        max_pixels: int | None = None,
    ) -> None:
        self.samples = list(samples.samples if isinstance(samples, DatasetIndex) else samples)
        if not self.samples:
            raise ValueError("ImageDataset needs at least one sample, got none")
        self.input_size = int(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values, got {self.mean} and {self.std}")
        self.augment = augment
        self.cache = cache
        self.max_pixels = max_pixels
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [s.label for s in self.samples]

    def load_array(self, i: int) -> np.ndarray:
        """The preprocessed (unaugmented) float32 (3, S, S) array of sample ``i``."""
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        sample = self.samples[i]
        try:
            gray = read_image(sample.path, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            raise DatasetError(f"sample {i} ({str(sample.path)!r}): {exc.reason}") from exc
        array = preprocess(gray, input_size=self.input_size, mean=self.mean, std=self.std)
        if self.cache:
            self._cache[i] = array
        return array

    def preload(self, indices: Iterable[int] | None = None) -> None:
        """Fill the cache now (e.g. before DataLoader workers fork, so that they share it)."""
        if not self.cache:
            raise ValueError("preload needs cache=True")
        for i in range(len(self)) if indices is None else indices:
            self.load_array(i)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} samples")
        i %= len(self)
        tensor = torch.from_numpy(self.load_array(i).copy())
        if self.augment:
            tensor = self._augment(tensor)
        return tensor, self.samples[i].label

    def _augment(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=image.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=image.dtype)[:, None, None]
        gray = image[:1] * std[:1] + mean[:1]  # the three channels are copies of one gray image

        angle = math.radians(float(torch.empty(()).uniform_(-5.0, 5.0)))
        scale = float(torch.empty(()).uniform_(0.95, 1.05))
        shift = torch.empty(2).uniform_(-0.06, 0.06)  # in [-1, 1] grid units: +-3 % of the side
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos, -sin, float(shift[0])], [sin, cos, float(shift[1])]], dtype=image.dtype)
        grid = torch.nn.functional.affine_grid(theta[None], [1, 1, *gray.shape[-2:]], align_corners=False)
        warped = torch.nn.functional.grid_sample(
            gray[None], grid, mode="bilinear", padding_mode="border", align_corners=False
        )[0]

        contrast = float(torch.empty(()).uniform_(0.9, 1.1))
        brightness = float(torch.empty(()).uniform_(-0.05, 0.05))
        centre = warped.mean()
        adjusted = ((warped - centre) * contrast + centre + brightness).clamp(0.0, 1.0)
        return ((adjusted.expand(3, -1, -1) - mean) / std).contiguous()
