"""Reading and checking the train replies of the Message API strategies.

Before anything is averaged, a reply must hold one ArrayRecord and one MetricRecord with
a positive weight (:func:`check_reply_records`), and tensors of exactly the global
model's dtypes and shapes with finite values (:func:`read_reply_arrays`, through a
:class:`ReplyLayout`). Each tensor is read once: :func:`checked_record` hands the values
read to the aggregation. :func:`common_metric_keys` and :func:`reply_order` keep one odd
reply, or the order replies came in, from changing a round.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

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
    return _check_records(content.array_records, content.metric_records, weight_key)


def _check_records(arrays: Mapping[str, ArrayRecord], metrics: Mapping[str, MetricRecord],
                   weight_key: str) -> str | None:
    # RecordDict builds its array_records / metric_records views anew at every access.
    if len(arrays) != 1:
        return f"{len(arrays)} ArrayRecords, expected 1"
    if len(metrics) != 1:
        return f"{len(metrics)} MetricRecords, expected 1"
    weight = next(iter(metrics.values())).get(weight_key)
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
        dtypes = {r.dtype for r in self.reference}
        #: The tensors' one dtype (a reply is then also read as one flat vector), or None.
        self.dtype = dtypes.pop() if len(dtypes) == 1 else None
        self.bounds = np.cumsum([0, *(r.size for r in self.reference)]).tolist()

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
    values, _, reason = read_flat(reply, layout)
    return values, reason


def read_flat(reply: ArrayRecord, layout: ReplyLayout
              ) -> tuple[list[np.ndarray], np.ndarray | None, str | None]:
    """:func:`read_reply_arrays`, and with a layout of one dtype the tensors also as one
    flat vector (their values in order); a reason leaves both empty."""
    arrays = list(reply.values())
    if len(arrays) != len(layout.reference):
        return [], None, f"{len(arrays)} weight tensors, expected {len(layout.reference)}"
    flat = np.empty(layout.bounds[-1], layout.dtype) if layout.dtype is not None else None
    bounds = layout.bounds
    values = []
    for i, (array, ref) in enumerate(zip(arrays, layout.reference, strict=True)):
        try:
            a = layout.read(i, array)
        except Mismatch as err:
            return [], None, f"tensor {i} {err}"
        except Exception as err:  # noqa: BLE001 - untrusted bytes: any failure rejects
            return [], None, f"tensor {i} cannot be read ({type(err).__name__}: {err})"
        if not isinstance(a, np.ndarray):
            return [], None, f"tensor {i} is not an array ({type(a).__name__})"
        if a.dtype != ref.dtype:
            # Strings, structures, complex, bool or datetimes would either break the
            # average or be averaged into something meaningless.
            return [], None, f"tensor {i} has dtype {a.dtype}, expected {ref.dtype}"
        if a.shape != ref.shape:
            return [], None, f"tensor {i} has shape {a.shape}, expected {ref.shape}"
        if flat is not None:
            flat[bounds[i]:bounds[i + 1]] = a.reshape(-1)
        values.append(a)
    if flat is None or not np.isfinite(flat).all():
        for i, a in enumerate(values):
            if not np.all(np.isfinite(a)):
                return [], None, f"tensor {i} holds NaN or infinite values"
    return values, flat, None


@dataclasses.dataclass(frozen=True)
class ReadReply:
    """A usable train reply as :func:`read_reply` read it: the aggregation reads
    nothing of it again."""

    msg: Message
    arrays_name: str
    record: ArrayRecord  # as received
    metrics_name: str
    metrics: MetricRecord
    values: list[np.ndarray]
    flat: np.ndarray | None  # ``values`` in one vector (a layout of one dtype)

    @property
    def order(self) -> tuple[float, float, bytes]:
        """:func:`reply_order` of the reply."""
        return _order(self.metrics, self.record)

    def checked(self) -> None:
        """Hand the values read to Flower's own aggregation (:func:`checked_record`)."""
        self.msg.content[self.arrays_name] = checked_record(self.record, self.values)


def read_reply(msg: Message, layout: ReplyLayout, weight_key: str) -> ReadReply | str:
    """``msg`` (a train reply without error) read and checked, or why it cannot be
    averaged in (:func:`check_reply_records`, :func:`read_reply_arrays`)."""
    array_records, metric_records = msg.content.array_records, msg.content.metric_records
    reason = _check_records(array_records, metric_records, weight_key)
    if reason is not None:
        return reason
    (arrays_name, record), = array_records.items()
    (metrics_name, metrics), = metric_records.items()
    values, flat, reason = read_flat(record, layout)
    if reason is not None:
        return reason
    return ReadReply(msg, arrays_name, record, metrics_name, metrics, values, flat)


def fedavg(replies: list[ReadReply], weight_key: str
           ) -> tuple[ArrayRecord, MetricRecord] | None:
    """Flower's FedAvg of ``replies`` in their order (``aggregate_arrayrecords`` and
    ``aggregate_metricrecords``: the same products and sums, so the same bits), each
    reply's tensors as one vector; None when Flower's own must run (a reply without a
    flat vector, or records or tensor names that differ between replies, which it
    rejects)."""
    if not replies:
        return None
    first = replies[0]
    keys = list(first.record.keys())
    flats: list[np.ndarray] = []
    for r in replies:
        if (r.flat is None or r.arrays_name != first.arrays_name
                or r.metrics_name != first.metrics_name or list(r.record.keys()) != keys):
            return None
        flats.append(r.flat)
    weights = [r.metrics[weight_key] for r in replies]
    if any(isinstance(w, list) for w in weights):
        return None
    total = sum(weights)  # type: ignore[arg-type]
    factors: list[float] = [w / total for w in weights]  # type: ignore[operator]
    total_flat: np.ndarray = flats[0] * factors[0]
    scratch = np.empty_like(total_flat)
    for flat, f in zip(flats[1:], factors[1:], strict=True):
        np.multiply(flat, f, out=scratch)
        total_flat += scratch
    arrays = ArrayRecord()
    start = 0
    for key, v in zip(keys, first.values, strict=True):
        arrays[key] = Array(total_flat[start:start + v.size].reshape(v.shape))
        start += v.size
    return arrays, _metric_average([r.metrics for r in replies], factors, weight_key)


def _metric_average(records: list[MetricRecord], factors: list[float], weight_key: str
                    ) -> MetricRecord:
    """``aggregate_metricrecords``' sums, in its order."""
    out: dict[str, Any] = {}
    for record, weight in zip(records, factors, strict=True):
        for key, value in record.items():
            if key == weight_key:
                continue
            if key not in out:
                out[key] = ([v * weight for v in value] if isinstance(value, list)
                            else value * weight)
            elif isinstance(value, list):
                out[key] = [c + v * weight for c, v in zip(out[key], value, strict=True)]
            else:
                out[key] = out[key] + value * weight
    return MetricRecord(out)


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
    same = usual_keys([next(iter(m.content.metric_records.values())) for m in replies])
    return ([m for m, ok in zip(replies, same, strict=True) if ok],
            [m for m, ok in zip(replies, same, strict=True) if not ok])


def usual_keys(metrics: list[MetricRecord]) -> list[bool]:
    """Which of ``metrics`` have the most common key set (:func:`common_metric_keys`)."""
    if not metrics:
        return []
    keys = [frozenset(m.keys()) for m in metrics]
    common = Counter(keys).most_common(1)[0][0]
    return [k == common for k in keys]


def with_unit_weight(msg: Message, key: str) -> Message:
    """The reply with its weight metric set to 1 (the message is changed in place)."""
    name, record = next(iter(msg.content.metric_records.items()))
    msg.content[name] = MetricRecord({**dict(record), key: 1})
    return msg


def reply_order(msg: Message) -> tuple[float, float, bytes]:
    """A sort key from a reply's content, so the float sum ignores arrival order."""
    return _order(next(iter(msg.content.metric_records.values())),
                  next(iter(msg.content.array_records.values())))


def _order(metrics: MetricRecord, record: ArrayRecord) -> tuple[float, float, bytes]:
    first = next(iter(record.values()))
    return (_as_float(metrics.get("num-examples", 0)),
            _as_float(metrics.get("train_loss", 0.0)),
            bytes(first.data[-64:]))  # values (the start is the .npy header)


def _as_float(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
