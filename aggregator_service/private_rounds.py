"""Client-level differential privacy in the round engine (``--dp central`` and
``--dp distributed``; the configuration and its checks are ``privacy_config``).

DP-FedAvg (McMahan et al. 2018) with the fixed-denominator estimator: the mechanism and
the accountant are ``fedmae.privacy``'s; this module is the one place the round engine
meets them, so the engine asks these questions and knows nothing of ε:

- ``sample``: who is in the round. Poisson, as the ledger accounts: every site is in
  independently with probability q = ``--fraction``, drawn with ``random.SystemRandom``
  (OS entropy: nobody can predict or replay a sample). The draw is over the connected
  sites; a site of the population that is not connected contributes nothing whether it
  was drawn or not, so this is the population's Poisson sample with absent sites
  silent. Never topped up to a minimum: a larger sample than drawn would not be
  the accounted one; a round with too few participants fails, as any round does.
- ``clip``/``clip_``: the round's C (fixed, or adaptive: ``fedmae.privacy.adaptive_clip``);
  the server clips each received delta to it again (central mode trusts the server,
  not the sites, which clip too) and weighs every site 1 (docs/privacy.md: ŵ <= the
  smallest site, so W = N).
- ``mean_``: Σ clip(Δᵢ) + N(0, σ²C²) once per round, divided by q·N; the strategy's
  server optimizer then steps on that (post-processing).
- ``budget_spent``: whether one more round would take ε above ``--dp-target-epsilon``.
- ``next_ledger``/``record``: the ledger with the round being published, saved beside
  its checkpoint (``v000042.privacy.json``) before the model file is renamed into
  place, so a restart resumes the rounds spent; a round is recorded once published.
  A round that publishes nothing released nothing and is not recorded.

Distributed mode (``--dp distributed``, with secure aggregation) differs in where the
noise is added: each site clips, rounds and adds its share of Skellam noise before
masking (``fedmae.privacy.skellam``; ``fedmae.secagg.site``), weighs itself 1, and the
server only divides the unmasked sum by q·N. The ledger accounts the Skellam bound with
no amplification by sampling: the server that samples is the party this mode does not
trust.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from dataclasses import replace
from typing import Any

import torch

from aggregator_service.privacy_config import PrivacyConfig, Shape, calibrated, skellam_noise
from aggregator_service.update_bounds import Weighing
from fedmae.errors import ConfigError
from fedmae.privacy.accountant import PoissonSampling, PrivacyLedger
from fedmae.privacy.adaptive_clip import AdaptiveClip
from fedmae.privacy.mechanisms import (
    FixedDenominator,
    clip_to_norm,
    noise_generator,
    private_mean_,
)
from fedmae.rounds import RoundClosed

log = logging.getLogger(__name__)

BUDGET_SPENT = "privacy budget spent"


class PrivateRounds:
    """One run's central DP: its sampling, clip, noise and ledger (module docstring)."""

    def __init__(self, privacy: PrivacyConfig, rate: float, ledger: PrivacyLedger):
        self.config = privacy
        self.rate = rate
        self.ledger = ledger
        self.skellam = ledger.distributed  # the sites' noise (distributed mode), else None
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
        self.estimator  # noqa: B018  (its constants are checked now: ConfigError at start)
        self._next_clip: AdaptiveClip | None = None  # C after the round being published
        self._round_clip = privacy.clip  # C of the round opened last (the round log's)
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
        """The round's Poisson sample of the connected sites (possibly empty); the round
        opens with the current C."""
        self._round_clip = self.clip
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

    @property
    def estimator(self) -> FixedDenominator:
        """This round's constants: its C, the update's noise multiplier (adaptive: z_Δ,
        its share of the ledger's σ) and the fixed denominator q·N."""
        return FixedDenominator.for_sampling(
            self.clip, self.update_noise_multiplier, self.rate, self.config.sites
        )

    def mean_(self, weighted_sum: torch.Tensor) -> torch.Tensor:
        """The round's noised mean, in place: (Σ clip(Δᵢ) + N(0, σ²C²)) / (q·N); in
        distributed mode the sum carries the sites' noise already: ÷ q·N only."""
        if self.skellam is not None:
            return weighted_sum.mul_(1.0 / self.estimator.denominator)
        return private_mean_(weighted_sum, self.estimator, self.generator)

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
        if self.adaptive is not None:  # its settings, and the next round's C
            settings = {k: v for k, v in self.adaptive.to_dict().items() if k != "clip"}
            extra["adaptive_clip"] = settings | {
                "next_clip": self.adaptive.clip,
                "update_noise_multiplier": self.update_noise_multiplier,
                "unclipped_share": self._unclipped_share,
            }
        return {
            **extra,
            "mode": self.config.mode, "clip": self._round_clip,  # the C the round used
            "noise_multiplier": ledger.noise_multiplier, "q": self.rate,
            "population": self.config.sites, "delta": ledger.delta,
            "epsilon": ledger.epsilon(), "rounds": ledger.rounds,
            "target_epsilon": self.config.target_epsilon, "accountant": ledger.accountant,
            "sampling": "poisson",
        }  # fmt: skip
