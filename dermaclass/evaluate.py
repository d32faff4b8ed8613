"""Metrics as pure functions of (labels, probabilities) that return plain dicts.

Plain accuracy misleads on dermoscopy data (HAM10000 is 67 % nevi), so the headline figure
is balanced accuracy, the mean per-class recall (the ISIC 2018 challenge metric), with
macro-F1 and per-class sensitivity and specificity beside it. scikit-learn computes them;
reports render from the returned dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm


def classification_metrics(labels: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Headline and per-class figures for integer ``labels`` and an (N, C) probability matrix.

    A class absent from ``labels`` has no recall: its sensitivity is None (not computable),
    and balanced accuracy is the mean over the classes present.
    """
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    pred = p.argmax(axis=1)
    k = len(classes)
    cm = skm.confusion_matrix(y, pred, labels=list(range(k)))
    support = cm.sum(axis=1)
    present = support > 0
    tp = np.diag(cm).astype(float)
    recall = np.divide(tp, support, out=np.full(k, np.nan), where=present)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.full(k, np.nan), where=predicted > 0)
    tn = cm.sum() - cm.sum(axis=0) - cm.sum(axis=1) + tp
    negatives = cm.sum() - support
    specificity = np.divide(tn, negatives, out=np.full(k, np.nan), where=negatives > 0)
    f1 = skm.f1_score(y, pred, labels=list(np.flatnonzero(present)), average=None, zero_division=0)
    per_class = {}
    f1_iter = iter(f1)
    for i, c in enumerate(classes):
        per_class[c] = {
            "support": int(support[i]),
            "sensitivity": _num(recall[i]),
            "specificity": _num(specificity[i]),
            "precision": _num(precision[i]),
            "f1": float(next(f1_iter)) if present[i] else None,
        }
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else None,
        "balanced_accuracy": float(np.nanmean(recall)) if present.any() else None,
        "macro_f1": float(np.mean(f1)) if present.any() else None,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
