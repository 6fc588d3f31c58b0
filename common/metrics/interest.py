"""Metrics of the interest head: a regression on ``log1p`` targets."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import mean_absolute_error, mean_squared_error

from common.metrics.arrays import NAN, same_length, vector


def interest_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """``mae``, ``rmse`` and ``n`` of the interest head; targets are already ``log1p``."""
    y = vector("y_true", y_true)
    f = vector("y_pred", y_pred)
    n = same_length(y_true=y, y_pred=f)
    if n == 0:
        return {"mae": NAN, "rmse": NAN, "n": 0}
    return {
        "mae": float(mean_absolute_error(y, f)),
        "rmse": float(np.sqrt(mean_squared_error(y, f))),
        "n": n,
    }
