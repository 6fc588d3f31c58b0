"""Metrics across a federation: per merchant, and their spread over merchants."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from common.metrics.arrays import NAN


def per_merchant(
    merchant_ids: Any,
    fn: Callable[..., Mapping[str, float] | float],
    *arrays: Any,
    min_rows: int = 20,
    **kwargs: Any,
) -> dict[str, dict[str, float]]:
    """Apply ``fn(*arrays_of_group, **kwargs)`` to each merchant's rows.

    Each array is indexed along its first axis. A ``fn`` returning a float is stored
    as ``{"value": x}``. Every entry gets ``n``, the merchant's row count. Merchants
    with fewer than ``min_rows`` rows are not evaluated: their entry has the keys of
    the evaluated merchants set to ``nan``. Keys are the merchant ids as strings,
    sorted.
    """
    ids = np.asarray(merchant_ids, dtype=object).astype(str)
    if ids.ndim != 1:
        raise ValueError(f"merchant_ids: expected a 1-D array, got shape {ids.shape}")
    arrs = [np.asarray(a) for a in arrays]
    for i, a in enumerate(arrs):
        if len(a) != len(ids):
            raise ValueError(
                f"array {i}: expected {len(ids)} rows like merchant_ids, got {len(a)}"
            )
    results: dict[str, dict[str, float]] = {}
    keys: list[str] = []
    skipped: list[str] = []
    for merchant in sorted(set(ids.tolist())):
        mask = ids == merchant
        n = int(mask.sum())
        if n < min_rows:
            results[merchant] = {"n": n}
            skipped.append(merchant)
            continue
        res = fn(*(a[mask] for a in arrs), **kwargs)
        entry = dict(res) if isinstance(res, Mapping) else {"value": float(res)}
        entry["n"] = n
        keys.extend(k for k in entry if k not in keys)
        results[merchant] = entry
    for merchant in skipped:
        results[merchant] = {**dict.fromkeys(keys, NAN), "n": results[merchant]["n"]}
    return results


def spread(values: Mapping[str, float], higher_is_better: bool = True) -> dict[str, float]:
    """Spread of a metric over merchants, ignoring ``nan``.

    Returns ``min``, ``max``, ``worst_decile`` (10th percentile, or the 90th when
    ``higher_is_better`` is false, e.g. for MAE), ``median``, ``mean`` and
    ``n_merchants`` (merchants with a defined value).
    """
    v = np.asarray([float(x) for x in values.values()], dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return {"min": NAN, "max": NAN, "worst_decile": NAN, "median": NAN, "mean": NAN,
                "n_merchants": 0}
    return {
        "min": float(v.min()),
        "max": float(v.max()),
        "worst_decile": float(np.percentile(v, 10 if higher_is_better else 90)),
        "median": float(np.median(v)),
        "mean": float(v.mean()),
        "n_merchants": len(v),
    }
