"""Classification metrics of one checkpoint on one split (NumPy only, float64 results, JSON-ready).

The numbers follow scikit-learn's definitions (the tests compare against it): precision and recall are 0 for
a class with no predictions / no samples (scikit-learn's ``zero_division=0``), and one-vs-rest AUC is the
Mann-Whitney statistic with ties counted one half. A class absent from ``y_true`` (or the only class present)
has no defined AUC: it is reported as ``None`` and left out of the macro mean, which is ``None`` when no class
has one.

Training scores a split with :func:`split_metrics` (the metrics plus the mean cross-entropy) and picks the
best epoch of a stage by :func:`selection_key`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "accuracy",
    "classification_metrics",
    "confusion_matrix",
    "cross_entropy",
    "macro_f1",
    "precision_recall_f1",
    "roc_auc_ovr",
    "selection_key",
    "softmax",
    "split_metrics",
]


def _check_labels(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim != 1 or y_pred.ndim != 1 or y_true.shape != y_pred.shape:
        raise ValueError(
            f"expected y_true and y_pred as 1-D arrays of the same length, got shapes {y_true.shape} "
            f"and {y_pred.shape}"
        )
    if num_classes < 2:
        raise ValueError(f"expected at least 2 classes, got num_classes={num_classes}")
    for name, arr in (("y_true", y_true), ("y_pred", y_pred)):
        if arr.size and (
            not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= num_classes
        ):
            raise ValueError(f"expected {name} as integer labels in [0, {num_classes - 1}], got {arr!r}")
    return y_true.astype(np.int64), y_pred.astype(np.int64)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, *, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = number of samples of true class i predicted as class j (int64, classes x classes)."""
    y_true, y_pred = _check_labels(y_true, y_pred, num_classes)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """accuracy = (1/n) * sum_i [y_pred_i == y_true_i]; ``nan`` for no samples."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"expected equal shapes, got {y_true.shape} and {y_pred.shape}")
    return float(np.mean(y_true == y_pred)) if y_true.size else float("nan")


def precision_recall_f1(
    y_true: np.ndarray, y_pred: np.ndarray, *, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 (float64 arrays of length ``num_classes``).

    precision_c = TP_c / (TP_c + FP_c), recall_c = TP_c / (TP_c + FN_c),
    F1_c = 2 * precision_c * recall_c / (precision_c + recall_c); each is 0 where its denominator is 0.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes=num_classes).astype(np.float64)
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)
    actual = cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, *, num_classes: int) -> float:
    """macro-F1 = (1/C) * sum_c F1_c over all ``num_classes`` classes (absent classes count as F1 = 0)."""
    return float(np.mean(precision_recall_f1(y_true, y_pred, num_classes=num_classes)[2]))


def roc_auc_ovr(y_true: np.ndarray, scores: np.ndarray) -> tuple[float | None, list[float | None]]:
    """One-vs-rest ROC AUC per class and their macro mean.

    AUC_c = (sum of the ranks of the positives' scores among all n scores - n_pos (n_pos + 1) / 2)
    / (n_pos * n_neg), ranks averaged over ties (= P(score_pos > score_neg) + 0.5 P(equal)). ``scores`` is
    (n, classes): probabilities or logits (AUC depends only on each column's ordering). ``None`` where class
    c has no positive or no negative sample; macro = mean of the defined values (``None`` if none is).
    """
    scores = np.asarray(scores, dtype=np.float64)
    y_true = np.asarray(y_true)
    if scores.ndim != 2 or scores.shape[0] != y_true.shape[0] or y_true.ndim != 1:
        raise ValueError(
            f"expected scores (n, classes) and y_true (n,), got shapes {scores.shape} and {y_true.shape}"
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("expected finite scores, got NaN or infinity")
    per_class: list[float | None] = []
    for c in range(scores.shape[1]):
        positive = y_true == c
        n_pos = int(positive.sum())
        n_neg = positive.size - n_pos
        if n_pos == 0 or n_neg == 0:
            per_class.append(None)
            continue
        ranks = rankdata(scores[:, c])  # average ranks for ties
        u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
        per_class.append(float(u / (n_pos * n_neg)))
    defined = [v for v in per_class if v is not None]
    macro = float(np.mean(defined)) if defined else None
    return macro, per_class


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable: exp(z - max z) / sum exp(z - max z)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def classification_metrics(
    y_true: np.ndarray,
    logits: np.ndarray,
    *,
    class_names: Sequence[str],
    loss: float | None = None,
) -> dict[str, Any]:
    """All metrics of one checkpoint on one split, as a JSON-serializable dict.

    ``logits``: (n, classes) raw scores; the prediction is their argmax (the lowest index on ties). Keys:
    ``n``, ``accuracy``, ``macro_f1``, ``per_class`` ({name: {precision, recall, f1, support}}),
    ``auc_ovr`` ({"macro": float | None, "per_class": {name: float | None}}), ``confusion_matrix`` (rows =
    true class, columns = predicted, in ``class_names`` order), and ``loss`` (mean cross-entropy) if given.
    """
    logits = np.asarray(logits, dtype=np.float64)
    num_classes = len(class_names)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(
            f"expected logits of shape (n, {num_classes}) for classes {list(class_names)}, got {logits.shape}"
        )
    y_true = np.asarray(y_true)
    y_pred = logits.argmax(axis=1) if logits.shape[0] else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(y_true, y_pred, num_classes=num_classes)
    precision, recall, f1 = precision_recall_f1(y_true, y_pred, num_classes=num_classes)
    auc_macro, auc_per_class = roc_auc_ovr(y_true, softmax(logits) if logits.shape[0] else logits)
    out: dict[str, Any] = {
        "n": int(y_true.shape[0]),
        "accuracy": accuracy(y_true, y_pred) if y_true.size else None,
        "macro_f1": float(np.mean(f1)) if y_true.size else None,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(cm[i].sum()),
            }
            for i, name in enumerate(class_names)
        },
        "auc_ovr": {"macro": auc_macro, "per_class": dict(zip(class_names, auc_per_class, strict=True))},
        "confusion_matrix": cm.tolist(),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """mean_i -log softmax(z_i)[y_i], float64."""
    if labels.size == 0:
        return float("nan")
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(labels.size), labels].mean())


def split_metrics(
    logits: np.ndarray | None, labels: np.ndarray | None, class_names: list[str]
) -> dict[str, Any] | None:
    """:func:`classification_metrics` with the cross-entropy loss; ``None`` for a missing or empty split."""
    if logits is None or labels is None or labels.size == 0:
        return None
    return classification_metrics(labels, logits, class_names=class_names, loss=cross_entropy(logits, labels))


def selection_key(metrics: dict[str, Any] | None) -> tuple[float, float]:
    """Larger is better: (val macro-F1, -val loss)."""
    if not metrics or metrics.get("n", 0) == 0:
        return (-math.inf, -math.inf)
    return (float(metrics["macro_f1"]), -float(metrics.get("loss", math.inf)))
