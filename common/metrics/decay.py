"""Metrics of the decay head: a binary classifier of lapsing users."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
)

from common.metrics.arrays import NAN, same_length, two_classes, vector

#: Probabilities are clipped to [EPS, 1 - EPS] before a log-loss: a confident wrong
#: prediction costs -log(EPS), about 16.1, not infinity.
EPS = 1e-7
#: Equal-width bins of the expected calibration error.
ECE_BINS = 10


def log_losses(y_true: Any, p: Any) -> np.ndarray:
    """Binary log-loss of each prediction: ``-(y log p + (1 - y) log(1 - p))`` with ``p``
    clipped to [EPS, 1 - EPS], in float64.

    ``p`` may hold several rows of predictions of the same labels (shape [V, N] against
    ``y_true`` [N]); the result has the shape of ``p``.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    if s.shape[-1:] != y.shape:
        raise ValueError(f"y_true and p: expected p's last axis as long as y_true, got "
                         f"shapes {y.shape} and {s.shape}")
    return -(y * np.log(s) + (1 - y) * np.log(1 - s))


def binary_log_loss(y_true: Any, p: Any) -> float:
    """Mean binary log-loss of the probabilities ``p`` (clipped, :func:`log_losses`)
    against the 0/1 labels ``y_true``; ``nan`` without rows."""
    losses = log_losses(y_true, p)
    return float(losses.mean()) if losses.size else NAN


def expected_calibration_error(y_true: Any, p: Any, bins: int = ECE_BINS) -> float:
    """ECE: sum over ``bins`` equal-width bins of [0, 1] of (rows in bin / rows) x
    |positive rate in bin - mean predicted risk in bin|.

    Bin ``b`` holds ``b / bins <= p < (b + 1) / bins``, the last one also ``p == 1``;
    empty bins add nothing. ``nan`` without rows.
    """
    y = np.asarray(y_true, dtype=float)
    s = np.asarray(p, dtype=float)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and p: expected two 1-D arrays of equal length, got "
                         f"shapes {y.shape} and {s.shape}")
    if len(y) == 0:
        return NAN
    which = np.clip(np.floor(np.clip(s, 0.0, 1.0) * bins).astype(int), 0, bins - 1)
    gap = np.abs(np.bincount(which, weights=y, minlength=bins)
                 - np.bincount(which, weights=s, minlength=bins))  # = rows x |rate - mean p|
    return float(gap.sum() / len(y))


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
    out["log_loss"] = binary_log_loss(y, s)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y.astype(int), (s >= threshold).astype(int), average="binary", zero_division=np.nan,
    )
    out.update(precision=float(precision), recall=float(recall), f1=float(f1))
    out["top_decile_lift"] = top_decile_lift(y, s)
    out["positive_rate"] = float(y.mean())
    return out
