"""SecAgg+'s mask generator, draw for draw as Flower's ``pseudo_rand_gen``.

Flower's ``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen`` folds a
seed into 32 bits and builds ``numpy.random.RandomState(seed32)`` for every mask: the
constructor first seeds a fresh MT19937 from OS entropy (about 0.4 ms), then reseeds it
the legacy way from ``seed32``. :func:`pseudo_rand_gen` reseeds one ``RandomState`` per
thread with ``RandomState.seed(seed32)`` (numpy's documented legacy reseeding: the
same state as the constructor's) and draws the same ``randint`` calls, so each mask is
the same array (``tests/test_shamir.py`` compares them).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

_LOCAL = threading.local()


def pseudo_rand_gen(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]
                    ) -> list[np.ndarray]:
    """Flower's ``pseudo_rand_gen(seed, num_range, dimensions_list)``: one int64 array of
    draws in ``[0, num_range - 1)`` per shape (a 0-d array for ``()``)."""
    if len(seed) & 0x3:
        raise ValueError(f"mask seed of {len(seed)} bytes: expected a multiple of 4")
    seed32 = 0
    for i in range(0, len(seed), 4):
        seed32 ^= int.from_bytes(seed[i:i + 4], "little")
    gen = getattr(_LOCAL, "gen", None)
    if gen is None:
        gen = _LOCAL.gen = np.random.RandomState()
    gen.seed(seed32)
    output = []
    for dimension in dimensions_list:
        if len(dimension) == 0:
            output.append(np.array(gen.randint(0, num_range - 1), dtype=np.int64))
        else:
            output.append(gen.randint(0, num_range - 1, dimension, dtype=np.int64))
    return output
