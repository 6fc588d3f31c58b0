"""Shamir's secret sharing over GF(2^128), share for share as ``pycryptodome``'s.

``Crypto.Protocol.SecretSharing.Shamir`` (with ``ssss=False``), which Flower's SecAgg+
uses for every client's mask seed and private key, multiplies field elements with a
generic 128-step loop that builds two 128-character strings a step. Yet every product
it forms has one public factor: a share's index (a small integer) when splitting, a
Lagrange coefficient (from the indices alone) when combining. :func:`split` and
:func:`combine` evaluate the same polynomials in the same field: the product with a
public factor is a carry-less multiplication that loops over that factor's bits only
(no branch on a secret), reduced modulo pycryptodome's irreducible polynomial
x^128 + x^7 + x^2 + x + 1. The random coefficients come from the same generator, drawn
in the same order (``tests/test_shamir.py`` compares shares and secrets byte for byte
with pycryptodome's on fixed draws). Nothing else changes: the same shares, threshold,
and points 1..n; ``pycryptodome`` still inverts the Lagrange denominators.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

_MASK = (1 << 128) - 1


def _reduce(value: int) -> int:
    """A product of two field elements (degree < 255) modulo x^128 + x^7 + x^2 + x + 1:
    two passes whatever the value (the first leaves degree < 135, the second < 128)."""
    for _ in range(2):
        high = value >> 128  # high * x^128 = high * (x^7 + x^2 + x + 1)
        value = (value & _MASK) ^ high ^ (high << 1) ^ (high << 2) ^ (high << 7)
    return value


def _bits(public: int) -> tuple[int, ...]:
    """The positions of the set bits of a public factor."""
    return tuple(i for i in range(public.bit_length()) if public >> i & 1)


def _times(value: int, bits: Sequence[int]) -> int:
    """``value`` times the public polynomial whose set bits are ``bits`` (unreduced)."""
    product = 0
    for i in bits:
        product ^= value << i
    return product


def split(threshold: int, num: int, secret: bytes,
          rng: Callable[[int], bytes] | None = None) -> list[tuple[int, bytes]]:
    """``Shamir.split(threshold, num, secret, ssss=False)``: ``num`` shares (index from 1,
    16 bytes) of a 16-byte ``secret``, any ``threshold`` of which rebuild it.

    ``rng`` draws the ``threshold - 1`` random coefficients (16 bytes each, in
    pycryptodome's order); by default pycryptodome's ``get_random_bytes``.
    """
    return [(i + 1, chunks[0]) for i, chunks in
            enumerate(split_chunks(threshold, num, [secret], rng))]


def split_chunks(threshold: int, num: int, secrets: Sequence[bytes],
                 rng: Callable[[int], bytes] | None = None) -> list[list[bytes]]:
    """:func:`split` of each 16-byte secret in turn (the coefficients drawn secret after
    secret, as so many ``Shamir.split`` calls would): per share index 1..``num``, its
    16-byte share of each secret.

    The secrets are evaluated together: each sits in its own 160-bit slot of one
    integer, so a shift or XOR of the integer acts on every slot, and the products'
    overflow (below 32 bits for an index below 2**32) stays within its slot until
    reduced.
    """
    if any(len(secret) != 16 for secret in secrets):
        raise ValueError("The encoded value must be an integer or a 16 byte string")
    if not 0 < num < 2**32:
        raise ValueError(f"Shamir shares: {num} shares, expected 1 to 2**32 - 1")
    if rng is None:
        from Crypto.Random import get_random_bytes

        rng = get_random_bytes
    draws = [[rng(16) for _ in range(threshold - 1)] for _ in secrets]
    # p(x) = c_1 x^(k-1) + ... + c_(k-1) x + secret, evaluated by Horner's rule
    coeffs = [_pack([int.from_bytes(d[j], "big") for d in draws])
              for j in range(threshold - 1)]
    coeffs.append(_pack([int.from_bytes(secret, "big") for secret in secrets]))
    low, high = _slot_masks(len(secrets))
    shares = []
    for index in range(1, num + 1):
        bits = _bits(index)
        packed = 0
        for coeff in coeffs:
            product = _times(packed, bits)
            over = (product >> 128) & high  # each slot's overflow, at its slot's start
            packed = (product & low) ^ over ^ (over << 1) ^ (over << 2) ^ (over << 7) ^ coeff
        shares.append([((packed >> (_SLOT * c)) & _MASK).to_bytes(16, "big")
                       for c in range(len(secrets))])
    return shares


_SLOT = 160  # bits a secret takes in split_chunks: 128 and room for a product's overflow


def _pack(values: Sequence[int]) -> int:
    packed = 0
    for c, value in enumerate(values):
        packed |= value << (_SLOT * c)
    return packed


@functools.lru_cache(maxsize=16)
def _slot_masks(count: int) -> tuple[int, int]:
    """Per slot: its 128 low bits, and the 32 bits above them moved to its start."""
    return _pack([_MASK] * count), _pack([(1 << 32) - 1] * count)


@functools.lru_cache(maxsize=64)
def lagrange_at_zero(indices: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Per index x_j, the set bits of prod_(m != j) x_m / (x_j + x_m): the weight of
    share j in the secret (public, computed with pycryptodome's field elements)."""
    from Crypto.Protocol import SecretSharing

    element: Any = SecretSharing._Element  # its stubs omit the field's operators
    weights = []
    for j, x_j in enumerate(indices):
        numerator, denominator = element(1), element(1)
        for m, x_m in enumerate(indices):
            if m != j:
                numerator *= element(x_m)
                denominator *= element(x_j) + element(x_m)
        weights.append(_bits(int(numerator * denominator.inverse())))
    return tuple(weights)


def combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """``Shamir.combine(shares, ssss=False)``: the 16-byte secret behind ``shares``
    (index, 16 bytes); a wrong secret, as pycryptodome's, when too few are given."""
    indices = tuple(index for index, _ in shares)
    if len(set(indices)) != len(indices):
        raise ValueError("Duplicate share")
    if any(len(share) != 16 for _, share in shares):
        raise ValueError("The encoded value must be an integer or a 16 byte string")
    secret = 0
    for (_, share), bits in zip(shares, lagrange_at_zero(indices), strict=True):
        secret ^= _times(int.from_bytes(share, "big"), bits)
    return _reduce(secret).to_bytes(16, "big")
