"""A Grid that shows the strategy one node per merchant while each virtual node hosts
several (``federation.merchants-per-node``, simulation only; ``common.hosting``).

The strategy samples, sends to and hears from merchant ids (their partition ids,
``0 .. merchants - 1``) exactly as it would nodes. :class:`MerchantGrid` groups a
batch of messages by the node hosting each merchant (the ``i``-th node in sorted
node-id order hosts ``common.hosting.hosted_by(i)``), sends one message per node and
group of identical content naming the merchants to serve, and splits each node's
reply into one reply per merchant: their own records, or their own error. A node
whose whole reply is an error (its actor died, say) fails each of its merchants with
that error; a node that never replies leaves its merchants unanswered (the strategy
counts them timed out). Sampling, screening, aggregation, DP wrappers, ``metrics.jsonl``
and checkpoints therefore see merchants as with one merchant a node.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict
from flwr.serverapp import Grid

from common.hosting import (
    ERROR_CODE_KEY,
    ERROR_REASON_KEY,
    ERROR_RECORD,
    MERCHANT_IDS_KEY,
    MERCHANTS_RECORD,
    hosted_by,
    nodes_needed,
    split_key,
)

log = logging.getLogger(__name__)

#: Error code of a merchant missing from its node's reply (a defect of the node).
MISSING_IN_REPLY = 110


class MerchantGrid:
    """``grid`` (a Flower Grid) seen as ``merchants`` nodes, ``per_node`` to a real one.

    Parameters
    ----------
    grid : the Grid the ServerApp was given (its nodes: ceil(merchants / per_node)).
    merchants : the simulation's merchants (partition ids ``0 .. merchants - 1``).
    per_node : merchants a node hosts (the last one may host fewer).
    """

    def __init__(self, grid: Grid, merchants: int, per_node: int) -> None:
        if merchants < 1 or per_node < 1:
            raise ValueError(f"MerchantGrid: need merchants >= 1 and per_node >= 1, got "
                             f"{merchants}, {per_node}")
        self._grid = grid
        self.merchants, self.per_node = merchants, per_node
        self._node_of: dict[int, int] = {}  # merchant -> node id, once every node is up
        #: node message id -> [(merchant, the merchant message's id, the message)]
        self._sent: dict[str, list[tuple[int, str, Message]]] = {}
        self._node_msg: dict[str, str] = {}  # merchant message id -> node message id
        self._ready: dict[str, Message] = {}  # merchant replies not pulled yet
        self.node_messages = 0  # node messages pushed, for the logs and the tests
        self._listener: Callable[[list[Message]], None] | None = None

    def listen(self, listener: Callable[[list[Message]], None] | None) -> None:
        """Have ``listener`` see each batch of merchant replies as it is pulled (the
        strategy reads them while the round's later replies are awaited); None: none."""
        self._listener = listener

    def get_node_ids(self) -> list[int]:
        """The merchants' ids, once every node they need has connected (else none, and
        the strategy waits for them as for nodes)."""
        if not self._node_of:
            nodes = sorted(self._grid.get_node_ids())
            needed = nodes_needed(self.merchants, self.per_node)
            if len(nodes) < needed:
                return []
            if len(nodes) > needed:
                raise RuntimeError(f"{len(nodes)} nodes connected for {self.merchants} "
                                   f"merchants at {self.per_node} a node: expected {needed}")
            self._node_of = {m: node for i, node in enumerate(nodes)
                             for m in hosted_by(i, self.per_node, self.merchants)}
            log.info("%d merchants on %d virtual nodes (%d a node)", self.merchants,
                     needed, self.per_node)
        return list(self._node_of)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Send one message per node and content; the ids returned are the merchant
        messages' own (their replies carry them as ``reply_to_message_id``)."""
        groups: dict[tuple[int, str, int], list[tuple[int, str, Message]]] = {}
        ids: list[str] = []
        for msg in messages:
            merchant = msg.metadata.dst_node_id
            if merchant not in self._node_of:
                raise ValueError(f"message for merchant {merchant}, which no node hosts "
                                 f"(merchants 0 .. {self.merchants - 1})")
            mid = str(uuid.uuid4())
            ids.append(mid)
            key = (self._node_of[merchant], msg.metadata.message_type, id(msg.content))
            groups.setdefault(key, []).append((merchant, mid, msg))
        node_messages = [(self._node_message(node, members), members)
                         for (node, _, _), members in groups.items()]
        pushed = list(self._grid.push_messages([m for m, _ in node_messages]))
        if len(pushed) != len(node_messages):
            raise RuntimeError(f"the grid stored {len(pushed)} of {len(node_messages)} "
                               "node messages")
        for nid, (_, members) in zip(pushed, node_messages, strict=True):
            self._sent[nid] = members
            for _, mid, _ in members:
                self._node_msg[mid] = nid
        self.node_messages += len(node_messages)
        return ids

    @staticmethod
    def _node_message(node: int, members: list[tuple[int, str, Message]]) -> Message:
        first = members[0][2]
        content = RecordDict(dict(first.content.items()))
        content[MERCHANTS_RECORD] = ConfigRecord(
            {MERCHANT_IDS_KEY: [merchant for merchant, _, _ in members]})
        meta = first.metadata
        return Message(content, dst_node_id=node, message_type=meta.message_type,
                       ttl=meta.ttl, group_id=meta.group_id or None)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The merchant replies among ``message_ids`` that have come."""
        wanted = set(message_ids)
        nodes = {self._node_msg[m] for m in wanted if m in self._node_msg}
        if nodes:
            for reply in self._grid.pull_messages(nodes):
                self._split(reply)
        found = [self._ready.pop(m) for m in wanted if m in self._ready]
        if found and self._listener is not None:
            self._listener(found)
        return found

    def _split(self, reply: Message) -> None:
        """File a node's reply as one reply per merchant in :attr:`_ready`."""
        members = self._sent.pop(reply.metadata.reply_to_message_id, None)
        if members is None:
            return  # not ours, or already split
        parts = None if reply.has_error() else unpack_reply(reply.content)
        for merchant, mid, msg in members:
            self._node_msg.pop(mid, None)
            if parts is None:
                body: RecordDict | Error = reply.error
            else:
                body = parts.get(merchant) or Error(
                    code=MISSING_IN_REPLY,
                    reason=f"merchant {merchant} missing from its node's reply")
            self._ready[mid] = _merchant_reply(body, reply, merchant, mid, msg)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """Push ``messages``, pull their replies until all came or ``timeout`` s passed
        (``server.pacing.PacedGrid`` does the same with paced looks)."""
        awaited = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while awaited and (end is None or time.monotonic() < end):
            found = self.pull_messages(awaited)
            replies.extend(found)
            awaited.difference_update(m.metadata.reply_to_message_id for m in found)
            if awaited:
                time.sleep(0.01)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def unpack_reply(content: RecordDict) -> dict[int, RecordDict | Error]:
    """A node's reply content as each merchant's records, or its error; keys not made
    by ``common.hosting.record_key`` are ignored."""
    parts: dict[int, dict[str, Any]] = {}
    for key, record in content.items():
        split = split_key(key)
        if split is not None:
            parts.setdefault(split[0], {})[split[1]] = record
    out: dict[int, RecordDict | Error] = {}
    for merchant, records in parts.items():
        error = records.get(ERROR_RECORD)
        if isinstance(error, ConfigRecord):
            out[merchant] = Error(code=int(error.get(ERROR_CODE_KEY, 0)),  # type: ignore[arg-type]
                                  reason=str(error.get(ERROR_REASON_KEY, "")))
        else:
            out[merchant] = RecordDict(records)
    return out


def _merchant_reply(body: RecordDict | Error, reply: Message, merchant: int, mid: str,
                    msg: Message) -> Message:
    """A reply to merchant message ``msg`` (id ``mid``) from ``merchant``, carrying
    ``body``, dated as its node's ``reply``."""
    meta = reply.metadata
    metadata = Metadata(run_id=meta.run_id, message_id=str(uuid.uuid4()),
                        src_node_id=merchant, dst_node_id=meta.dst_node_id,
                        reply_to_message_id=mid, group_id=msg.metadata.group_id,
                        created_at=meta.created_at, ttl=meta.ttl,
                        message_type=meta.message_type)
    # Message's ``metadata`` argument (public in its signature, absent from its typed
    # overloads) is how Flower itself rebuilds a received message.
    if isinstance(body, Error):
        return Message(error=body, metadata=metadata)  # type: ignore[call-overload]
    return Message(content=body, metadata=metadata)  # type: ignore[call-overload]
