"""Every access of the client layer to Flower's private internals (flwr 1.42.0).

One small function per patch; each checks :data:`PIN` and, with another Flower
installed, leaves Flower's own code in place (one warning per process). The
``*_SOURCES`` constants hold the SHA-256 of the source of each Flower function a patch
replaces, mimics or relies on, as found in 1.42.0 (``tests/test_secagg_cost.py`` checks
them).

``secaggplus_names``: ``secaggplus_mod`` (the client side of SecAgg+) calls two helpers
by their module-global names, and both do work a merchant need not do:

- ``create_shares`` (Shamir's secret sharing of the mask seed and of the first private
  key, at ``share_keys``) splits the secret's 16-byte chunks with pycryptodome's
  ``Shamir.split``, whose field multiplication is a generic pure-Python loop, in a new
  thread pool on every call (the work holds the GIL). :func:`create_shares` computes the
  same shares, in the same byte layout (4-byte index, then each chunk's 16-byte share),
  with ``common.shamir.split_chunks``: the same polynomials over the same field, their
  coefficients drawn from the same generator in the same order, evaluated at the small
  public indices without the generic loop (figures in ``README.md``'s Overhead).
- ``bytes_to_private_key`` parses the client's PEM private key again for every
  neighbour (10 times at ``share_keys``, 10 at ``collect_masked_vectors``, 11 shares);
  :func:`private_key_of` parses each key once. The key objects it keeps are those of
  the last few rounds' state, whose bytes this process's context holds anyway.
- ``pseudo_rand_gen`` (the private and pairwise masks, at ``collect_masked_vectors``)
  builds a ``RandomState`` per mask, which first seeds itself from OS entropy;
  ``common.mask_prg.pseudo_rand_gen`` reseeds one the same legacy way instead.
- ``generate_shared_key``: the key agreements of the first private key with the
  neighbours' first public keys (one elliptic-curve Diffie-Hellman each, 10 at 20
  clients a round), which ``collect_masked_vectors`` derives the pairwise masks from,
  only need what ``share_keys`` already has; ``client.secagg`` agrees them there
  (:func:`pairwise_keys`, kept in the node's context state beside the private key they
  come from, dropped at ``collect_masked_vectors``), where the server's keys-ahead
  thread runs them during its evaluation, and :func:`shared_key` answers them at
  ``collect_masked_vectors``: the same keys, agreed one stage earlier.
- ``ndarray_to_bytes`` (the masked arrays, all in [0, 2**32), sent as int64):
  :func:`masked_to_bytes` sends them as uint32 straight away.

None changes what is computed or sent: the same key agreements, shares, masks and
quantisation; only how the same values are computed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from common.pinned import Pin

log = logging.getLogger(__name__)

PIN = Pin("flwr", "1.42.0", __name__, ("secaggplus_names",))

_MOD = "flwr.client.mod.secure_aggregation.secaggplus_mod"

#: ``secaggplus_names`` replaces five module-global names of ``secaggplus_mod`` that
#: ``_share_keys`` and ``_collect_masked_vectors`` call; :func:`create_shares` mimics
#: Flower's (layout and padding) and pycryptodome's split, ``pseudo_rand_gen`` Flower's
#: (``common.mask_prg``), :func:`private_key_of` and :func:`shared_key` wrap Flower's
#: parser and key agreement, :func:`masked_to_bytes` its encoder; :func:`pairwise_keys`
#: reads the state the mod saves.
SECAGGPLUS_NAMES_SOURCES = {
    "flwr.common.secure_aggregation.crypto.shamir:create_shares":
        "d922b6370cd57ff11dd72f0608997d4c0e9775fbb7c12c959234a55075092441",
    "flwr.common.secure_aggregation.crypto.shamir:combine_shares":
        "e9339f2cd706eed48b36c7ce73e0d68a96222bce8d8590bae4cca78552b68601",
    "flwr.common.secure_aggregation.secaggplus_utils:pseudo_rand_gen":
        "19ee2545ed58c0174c0b1a56f4211d635347156163ae76a711613badad4b25e9",
    "Crypto.Protocol.SecretSharing:Shamir.split":
        "3012a8785129c98c158ca380c201752f5c216dbed65c04ec171868ef07013b1b",
    "flwr.common.secure_aggregation.crypto.symmetric_encryption:generate_shared_key":
        "5ee640972ced1faa1d7ac8c607eb96afd4e4268a1cb184d51a5d632206686118",
    f"{_MOD}:SecAggPlusState.to_dict":
        "ad35f16447e6bd8a005070834b3fb52cb8229d2fd09e7c953ab545483f2e99a6",
    "flwr.supercore.primitives.asymmetric:bytes_to_private_key":
        "ed52cf7696efe92ce7fe3e53d209a8c2ae69023aa5f4d96af056d25b4acc23ba",
    f"{_MOD}:_share_keys": "0873eca66c3df037ec2dda9f725668b4e36d4e96f82d39cbd222316c1a17baca",
    f"{_MOD}:_collect_masked_vectors":
        "d638fe6563407bc1f45623a677d0ac83bf1db577afc0127ec50a71928f8ead44",
}

#: Every patch of this module and the Flower sources it depends on.
PATCHES = {"secaggplus_names": SECAGGPLUS_NAMES_SOURCES}


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Flower's ``create_shares``: ``num`` shares of ``secret`` (PKCS#7-padded to 16-byte
    chunks), any ``threshold`` of which rebuild it with Flower's ``combine_shares``;
    share i is i (4 bytes, little-endian) followed by each chunk's 16-byte share at
    point i, each chunk split as ``Shamir.split`` would (``common.shamir.split_chunks``:
    the same field, polynomials and draws; all chunks at once, no thread pool)."""
    from Crypto.Util.Padding import pad

    from common.shamir import split_chunks

    padded = pad(secret, 16)
    chunks = [padded[start:start + 16] for start in range(0, len(padded), 16)]
    return [i.to_bytes(4, "little", signed=False) + b"".join(share)
            for i, share in enumerate(split_chunks(threshold, num, chunks), start=1)]


@functools.lru_cache(maxsize=4)
def private_key_of(data: bytes) -> Any:
    """Flower's ``bytes_to_private_key``, parsed once per key (the last four kept)."""
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key

    return bytes_to_private_key(data)


def secaggplus_names() -> bool:
    """Point ``secaggplus_mod``'s ``create_shares``, ``bytes_to_private_key``,
    ``pseudo_rand_gen``, ``generate_shared_key`` and ``ndarray_to_bytes`` at
    :func:`create_shares`, :func:`private_key_of`, ``common.mask_prg.pseudo_rand_gen``,
    :func:`shared_key` and :func:`masked_to_bytes` in this process (idempotent); False
    with another Flower, whose mod is left as it is."""
    if not PIN.holds():
        return False
    # The package exports the mod function under the module's name: import the module.
    mod: Any = importlib.import_module(_MOD)
    from common.mask_prg import pseudo_rand_gen

    mod.create_shares = create_shares
    mod.bytes_to_private_key = private_key_of
    mod.pseudo_rand_gen = pseudo_rand_gen
    mod.generate_shared_key = shared_key
    mod.ndarray_to_bytes = masked_to_bytes
    return True


def masked_to_bytes(array: Any) -> bytes:
    """Flower's ``ndarray_to_bytes`` of a masked array, as uint32 when every entry lies in
    [0, 2**32) (``secaggplus_mod`` reduces them mod its power-of-2 modulus, at most
    2**32, but keeps int64): the same numbers in half the bytes, without
    ``client.secagg.as_uint32`` decoding and encoding them again."""
    import numpy as np
    from flwr.common import ndarray_to_bytes

    if array.dtype.kind in "iu" and (array.size == 0 or (
            int(array.min()) >= 0 and int(array.max()) < 2**32)):
        array = array.astype(np.uint32)
    return ndarray_to_bytes(array)


def masked_as_uint32() -> bool:
    """Whether ``secaggplus_mod`` encodes masked arrays with :func:`masked_to_bytes`."""
    mod: Any = importlib.import_module(_MOD)
    return mod.ndarray_to_bytes is masked_to_bytes


#: The ``context.state`` record in which ``share_keys`` leaves the pairwise keys that
#: ``collect_masked_vectors`` will mask with (:func:`pairwise_keys`).
PAIRWISE_RECORD = "fedecay.secagg.pairwise"

_AGREED = threading.local()


def pairwise_keys(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The key agreements of the first private key with each neighbour's first public
    key, from the mod's saved state after ``share_keys`` (``sk1``, ``nid`` and
    ``public_keys_dict``, as ``SecAggPlusState.to_dict`` flattens it): the keys
    ``collect_masked_vectors`` derives its pairwise masks from. None with another Flower
    or a state without them."""
    if not PIN.holds():
        return None
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        generate_shared_key,
    )
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    sk1, nid = state.get("sk1"), state.get("nid")
    nodes, values = state.get("public_keys_dict:K"), state.get("public_keys_dict:V")
    if not isinstance(sk1, bytes) or not isinstance(nodes, list) or \
            not isinstance(values, list) or len(values) != 2 * len(nodes):
        return None
    private = private_key_of(sk1)
    public = [values[2 * i] for i, node in enumerate(nodes) if node != nid]
    return {"sk1": sk1, "pk1": public,
            "keys": [generate_shared_key(private, bytes_to_public_key(pk)) for pk in public]}


@contextlib.contextmanager
def pairwise_keys_agreed(record: Mapping[str, Any]) -> Iterator[None]:
    """Within the block (this thread), :func:`shared_key` answers the pairs of
    ``record`` (from :func:`pairwise_keys`) without agreeing them again."""
    _AGREED.value = (private_key_of(record["sk1"]),
                     dict(zip(record["pk1"], record["keys"], strict=True)))
    try:
        yield
    finally:
        _AGREED.value = None


def shared_key(private_key: Any, public_key: Any) -> bytes:
    """Flower's ``generate_shared_key``; a pair agreed ahead (:func:`pairwise_keys_agreed`)
    is answered with the key agreed then: the same bytes."""
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        generate_shared_key,
    )

    agreed = getattr(_AGREED, "value", None)
    if agreed is not None and private_key is agreed[0]:
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        found = agreed[1].get(public_key_to_bytes(public_key))
        if found is not None:
            return bytes(found)
    return generate_shared_key(private_key, public_key)
