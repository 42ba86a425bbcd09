"""Masks: a ChaCha20 keystream from a 256-bit seed, read as elements of Z_{2^bits}.

A site's masked input is ``x + self_mask + sum(+pairwise for peers above it)
- sum(pairwise for peers below it)`` in the ring; over all sites the pairwise masks
cancel, and the server removes the self masks it reconstructs from shares.
Arithmetic is numpy unsigned integers, which wrap modulo 2^bits.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedmae.secagg.keys import SEED_BYTES

RING_DTYPES = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}

# cryptography's ChaCha20 nonce is 16 bytes: a 32-bit block counter then a 96-bit nonce.
# A seed is used for one purpose only, so a fixed nonce per purpose is safe, and keeps
# the two purposes' streams apart even if a seed were ever reused.
PAIRWISE_NONCE = (0).to_bytes(4, "little") + b"fedmae-pair\x00"
SELF_NONCE = (0).to_bytes(4, "little") + b"fedmae-self\x00"

# Elements per block when a masked input is built or a sum unmasked: 1 MiB of uint32
# (2 MiB of uint64) of keystream at a time, so no party holds a second full-length mask
# beside its one input or sum array (a 10 M-parameter model would need 40-80 MB each).
BLOCK = 1 << 18

_CHUNK_BYTES = 1 << 20
_ZEROS = bytes(_CHUNK_BYTES)


def ring_dtype(bits: int) -> np.dtype:
    """The numpy dtype of Z_{2^bits} (bits 32 or 64)."""
    try:
        return RING_DTYPES[bits]
    except KeyError:
        raise ValueError(f"the ring is 2^32 or 2^64, not 2^{bits}") from None


def bits_of(ring: np.ndarray) -> int:
    """The ring size (32 or 64) of a ring array, from its dtype."""
    for bits, dtype in RING_DTYPES.items():
        if ring.dtype == dtype:
            return bits
    raise ValueError(f"a ring array is uint32 or uint64, not {ring.dtype}")


def expand(seed: bytes, n: int, bits: int, nonce: bytes) -> np.ndarray:
    """``n`` uniform elements of Z_{2^bits}: the ChaCha20 keystream of ``seed``, little-endian."""
    return expand_range(seed, 0, n, bits, nonce)


def expand_range(
    seed: bytes, start: int, count: int, bits: int, nonce: bytes, out: np.ndarray | None = None
) -> np.ndarray:
    """Elements ``start .. start + count`` of ``expand(seed, ..., bits, nonce)``, written
    into ``out`` (``count`` elements of the ring dtype; a fresh array when None).

    ChaCha20 is seekable: the keystream's 64-byte block ``b`` is the cipher started at
    block counter ``b`` (the first 4 bytes of cryptography's 16-byte nonce, added to the
    nonce's own), so a long mask is made, added and dropped block by block.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if count < 0 or start < 0:
        raise ValueError(f"a mask range has a non-negative start and length, got {start}, {count}")
    dtype = ring_dtype(bits)
    first_byte = start * dtype.itemsize
    block, skip = divmod(first_byte, 64)
    block += int.from_bytes(nonce[:4], "little")  # the nonce's own starting counter
    if block + (skip + count * dtype.itemsize + 63) // 64 > 2**32:
        raise ValueError("a mask is at most 256 GiB (2^32 ChaCha20 blocks)")
    seek = block.to_bytes(4, "little") + nonce[4:]
    if out is None:
        out = np.empty(count, dtype=dtype)
    elif out.shape != (count,) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"a mask range is written into {count} contiguous {dtype} elements")
    raw = out.view(np.uint8)
    keystream = Cipher(algorithms.ChaCha20(seed, seek), mode=None).encryptor()
    if skip:
        keystream.update(_ZEROS[:skip])
    # Encrypting zeros straight into the array: no keystream bytes object and no copy
    # (10 M uint32: 27 -> 14 ms here), and never a second full-size zero buffer.
    for begin in range(0, raw.size, _CHUNK_BYTES):
        stop = min(begin + _CHUNK_BYTES, raw.size)
        keystream.update_into(_ZEROS[: stop - begin], raw[begin:stop])
    if sys.byteorder == "big":  # the keystream's bytes are little-endian elements
        out.byteswap(inplace=True)
    return out


def pairwise_mask(seed: bytes, n: int, bits: int) -> np.ndarray:
    """The mask two sites share, from their agreed seed."""
    return expand(seed, n, bits, PAIRWISE_NONCE)


def self_mask(seed: bytes, n: int, bits: int) -> np.ndarray:
    """A site's own mask, from its private seed (Shamir-shared so survivors can remove it)."""
    return expand(seed, n, bits, SELF_NONCE)


def pairwise_contribution(my_id: int, peer_id: int, seed: bytes, n: int, bits: int) -> np.ndarray:
    """What the pair (me, peer) adds to my masked input: +mask if peer > me, else -mask."""
    if my_id == peer_id:
        raise ValueError(f"a site has no pairwise mask with itself (id {my_id})")
    mask = pairwise_mask(seed, n, bits)
    return mask if peer_id > my_id else np.negative(mask)


def masked_input(
    x_ring: np.ndarray, my_id: int, peer_seeds: Mapping[int, bytes], self_seed: bytes
) -> np.ndarray:
    """``x_ring`` plus the self mask plus the signed pairwise masks of every peer."""
    bits = bits_of(x_ring)
    n = x_ring.size
    masked = x_ring + self_mask(self_seed, n, bits)
    for peer_id, seed in peer_seeds.items():
        masked += pairwise_contribution(my_id, peer_id, seed, n, bits)
    return masked


def remove_self_masks(masked_sum: np.ndarray, self_seeds: Mapping[int, bytes]) -> np.ndarray:
    """The sum with the surviving sites' self masks (reconstructed seeds) taken off."""
    bits = bits_of(masked_sum)
    out = masked_sum.copy()
    for seed in self_seeds.values():
        out -= self_mask(seed, out.size, bits)
    return out


def remove_dropped_pairwise(
    masked_sum: np.ndarray, dropped_seeds: Mapping[tuple[int, int], bytes]
) -> np.ndarray:
    """The sum with the pairwise masks of dropped sites taken off.

    ``dropped_seeds[(survivor, dropped)]`` is the seed the server recomputes from the
    dropped site's reconstructed mask key; the survivor's masked input carried that
    pair's contribution, which no longer cancels.
    """
    bits = bits_of(masked_sum)
    out = masked_sum.copy()
    for (survivor, dropped), seed in dropped_seeds.items():
        out -= pairwise_contribution(survivor, dropped, seed, out.size, bits)
    return out
