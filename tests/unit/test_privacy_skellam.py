"""Distributed Skellam noise (fedmae.privacy.skellam): the sampler's variance, the sum
over sites is the target Skellam, conditional rounding keeps its bound, and the RDP
bound holds against the exact Rényi divergence and sits just above the Gaussian's."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedmae.errors import ConfigError
from fedmae.privacy.accountant import PoissonSampling, epsilon_for
from fedmae.privacy.skellam import (
    POISSON_MAX_MEAN,
    SKELLAM_ORDERS,
    DistributedSkellam,
    conditional_round,
    frac_bits_for,
    noise_rng,
    rounded_norm_bound,
    skellam_noise,
    skellam_rdp,
)
from fedmae.secagg import fixed_point

DELTA = 1e-5


def _variance_within_bound(samples: np.ndarray, variance: float) -> None:
    """Sample variance against V within 5 standard errors; a Skellam's excess kurtosis is
    1/V, so Var(s²)/V² = (2 + 1/V)/n."""
    n = samples.size
    measured = float(np.var(samples.astype(np.float64), ddof=1))
    assert abs(measured / variance - 1) < 5 * math.sqrt((2 + 1 / variance) / n)
    assert abs(float(samples.mean())) < 5 * math.sqrt(variance / n)


def test_the_sampler_has_the_asked_variance():
    samples = skellam_noise(1 << 20, 1234.5, noise_rng(1))
    assert samples.dtype == np.int64
    _variance_within_bound(samples, 1234.5)


def test_the_sum_over_sites_is_the_target_skellam():
    """Ten sites' shares sum to variance V (10^6 coordinates), and for a small V the sum's
    histogram is the Skellam pmf of variance V (χ² goodness of fit, p > 0.001)."""
    config = DistributedSkellam(clip=1.0, noise_multiplier=1.0, frac_bits=4, dim=1, min_sites=10)
    rng = noise_rng(2)
    total = sum(skellam_noise(1 << 20, config.site_variance, rng) for _ in range(10))
    _variance_within_bound(total, config.variance)

    small = sum(skellam_noise(200_000, 0.6, rng) for _ in range(10))  # V = 6
    values, counts = np.unique(small, return_counts=True)
    pmf = stats.skellam.pmf(values, 3.0, 3.0)
    keep = pmf * small.size >= 5  # χ² wants >= 5 expected per cell; lump the tails
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(pmf[keep], 1 - pmf[keep].sum()) * small.size
    assert stats.chisquare(observed, expected).pvalue > 0.001


def test_conditional_rounding_is_integer_unbiased_and_within_its_bound():
    rng = noise_rng(3)
    dim, norm = 4096, 300.0
    direction = rng.standard_normal(dim)
    scaled = direction * (norm / np.linalg.norm(direction))
    bound = rounded_norm_bound(norm, dim)
    assert norm < bound < norm + math.sqrt(dim)
    draws = np.stack([conditional_round(scaled, bound, rng) for _ in range(200)])
    assert draws.dtype == np.int64
    assert np.all(np.linalg.norm(draws, axis=1) <= bound)
    assert np.all(np.abs(draws - scaled) < 1)
    # conditioning on the norm leaves the rounding all but unbiased (bias << 1 unit)
    assert abs(float((draws.mean(axis=0) - scaled).mean())) < 0.01


@pytest.mark.parametrize("variance", [4.0, 25.0, 200.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_the_rdp_bound_holds_against_the_exact_divergence(variance, shift):
    """One coordinate: D_α(Sk + shift ‖ Sk), summed over the support, is at most the bound
    (Δ₁ = Δ₂ = shift) at every order checked."""
    mu = variance / 2
    support = np.arange(
        -shift - 60 * int(math.sqrt(variance)) - 60, 60 * int(math.sqrt(variance)) + 60
    )
    p = stats.skellam.logpmf(support - shift, mu, mu)
    q = stats.skellam.logpmf(support, mu, mu)
    orders = np.array([2.0, 3.0, 5.0, 10.0, 20.0])
    bound = skellam_rdp(orders, shift, shift, variance)
    for alpha, limit in zip(orders, bound, strict=True):
        with np.errstate(invalid="ignore"):  # -inf + inf where both pmfs underflow
            terms = alpha * p + (1 - alpha) * q
        # beyond float64's reach both pmfs are 0 (logpmf -inf): nothing to add there
        exact = float(np.logaddexp.reduce(terms[np.isfinite(terms)])) / (alpha - 1)
        assert exact <= limit + 1e-9
        assert limit >= alpha * shift**2 / (2 * variance)  # never below the Gaussian's


def test_epsilon_is_just_above_the_gaussian_with_the_same_multiplier():
    """With s·C far above √d the discrete surcharge vanishes: ε is the Gaussian's at σ
    (dp-accounting, no sampling) within 1 %, and never below it. (Where the Gaussian's
    best order is below 2, below the Skellam bound's integer orders, the gap is wider.)"""
    for sigma, rounds in [(1.2, 1), (2.0, 10), (5.0, 50)]:
        config = DistributedSkellam(1.0, sigma, frac_bits=16, dim=10_000, min_sites=5)
        assert config.rounding_inflation < 1.002
        gaussian = epsilon_for(sigma, PoissonSampling(1.0), DELTA, rounds)
        ours = config.epsilon(rounds, DELTA)
        assert gaussian <= ours <= gaussian * 1.01


def test_coarse_fixed_point_costs_noise_and_epsilon():
    """Few fractional bits: rounding inflates the sensitivity, so more noise for the same σ,
    and the discrete term grows; ε stays a valid bound, larger than the fine one's."""
    coarse = DistributedSkellam(
        clip=1.0, noise_multiplier=1.0, frac_bits=6, dim=100_000, min_sites=5
    )
    fine = DistributedSkellam(
        clip=1.0, noise_multiplier=1.0, frac_bits=14, dim=100_000, min_sites=5
    )
    assert coarse.rounding_inflation > 2 > 1.01 > fine.rounding_inflation
    assert coarse.noise_std > fine.noise_std
    assert coarse.epsilon(10, DELTA) >= fine.epsilon(10, DELTA)


def test_colluding_sites_noise_is_not_counted():
    config = DistributedSkellam(
        clip=1.0, noise_multiplier=1.0, frac_bits=12, dim=1000, min_sites=10
    )
    honest = config.variance * 7 / 10  # 3 of 10 sites tell the server their noise
    assert config.epsilon(5, DELTA, variance=honest) > config.epsilon(5, DELTA)
    assert config.epsilon(0, DELTA) == 0.0


def test_a_site_encodes_into_the_ring_and_the_sum_decodes_to_the_mean_plus_noise():
    """Five sites encode clipped vectors; the ring sum decodes (fixed_point) to their sum
    plus noise of the configured standard deviation."""
    dim, sites = 200_000, 5
    config = DistributedSkellam(
        clip=1.0, noise_multiplier=0.5, frac_bits=12, dim=dim, min_sites=sites
    )
    rng = noise_rng(4)
    vectors = [rng.standard_normal(dim) for _ in range(sites)]
    vectors = [v / np.linalg.norm(v) * 0.9 for v in vectors]
    ring_sum = np.zeros(dim, dtype=np.uint32)
    for v in vectors:
        ring_sum += fixed_point.to_ring(config.encode(v, rng), 32)
    decoded = fixed_point.decode_sum(ring_sum, config.frac_bits)
    error = decoded - np.sum(vectors, axis=0)
    rounding_variance = sites / 4 / config.scale**2  # at most 1/4 unit² per site
    measured = float(np.var(error))
    assert config.noise_std**2 * 0.98 < measured < (config.noise_std**2 + rounding_variance) * 1.02


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": 0.0},
        {"noise_multiplier": 0.0},
        {"noise_multiplier": math.inf},
        {"dim": 0},
        {"min_sites": 0},
    ],
)
def test_bad_configurations_are_config_errors(kwargs):
    base = {"clip": 1.0, "noise_multiplier": 1.0, "frac_bits": 10, "dim": 10, "min_sites": 3}
    with pytest.raises(ConfigError):
        DistributedSkellam(**{**base, **kwargs})


def test_orders_are_integers():
    assert np.all(SKELLAM_ORDERS == np.floor(SKELLAM_ORDERS)) and SKELLAM_ORDERS.min() >= 2
    with pytest.raises(ValueError):
        skellam_rdp(np.array([1.5]), 1.0, 1.0, 10.0)


def test_noise_of_a_huge_variance_has_that_variance():
    # numpy's Poisson sampler is 3 % short in standard deviation at a mean of 2.2e14;
    # skellam_noise sums draws of at most POISSON_MAX_MEAN, which it is exact for.
    variance = 8 * POISSON_MAX_MEAN  # 4 draws a side
    noise = skellam_noise(200_000, variance, noise_rng(5))
    assert float(noise.std()) == pytest.approx(math.sqrt(variance), rel=0.01)
    assert abs(float(noise.mean())) < 5 * math.sqrt(variance / 200_000)


def test_the_planned_fixed_point_and_ring():
    # The fewest fractional bits that round within 0.1 %: more only grow the integers.
    bits = frac_bits_for(5.0, 1_301_648)
    assert bits == 12
    assert rounded_norm_bound(2.0**bits * 5, 1_301_648) <= 2.0**bits * 5 * 1.001
    assert rounded_norm_bound(2.0 ** (bits - 1) * 5, 1_301_648) > 2.0 ** (bits - 1) * 5 * 1.001
    # A round of 100 sites at σ = 2.85 (ε = 8 over 20 rounds) fits the 32-bit ring; at
    # C = 1e6 it needs 64 bits, and asking for 32 is refused with the numbers.
    noise = DistributedSkellam(5.0, 2.85, bits, 1_301_648, 3)
    assert noise.ring_bits(100) == 32
    wide = DistributedSkellam(1e6, 100.0, frac_bits_for(1e6, 1_301_648), 1_301_648, 3)
    assert wide.ring_bits(100) == 64
    with pytest.raises(ConfigError, match="a 32-bit ring cannot hold 100 inputs"):
        wide.ring_bits(100, requested=32)
