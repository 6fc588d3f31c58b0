"""Weight tensors to and from a message's ArrayRecord, at a simulated merchant's rate.

A node hosting many tiny merchants (``client.hosted``) reads the global weights once
for all of them (:func:`read_weights`, read-only arrays) and serializes each merchant's
reply with :func:`array_record`: the bytes ``ArrayRecord(weights)`` would hold (a
``.npy`` header, then the values), with the header made once per dtype and shape
rather than by ``np.save`` for every tensor of every reply.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of this kind."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, np.dtype(dtype)), allow_pickle=False)
    data = buffer.getvalue()
    return data[:len(data) - np.dtype(dtype).itemsize * int(np.prod(shape))]


def array_record(weights: list[np.ndarray]) -> ArrayRecord:
    """``ArrayRecord(weights)``, byte for byte (keys "0", "1", ...)."""
    record = ArrayRecord()
    for i, w in enumerate(weights):
        a = np.asarray(w)
        if a.dtype.hasobject or not a.flags.c_contiguous:
            record[str(i)] = Array(a)  # np.save's own way (Fortran order, say)
            continue
        shape = tuple(int(n) for n in a.shape)
        record[str(i)] = Array(dtype=str(a.dtype), shape=shape, stype=SType.NUMPY,
                               data=_npy_header(a.dtype.str, shape) + a.tobytes())
    return record


def read_weights(record: ArrayRecord) -> list[np.ndarray]:
    """The record's tensors, read-only: shared by every merchant a node serves, so an
    in-place change would leak into the next merchant's starting point."""
    arrays = record.to_numpy_ndarrays()
    for a in arrays:
        a.setflags(write=False)
    return arrays
