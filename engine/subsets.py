"""Which images an analysis uses: one definition for calibration and the study.

``both_correct`` is the primary subset: both checkpoints predict the label, so each map explains the class
its own checkpoint predicted and the comparison is not between a right and a wrong answer.
``finetuned_correct`` (the paper's "true positives") and ``all`` are sensitivity analyses.
"""

from __future__ import annotations

__all__ = ["SUBSETS", "SUBSET_ALIASES", "SUBSET_DEFINITIONS", "in_subset", "resolve_subset"]

SUBSETS: tuple[str, ...] = ("both_correct", "finetuned_correct", "all")
SUBSET_DEFINITIONS: dict[str, str] = {
    "both_correct": "both checkpoints predict the label (primary)",
    "finetuned_correct": "the fine-tuned checkpoint predicts the label (the paper's true positives; sensitivity)",
    "all": "every image (sensitivity)",
}
# The study's name for the paper's subset, kept for its command line.
SUBSET_ALIASES: dict[str, str] = {"true_positive": "finetuned_correct"}


def resolve_subset(name: str) -> str:
    """The subset's canonical name; an unknown one is a ``ValueError`` listing the valid ones."""
    canonical = SUBSET_ALIASES.get(name, name)
    if canonical not in SUBSETS:
        valid = ", ".join([*SUBSETS, *SUBSET_ALIASES])
        raise ValueError(f"unknown subset {name!r}; valid options: {valid}")
    return canonical


def in_subset(subset: str, *, label: int | None, transfer: int, finetuned: int) -> bool:
    """Whether an image with ``label`` and the two checkpoints' predicted indices belongs to ``subset``."""
    canonical = resolve_subset(subset)
    if canonical == "all":
        return True
    if label is None:
        raise ValueError(f"subset {subset!r} needs the image's label")
    if canonical == "finetuned_correct":
        return finetuned == label
    return finetuned == label and transfer == label
