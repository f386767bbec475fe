"""One definition of the analysis subsets, for calibration and the study."""

from __future__ import annotations

import pytest

from engine.subsets import SUBSETS, in_subset, resolve_subset


@pytest.mark.parametrize(
    ("transfer", "finetuned", "expected"),
    [
        (1, 1, (True, True, True)),
        (0, 1, (False, True, True)),
        (1, 0, (False, False, True)),
        (0, 0, (False, False, True)),
    ],
)
def test_membership(transfer: int, finetuned: int, expected: tuple[bool, bool, bool]) -> None:
    got = tuple(in_subset(s, label=1, transfer=transfer, finetuned=finetuned) for s in SUBSETS)
    assert got == expected
    assert in_subset("true_positive", label=1, transfer=transfer, finetuned=finetuned) == expected[1]


def test_names_and_errors() -> None:
    assert resolve_subset("true_positive") == "finetuned_correct"
    with pytest.raises(
        ValueError, match="valid options: both_correct, finetuned_correct, all, true_positive"
    ):
        resolve_subset("tp")
    with pytest.raises(ValueError, match="needs the image's label"):
        in_subset("both_correct", label=None, transfer=0, finetuned=0)
    assert in_subset("all", label=None, transfer=0, finetuned=1)
