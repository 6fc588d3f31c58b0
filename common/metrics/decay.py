"""Metrics of the decay head: a binary classifier of lapsing users."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
)

from common.metrics.arrays import NAN, same_length, two_classes, vector


def choose_threshold(y_true: Any, p: Any, default: float = 0.5) -> float:
    """Threshold on ``p`` maximising F1 (predict positive when ``p >= threshold``).

    The candidates are the distinct scores; among equally good ones the highest wins.
    Returns ``default`` when ``y_true`` has no positive (F1 is undefined everywhere).
    """
    y = vector("y_true", y_true)
    s = vector("p", p)
    same_length(y_true=y, p=s)
    if len(y) == 0 or y.sum() == 0:
        return float(default)
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = np.flatnonzero(f1 == f1.max())
    return float(thresholds[best].max())


def top_decile_lift(y_true: Any, p: Any, fraction: float = 0.1) -> float:
    """Positive rate among the top ``fraction`` of rows by ``p``, over the base rate.

    The top set holds ``ceil(fraction * n)`` rows. Scores tied at the cut count
    fractionally (the expected rate under random tie-breaking), so the result does not
    depend on row order. ``nan`` when empty or without positives.
    """
    y = vector("y_true", y_true)
    s = vector("p", p)
    n = same_length(y_true=y, p=s)
    if n == 0 or y.sum() == 0:
        return NAN
    k = max(1, math.ceil(fraction * n))
    cut = np.sort(s)[::-1][k - 1]
    above, tied = s > cut, s == cut
    positives = y[above].sum() + y[tied].mean() * (k - above.sum())
    return float((positives / k) / y.mean())


def decay_metrics(y_true: Any, p: Any, threshold: float = 0.5) -> dict[str, float]:
    """Ranking, calibration and thresholded metrics of the decay head.

    Returns ``roc_auc``, ``pr_auc`` (average precision), ``log_loss``, ``precision``,
    ``recall``, ``f1`` (positive when ``p >= threshold``), ``top_decile_lift``,
    ``positive_rate`` and ``n``. AUCs are ``nan`` with one class only.
    """
    y = vector("y_true", y_true)
    s = vector("p", p)
    n = same_length(y_true=y, p=s)
    out: dict[str, float] = dict.fromkeys(
        ("roc_auc", "pr_auc", "log_loss", "precision", "recall", "f1", "top_decile_lift",
         "positive_rate"), NAN,
    )
    out["n"] = n
    if n == 0:
        return out
    if two_classes(y):
        out["roc_auc"] = float(roc_auc_score(y, s))
        out["pr_auc"] = float(average_precision_score(y, s))
    out["log_loss"] = float(log_loss(y, np.clip(s, 0.0, 1.0), labels=[0, 1]))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y.astype(int), (s >= threshold).astype(int), average="binary", zero_division=np.nan,
    )
    out.update(precision=float(precision), recall=float(recall), f1=float(f1))
    out["top_decile_lift"] = top_decile_lift(y, s)
    out["positive_rate"] = float(y.mean())
    return out
