"""Client-level differential privacy in the round engine (``--dp central`` and
``--dp distributed``).

DP-FedAvg (McMahan et al. 2018) with the fixed-denominator estimator: the mechanism and
the accountant are ``fedmae.privacy``'s; this module is the one place the round engine
meets them, so the engine asks five questions and knows nothing of ε:

Distributed mode (``--dp distributed``, with secure aggregation) differs in where the
noise is added: each site clips, rounds and adds its share of Skellam noise before
masking (``fedmae.privacy.skellam``; ``fedmae.secagg.site``), weighs itself 1, and the
server only divides the unmasked sum by q·N. The ledger accounts the Skellam bound with
no amplification by sampling: the server that samples is the party this mode does not
trust.

- ``sample``: who is in the round. Poisson, as the ledger accounts: every site is in
  independently with probability q = ``--fraction``, drawn with ``random.SystemRandom``
  (OS entropy: nobody can predict or replay a sample). The draw is over the connected
  sites; a site of the population that is not connected contributes nothing whether it
  was drawn or not, so this is the population's Poisson sample with absent sites
  silent. Never topped up to a minimum: a larger sample than drawn would not be
  the accounted one; a round with too few participants fails, as any round does.
- ``clip_``: the server clips each received delta to C again (central mode trusts the
  server, not the sites, which clip too) and weighs every site 1 (docs/privacy.md:
  ŵ <= the smallest site, so W = N).
- ``mean_``: Σ clip(Δᵢ) + N(0, σ²C²) once per round, divided by q·N; the strategy's
  server optimizer then steps on that (post-processing).
- ``budget_spent``: whether one more round would take ε above ``--dp-target-epsilon``.
- ``next_ledger``/``record``: the ledger with the round being published, saved beside
  its checkpoint (``v000042.privacy.json``) before the model file is renamed into
  place, so a restart resumes the rounds spent; a round is recorded once published.
  A round that publishes nothing released nothing and is not recorded.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from fedmae.errors import ConfigError
from fedmae.privacy import skellam
from fedmae.privacy.accountant import PoissonSampling, PrivacyLedger, calibrate_noise
from fedmae.privacy.adaptive_clip import DEFAULT_LEARNING_RATE, AdaptiveClip
from fedmae.privacy.mechanisms import (
    FixedDenominator,
    clip_to_norm,
    noise_generator,
    private_mean_,
)
from fedmae.rounds import RoundClosed

if TYPE_CHECKING:  # update_bounds imports the config, which imports this module
    from aggregator_service.update_bounds import Weighing

log = logging.getLogger(__name__)

# The tiny MAE's honest round-1 deltas have L2 norms 4-9 (docs/round-log.md), and
# later rounds' are smaller. Noise on the mean grows with C while clipping only
# shortens (never turns) a delta, so C sits at the low end of the honest norms rather
# than above them (Andrew et al. 2021 aim at the median); set it from update_norm in
# rounds.jsonl for another model.
DEFAULT_CLIP = 5.0
BUDGET_SPENT = "privacy budget spent"
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


class PrivateRounds:
    """One run's central DP: its sampling, clip, noise and ledger (module docstring)."""

    def __init__(self, privacy: PrivacyConfig, rate: float, ledger: PrivacyLedger):
        self.config = privacy
        self.rate = rate
        self.ledger = ledger
        self.skellam = ledger.distributed  # the sites' noise (distributed mode), else None
        self.estimator = FixedDenominator.for_sampling(
            privacy.clip, ledger.noise_multiplier, rate, privacy.sites
        )
        # Adaptive clipping (--dp-clip-quantile): C moves each published round; the
        # update's noise multiplier is raised so update + bits cost the ledger's σ.
        self.adaptive: AdaptiveClip | None = None
        self.update_noise_multiplier = ledger.noise_multiplier
        if privacy.clip_quantile is not None:
            self.adaptive = AdaptiveClip.with_defaults(
                privacy.clip, rate * privacy.sites, privacy.clip_quantile, privacy.clip_lr,
                privacy.clip_bit_noise,
            )  # fmt: skip
            self.update_noise_multiplier = self.adaptive.update_noise_multiplier(
                ledger.noise_multiplier
            )
        self._next_clip: AdaptiveClip | None = None  # C after the round being published
        self._round_clip = privacy.clip  # C of the last closed round (the round log's)
        self._unclipped_share: float | None = None
        self.generator = noise_generator(privacy.noise_seed)
        # Who is sampled must be unpredictable: OS entropy (a test may seed a Random).
        self.rng: random.Random = random.SystemRandom()
        self._warned = False  # about more connected sites than the population

    @classmethod
    def plan(
        cls, privacy: PrivacyConfig, fraction: float, rounds: int, shape: Shape | None = None
    ) -> PrivateRounds:
        """σ (given, or calibrated for ``rounds``) and a fresh ledger; ConfigError if the
        target cannot be met or one round already exceeds it. Distributed mode needs
        ``shape``."""
        sampling = PoissonSampling(rate=fraction)
        delta, target = privacy.delta_, privacy.target_epsilon
        sigma = calibrated(privacy, fraction, rounds, shape).noise_multiplier
        assert sigma is not None
        noise = None
        if privacy.distributed:
            assert shape is not None
            noise = skellam_noise(privacy, sigma, shape)
            noise.ring_bits(shape.max_sites, shape.ring_bits)  # the sum fits (ConfigError)
        ledger = PrivacyLedger(
            sigma, sampling, delta, accountant=privacy.accountant, distributed=noise
        )
        ledger.epsilon_after(1)  # the per-round RDP curve (~0.3 s) now, not under a lock
        if target is not None and not ledger.budget_allows_next_round(target):
            raise ConfigError(
                f"--dp-target-epsilon {target:g} cannot be met even for one round: σ = "
                f"{sigma:g} at sampling rate {fraction:g} gives ε = "
                f"{ledger.epsilon_after(1):.3g} at δ = {delta:g} after one round; raise "
                "σ or the target, or lower --fraction"
            )
        return cls(privacy, fraction, ledger)

    def resume(self, saved: str | None, version: int) -> None:
        """Take up the ledger saved with ``version``, the one the server starts from;
        ConfigError if a published version has none, or one of another mechanism."""
        if saved is None:
            if version > 0:
                raise ConfigError(
                    f"version {version} has no privacy ledger: the rounds that made it were "
                    "not accounted (trained without --dp?), so no ε can be claimed for this "
                    "run; start from an empty --state-dir"
                )
            return
        ledger = PrivacyLedger.from_json(saved)
        mine, theirs = self.ledger, ledger
        if (mine.noise_multiplier, mine.sampling, mine.delta, mine.accountant,
                mine.distributed) != (theirs.noise_multiplier, theirs.sampling, theirs.delta,
                                      theirs.accountant, theirs.distributed):  # fmt: skip
            raise ConfigError(
                f"version {version}'s privacy ledger is for σ = {theirs.noise_multiplier:g}, "
                f"{theirs.sampling.to_dict()}, δ = {theirs.delta:g}; this run's is σ = "
                f"{mine.noise_multiplier:g}, {mine.sampling.to_dict()}, δ = {mine.delta:g}: "
                "resume with the same --dp flags and --fraction (for a calibrated σ, the same "
                "--rounds too; distributed noise also needs the same model and round size)"
            )
        ledger.epsilon()  # its RDP curve now, not under the engine's lock
        self.ledger = ledger
        saved_clip = json.loads(saved).get("adaptive_clip")
        if self.adaptive is not None and saved_clip is not None:
            adaptive = AdaptiveClip.from_dict(saved_clip)
            if replace(adaptive, clip=self.adaptive.clip) != self.adaptive:
                raise ConfigError(
                    f"version {version}'s adaptive clipping is {adaptive.to_dict()}; this run's "
                    f"is {self.adaptive.to_dict()}: resume with the same --dp-clip-* flags"
                )
            self.adaptive = adaptive  # the C the last published round left
        elif (self.adaptive is None) != (saved_clip is None) and version > 0:
            raise ConfigError(
                f"version {version} was trained {'with' if saved_clip else 'without'} adaptive "
                "clipping: resume with the same --dp-clip-quantile"
            )

    def sample(self, connected: list[str]) -> list[str]:
        """The round's Poisson sample of the connected sites (possibly empty)."""
        if len(connected) > self.config.sites and not self._warned:
            self._warned = True  # privacy holds; the mean is no longer unbiased
            log.warning("%d sites are connected, more than --dp-sites %d: each round's mean "
                        "is divided by q·N for N = %d and overshoots; restart with the real "
                        "population", len(connected), self.config.sites,
                        self.config.sites)  # fmt: skip
        return [c for c in sorted(connected) if self.rng.random() < self.rate]

    @property
    def clip(self) -> float:
        """C for the round now running (sites clip to it, and so does the server)."""
        return self.adaptive.clip if self.adaptive is not None else self.config.clip

    def clip_(self, delta: torch.Tensor, weighing: Weighing) -> Weighing:
        """Clip ``delta`` in place to C (after the round's own norm bound, if any) and
        weigh it 1; the returned weighing says how it was folded (its scale: the
        overall factor, for the round log)."""
        if weighing.scale < 1.0:
            delta.mul_(weighing.scale)
        clip_to_norm(delta, self.clip)
        scale = min(weighing.scale, self.clip / weighing.norm) if weighing.norm else 1.0
        return replace(weighing, weight=1, scale=scale)

    def mean_(self, weighted_sum: torch.Tensor) -> torch.Tensor:
        """The round's noised mean, in place: (Σ clip(Δᵢ) + N(0, σ²C²)) / (q·N); in
        distributed mode the sum carries the sites' noise already: ÷ q·N only."""
        if self.skellam is not None:
            return weighted_sum.mul_(1.0 / self.estimator.denominator)
        # σ·C with this round's C (adaptive: z_Δ, the update's share of the ledger's σ)
        estimator = replace(self.estimator, clip=self.clip,
                            noise_multiplier=self.update_noise_multiplier)  # fmt: skip
        return private_mean_(weighted_sum, estimator, self.generator)

    def budget_spent(self) -> bool:
        """One more round would take ε above the target (never, without a target)."""
        target = self.config.target_epsilon
        return target is not None and not self.ledger.budget_allows_next_round(target)

    def next_ledger(self, norms: list[float] | None = None) -> str:
        """The ledger's JSON with the round being published recorded (for its checkpoint).
        Adaptive clipping: C for the next round, moved by the noised share of
        ``norms`` (the folded deltas' L2 norms as received) within this round's C, is
        saved in it too and taken up by ``record``."""
        after = copy.copy(self.ledger)  # shares the per-round RDP curve already computed
        after.record_round()
        data = json.loads(after.to_json())
        if self.adaptive is not None:
            norms = norms or []
            self._next_clip = replace(self.adaptive)
            unclipped = sum(1 for n in norms if n <= self.adaptive.clip)
            self._unclipped_share = self._next_clip.adapt(unclipped, len(norms), self.generator)
            data["adaptive_clip"] = self._next_clip.to_dict()
        return json.dumps(data, sort_keys=True)

    def record(self) -> None:
        """The round's model is published: its cost is spent (and C moves, if adaptive)."""
        self.ledger.record_round()
        self._round_clip = self.clip
        if self._next_clip is not None:
            self.adaptive, self._next_clip = self._next_clip, None

    def for_sites(self, closed: RoundClosed) -> RoundClosed:
        """What the sites hear of a closed round under DP: no loss (a mean of the
        participants' own figures, with no noise on it) and no reason (a failure's names
        how many took part); the operator's round log keeps both."""
        reason = "" if closed.success else "the round did not publish (see the round log)"
        return replace(closed, train_loss=0.0, val_loss=0.0, reason=reason)

    def describe(self) -> str:
        """One line for the log: the mechanism, its parameters and ε so far."""
        ledger, noise = self.ledger, self.skellam
        how = (
            "central DP (Gaussian noise added by the server)"
            if noise is None
            else f"distributed DP (Skellam shares added by the sites before masking, "
            f"2^{noise.frac_bits} units per 1.0, each site 1/{noise.min_sites} of the noise; "
            "no amplification by sampling claimed)"
        )
        return (
            f"{how}: σ = {ledger.noise_multiplier:.4g}, C = {self.clip:g}"
            f"{' (adaptive)' if self.adaptive else ''}, q = "
            f"{self.rate:g}, N = {self.config.sites}; ε = {ledger.epsilon():.4g} at δ = "
            f"{ledger.delta:g} after {ledger.rounds} round(s)"
        )

    def summary(self) -> dict[str, Any]:
        """The ``dp`` object of a round-log line: the mechanism and ε at δ so far."""
        ledger = self.ledger
        noise = self.skellam
        extra = {} if noise is None else {
            "noise": "skellam", "frac_bits": noise.frac_bits, "min_sites": noise.min_sites,
            "noise_std": noise.noise_std, "amplification": False,
        }  # fmt: skip
        if self.adaptive is not None:  # C of the round logged, and the next one's
            extra["adaptive_clip"] = {
                **self.adaptive.to_dict(), "next_clip": self.adaptive.clip,
                "update_noise_multiplier": self.update_noise_multiplier,
                "unclipped_share": self._unclipped_share,
            }  # fmt: skip
            del extra["adaptive_clip"]["clip"]
        clip = self._round_clip if self.adaptive is not None else self.config.clip
        return {
            **extra,
            "mode": self.config.mode, "clip": clip,
            "noise_multiplier": ledger.noise_multiplier, "q": self.rate,
            "population": self.config.sites, "delta": ledger.delta,
            "epsilon": ledger.epsilon(), "rounds": ledger.rounds,
            "target_epsilon": self.config.target_epsilon, "accountant": ledger.accountant,
            "sampling": "poisson",
        }  # fmt: skip
