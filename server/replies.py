"""Reading and checking the train replies of the Message API strategies.

Before anything is averaged, a reply must hold one ArrayRecord and one MetricRecord with
a positive weight (:func:`check_reply_records`), and tensors of exactly the global
model's dtypes and shapes with finite values (:func:`read_reply_arrays`, through a
:class:`ReplyLayout`). Each tensor is read once: :func:`checked_record` hands the values
read to the aggregation. :func:`common_metric_keys` and :func:`reply_order` keep one odd
reply, or the order replies came in, from changing a round.
"""

from __future__ import annotations

import io
import math
from collections import Counter

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType

from server import flower_seam


def array_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialized tensors in ``record``."""
    return int(sum(len(a.data) for a in record.values()))


def check_reply_records(content: RecordDict, weight_key: str) -> str | None:
    """Why a reply's records cannot be aggregated (FedAvg needs one ArrayRecord and one
    MetricRecord with a positive weight), or None when they can."""
    if len(content.array_records) != 1:
        return f"{len(content.array_records)} ArrayRecords, expected 1"
    if len(content.metric_records) != 1:
        return f"{len(content.metric_records)} MetricRecords, expected 1"
    weight = next(iter(content.metric_records.values())).get(weight_key)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"metric '{weight_key}' is {weight!r}, expected a positive number"
    return None


class ReplyLayout:
    """How the global weights' tensors look serialized in a reply (Flower's ``Array``:
    a ``.npy`` header, then the raw values), to read a well-formed reply without parsing
    its headers: ``numpy()`` parses each header with ``ast.literal_eval``, ~36 us a
    tensor, which made reading the replies most of the server's aggregation time.
    A tensor whose header is byte for byte the expected one has exactly the expected
    dtype and shape; any other goes through ``numpy()``, and so does every tensor when
    ``server.flower_seam`` does not know the installed Flower's byte layout.
    """

    def __init__(self, reference: list[np.ndarray]) -> None:
        self.reference = [np.ascontiguousarray(r) for r in reference]
        self.heads = [flower_seam.npy_header(ref) for ref in self.reference]

    def read(self, i: int, array: Array) -> np.ndarray:
        """Tensor ``i`` of a reply; :class:`Mismatch` when its header names another dtype
        or shape than the global one's."""
        ref, head = self.reference[i], self.heads[i]
        data = array.data
        if head is not None and array.stype == SType.NUMPY \
                and len(data) == len(head) + ref.nbytes and data.startswith(head):
            return np.frombuffer(data, ref.dtype, ref.size, len(head)).reshape(ref.shape)
        if array.stype != SType.NUMPY:
            raise TypeError(f"serialization type {array.stype!r}, expected {SType.NUMPY!r}")
        # Read the header first: a crafted one could claim a shape whose payload numpy
        # would allocate before finding the data short.
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(stream)
        if dtype != ref.dtype:
            raise Mismatch(f"has dtype {dtype}, expected {ref.dtype}")
        if tuple(shape) != ref.shape:
            raise Mismatch(f"has shape {tuple(shape)}, expected {ref.shape}")
        return array.numpy()


class Mismatch(ValueError):
    """A reply tensor whose header names another dtype or shape than the global one's."""


def read_reply_arrays(reply: ArrayRecord, layout: ReplyLayout
                      ) -> tuple[list[np.ndarray], str | None]:
    """A reply's tensors, and why they cannot be averaged in (None when they can)."""
    arrays = list(reply.values())
    if len(arrays) != len(layout.reference):
        return [], f"{len(arrays)} weight tensors, expected {len(layout.reference)}"
    values = []
    for i, (array, ref) in enumerate(zip(arrays, layout.reference, strict=True)):
        try:
            a = layout.read(i, array)
        except Mismatch as err:
            return [], f"tensor {i} {err}"
        except Exception as err:  # noqa: BLE001 - untrusted bytes: any failure rejects
            return [], f"tensor {i} cannot be read ({type(err).__name__}: {err})"
        if not isinstance(a, np.ndarray):
            return [], f"tensor {i} is not an array ({type(a).__name__})"
        if a.dtype != ref.dtype:
            # Strings, structures, complex, bool or datetimes would either break the
            # average or be averaged into something meaningless.
            return [], f"tensor {i} has dtype {a.dtype}, expected {ref.dtype}"
        if a.shape != ref.shape:
            return [], f"tensor {i} has shape {a.shape}, expected {ref.shape}"
        if not np.all(np.isfinite(a)):
            return [], f"tensor {i} holds NaN or infinite values"
        values.append(a)
    return values, None


def checked_record(record: ArrayRecord, values: list[np.ndarray]) -> ArrayRecord:
    """The reply's tensors, each giving its values already read and checked."""
    checked = ArrayRecord()  # item by item: the constructor would copy into plain Arrays
    for (key, array), value in zip(record.items(), values, strict=True):
        checked[key] = flower_seam.array_returning(array, value)
    return checked


def common_metric_keys(replies: list[Message]) -> tuple[list[Message], list[Message]]:
    """Split replies into those with the most common metric key set and the others.

    Flower's aggregation raises when key sets differ; one odd client must not stop a
    round.
    """
    if not replies:
        return [], []
    keys = [frozenset(next(iter(m.content.metric_records.values())).keys()) for m in replies]
    common = Counter(keys).most_common(1)[0][0]
    same = [m for m, k in zip(replies, keys, strict=True) if k == common]
    other = [m for m, k in zip(replies, keys, strict=True) if k != common]
    return same, other


def with_unit_weight(msg: Message, key: str) -> Message:
    """The reply with its weight metric set to 1 (the message is changed in place)."""
    name, record = next(iter(msg.content.metric_records.items()))
    msg.content[name] = MetricRecord({**dict(record), key: 1})
    return msg


def reply_order(msg: Message) -> tuple[float, float, bytes]:
    """A sort key from a reply's content, so the float sum ignores arrival order."""
    metrics = next(iter(msg.content.metric_records.values()))
    record = next(iter(msg.content.array_records.values()))
    first = next(iter(record.values()))
    return (_as_float(metrics.get("num-examples", 0)),
            _as_float(metrics.get("train_loss", 0.0)),
            bytes(first.data[-64:]))  # values (the start is the .npy header)


def _as_float(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
