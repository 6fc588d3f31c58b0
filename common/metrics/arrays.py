"""Checks shared by the metrics: arrays in, ``nan`` for what is undefined."""

from __future__ import annotations

from typing import Any

import numpy as np

NAN = float("nan")


def vector(name: str, x: Any, dtype: Any = float) -> np.ndarray:
    """``x`` as a 1-D array of ``dtype``; ``ValueError`` naming ``name`` otherwise."""
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    return arr


def same_length(**arrays: np.ndarray) -> int:
    """The common length of ``arrays``; ``ValueError`` listing the lengths otherwise."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have equal length, got {lengths}")
    return next(iter(lengths.values()))


def two_classes(y: np.ndarray) -> bool:
    """Whether the 0/1 labels ``y`` hold both classes."""
    return len(y) > 0 and 0 < y.sum() < len(y)
