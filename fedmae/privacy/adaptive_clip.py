"""Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially
Private Learning with Adaptive Clipping", NeurIPS): the clipping norm C follows the
γ-quantile of the sites' update norms instead of being guessed before the run.

Each round every sampled site contributes a bit bᵢ = 1[‖Δᵢ‖ <= C], centred as
bᵢ − 1/2 so one site moves the bit sum by at most 1/2. The server adds N(0, σ_b²) to
that sum, estimates the unclipped share b̃ = (Σ(bᵢ − ½) + noise) / (q·N) + ½ with the
same fixed denominator as the mean, and moves C geometrically toward the quantile:

    C ← C · exp(−η (b̃ − γ))

The bit sum is a second Gaussian mechanism on the same sample, of noise multiplier
z_b = σ_b / ½ = 2σ_b. Released together, the update (noise multiplier z_Δ) and the bit
sum are exactly one Gaussian mechanism with noise multiplier z where
z⁻² = z_Δ⁻² + z_b⁻² (Andrew et al. 2021, Theorem 1: scale each query by its noise and
stack them; the stacked sensitivity is the root of the squares). So the ledger keeps
accounting z, and the update's own noise multiplier is raised to
z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2): the adaptation is paid out of the same budget, never
added silently. The
paper's (and TensorFlow Federated's) defaults: γ = 0.5 (the median), η = 0.2, σ_b =
q·N / 20. z_Δ exists only when 2σ_b > z: a configuration that breaks it is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from fedmae.errors import ConfigError

DEFAULT_QUANTILE = 0.5
DEFAULT_LEARNING_RATE = 0.2
BIT_NOISE_PER_SITE = 1 / 20  # σ_b = q·N / 20


@dataclass
class AdaptiveClip:
    """The clipping norm C of the next round and how it adapts."""

    clip: float  # C, the current clipping norm
    quantile: float = DEFAULT_QUANTILE  # γ: the share of updates meant to stay unclipped
    learning_rate: float = DEFAULT_LEARNING_RATE  # η: C moves by at most exp(η/2) a round
    bit_noise: float = 0.0  # σ_b: std of the noise on the centred bit sum
    expected_sites: float = 1.0  # q·N, the fixed denominator of the bit mean

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"the clipping norm C is positive and finite, got {self.clip!r}")
        if not 0 < self.quantile < 1:
            raise ConfigError(f"--dp-clip-quantile γ is in (0, 1), got {self.quantile!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"--dp-clip-lr η is positive, got {self.learning_rate!r}")
        if not (math.isfinite(self.bit_noise) and self.bit_noise > 0):
            raise ConfigError(f"the bit noise σ_b is positive, got {self.bit_noise!r}")
        if not (math.isfinite(self.expected_sites) and self.expected_sites > 0):
            raise ConfigError(f"q·N is positive, got {self.expected_sites!r}")

    @classmethod
    def with_defaults(
        cls, clip: float, expected_sites: float, quantile: float = DEFAULT_QUANTILE,
        learning_rate: float = DEFAULT_LEARNING_RATE, bit_noise: float | None = None,
    ) -> AdaptiveClip:  # fmt: skip
        """σ_b = q·N / 20 unless given (the paper's recommendation)."""
        noise = expected_sites * BIT_NOISE_PER_SITE if bit_noise is None else bit_noise
        return cls(clip, quantile, learning_rate, noise, expected_sites)

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """z_Δ, the update's noise multiplier, so that the update and the bit sum
        together cost what one mechanism at ``noise_multiplier`` (z, accounted) does."""
        z, bits = noise_multiplier, 2 * self.bit_noise
        if not bits > z:
            raise ConfigError(
                f"adaptive clipping's bit noise σ_b = {self.bit_noise:g} is too small for σ = "
                f"{z:g}: the update's own noise (σ⁻² − (2σ_b)⁻²)^(-1/2) needs 2σ_b > σ; raise "
                "--dp-clip-bit-noise, or the expected sites per round (q·N)"
            )
        return (z**-2 - bits**-2) ** -0.5

    def adapt(self, unclipped: int, sampled: int, generator: torch.Generator) -> float:
        """Move C from the round's bits: ``unclipped`` of ``sampled`` sites had norms
        <= C. Returns the noised unclipped share b̃ that moved it (post-processing)."""
        if not 0 <= unclipped <= sampled:
            raise ValueError(f"{unclipped} unclipped of {sampled} sites")
        noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * self.bit_noise
        share = (unclipped - sampled / 2 + noise) / self.expected_sites + 0.5
        self.clip *= math.exp(-self.learning_rate * (share - self.quantile))
        return share

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AdaptiveClip:
        try:
            return cls(**{k: float(data[k]) for k in (
                "clip", "quantile", "learning_rate", "bit_noise", "expected_sites")})  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"the adaptive clip state lacks or garbles {error}") from None
