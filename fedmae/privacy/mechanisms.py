"""DP-FedAvg's mechanism: clip each delta, cap each weight, add Gaussian noise to the sum,
divide by a fixed denominator (McMahan, Ramage, Talwar, Zhang 2018, "Learning
Differentially Private Recurrent Language Models", the estimator f̃_f).

Why each step:

- **Clipping** (at the site): ||clip(Δᵢ)|| <= C bounds what one site can add to the sum.
- **Capped weights** wᵢ = min(nᵢ / ŵ, 1): a site's weight is at most 1 whatever it
  claims, so its term wᵢ·clip(Δᵢ) has norm <= C. Plain FedAvg's nᵢ / Σ nⱼ is
  data-dependent: one site claiming n = 2^40 takes the whole mean, and adding or
  removing a site changes every other site's share.
- **Fixed denominator** q·W, where W = Σ wᵢ over *all* N sites (for equal weights,
  W = N and q·W = the expected number of sites per round) is a public constant, not
  the round's Σ wᵢ: dividing by the round's own sum would make the sensitivity depend
  on who was sampled.

So Δ = (Σᵢ wᵢ·clip(Δᵢ) + N(0, σ²C²·I)) / (q·W). Adding or removing one site moves the
sum by at most C, the published Δ by at most C / (q·W): the sensitivity, and the noise
on Δ has standard deviation σ·C / (q·W) per coordinate (σ: the noise multiplier the
ledger accounts, ``fedmae.privacy.accountant``). The estimator is unbiased for the
w-weighted mean over all sites; its price is variance from the random number of sites
sampled, which is why it wants many sites per round.

Noise comes from a ``torch.Generator`` seeded with 64 bits of OS entropy
(``os.urandom``) by default, so no one can replay it from a guessable seed; tests pass
an explicit seed. The generator's stream is not itself a CSPRNG, and float noise is not
an exact Gaussian (docs/privacy.md, "Differential privacy (core)").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from fedmae.errors import ConfigError, InvalidUpdate

_NOISE_BLOCK = 1 << 20  # coordinates of noise drawn at a time: 4 MiB, not a model's worth
_SHRINK_ULPS = 2.0**-22  # two float32 ulps: clipping's first step back after rounding up


def clip_to_norm(delta: torch.Tensor, bound: float) -> float:
    """Scale ``delta`` (a flat float tensor) in place to L2 norm at most ``bound``;
    return its norm before clipping.

    The norm is summed in float64, and after scaling it is measured again: float32
    rounding of ``delta · bound / norm`` can land a hair above ``bound``, and a clipped
    norm above C would void the sensitivity argument, so it is shrunk by a few ulps
    until it is not. A NaN or infinite value is refused (InvalidUpdate): it has no norm
    to clip to.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ConfigError(f"the clipping norm C is a positive finite number, got {bound!r}")
    norm = _norm(delta)
    if not math.isfinite(norm):
        raise InvalidUpdate("the update has NaN or infinite values: it cannot be clipped")
    if norm > bound:
        delta.mul_(bound / norm)
        # Usually no pass, rarely one. Each pass shrinks twice as hard as the last, so
        # even subnormals that round back up end at zero within 23 passes.
        shrink = _SHRINK_ULPS
        while _norm(delta) > bound:
            delta.mul_(1.0 - shrink)
            shrink = min(2 * shrink, 1.0)
    return norm


def _norm(values: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(values, dtype=torch.float64))


def capped_weight(num_samples: int, weight_cap: float) -> float:
    """wᵢ = min(nᵢ / ŵ, 1): a site's weight under DP, at most 1 whatever it claims.

    ``weight_cap`` ŵ is public (a configuration value, e.g. the most samples a site
    trains on), so sites with ŵ or more samples weigh the same, and the others in
    proportion to their data."""
    if not (math.isfinite(weight_cap) and weight_cap > 0):
        raise ConfigError(f"the weight cap ŵ is a positive finite number, got {weight_cap!r}")
    if num_samples < 0:
        raise InvalidUpdate(f"a sample count is >= 0, got {num_samples}")
    return min(num_samples / weight_cap, 1.0)


@dataclass(frozen=True)
class FixedDenominator:
    """The estimator's public constants: clipping norm C, noise multiplier σ, and the
    fixed denominator q·W."""

    clip: float
    noise_multiplier: float
    denominator: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"the clipping norm C is positive and finite, got {self.clip!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"the noise multiplier σ is >= 0, got {self.noise_multiplier!r}")
        if not (math.isfinite(self.denominator) and self.denominator > 0):
            raise ConfigError(f"the fixed denominator q·W is positive, got {self.denominator!r}")

    @classmethod
    def for_sampling(
        cls, clip: float, noise_multiplier: float, rate: float, total_weight: float
    ) -> FixedDenominator:
        """q·W from the sampling rate q and W = Σ wᵢ over all sites (for equal weights,
        the number of sites N; for fixed-size sampling of m of N, q = m / N)."""
        if not 0 < rate <= 1:
            raise ConfigError(f"the sampling rate q is in (0, 1], got {rate!r}")
        if not (math.isfinite(total_weight) and total_weight > 0):
            raise ConfigError(f"the total weight W is positive, got {total_weight!r}")
        return cls(clip, noise_multiplier, rate * total_weight)

    @property
    def sensitivity(self) -> float:
        """How far adding or removing one site can move the published Δ (L2): C / (q·W)."""
        return self.clip / self.denominator

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of Δ: σ·C / (q·W)."""
        return self.noise_multiplier * self.clip / self.denominator


def noise_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator for the noise: seeded from ``os.urandom`` unless ``seed`` is given
    (tests only: a known seed makes the noise known, and the privacy with it)."""
    generator = torch.Generator()
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    generator.manual_seed(seed)
    return generator


def fold_(total: torch.Tensor, clipped_delta: torch.Tensor, weight: float, clip: float) -> None:
    """total += weight · clipped_delta, after checking the term's bound (w <= 1, norm <= C):
    the sum's sensitivity rests on it, so a term that breaks it is refused, not folded."""
    if not 0 <= weight <= 1:
        raise InvalidUpdate(f"a weight under DP is in [0, 1] (capped), got {weight!r}")
    if _norm(clipped_delta) > clip:
        raise InvalidUpdate(f"an update folded under DP must be clipped to norm {clip}")
    total.add_(clipped_delta, alpha=weight)


def add_gaussian_noise_(values: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """values += N(0, std²) on every coordinate, drawn block by block (bounded scratch)."""
    if not (math.isfinite(std) and std >= 0):
        raise ConfigError(f"the noise's standard deviation is >= 0, got {std!r}")
    if std == 0:
        return
    flat = values.view(-1)
    block = torch.empty(min(_NOISE_BLOCK, flat.numel()), dtype=values.dtype)
    for start in range(0, flat.numel(), _NOISE_BLOCK):
        stop = min(start + _NOISE_BLOCK, flat.numel())
        noise = block[: stop - start]
        torch.randn(noise.shape, generator=generator, dtype=values.dtype, out=noise)
        flat[start:stop].add_(noise, alpha=std)


def private_mean_(
    weighted_sum: torch.Tensor, estimator: FixedDenominator, generator: torch.Generator
) -> torch.Tensor:
    """The fixed-denominator estimate, in place: (Σ wᵢ·clip(Δᵢ) + N(0, σ²C²)) / (q·W).

    ``weighted_sum`` is the round's sum of capped-weight, clipped deltas (``fold_``); it
    is overwritten and returned. With σ = 0 no noise is drawn and the result is exactly
    ``weighted_sum / (q·W)``.
    """
    add_gaussian_noise_(weighted_sum, estimator.noise_multiplier * estimator.clip, generator)
    weighted_sum.div_(estimator.denominator)
    return weighted_sum
