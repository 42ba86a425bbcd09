"""Fixed point: clipping, unbiased stochastic rounding, the ring and its overflow check."""

from __future__ import annotations

import numpy as np
import pytest

from fedmae.errors import ConfigError
from fedmae.secagg import fixed_point, masks


def test_stochastic_rounding_is_unbiased():
    draws = 200_000
    rng = np.random.default_rng(0)
    for value in (0.3, -2.75, 5.0, 1e-3):
        rounded = fixed_point.stochastic_round(np.full(draws, value), rng)
        assert set(np.unique(rounded)) <= {np.floor(value), np.ceil(value)}
        # Bernoulli(frac) variance <= 1/4: 6 standard errors of the mean.
        assert abs(rounded.mean() - value) < 6 * 0.5 / np.sqrt(draws)
    # Guard: rounding to nearest would miss 0.3 by far more than the bound.
    assert abs(np.rint(0.3) - 0.3) > 6 * 0.5 / np.sqrt(draws)


def test_an_injected_generator_makes_quantization_reproducible():
    values = np.linspace(-1, 1, 101)
    first = fixed_point.quantize(values, 1.0, 4, np.random.default_rng(7))
    second = fixed_point.quantize(values, 1.0, 4, np.random.default_rng(7))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, fixed_point.quantize(values, 1.0, 4, np.random.default_rng(8)))


def test_values_are_clipped_to_the_bound():
    q = fixed_point.quantize(np.array([-100.0, -2.0, 0.5, 2.0, 100.0]), 2.0, 3)
    assert q[0] == q[1] == -16 and q[3] == q[4] == 16
    assert q[2] == 4
    with pytest.raises(ValueError, match="positive"):
        fixed_point.clip(np.zeros(2), 0.0)


def test_negative_values_are_twos_complement():
    ring = fixed_point.to_ring(np.array([-1, -(2**31), 2**31 - 1, 0]), 32)
    assert ring.dtype == np.uint32
    assert list(ring) == [2**32 - 1, 2**31, 2**31 - 1, 0]
    assert list(fixed_point.to_signed(ring)) == [-1, -(2**31), 2**31 - 1, 0]
    assert fixed_point.to_ring(np.array([-5]), 64)[0] == 2**64 - 5


@pytest.mark.parametrize(("bits", "frac_bits"), [(32, 16), (64, 40)])
def test_the_sum_decodes_within_the_rounding_bound(bits, frac_bits):
    sites, clip, n = 5, 4.0, 10_000
    rng = np.random.default_rng(3)
    fixed_point.check_ring(bits, sites, 1, clip, frac_bits)
    deltas = [rng.normal(0, 2.0, n) for _ in range(sites)]
    total = np.zeros(n, dtype=masks.ring_dtype(bits))
    for delta in deltas:
        total += fixed_point.encode(delta, clip, frac_bits, bits, rng=rng)
    decoded = fixed_point.decode_sum(total, frac_bits)
    expected = sum(np.clip(delta, -clip, clip) for delta in deltas)
    error = np.abs(decoded - expected)
    assert error.max() < sites / 2**frac_bits
    # Negative and positive sums both occur and decode: the wrap is two's complement.
    assert (expected < -1).any() and (expected > 1).any()


def test_weighted_sums_and_the_weight_decode_exactly():
    bits, frac_bits, clip = 32, 12, 2.0
    weights = [120, 7, 300]
    rng = np.random.default_rng(5)
    deltas = [rng.uniform(-clip, clip, 1000) for _ in weights]
    fixed_point.check_ring(bits, len(weights), max(weights), clip, frac_bits)
    total = np.zeros(1000, dtype=np.uint32)
    weight_total = np.zeros(1, dtype=np.uint32)
    for delta, weight in zip(deltas, weights, strict=True):
        total += fixed_point.encode(delta, clip, frac_bits, bits, weight=weight, rng=rng)
        weight_total += fixed_point.to_ring(np.array([weight]), bits)
    assert int(fixed_point.to_signed(weight_total)[0]) == sum(weights)
    weighted_mean = fixed_point.decode_sum(total, frac_bits) / sum(weights)
    expected = sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    assert np.abs(weighted_mean - expected).max() < 1 / 2**frac_bits


def test_ring_bits_needed_is_tight():
    # One site, weight 1: a largest value of 2^31 - 1 fits a 32-bit ring, 2^31 does not.
    assert fixed_point.ring_bits_needed(1, 1, 2**31 - 1, 0) == 32
    assert fixed_point.ring_bits_needed(1, 1, 2**31, 0) == 33
    fixed_point.check_ring(32, 1, 1, 2**31 - 1, 0)
    top = fixed_point.encode(np.array([2.0**31 - 1]), 2**31 - 1, 0, 32)
    assert fixed_point.decode_sum(top, 0)[0] == 2**31 - 1
    # ... and one more wraps to a negative value: the overflow the check prevents.
    over = fixed_point.encode(np.array([2.0**31]), 2**31, 0, 32)
    assert fixed_point.decode_sum(over, 0)[0] < 0
    with pytest.raises(ConfigError, match="needs 33 bits; use 64"):
        fixed_point.check_ring(32, 1, 1, 2**31, 0)


def test_the_overflow_check_names_the_configuration():
    # Flower's defaults (clip 8, 2^22) with 1000 sites of weight 1000 overflow 32 bits.
    with pytest.raises(ConfigError, match="1000 sites x weight cap 1000 x clip 8.0"):
        fixed_point.check_ring(32, 1000, 1000, 8.0, 22)
    fixed_point.check_ring(64, 1000, 1000, 8.0, 22)
    with pytest.raises(ConfigError, match="no ring fits"):
        fixed_point.check_ring(64, 2**20, 2**20, 8.0, 22)
    with pytest.raises(ConfigError, match="32 or 64 bits"):
        fixed_point.check_ring(16, 1, 1, 1.0, 0)
    with pytest.raises(ValueError, match="sites >= 1"):
        fixed_point.ring_bits_needed(0, 1, 1.0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        fixed_point.encode(np.zeros(2), 1.0, 2, 32, weight=-1)


def test_the_ring_plan_takes_32_bits_while_they_fit_and_the_most_fraction_bits():
    assert fixed_point.plan_ring(3, 600, 1.0) == (32, 20)  # 3 x 600 x 2^20 < 2^31
    bits, frac = fixed_point.plan_ring(100, 10_000, 1.0)
    assert (bits, frac) == (32, 11)
    assert fixed_point.ring_bits_needed(100, 10_000, 1.0, frac) <= 32
    assert fixed_point.ring_bits_needed(100, 10_000, 1.0, frac + 1) > 32
    assert fixed_point.plan_ring(10_000, 10_000, 4.0) == (64, 24)  # too big for 32
    assert fixed_point.plan_ring(3, 600, 1.0, ring_bits=64) == (64, 24)


def test_a_ring_too_small_for_the_configuration_is_a_clear_error():
    with pytest.raises(ConfigError, match="32-bit ring can overflow"):
        fixed_point.plan_ring(10_000, 10_000, 4.0, ring_bits=32)


@pytest.mark.parametrize(("bits", "frac_bits"), [(32, 16), (64, 40)])
def test_the_mean_decoded_in_place_is_the_plain_decoding(bits, frac_bits):
    # Block by block over the sum's own memory (more than one block, a ragged last one)
    # gives, value for value, the float32 of decode_sum(...) / weight.
    n, weight = 3 * (1 << 18) + 5, 7
    rng = np.random.default_rng(11)
    values = rng.integers(-(2**30), 2**30, n) * (1 if bits == 32 else 2**20)
    total = fixed_point.to_ring(values, bits)
    expected = (fixed_point.decode_sum(total, frac_bits) / weight).astype(np.float32)
    mean = fixed_point.decode_mean_in_place(total, frac_bits, weight)
    assert mean.dtype == np.float32 and mean.shape == (n,)
    assert np.shares_memory(mean, total)
    assert np.array_equal(mean, expected)
