"""DP-FedAvg's mechanism (fedmae.privacy.mechanisms): clipping never exceeds C, the
noise has the configured standard deviation, and without noise the estimator is the
plain weighted sum over the fixed denominator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmae.errors import ConfigError, InvalidUpdate
from fedmae.privacy.mechanisms import (
    FixedDenominator,
    capped_weight,
    clip_to_norm,
    fold_,
    noise_generator,
    private_mean_,
)


def _norm(values: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(values, dtype=torch.float64))


finite_float32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=300, deadline=None)
@given(
    values=hnp.arrays(np.float32, st.integers(1, 64), elements=finite_float32),
    bound=st.floats(min_value=1e-30, max_value=1e30),
)
def test_a_clipped_update_never_exceeds_the_bound(values, bound):
    delta = torch.from_numpy(values.copy())
    before = _norm(delta)
    returned = clip_to_norm(delta, bound)
    assert returned == before
    assert _norm(delta) <= bound
    if before <= bound:
        assert torch.equal(delta, torch.from_numpy(values))  # untouched


@pytest.mark.parametrize(
    "values, bound",
    [
        ([3.4028235e38] * 8, 1.0),  # float32 max: the squares overflow float32, not float64
        ([1.0 + 2**-23] * 1000, math.sqrt(1000)),  # a norm a hair above C
        ([0.1] * 4097, 6.4015622),  # scaling by bound/norm rounds up in float32
        ([1.4e-45], 1e-45),  # the smallest subnormal cannot shrink by an ulp: it goes to 0
        ([-2.0, 0.0, 2.0], 1e-38),
    ],
)
def test_adversarial_values_are_clipped_to_at_most_c(values, bound):
    delta = torch.tensor(values, dtype=torch.float32)
    clip_to_norm(delta, bound)
    assert _norm(delta) <= bound
    assert torch.isfinite(delta).all()


def test_rounding_up_is_caught_on_random_directions():
    """Over many random directions, scaling to C lands above C for some in float32 (which
    is why clip_to_norm checks again); after clipping none is above."""
    generator = torch.Generator().manual_seed(5)
    above = 0
    for _ in range(300):
        delta = torch.randn(257, generator=generator) * 37.0
        naive = delta * (0.7 / _norm(delta))
        above += _norm(naive) > 0.7
        clip_to_norm(delta, 0.7)
        assert _norm(delta) <= 0.7
    assert above > 0  # the hazard is real, not hypothetical


def test_nan_or_inf_cannot_be_clipped():
    for bad in (math.nan, math.inf):
        with pytest.raises(InvalidUpdate):
            clip_to_norm(torch.tensor([1.0, bad]), 1.0)
    with pytest.raises(ConfigError):
        clip_to_norm(torch.ones(3), 0.0)


def test_weights_are_capped_at_one():
    assert capped_weight(300, 600) == 0.5
    assert capped_weight(600, 600) == 1.0
    assert capped_weight(2**40, 600) == 1.0  # a lie about n buys nothing
    with pytest.raises(InvalidUpdate):
        capped_weight(-1, 600)


def test_fold_refuses_terms_that_break_the_sensitivity():
    total = torch.zeros(4)
    with pytest.raises(InvalidUpdate, match="capped"):
        fold_(total, torch.zeros(4), 1.5, clip=1.0)
    with pytest.raises(InvalidUpdate, match="clipped"):
        fold_(total, torch.ones(4), 1.0, clip=1.0)  # norm 2 > 1
    assert torch.equal(total, torch.zeros(4))


def _round_sum(sites: int, size: int, clip: float, seed: int) -> torch.Tensor:
    """Σ wᵢ·clip(Δᵢ) over ``sites`` random deltas, weights from sample counts 100..."""
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(size)
    for i in range(sites):
        delta = torch.randn(size, generator=generator) * (0.01 + i)
        clip_to_norm(delta, clip)
        fold_(total, delta, capped_weight(100 * (i + 1), 300), clip)
    return total


def test_without_noise_the_estimator_is_the_weighted_sum_over_the_fixed_denominator():
    estimator = FixedDenominator.for_sampling(
        clip=1.0, noise_multiplier=0.0, rate=0.1, total_weight=40
    )
    assert estimator.denominator == pytest.approx(4.0)
    total = _round_sum(5, 10_000, 1.0, seed=1)
    expected = total / estimator.denominator
    assert torch.equal(private_mean_(total.clone(), estimator, noise_generator(0)), expected)


def test_the_noise_has_the_configured_standard_deviation():
    """The noised aggregate minus the noiseless one, over 2^20 coordinates: its variance
    is σ²C²/(qW)² within 5 standard errors of the sample variance (√(2/(n-1)) relative,
    0.7 % here), and its mean is 0 within 5 standard errors."""
    clip, sigma, rate, weight = 0.5, 1.3, 0.1, 100.0
    estimator = FixedDenominator.for_sampling(clip, sigma, rate, weight)
    assert estimator.noise_std == pytest.approx(sigma * clip / (rate * weight))
    assert estimator.sensitivity == pytest.approx(clip / (rate * weight))
    size = 1 << 20
    total = _round_sum(5, size, clip, seed=2)
    noiseless = total / estimator.denominator
    noise = (private_mean_(total, estimator, noise_generator(3)) - noiseless).double()
    n, std = noise.numel(), estimator.noise_std
    variance = float(noise.var())
    assert abs(variance / std**2 - 1) < 5 * math.sqrt(2 / (n - 1))
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)
    # Gaussian, not just the right variance: the fourth moment is 3σ⁴ (sd √96/√n relative).
    kurtosis = float((noise**4).mean()) / variance**2
    assert abs(kurtosis - 3) < 5 * math.sqrt(96 / n)


def test_default_noise_is_fresh_and_seeded_noise_repeats():
    estimator = FixedDenominator(clip=1.0, noise_multiplier=1.0, denominator=1.0)
    draws = [private_mean_(torch.zeros(64), estimator, noise_generator()) for _ in range(2)]
    assert not torch.equal(draws[0], draws[1])
    seeded = [private_mean_(torch.zeros(64), estimator, noise_generator(7)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])


@pytest.mark.parametrize(
    "clip, sigma, denominator",
    [
        (0.0, 1.0, 1.0),
        (1.0, -0.1, 1.0),
        (1.0, 1.0, 0.0),
        (math.inf, 1.0, 1.0),
        (1.0, math.nan, 1.0),
    ],
)
def test_bad_estimator_constants_are_config_errors(clip, sigma, denominator):
    with pytest.raises(ConfigError):
        FixedDenominator(clip, sigma, denominator)
