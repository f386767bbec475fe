"""Classification metrics against scikit-learn (an independent implementation) and invariants."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from training.evaluation import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    precision_recall_f1,
    roc_auc_ovr,
    softmax,
)

CLASSES = ["normal", "lobar", "lower", "diffuse", "nodules"]


def _random_case(seed: int, n: int = 60, num_classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), y] += rng.uniform(0, 2, size=n)  # informative but imperfect
    return y, logits


@pytest.mark.parametrize("seed", range(5))
def test_matches_scikit_learn(seed: int) -> None:
    y, logits = _random_case(seed)
    pred = logits.argmax(1)
    labels = list(range(5))
    m = classification_metrics(y, logits, class_names=CLASSES)
    assert m["n"] == len(y)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(
        skm.f1_score(y, pred, average="macro", labels=labels, zero_division=0)
    )
    prec = skm.precision_score(y, pred, average=None, labels=labels, zero_division=0)
    rec = skm.recall_score(y, pred, average=None, labels=labels, zero_division=0)
    for i, name in enumerate(CLASSES):
        assert m["per_class"][name]["precision"] == pytest.approx(prec[i])
        assert m["per_class"][name]["recall"] == pytest.approx(rec[i])
    probs = softmax(logits)
    assert m["auc_ovr"]["macro"] == pytest.approx(
        skm.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels)
    )
    for i, name in enumerate(CLASSES):
        assert m["auc_ovr"]["per_class"][name] == pytest.approx(skm.roc_auc_score(y == i, probs[:, i]))
    np.testing.assert_array_equal(
        np.array(m["confusion_matrix"]), skm.confusion_matrix(y, pred, labels=labels)
    )
    json.dumps(m, allow_nan=False)  # JSON-ready, no NaN


def test_auc_with_ties_matches_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, size=40)
    scores = rng.integers(0, 4, size=(40, 3)).astype(float)  # many ties
    macro, per_class = roc_auc_ovr(y, scores)
    for c in range(3):
        assert per_class[c] == pytest.approx(skm.roc_auc_score(y == c, scores[:, c]))
    assert macro == pytest.approx(np.mean([v for v in per_class if v is not None]))


def test_absent_class_gives_none_auc_and_zero_scores() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    logits = np.eye(4)[[0, 1, 1, 1, 2, 0]] * 3.0  # class 3 never present, never predicted
    m = classification_metrics(y, logits, class_names=["a", "b", "c", "d"])
    assert m["auc_ovr"]["per_class"]["d"] is None
    defined = [m["auc_ovr"]["per_class"][k] for k in "abc"]
    assert m["auc_ovr"]["macro"] == pytest.approx(np.mean(defined))
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    pred = logits.argmax(1)
    assert m["macro_f1"] == pytest.approx(
        skm.f1_score(y, pred, average="macro", labels=[0, 1, 2, 3], zero_division=0)
    )
    json.dumps(m, allow_nan=False)


def test_perfect_and_reversed_scores() -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    logits = np.eye(3)[y] * 5
    m = classification_metrics(y, logits, class_names=["a", "b", "c"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["auc_ovr"]["macro"] == 1.0
    assert np.array_equal(np.array(m["confusion_matrix"]), np.diag([2, 2, 2]))
    macro, _ = roc_auc_ovr(y, -logits)
    assert macro == 0.0


def test_empty_split_is_defined() -> None:
    m = classification_metrics(np.zeros(0, dtype=int), np.zeros((0, 3)), class_names=["a", "b", "c"])
    assert m["n"] == 0 and m["accuracy"] is None and m["auc_ovr"]["macro"] is None
    json.dumps(m, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 50),
    num_classes=st.integers(2, 6),
)
def test_invariants(seed: int, n: int, num_classes: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n)
    pred = rng.integers(0, num_classes, size=n)
    cm = confusion_matrix(y, pred, num_classes=num_classes)
    assert cm.sum() == n
    assert np.array_equal(cm.sum(axis=1), np.bincount(y, minlength=num_classes))
    assert accuracy(y, pred) == pytest.approx(np.trace(cm) / n)
    p, r, f1 = precision_recall_f1(y, pred, num_classes=num_classes)
    for arr in (p, r, f1):
        assert np.all((arr >= 0) & (arr <= 1))
    assert 0 <= macro_f1(y, pred, num_classes=num_classes) <= 1
    # AUC is invariant to a strictly increasing transform of the scores
    scores = rng.normal(size=(n, num_classes))
    a1 = roc_auc_ovr(y, scores)[1]
    a2 = roc_auc_ovr(y, np.exp(scores) * 3 + 1)[1]
    assert a1 == pytest.approx(a2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: confusion_matrix(np.array([0, 1]), np.array([0]), num_classes=2), "same length"),
        (lambda: confusion_matrix(np.array([0, 5]), np.array([0, 1]), num_classes=2), r"\[0, 1\]"),
        (lambda: confusion_matrix(np.array([0.5]), np.array([0]), num_classes=2), "integer labels"),
        (lambda: confusion_matrix(np.array([0]), np.array([0]), num_classes=1), "at least 2 classes"),
        (lambda: roc_auc_ovr(np.array([0, 1]), np.array([[np.nan, 0], [0, 1]])), "finite"),
        (lambda: roc_auc_ovr(np.array([0, 1]), np.zeros(2)), r"\(n, classes\)"),
        (
            lambda: classification_metrics(np.array([0]), np.zeros((1, 2)), class_names=["a", "b", "c"]),
            "(n, 3)",
        ),
    ],
)
def test_errors_say_what_was_expected(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
