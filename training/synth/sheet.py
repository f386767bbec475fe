"""A contact sheet of synthetic radiographs: one row per class, a few examples and the masks overlaid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from training.synth.config import SynthConfig
from training.synth.dataset import parse_class_names
from training.synth.image import generate_image

__all__ = ["contact_sheet"]


def contact_sheet(
    *,
    seed: int = 0,
    size: int = 160,
    per_class: int = 4,
    class_names: Sequence[str] | None = None,
    overlay: bool = True,
    config: SynthConfig | None = None,
) -> Image.Image:
    """A grid of examples: one row per class, ``per_class`` images, then the masks of the first one overlaid
    (lesion red, lung outline green). The first image of the normal row carries the corner cue."""
    names = parse_class_names(class_names)
    columns = per_class + (1 if overlay else 0)
    label_h = 14
    sheet = Image.new("RGB", (columns * size, len(names) * (size + label_h)), "black")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(names):
        top = row * (size + label_h)
        draw.text((4, top + 1), name, fill="white")
        for col in range(per_class):
            index = row * per_class + col
            image, lesion, lungs = generate_image(
                index, seed=seed, label=row, size=size, cue=(row == 0 and col == 0), config=config
            )
            sheet.paste(Image.fromarray(image).convert("RGB"), (col * size, top + label_h))
            if overlay and col == 0:
                rgb = np.repeat(image[:, :, None], 3, axis=2)
                rgb[lesion] = (0.5 * rgb[lesion] + [127, 0, 0]).astype(np.uint8)
                edge = lungs & ~ndimage.binary_erosion(lungs)
                rgb[edge] = (0, 255, 0)
                sheet.paste(Image.fromarray(rgb), (per_class * size, top + label_h))
        if overlay:
            draw.text((per_class * size + 4, top + 1), "masks", fill="white")
    return sheet
