"""Property-based tests of the server's reply screening: whatever bytes a client sends
as a weight tensor, the screening returns the values or a rejection reason, never raises.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.replies import ReplyLayout, read_reply_arrays

REFERENCE = [np.zeros((2, 3), np.float32), np.zeros(3, np.float32)]
LAYOUT = ReplyLayout(REFERENCE)
GOOD = ArrayRecord([np.ones((2, 3), np.float32), np.ones(3, np.float32)])
DTYPES = ["<f4", "<f8", "|b1", "<i4", "<c8", "<U3", "|S2", "<M8[s]", "|O", "[('a','<f4')]",
          "???", ""]


def _npy_header(dtype: str, shape: str, order: str) -> bytes:
    body = f"{{'descr': {dtype!r}, 'fortran_order': {order}, 'shape': {shape}, }}"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode()


tensors = st.one_of(
    st.binary(max_size=200),  # anything at all
    st.builds(lambda head, tail: head + tail,  # a plausible .npy header, arbitrary rest
              st.builds(_npy_header, st.sampled_from(DTYPES),
                        st.sampled_from(["(2, 3)", "(3,)", "()", "(-1,)", "(2, 3, 1)", "x"]),
                        st.sampled_from(["False", "True", "0"])),
              st.binary(max_size=64)),
    # the expected header with a payload of any length
    st.builds(lambda tail: GOOD["0"].data[:128] + tail, st.binary(max_size=64)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=tensors, stype=st.sampled_from([SType.NUMPY, "torch", ""]),
       claimed=st.sampled_from(DTYPES))
def test_any_bytes_give_values_or_a_reason(first: bytes, stype: str, claimed: str) -> None:
    record = ArrayRecord()
    record["0"] = Array(dtype=claimed, shape=(2, 3), stype=stype, data=first)
    record["1"] = GOOD["1"]
    values, reason = read_reply_arrays(record, LAYOUT)
    if reason is None:
        assert [v.dtype for v in values] == [r.dtype for r in REFERENCE]
        assert [v.shape for v in values] == [r.shape for r in REFERENCE]
        assert all(np.isfinite(v).all() for v in values)
    else:
        assert values == [] and reason.startswith("tensor 0 ")
