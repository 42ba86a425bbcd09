"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Why this and not a library: pycryptodome's Shamir shares only 16-byte secrets over
GF(2^128) (Flower splits a seed into halves and pickles the lists). One field large
enough for a whole 32-byte secret keeps one share per secret; 2^521 - 1 is a
Mersenne prime (so no table of primes to trust) and fits any 256-bit value. The
coefficients come from ``secrets``; shares sit at x = 1..n; reconstruction is
Lagrange interpolation at 0.
"""

from __future__ import annotations

import secrets as _random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1
SECRET_BYTES = 32
_Y_BYTES = (PRIME.bit_length() + 7) // 8  # 66
_X_BYTES = 2
SHARE_BYTES = _X_BYTES + _Y_BYTES


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial; x in 1..n."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """68 bytes: x (2, big-endian) then y (66, big-endian)."""
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Share:
        """A share from its 68 bytes; ValueError on a wrong length or a point off the field."""
        if len(raw) != SHARE_BYTES:
            raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
        x = int.from_bytes(raw[:_X_BYTES], "big")
        y = int.from_bytes(raw[_X_BYTES:], "big")
        if x == 0 or y >= PRIME:
            raise ValueError("a share's x is 1..n and its y is below the field's prime")
        return cls(x, y)


def split(secret: bytes, threshold: int, shares: int) -> list[Share]:
    """``shares`` shares of a 32-byte ``secret`` at x = 1..shares; any ``threshold``
    of them rebuild it."""
    return split_at(secret, threshold, range(1, shares + 1))


def split_at(secret: bytes, threshold: int, xs: Iterable[int]) -> list[Share]:
    """Shares of a 32-byte ``secret`` at the distinct points ``xs`` (site indices,
    1..65535); any ``threshold`` of them rebuild it."""
    points = list(xs)
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a shared secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(points)) != len(points) or not all(0 < x < 2 ** (8 * _X_BYTES) for x in points):
        raise ValueError(f"share points are distinct and in 1..65535, got {points}")
    if not 1 <= threshold <= len(points):
        raise ValueError(
            f"need 1 <= threshold <= shares, got threshold {threshold}, shares {len(points)}"
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_random.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in points]


def reconstruct(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret from at least ``threshold`` distinct shares (the first ``threshold`` used).

    ValueError on duplicate x-coordinates, on fewer than ``threshold`` shares, or when
    the shares interpolate to a value that is no 32-byte secret (shares from different
    sharings, or corrupted ones).
    """
    xs = [share.x for share in shares]
    if len(set(xs)) != len(xs):
        raise ValueError(f"duplicate share x-coordinates in {sorted(xs)}")
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    value = interpolate_at_zero(list(shares)[:threshold])
    if value >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("the shares do not interpolate to a 32-byte secret (mixed or corrupt)")
    return value.to_bytes(SECRET_BYTES, "big")


def interpolate_at_zero(points: Sequence[Share]) -> int:
    """The value at 0 of the polynomial through ``points`` (Lagrange, mod PRIME)."""
    return interpolate_at(points, 0)


def interpolate_at(points: Sequence[Share], x: int) -> int:
    """The value at ``x`` of the polynomial through ``points`` (Lagrange, mod PRIME): at
    0 the secret; at a holder's x, what its share should be."""
    total = 0
    for i, share_i in enumerate(points):
        numerator, denominator = 1, 1
        for j, share_j in enumerate(points):
            if i != j:
                numerator = numerator * (x - share_j.x) % PRIME
                denominator = denominator * (share_i.x - share_j.x) % PRIME
        total = (total + share_i.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    # Horner's rule, highest coefficient first.
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value
