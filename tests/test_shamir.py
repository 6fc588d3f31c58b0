"""``common.shamir`` and ``common.mask_prg`` give, byte for byte, what pycryptodome's
``Shamir`` and Flower's SecAgg+ helpers give on the same random draws."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
from Crypto.Protocol import SecretSharing
from Crypto.Protocol.SecretSharing import Shamir

import client.flower_seam as client_seam
from common import mask_prg, shamir
from server import secagg_workflow


def _stream(seed: int) -> Callable[[int], bytes]:
    """A seeded stand-in for ``get_random_bytes``."""
    rng = random.Random(seed)
    return rng.randbytes


@pytest.mark.parametrize(("threshold", "num"), [(1, 1), (1, 4), (2, 3), (3, 5), (7, 11),
                                                (8, 15), (12, 20), (5, 100)])
def test_split_gives_pycryptodomes_shares_on_the_same_draws(
        threshold: int, num: int, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = bytes(random.Random(threshold * num).randbytes(16))
    monkeypatch.setattr(SecretSharing, "rng", _stream(7))
    assert shamir.split(threshold, num, secret, rng=_stream(7)) == \
        Shamir.split(threshold, num, secret, ssss=False)


def test_split_chunks_draws_secret_after_secret_as_so_many_splits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = [bytes([i]) * 16 for i in range(23)] + [bytes(16), b"\xff" * 16]
    monkeypatch.setattr(SecretSharing, "rng", _stream(3))
    expected = [Shamir.split(7, 11, secret, ssss=False) for secret in secrets]
    got = shamir.split_chunks(7, 11, secrets, rng=_stream(3))
    assert got == [[expected[c][i][1] for c in range(len(secrets))] for i in range(11)]
    # the default generator is pycryptodome's, looked up when called
    monkeypatch.setattr("Crypto.Random.get_random_bytes", _stream(5))
    monkeypatch.setattr(SecretSharing, "rng", _stream(5))
    expected = [Shamir.split(3, 4, secret) for secret in secrets[:2]]
    assert shamir.split_chunks(3, 4, secrets[:2]) == \
        [[split[i][1] for split in expected] for i in range(4)]


def test_combine_gives_pycryptodomes_secret_from_any_shares() -> None:
    rng = random.Random(11)
    for _ in range(40):
        threshold = rng.randint(1, 9)
        num = rng.randint(threshold, 16)
        secret = rng.randbytes(16)
        shares = Shamir.split(threshold, num, secret)
        picked = rng.sample(shares, threshold)
        assert shamir.combine(picked) == Shamir.combine(picked) == secret
        more = rng.sample(shares, rng.randint(threshold, num))
        assert shamir.combine(more) == Shamir.combine(more) == secret
        if threshold > 1:  # too few: the same wrong secret as pycryptodome's
            fewer = picked[:-1]
            assert shamir.combine(fewer) == Shamir.combine(fewer) != secret


def test_combine_refuses_what_pycryptodome_refuses() -> None:
    shares = Shamir.split(2, 3, bytes(16))
    with pytest.raises(ValueError, match="Duplicate share"):
        shamir.combine([shares[0], shares[0]])
    with pytest.raises(ValueError, match="16 byte"):
        shamir.combine([(1, b"short"), shares[1]])
    with pytest.raises(ValueError, match="16 byte"):
        shamir.split(2, 3, b"short")


def test_the_seams_shares_are_flowers_on_the_same_draws(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """One chunk: Flower's ``create_shares`` draws in order (its pool has one thread)."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

    monkeypatch.setattr(SecretSharing, "rng", _stream(1))
    monkeypatch.setattr("Crypto.Random.get_random_bytes", _stream(1))
    assert client_seam.create_shares(b"seed", 3, 5) == create_shares(b"seed", 3, 5)
    secret = bytes(range(200))  # 13 chunks: Flower's pool draws in any order
    shares = client_seam.create_shares(secret, 7, 11)
    assert [s[:4] for s in shares] == [i.to_bytes(4, "little") for i in range(1, 12)]
    assert combine_shares(shares[4:]) == secagg_workflow.combine_shares(shares[:7]) == secret


@pytest.mark.parametrize("seed", [b"\x00" * 32, bytes(range(32)), b"k" * 44])
def test_the_mask_generator_gives_flowers_masks(seed: bytes) -> None:
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    shapes = [(), (1,), (3, 4), (10_850,)]
    np.random.rand(5)  # whatever the global generator did before
    for _ in range(2):  # a reused generator starts afresh from the seed
        for ours, flowers in zip(mask_prg.pseudo_rand_gen(seed, 2**32, shapes),
                                 pseudo_rand_gen(seed, 2**32, shapes), strict=True):
            assert ours.dtype == flowers.dtype == np.int64
            assert ours.shape == flowers.shape
            np.testing.assert_array_equal(ours, flowers)
    with pytest.raises(ValueError, match="multiple of 4"):
        mask_prg.pseudo_rand_gen(b"abc", 2**32, shapes)
