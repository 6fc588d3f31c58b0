"""A virtual node serving several simulated merchants with one message
(``federation.merchants-per-node``; the names are ``common.hosting``'s).

The server's message names the merchants (partition ids) to serve. Each is served in
turn by the ordinary handler (``client.app.handle_train`` / ``handle_evaluate``), from
the same received message and the same weights (read once), in a Context whose
``partition-id`` is that merchant's: its shard, its seeded faults, its whitelisted
metrics, as if it had been sent alone. The
reply holds every merchant's records (or its error) under ``common.hosting.record_key``;
one merchant's data error, simulated fault or unexpected exception fails that merchant
only (:func:`serve_one`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from client.arrays import read_weights
from common.hosting import (
    ERROR_CODE_KEY,
    ERROR_REASON_KEY,
    ERROR_RECORD,
    MERCHANT_IDS_KEY,
    MERCHANTS_RECORD,
    record_key,
)

log = logging.getLogger(__name__)

#: Serves one merchant: (the node's message, that merchant's Context, the message's
#: tensors when already read, else None) -> its reply.
Handler = Callable[[Message, Context, "list[np.ndarray] | None"], Message]


def named_merchants(msg: Message) -> list[int] | None:
    """The merchants ``msg`` asks this node to serve; None for an ordinary message."""
    if not msg.has_content():
        return None
    record = msg.content.config_records.get(MERCHANTS_RECORD)
    if record is None:
        return None
    ids = record.get(MERCHANT_IDS_KEY)
    if not isinstance(ids, list) or not all(isinstance(m, int) and not isinstance(m, bool)
                                            and m >= 0 for m in ids):
        raise ValueError(f"'{MERCHANTS_RECORD}.{MERCHANT_IDS_KEY}' must list partition "
                         f"ids (ints >= 0), got {ids!r}")
    return [int(m) for m in ids]


def merchant_context(context: Context, merchant: int) -> Context:
    """``context`` as merchant ``merchant``'s node would have it (simulation: its
    ``partition-id``); the state is the node's."""
    return Context(run_id=context.run_id, node_id=context.node_id,
                   node_config={**context.node_config, "partition-id": merchant},
                   state=context.state, run_config=context.run_config)


def serve_merchants(msg: Message, context: Context, merchants: list[int],
                    handler: Handler) -> Message:
    """Serve each of ``merchants`` with ``handler``, one after another; one reply
    holding each merchant's records or error."""
    if "data-path" in context.node_config:
        raise ValueError(f"'{MERCHANTS_RECORD}' names merchants to a deployed node "
                         "(it serves its own data only)")
    # The global weights are read once for all: ~1.6 ms a merchant (docs/performance.md).
    arrays = msg.content.array_records.get("arrays")
    weights = read_weights(arrays) if arrays is not None else None
    packed = RecordDict()
    for merchant in merchants:
        reply = serve_one(msg, context, merchant, handler, weights)
        if reply.has_error():
            packed[record_key(merchant, ERROR_RECORD)] = ConfigRecord(
                {ERROR_CODE_KEY: int(reply.error.code),
                 ERROR_REASON_KEY: str(reply.error.reason or "")})
            continue
        for name, record in reply.content.items():
            packed[record_key(merchant, name)] = record
    return Message(packed, reply_to=msg)


def serve_one(msg: Message, context: Context, merchant: int, handler: Handler,
              weights: list[np.ndarray] | None) -> Message:
    """``handler``'s reply for ``merchant``; an exception it raises becomes that
    merchant's error reply, as Flower makes one for a ClientApp that raised (code
    ``CLIENT_APP_RAISED_EXCEPTION``, reason ``"<class ...>:<'message'>"``), so the
    merchants served after it still reply."""
    try:
        return handler(msg, merchant_context(context, merchant), weights)
    except Exception as err:  # a K = 1 node would fail this merchant alone
        log.exception("merchant (partition %d) failed; its node-mates go on", merchant)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=f"{type(err)}:<'{err}'>"), reply_to=msg)


#: A simulated federation of at least this many merchants warms each process up
#: (:func:`warms_up`). Warming every validation layout costs ~1-1.5 s a layout once a
#: process; with a handful of merchants a process meets them all in the first rounds
#: and compiling lazily costs no more (``docs/performance.md``).
WARM_UP_MERCHANTS = 10


def warms_up(msg: Message, context: Context) -> bool:
    """Whether the process serving ``msg`` compiles every validation layout a fit can
    meet before its first training (``client.work.warm_up``):
    :func:`simulation_warms_up` with the merchants ``msg`` names on each node."""
    return simulation_warms_up(context, max(len(named_merchants(msg) or ()), 1))


def simulation_warms_up(context: Context, merchants_per_node: int = 1) -> bool:
    """Whether this node belongs to a simulation (no ``data-path``: its processes serve
    whichever merchants the engine hands them, of every size) of about
    :data:`WARM_UP_MERCHANTS` merchants or more (its virtual nodes times
    ``merchants_per_node``)."""
    if "data-path" in context.node_config:
        return False
    nodes = int(context.node_config.get("num-partitions", 1))
    return nodes * merchants_per_node >= WARM_UP_MERCHANTS


def serve(msg: Message, context: Context, handler: Handler) -> Message:
    """``handler``'s reply to ``msg``, or, when ``msg`` names merchants, the packed
    replies of each (:func:`serve_merchants`)."""
    merchants = named_merchants(msg)
    if merchants is None:
        return handler(msg, context, None)
    return serve_merchants(msg, context, merchants, handler)
