"""Distributed DP for secure aggregation: each site adds its share of Skellam noise in
the ring's integer units (Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for
Differentially Private Federated Learning", NeurIPS).

Why Skellam rather than the distributed discrete Gaussian (Kairouz, Liu, Steinke 2021,
ICML): a Skellam variable is Poisson(μ) − Poisson(μ), and a sum of independent
Skellams is again Skellam. m sites adding variance V/m each put *exactly* a Skellam of
variance V into the masked sum, so the accounting is of the noise actually there, with
no extra term for the sum of discrete Gaussians not being one; and a site samples it
with two calls to numpy's exact Poisson sampler instead of a hand-written
discrete-Gaussian rejection sampler (where a naive implementation breaks privacy).

One site, in the units of ``fedmae.secagg.fixed_point`` (s = 2^frac_bits per unit):

1. Δ clipped to L2 norm C and weighted by w <= 1 (``fedmae.privacy.mechanisms``);
2. scaled by s and rounded to integers *conditionally*: stochastic rounding, redrawn
   until the integer vector's L2 norm is at most Δ₂ = min(sC + √d, √(s²C² + d/4 +
   √(2 ln(1/β))·(sC + √d/2))) (Kairouz et al. 2021, Theorem 1; β = e^-0.5 as there,
   so a draw is kept with probability >= 1 − β). The redraw makes ||x̃|| <= Δ₂ hold
   always: the rounding slack is in the sensitivity, not in δ;
3. plus Skellam noise of variance σ²Δ₂² / m_min per coordinate, m_min the fewest sites
   a round can publish with, so any round's sum carries variance >= σ²Δ₂².

Accounting (add/remove one site; the sum moves by an integer vector of L2 norm <= Δ₂
and L1 norm <= Δ₁ = Δ₂·min(√d, Δ₂), since |v| <= v² for integers): for integer α > 1,
total variance V (Agarwal et al. 2021, Theorem 3.5 / Corollary 3.6),

    ε_RDP(α) <= α Δ₂² / (2V) + min( ((2α − 1) Δ₂² + 6 Δ₁) / (4V²),  3 Δ₁ / (2V) ).

The first term is the Gaussian mechanism's with noise multiplier σ; the min is the
price of being discrete. Rounds compose by adding RDP; ε at δ is dp-accounting's
conversion. No amplification by sampling is claimed: an unsampled site's output is
unchanged, so the unamplified RDP is a valid (conservative) bound; the subsampled-RDP
bound for non-Gaussian mechanisms is future work (docs/privacy.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from fedmae.errors import ConfigError

ROUNDING_BETA = math.exp(-0.5)  # Kairouz et al. 2021's choice: a rounding kept with p >= 0.39
SKELLAM_ORDERS = np.array([*range(2, 65), 80, 96, 128, 192, 256, 512, 1024], dtype=np.float64)
_MAX_ROUNDING_DRAWS = 1000  # P(all fail) <= β^1000 = e^-500


# numpy's Poisson sampler loses accuracy at huge means (measured here: a standard
# deviation 3 % short at λ = 2.2e14, right to 0.1 % up to 1e13): a draw of a larger mean
# is the sum of draws of at most this mean (a sum of Poissons is exactly Poisson).
POISSON_MAX_MEAN = 1e10
MAX_ROUNDING_INFLATION = 1e-3  # fractional bits: the fewest that keep Δ₂/(s·C) - 1 below
OVERFLOW_ODDS = 2.0**-64  # a round may wrap any coordinate at most this likely


def noise_tail(variance: float, dim: int, odds: float = OVERFLOW_ODDS) -> float:
    """t with P(any of ``dim`` Skellam coordinates of ``variance`` exceeds t) <= ``odds``.

    A Skellam is a limit of sums of independent centred variables bounded by 1 (Poisson
    is Binomial's limit), so Bernstein's inequality holds: P(|X| >= t) <= 2 exp(-t² /
    (2(V + t/3))). Solved for t at odds/dim each (a union bound over coordinates)."""
    level = math.log(2 * dim / odds)
    return level / 3 + math.sqrt(level**2 / 9 + 2 * level * variance)


def noise_rng(seed: int | None = None) -> np.random.Generator:
    """A numpy generator seeded with 256 bits of ``os.urandom`` unless ``seed`` is given
    (tests only). PCG64's stream is not a CSPRNG; the seed is not guessable."""
    entropy = seed if seed is not None else int.from_bytes(os.urandom(32), "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def rounded_norm_bound(scaled_norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """Δ₂: the L2 norm conditional rounding keeps a vector of norm ``scaled_norm`` (in
    integer units) within (Kairouz et al. 2021, Theorem 1)."""
    if not (dim >= 1 and scaled_norm > 0 and 0 <= beta < 1):
        raise ConfigError(f"need dim >= 1, a positive norm and β in [0, 1), got {dim}, "
                          f"{scaled_norm}, {beta}")  # fmt: skip
    always = scaled_norm + math.sqrt(dim)
    if beta == 0:
        return always
    likely = math.sqrt(
        scaled_norm**2
        + dim / 4
        + math.sqrt(2 * math.log(1 / beta)) * (scaled_norm + math.sqrt(dim) / 2)
    )
    return min(always, likely)


def conditional_round(scaled: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Unbiased stochastic rounding of ``scaled`` to int64, redrawn until its L2 norm is
    at most ``bound`` (ValueError if ``_MAX_ROUNDING_DRAWS`` draws all fail: ``bound``
    was not from ``rounded_norm_bound`` for this vector's norm)."""
    values = np.asarray(scaled, dtype=np.float64)
    floor = np.floor(values)
    fraction = values - floor
    for _ in range(_MAX_ROUNDING_DRAWS):
        rounded = floor + (rng.random(values.shape) < fraction)
        if math.sqrt(float(np.dot(rounded, rounded))) <= bound:
            return rounded.astype(np.int64)
    raise ValueError(f"no rounding within L2 norm {bound} in {_MAX_ROUNDING_DRAWS} draws")


def skellam_noise(size: int, variance: float, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of symmetric Skellam noise of ``variance`` (int64): Poisson(V/2) −
    Poisson(V/2)."""
    if not (math.isfinite(variance) and variance >= 0):
        raise ConfigError(f"a noise variance is >= 0 and finite, got {variance!r}")
    if variance == 0:
        return np.zeros(size, dtype=np.int64)
    parts = math.ceil(variance / 2 / POISSON_MAX_MEAN)
    mean = variance / 2 / parts
    noise = np.zeros(size, dtype=np.int64)
    for _ in range(parts):
        noise += rng.poisson(mean, size).astype(np.int64)
        noise -= rng.poisson(mean, size).astype(np.int64)
    return noise


def frac_bits_for(clip: float, dim: int, max_inflation: float = MAX_ROUNDING_INFLATION) -> int:
    """The fewest fractional bits (s = 2^bits units per 1.0) at which conditional
    rounding inflates the sensitivity s·C by at most ``max_inflation``: more bits only
    grow the integers (and the Poisson means) without adding privacy or accuracy."""
    for bits in range(0, 31):
        scaled = 2.0**bits * clip
        if rounded_norm_bound(scaled, dim) <= scaled * (1 + max_inflation):
            return bits
    raise ConfigError(f"no fixed point up to 2^30 rounds a clip of {clip} in {dim} values finely")


def skellam_rdp(orders: np.ndarray, l2: float, l1: float, variance: float) -> np.ndarray:
    """Agarwal et al. 2021's RDP bound of the Skellam mechanism at integer ``orders`` > 1,
    for L2/L1 sensitivities ``l2``/``l1`` and noise ``variance`` (all in integer units)."""
    alpha = np.asarray(orders, dtype=np.float64)
    if np.any(alpha <= 1) or np.any(alpha != np.floor(alpha)):
        raise ValueError("the Skellam RDP bound holds for integer orders > 1")
    if variance <= 0:
        return np.full(alpha.shape, math.inf)
    gaussian = alpha * l2**2 / (2 * variance)
    discrete = np.minimum(
        ((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance)
    )
    return gaussian + discrete


@dataclass(frozen=True)
class DistributedSkellam:
    """One configuration of distributed Skellam noise: clip C, noise multiplier σ, the
    ring's fractional bits, the model's size d and m_min, the fewest sites that publish."""

    clip: float
    noise_multiplier: float
    frac_bits: int
    dim: int
    min_sites: int
    beta: float = ROUNDING_BETA

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"the clipping norm C is positive and finite, got {self.clip!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(
                f"distributed DP needs a noise multiplier σ > 0, got {self.noise_multiplier!r}"
            )
        if self.frac_bits < 0 or self.dim < 1 or self.min_sites < 1:
            raise ConfigError(
                f"need frac_bits >= 0, dim >= 1 and min_sites >= 1, got {self.frac_bits}, "
                f"{self.dim}, {self.min_sites}"
            )

    @property
    def scale(self) -> float:
        return float(2**self.frac_bits)

    @cached_property
    def l2_sensitivity(self) -> float:
        """Δ₂ in integer units: s·C inflated by conditional rounding's slack."""
        return rounded_norm_bound(self.scale * self.clip, self.dim, self.beta)

    @property
    def l1_sensitivity(self) -> float:
        """Δ₁ in integer units: ||v||₁ <= √d·||v||₂, and <= ||v||₂² for an integer v."""
        return self.l2_sensitivity * min(math.sqrt(self.dim), self.l2_sensitivity)

    @property
    def rounding_inflation(self) -> float:
        """Δ₂ / (s·C): how much rounding costs (noise is scaled by it); near 1 wants
        s·C well above √d, i.e. enough fractional bits."""
        return self.l2_sensitivity / (self.scale * self.clip)

    @property
    def variance(self) -> float:
        """The summed noise's variance per coordinate, integer units: (σ·Δ₂)²."""
        return (self.noise_multiplier * self.l2_sensitivity) ** 2

    @property
    def site_variance(self) -> float:
        return self.variance / self.min_sites

    @property
    def noise_std(self) -> float:
        """The summed noise's standard deviation per coordinate in model units (÷ s)."""
        return math.sqrt(self.variance) / self.scale

    def round_rdp(self, variance: float | None = None) -> np.ndarray:
        """RDP of one round at ``SKELLAM_ORDERS``; ``variance``: the noise the adversary
        does not know (default: the configured total, all of it honest)."""
        v = self.variance if variance is None else variance
        return skellam_rdp(SKELLAM_ORDERS, self.l2_sensitivity, self.l1_sensitivity, v)

    def epsilon(self, rounds: int, delta: float, variance: float | None = None) -> float:
        """ε at ``delta`` after ``rounds`` rounds (no amplification by sampling claimed)."""
        if not 0 < delta < 1:
            raise ConfigError(f"δ is in (0, 1), got {delta!r}")
        if rounds < 0:
            raise ConfigError(f"rounds is >= 0, got {rounds}")
        if rounds == 0:
            return 0.0
        rdp = rounds * self.round_rdp(variance)
        epsilon, _ = rdp_privacy_accountant.compute_epsilon(SKELLAM_ORDERS, rdp, delta)
        return float(epsilon) if not math.isnan(epsilon) else math.inf

    def largest_sum(self, sites: int) -> float:
        """The largest |coordinate| of ``sites`` inputs' sum, but with odds
        ``OVERFLOW_ODDS``: each input's rounded part is within Δ₂ (its L2 bound), and
        the noise of ``sites`` shares within ``noise_tail``."""
        return sites * math.ceil(self.l2_sensitivity) + noise_tail(
            sites * self.site_variance, self.dim
        )

    def fits_ring(self, bits: int, max_sites: int) -> bool:
        """Whether a sum of ``max_sites`` inputs (and their weights) stays in the signed
        range of a ring of ``bits``, but with odds ``OVERFLOW_ODDS``."""
        return self.largest_sum(max_sites) < 2 ** (bits - 1) - max_sites

    def ring_bits(self, max_sites: int, requested: int | None = None) -> int:
        """The ring for ``max_sites`` inputs: ``requested``, or 32 bits when they fit
        it (half the bytes), else 64; ConfigError when the ring cannot hold them."""
        for bits in (requested,) if requested else (32, 64):
            if self.fits_ring(bits, max_sites):
                return bits
        bits = requested or 64
        raise ConfigError(
            f"a {bits}-bit ring cannot hold {max_sites} inputs clipped to {self.clip} with "
            f"σ = {self.noise_multiplier:g} noise at 2^{self.frac_bits} per unit (sums up to "
            f"{self.largest_sum(max_sites):.3g}): lower --secagg-max-sites, --dp-clip or σ"
            + ("" if requested in (None, 64) else ", or drop --secagg-ring-bits")
        )

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A site's integer vector: ``values`` (already L2-clipped to C and weighted by
        w <= 1), scaled, conditionally rounded, plus its share of the noise (int64; put
        it in the ring with ``fedmae.secagg.fixed_point.to_ring``)."""
        scaled = np.asarray(values, dtype=np.float64) * self.scale
        if scaled.size != self.dim:
            raise ValueError(f"expected {self.dim} values, got {scaled.size}")
        norm = math.sqrt(float(np.dot(scaled, scaled)))
        if norm > self.scale * self.clip * (1 + 1e-12):
            raise ValueError(f"values of L2 norm {norm / self.scale} exceed the clip {self.clip}")
        rounded = conditional_round(scaled, self.l2_sensitivity, rng)
        return rounded + skellam_noise(self.dim, self.site_variance, rng)


def calibrate_skellam(
    target_epsilon: float,
    delta: float,
    rounds: int,
    *,
    clip: float,
    frac_bits: int,
    dim: int,
    min_sites: int,
    max_noise_multiplier: float = 100.0,
) -> float:
    """The smallest σ (to 1e-4 relative, rounded up) whose distributed Skellam noise
    keeps ε at ``delta`` after ``rounds`` rounds within ``target_epsilon``; ConfigError
    if even ``max_noise_multiplier`` does not. ε falls as σ grows: a bisection."""

    def epsilon(sigma: float) -> float:
        return DistributedSkellam(clip, sigma, frac_bits, dim, min_sites).epsilon(rounds, delta)

    if not (math.isfinite(target_epsilon) and target_epsilon > 0) or rounds < 1:
        raise ConfigError(f"need a target ε > 0 and rounds >= 1, got {target_epsilon}, {rounds}")
    if epsilon(max_noise_multiplier) > target_epsilon:
        raise ConfigError(
            f"ε = {target_epsilon:g} at δ = {delta:g} over {rounds} round(s) of distributed "
            f"Skellam noise needs σ above {max_noise_multiplier:g} (no amplification by "
            "sampling is claimed in this mode): raise the target or lower --rounds"
        )
    low, high = 1e-3, max_noise_multiplier
    while high - low > 1e-4 * high:
        middle = (low + high) / 2
        if epsilon(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high
