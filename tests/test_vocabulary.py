"""The vocabulary is defined once (core.vocabulary); where a type must spell it out, it must agree."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

from core import vocabulary
from service.app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_settings_backend_literal_is_the_backends() -> None:
    assert get_args(Settings.model_fields["backend"].annotation) == vocabulary.BACKENDS


def test_settings_keep_maps_literal_is_the_vocabulary() -> None:
    assert get_args(Settings.model_fields["keep_maps"].annotation) == vocabulary.KEEP_MAPS


def test_no_package_spells_out_a_vocabulary_tuple() -> None:
    """A literal tuple or list equal to one of the vocabulary's tuples, outside core/vocabulary.py, is a copy."""
    vocab = {
        tuple(value)
        for name, value in vars(vocabulary).items()
        if name.isupper() and isinstance(value, tuple)
    }
    copies = []
    for package in ("core", "training", "engine", "service", "cli"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "core" / "vocabulary.py":
                continue
            tree = ast.parse(path.read_text())
            # a Literal[...] must spell its values (checked against the vocabulary where it matters, above)
            literal_slices = {
                id(node.slice)
                for node in ast.walk(tree)
                if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "Literal"
            }
            for node in ast.walk(tree):
                if id(node) in literal_slices:
                    continue
                if isinstance(node, ast.Tuple | ast.List) and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
                ):
                    values = tuple(e.value for e in node.elts)  # type: ignore[attr-defined]
                    if len(values) > 1 and values in vocab:
                        copies.append(f"{path.relative_to(ROOT)}:{node.lineno} {values}")
    assert copies == []


def test_response_severity_literal_is_the_severities() -> None:
    from service.app.schemas import MethodReport

    annotation = MethodReport.model_fields["severity"].annotation
    literal = next(a for a in get_args(annotation) if a is not type(None))
    assert get_args(literal) == vocabulary.SEVERITIES
