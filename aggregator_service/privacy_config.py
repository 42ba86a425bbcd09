"""``--dp``'s configuration: the settings (``PrivacyConfig``), the refusals of a
setup under which the guarantee would not hold (``check_central``), and σ's
calibration for the planned rounds (``calibrated``; distributed noise's ``Shape``).
The mechanism at work in the rounds is ``private_rounds``."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedmae.errors import ConfigError
from fedmae.privacy import skellam
from fedmae.privacy.accountant import PoissonSampling, calibrate_noise
from fedmae.privacy.adaptive_clip import DEFAULT_LEARNING_RATE

# The tiny MAE's honest round-1 deltas have L2 norms 4-9 (docs/round-log.md), and
# later rounds' are smaller. Noise on the mean grows with C while clipping only
# shortens (never turns) a delta, so C sits at the low end of the honest norms rather
# than above them (Andrew et al. 2021 aim at the median); set it from update_norm in
# rounds.jsonl for another model.
DEFAULT_CLIP = 5.0
FEWEST_EXPECTED_SITES = 3  # as SAFE_MIN_PARTICIPANTS: a mean of 2 tells each the other's


def default_delta(sites: int) -> float:
    """δ = min(1e-5, N^-1.1): 1e-5 (the usual target, and the issue's) up to 35,000
    sites; above that, δ shrinks so it stays well below 1/N (a δ near 1/N allows a
    mechanism that publishes one site's data outright)."""
    return min(1e-5, sites**-1.1)


@dataclass(frozen=True)
class PrivacyConfig:
    """``--dp``'s settings (``fedmae serve --dp-*``)."""

    clip: float = DEFAULT_CLIP  # C: each site's delta is clipped to this L2 norm
    noise_multiplier: float | None = None  # σ; None = calibrated from target_epsilon
    target_epsilon: float | None = None  # E: calibrates σ, and the budget stop
    delta: float | None = None  # δ; None = default_delta(sites)
    sites: int = 0  # N: the enrolled population, public, fixed for the run
    accountant: str = "rdp"
    noise_seed: int | None = None  # tests only: known noise is no privacy
    mode: str = "central"  # or "distributed": the sites add Skellam noise before masking
    clip_quantile: float | None = None  # γ: adaptive clipping (central), None = C fixed
    clip_lr: float = DEFAULT_LEARNING_RATE  # η of the adaptive clip
    clip_bit_noise: float | None = None  # σ_b; None = q·N / 20

    @property
    def distributed(self) -> bool:
        return self.mode == "distributed"

    @property
    def delta_(self) -> float:
        return default_delta(self.sites) if self.delta is None else self.delta


def check_central(
    privacy: PrivacyConfig, fraction: float, rounds: int, strategy: str, sums: bool,
    secure: bool,
) -> None:  # fmt: skip
    """Refuse a configuration under which ``--dp``'s guarantee would not hold, naming
    the numbers (ConfigError: exit 2). ``sums``: the rule aggregates a sum of the
    deltas (FedAvg and the server optimizers on it)."""
    mode = f"--dp {privacy.mode}"
    if privacy.distributed:
        if not secure:
            raise ConfigError(
                "--dp distributed has each site add its share of the noise before secure "
                "aggregation masks its input: add --secure-aggregation (or use --dp central, "
                "which trusts the server to add the noise)"
            )
        if privacy.clip_quantile is not None:
            raise ConfigError(
                "--dp-clip-quantile (adaptive clipping) needs each site's clipped bit in the "
                "clear, which secure aggregation hides: it works with --dp central only"
            )
    elif secure:
        raise ConfigError(
            "--dp central adds its noise to the clear sum of the round's deltas, which "
            "--secure-aggregation never shows the server: use --dp distributed with it "
            "(each site adds its share of the noise before masking)"
        )
    if not sums:
        raise ConfigError(
            f"--strategy {strategy} aggregates no sum of the deltas, and {mode}'s noise "
            f"is calibrated for a sum (one site moves it by at most C): use fedavg, fedavgm, "
            "fedadam, fedyogi, fedadagrad, fedprox or norm-bounded"
        )
    n = privacy.sites
    if n <= 0:
        raise ConfigError(
            f"{mode} needs --dp-sites N, the number of enrolled sites: the mean is "
            "divided by the fixed q·N, which must be known before the run"
        )
    if n < FEWEST_EXPECTED_SITES or fraction * n < FEWEST_EXPECTED_SITES:
        raise ConfigError(
            f"{mode} with --dp-sites {n} and --fraction {fraction:g} expects "
            f"{fraction * n:g} sites per round: it needs at least {FEWEST_EXPECTED_SITES} "
            "(with fewer, a site learns the others' updates from the model, and the "
            "noise needed for any ε drowns the mean); enrol more sites or raise --fraction"
        )
    if not (math.isfinite(privacy.clip) and privacy.clip > 0):
        raise ConfigError(f"--dp-clip is a positive L2 norm, got {privacy.clip:g}")
    sigma, target = privacy.noise_multiplier, privacy.target_epsilon
    if sigma is None and target is None:
        raise ConfigError(
            f"{mode} needs --dp-noise-multiplier σ, or --dp-target-epsilon E to "
            "calibrate σ for the planned --rounds"
        )
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise ConfigError(
            f"--dp-noise-multiplier {sigma:g}: σ must be > 0 (σ = 0 is no privacy: use --dp off)"
        )
    if target is not None and not (math.isfinite(target) and target > 0):
        raise ConfigError(f"--dp-target-epsilon {target:g}: ε must be a positive number")
    if sigma is None and rounds == 0:
        raise ConfigError(
            "--dp-target-epsilon without --dp-noise-multiplier calibrates σ for the planned "
            "--rounds: give --rounds (not 0), or σ with the target as a budget stop"
        )
    if not 0 < privacy.delta_ < 1:
        raise ConfigError(f"--dp-delta {privacy.delta_:g}: δ is in (0, 1), well below 1/N")


@dataclass(frozen=True)
class Shape:
    """What distributed noise is planned for: the model's size d, the fewest inputs a
    round publishes with (each site adds 1/min_sites of the noise), the most a round
    holds and the ring asked for (None: the smaller that holds them)."""

    dim: int
    min_sites: int
    max_sites: int = 100
    ring_bits: int | None = None


def model_dim(model: str) -> int:
    """The number of trainable parameters of ``model`` (what a delta holds)."""
    from fedmae.ml.model_state import count_trainable_parameters
    from fedmae.ml.model_zoo import build_model

    return count_trainable_parameters(build_model(model, seed=0))


def skellam_noise(privacy: PrivacyConfig, sigma: float, shape: Shape) -> skellam.DistributedSkellam:
    return skellam.DistributedSkellam(
        clip=privacy.clip, noise_multiplier=sigma,
        frac_bits=skellam.frac_bits_for(privacy.clip, shape.dim), dim=shape.dim,
        min_sites=shape.min_sites,
    )  # fmt: skip


def calibrated(
    privacy: PrivacyConfig, fraction: float, rounds: int, shape: Shape | None = None
) -> PrivacyConfig:
    """``privacy`` with σ: as given, or the smallest that keeps ε at δ within the target
    after ``rounds`` rounds (ConfigError if none does). Distributed mode needs ``shape``."""
    if privacy.noise_multiplier is not None:
        return privacy
    assert privacy.target_epsilon is not None  # check_central
    if privacy.distributed:
        assert shape is not None, "distributed noise is calibrated for a model and a round size"
        sigma = skellam.calibrate_skellam(
            privacy.target_epsilon, privacy.delta_, rounds, clip=privacy.clip,
            frac_bits=skellam.frac_bits_for(privacy.clip, shape.dim), dim=shape.dim,
            min_sites=shape.min_sites,
        )  # fmt: skip
    else:
        sigma = calibrate_noise(
            privacy.target_epsilon, privacy.delta_, PoissonSampling(rate=fraction), rounds,
            privacy.accountant,
        )  # fmt: skip
    return replace(privacy, noise_multiplier=sigma)
