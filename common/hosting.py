"""Several simulated merchants on one virtual node: the names both sides agree on.

With ``federation.merchants-per-node`` K > 1 the Simulation Engine runs ceil(M / K)
virtual SuperNodes instead of one per merchant. The server still samples merchants
(``server.merchant_grid.MerchantGrid`` shows it one id per merchant, its partition
id) and sends each node one message naming the sampled merchants it hosts
(:data:`MERCHANTS_RECORD`); the node's ClientApp works for each named merchant in turn
(``client.hosted``) and replies with every merchant's records under keys made by
:func:`record_key`, an error under :data:`ERROR_RECORD`. The server splits the reply
back into one reply per merchant, so everything after the grid sees merchants as with
K = 1. Nothing here imports Flower: the client packs and the server unpacks with these
names.
"""

from __future__ import annotations

#: ConfigRecord of a node's instruction naming the merchants (partition ids) to serve.
MERCHANTS_RECORD = "fedecay.merchants"
#: Its one key: the partition ids, in the order the node serves them.
MERCHANT_IDS_KEY = "ids"
#: Record name (under :func:`record_key`) of a merchant's error: a ConfigRecord with
#: :data:`ERROR_CODE_KEY` and :data:`ERROR_REASON_KEY`.
ERROR_RECORD = "error"
ERROR_CODE_KEY = "code"
ERROR_REASON_KEY = "reason"
#: Separates the merchant's partition id from its record's name in a node's reply.
_SEP = "/"


def record_key(merchant: int, name: str) -> str:
    """The key of merchant ``merchant``'s record ``name`` in its node's reply."""
    return f"{int(merchant)}{_SEP}{name}"


def split_key(key: str) -> tuple[int, str] | None:
    """(merchant, record name) of a node reply's key; None for a key not made by
    :func:`record_key`."""
    head, sep, name = key.partition(_SEP)
    if not sep or not name or not head.isdigit():
        return None
    return int(head), name


def hosted_by(index: int, merchants_per_node: int, merchants: int) -> range:
    """The merchants (partition ids) the ``index``-th node, in sorted node-id order,
    hosts: ``[index * K, (index + 1) * K)`` cut at ``merchants``."""
    start = index * merchants_per_node
    return range(start, min(start + merchants_per_node, merchants))


def nodes_needed(merchants: int, merchants_per_node: int) -> int:
    """Virtual nodes for ``merchants`` merchants, ``merchants_per_node`` a node."""
    return -(-merchants // merchants_per_node)
