"""Masks from ChaCha20 keystreams: they cancel in the sum and hide each input."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from fedmae.secagg import masks

SITES = [1, 2, 3, 4, 5]


def _seed(*labels: object) -> bytes:
    # Fixed, distinct 32-byte seeds keep these statistical tests deterministic.
    return hashlib.sha256(repr(labels).encode()).digest()


def _pair_seed(a: int, b: int) -> bytes:
    return _seed("pair", min(a, b), max(a, b))


def _inputs(n: int, bits: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    dtype = masks.ring_dtype(bits)
    return {site: rng.integers(0, 2**bits, n, dtype=dtype, endpoint=False) for site in SITES}


def _masked(site: int, x: np.ndarray, peers=SITES) -> np.ndarray:
    seeds = {peer: _pair_seed(site, peer) for peer in peers if peer != site}
    return masks.masked_input(x, site, seeds, _seed("self", site))


@pytest.mark.parametrize("bits", [32, 64])
def test_masks_cancel_exactly_in_the_ring(bits):
    n = 1000
    inputs = _inputs(n, bits)
    total = np.zeros(n, dtype=masks.ring_dtype(bits))
    for site in SITES:
        total += _masked(site, inputs[site])
    unmasked = masks.remove_self_masks(total, {site: _seed("self", site) for site in SITES})
    assert np.array_equal(unmasked, sum(inputs.values()))
    # Without removing the self masks the sum is not the inputs' sum.
    assert not np.array_equal(total, sum(inputs.values()))


@pytest.mark.parametrize("bits", [32, 64])
def test_a_dropped_sites_pairwise_masks_are_removed(bits):
    n, dropped = 500, 4
    inputs = _inputs(n, bits)
    survivors = [site for site in SITES if site != dropped]
    total = np.zeros(n, dtype=masks.ring_dtype(bits))
    for site in survivors:  # every survivor masked with the dropped site too
        total += _masked(site, inputs[site])
    total = masks.remove_self_masks(total, {site: _seed("self", site) for site in survivors})
    assert not np.array_equal(total, sum(inputs[site] for site in survivors))
    pairs = {(site, dropped): _pair_seed(site, dropped) for site in survivors}
    unmasked = masks.remove_dropped_pairwise(total, pairs)
    assert np.array_equal(unmasked, sum(inputs[site] for site in survivors))


def _byte_chi_square(values: np.ndarray) -> float:
    counts = np.bincount(values.view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("bits", [32, 64])
def test_one_masked_input_is_uniform_bytes(bits):
    n = 2**16
    # A very non-uniform input: small signed values, mostly 0x00 and 0xff bytes.
    x = np.arange(-(n // 2), n // 2, dtype=np.int64).view(np.uint64).astype(masks.ring_dtype(bits))
    # 255 degrees of freedom: mean 255, sd ~22.6; 400 is beyond 6 sd.
    assert _byte_chi_square(x) > 10_000
    assert _byte_chi_square(_masked(3, x)) < 400
    assert _byte_chi_square(masks.pairwise_mask(_seed("only"), n, bits)) < 400


def test_a_masked_input_is_unrelated_to_its_input():
    n = 2**16
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2**32, n, dtype=np.uint32)
    masked = _masked(2, x)
    r = np.corrcoef(x.astype(np.float64), masked.astype(np.float64))[0, 1]
    assert abs(r) < 4 / np.sqrt(n)  # ~4 standard errors of r under independence
    # Guard: the same statistic does see a relation when there is one.
    leaky = x + (masked >> np.uint32(8))
    assert abs(np.corrcoef(x.astype(np.float64), leaky.astype(np.float64))[0, 1]) > 0.5


def test_masks_are_deterministic_and_separated_by_purpose():
    seed = _seed("s")
    assert np.array_equal(masks.pairwise_mask(seed, 64, 32), masks.pairwise_mask(seed, 64, 32))
    assert not np.array_equal(masks.pairwise_mask(seed, 64, 32), masks.self_mask(seed, 64, 32))
    assert not np.array_equal(
        masks.pairwise_mask(seed, 64, 32), masks.pairwise_mask(_seed("t"), 64, 32)
    )
    # A longer mask extends a shorter one (one keystream, read in order, across chunks).
    long = masks.pairwise_mask(seed, 300_000, 32)
    assert np.array_equal(long[:1000], masks.pairwise_mask(seed, 1000, 32))
    # 64-bit elements are the same keystream read little-endian in pairs of words.
    words = masks.pairwise_mask(seed, 8, 32).astype(np.uint64)
    assert np.array_equal(masks.pairwise_mask(seed, 4, 64), words[0::2] | (words[1::2] << 32))


def test_the_keystream_is_chacha20_of_zeros():
    # RFC 8439 section 2.4.2 test vector: encrypting zeros returns the keystream itself.
    key = bytes(range(32))
    nonce = bytes.fromhex("000000000000004a00000000")
    first_block = np.frombuffer(
        bytes.fromhex(
            "224f51f3401bd9e12fde276fb8631ded8c131f823d2c06e27e4fcaec9ef3cf78"
            "8a3b0aa372600a92b57974cded2b9334794cba40c63e34cdea212c4cf07d41b7"
        ),
        dtype="<u4",
    )
    block1 = masks.expand(key, 16, 32, (1).to_bytes(4, "little") + nonce)
    assert np.array_equal(block1, first_block)


def test_pairwise_contributions_cancel_per_pair():
    for a, b in itertools.combinations(SITES, 2):
        seed = _pair_seed(a, b)
        both = masks.pairwise_contribution(a, b, seed, 16, 64) + masks.pairwise_contribution(
            b, a, seed, 16, 64
        )
        assert not both.any()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="2\\^32 or 2\\^64"):
        masks.pairwise_mask(_seed("s"), 4, 16)
    with pytest.raises(ValueError, match="32 bytes"):
        masks.self_mask(b"short", 4, 32)
    with pytest.raises(ValueError, match="uint32 or uint64"):
        masks.masked_input(np.zeros(4, np.int64), 1, {}, _seed("s"))
    with pytest.raises(ValueError, match="itself"):
        masks.pairwise_contribution(2, 2, _seed("s"), 4, 32)


def test_a_range_of_a_mask_is_the_same_elements_of_the_whole():
    seed = bytes(range(32))
    for bits in (32, 64):
        whole = masks.self_mask(seed, 5000, bits)
        for start, count in ((0, 5000), (1, 17), (15, 1), (16, 100), (4093, 907), (4999, 1)):
            part = masks.expand_range(seed, start, count, bits, masks.SELF_NONCE)
            assert np.array_equal(part, whole[start : start + count]), (bits, start, count)


def test_a_range_past_the_keystream_limit_is_refused():
    with pytest.raises(ValueError, match="256 GiB"):
        masks.expand_range(bytes(32), 2**36, 1, 64, masks.SELF_NONCE)


def test_a_range_written_into_a_given_array_is_the_same_elements():
    seed = bytes(range(32))
    for bits in (32, 64):
        whole = masks.self_mask(seed, 5000, bits)
        out = np.zeros(907, dtype=masks.ring_dtype(bits))
        part = masks.expand_range(seed, 4093, 907, bits, masks.SELF_NONCE, out=out)
        assert part is out and np.array_equal(out, whole[4093:])
        with pytest.raises(ValueError, match="contiguous"):
            masks.expand_range(seed, 0, 10, bits, masks.SELF_NONCE, out=out[:20:2])
