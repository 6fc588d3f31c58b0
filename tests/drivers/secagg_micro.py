"""Milliseconds of SecAgg+'s pure-Python steps, Flower's (pycryptodome's) against this
project's (README, Secure aggregation, Overhead); not run by the tests.

    python tests/drivers/secagg_micro.py [REPEATS]

At 20 clients a round (11 shares, threshold 7): a client splits its 32-byte mask seed
and its 306-byte PEM private key into 11 shares each (``share_keys``) and builds 11
masks of the default model's 10,851 entries (``collect_masked_vectors``); the server
rebuilds 20 seeds from 7 shares each and their 20 masks (``unmask``). The key
agreement (one P-384 ECDH in ``cryptography``, 20 a client) is timed for scale: it is
the same code on both sides.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable


def _ms(step: Callable[[], object], repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes

    import client.flower_seam as seam
    import server.secagg_workflow as workflow
    from common import mask_prg

    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    private, public = generate_key_pairs()
    pem, seed = private_key_to_bytes(private), os.urandom(32)
    seed_shares = create_shares(seed, 7, 11)[:7]
    shapes = [(1,), (10_850,)]
    rows = [
        ("split the 32-byte seed, 11 shares", lambda: create_shares(seed, 7, 11),
         lambda: seam.create_shares(seed, 7, 11)),
        (f"split the {len(pem)}-byte key, 11 shares", lambda: create_shares(pem, 7, 11),
         lambda: seam.create_shares(pem, 7, 11)),
        ("rebuild a seed from 7 shares", lambda: combine_shares(seed_shares),
         lambda: workflow.combine_shares(seed_shares)),
        ("one mask of 10,851 entries", lambda: pseudo_rand_gen(seed, 2**32, shapes),
         lambda: mask_prg.pseudo_rand_gen(seed, 2**32, shapes)),
    ]
    print(f"ms a call, mean of {repeats}: Flower's / this project's")
    for name, flowers, ours in rows:
        print(f"  {name}: {_ms(flowers, repeats):.3f} / {_ms(ours, repeats):.3f}")
    other = generate_key_pairs()[1]
    print(f"  one key agreement (P-384 ECDH, both): "
          f"{_ms(lambda: generate_shared_key(private, other), repeats * 10):.3f}")


if __name__ == "__main__":
    main()
