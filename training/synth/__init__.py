"""Synthetic PA chest radiographs with ground-truth lesion and lung masks (NumPy/SciPy only, no torch).

Each image is an analytic phantom rendered in radiograph convention (air dark, bone bright): a soft-tissue
thorax whose thickness falls off towards the skin, two air-filled lungs (apex, lateral wall, diaphragm dome,
costophrenic recess), heart and mediastinum, trachea, hilar vessels and lung markings, posterior and anterior
ribs, spine, clavicles, humeral heads and a gastric bubble. Attenuation ``A`` is summed along the beam and
mapped to brightness as ``I = 1 - exp(-k A)``, then windowed, gamma-corrected, blurred and given
signal-dependent noise. Pose (rotation, shift, scale), patient width, inspiration, heart size, exposure,
contrast, gamma, blur and noise vary per image.

Findings replace lung air by fluid, so they are bright and lie inside the lungs. The five findings, in the
order of the class names:

0. ``normal``: none (empty lesion mask);
1. ``lobar_consolidation``: a dense opacity filling one lobe of one lung, with a sharp fissural border and
   sometimes air bronchograms;
2. ``bilateral_lower_zone``: patchy opacities in the peripheral lower zones of both lungs;
3. ``diffuse_patchy``: ground-glass patches scattered through both lungs;
4. ``upper_zone_nodules``: 2-6 round nodules, some cavitated, in the upper zones.

Every image comes with a lung mask (the visible lung fields: lungs minus the heart shadow) and a lesion mask
(inside the lung mask; empty for ``normal``). Images are deterministic: the anatomy is drawn from
``default_rng([seed, index, 0])`` and the finding from ``default_rng([seed, index, 1])``, so the same index
has the same patient whatever its label, and a dataset is byte-identical for the same arguments whether it
is written by one process or many.

Dataset layout (``generate_dataset``)::

    OUT/<split>/<class>/<id>.png        8-bit grayscale
    OUT/masks/<id>_lesion.png           0/255
    OUT/masks/<id>_lungs.png            0/255
    OUT/manifest.csv                    path,label,split,lesion_mask,lung_mask,cue,lesion_fraction
    OUT/synth_config.json               the parameters

Paths in the manifest are relative to ``OUT``; ``cue`` is 0/1; ``lesion_fraction`` is
``|lesion mask| / |lung mask|`` (the share of the visible lung fields covered by the finding).
"""

from core.vocabulary import SPLITS
from training.synth.config import SynthConfig
from training.synth.dataset import (
    DEFAULT_CLASS_NAMES,
    GENERATOR_VERSION,
    MANIFEST_COLUMNS,
    generate_dataset,
    iter_manifest,
    parse_class_names,
    parse_split,
)
from training.synth.findings import FINDINGS
from training.synth.image import generate_image
from training.synth.sheet import contact_sheet

__all__ = [
    "DEFAULT_CLASS_NAMES",
    "FINDINGS",
    "GENERATOR_VERSION",
    "MANIFEST_COLUMNS",
    "SPLITS",
    "SynthConfig",
    "contact_sheet",
    "generate_dataset",
    "generate_image",
    "iter_manifest",
    "parse_class_names",
    "parse_split",
]
