"""Payload digests as "algorithm:hex" strings, xxh3-128 by default.

An end-to-end check that the chunks were put back together right, fast enough (about
20 GB/s here, sha256 1.7 GB/s) to cost nothing next to the TLS stream. It is not what
makes the bytes trustworthy; the mTLS channel authenticates them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import xxhash

from fedmae.errors import InvalidUpdate

DEFAULT_DIGEST = "xxh3-128"
_DIGESTS: dict[str, Callable] = {"xxh3-128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def payload_digest(
    payload: memoryview | bytes | np.ndarray, algorithm: str = DEFAULT_DIGEST
) -> str:
    """``"algorithm:hex"`` of a payload."""
    try:
        make = _DIGESTS[algorithm]
    except KeyError:
        raise InvalidUpdate(
            f"unsupported digest algorithm {algorithm!r}; use one of {', '.join(_DIGESTS)}"
        ) from None
    return f"{algorithm}:{make(payload).hexdigest()}"


class PayloadDigest:
    """The default digest taken piece by piece; ``hexdigest()`` is "algorithm:hex"."""

    def __init__(self) -> None:
        self._hash = _DIGESTS[DEFAULT_DIGEST]()

    def update(self, piece: memoryview | bytes) -> None:
        self._hash.update(piece)

    def hexdigest(self) -> str:
        return f"{DEFAULT_DIGEST}:{self._hash.hexdigest()}"


def check_digest(
    payload: memoryview | bytes | np.ndarray, expected: str, default: str | None = None
) -> str:
    """The payload's digest in ``expected``'s algorithm; ``InvalidUpdate`` if they differ.
    An empty ``expected`` checks nothing and returns the default digest. ``default`` is
    the default algorithm's digest when the caller already has it (hashed as received)."""
    algorithm, sep, _ = expected.partition(":")
    if expected and not sep:
        raise InvalidUpdate(f"digest {expected[:40]!r} is not of the form 'algorithm:hex'")
    if default is not None and algorithm in ("", DEFAULT_DIGEST):
        actual = default
    else:
        actual = payload_digest(payload, algorithm or DEFAULT_DIGEST)
    if expected and actual != expected.lower():
        raise InvalidUpdate(
            f"payload digest mismatch: sender says {expected[:28]}..., received data "
            f"hashes to {actual[:28]}... (corrupted in transit?)"
        )
    return actual
