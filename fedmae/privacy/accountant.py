"""The privacy ledger: ε at a configured δ after the rounds run so far (DP-FedAvg).

One round of DP-FedAvg is a sampled Gaussian mechanism over *sites* (client-level
DP): the server samples sites, each sends its delta clipped to L2 norm C with a weight
w <= 1, and Gaussian noise of standard deviation σ·C is added to the weighted sum
(``fedmae.privacy.mechanisms``). The ledger composes that mechanism over rounds with
Google's ``dp-accounting`` (RDP accountant by default; PLD optional) rather than our
own arithmetic: privacy accounting is easy to get subtly wrong, and a maintained,
tested implementation is the one source of truth. A test cross-checks it against
opacus' independent RDP code.

Sampling decides the neighbouring relation, and so the event we account:

- ``PoissonSampling(rate=q)``: each site takes part independently with probability q.
  Neighbours differ by adding or removing one site (ADD_OR_REMOVE_ONE); the weighted
  sum moves by at most C, so the event is PoissonSampled(q, Gaussian(σ)).
- ``FixedSizeSampling(sample_size=m, population=N)``: m of N sites, uniformly without
  replacement. Its amplification theorem (Wang, Balle, Kasiviswanathan 2019, Thm 27)
  holds for neighbours that *replace* one site (REPLACE_ONE), where the population N is
  public and the sum moves by up to 2C. The noise multiplier against that sensitivity
  is σ/2, so the event is SampledWithoutReplacement(N, m, Gaussian(σ/2)). This is
  dp-accounting's only accountant for sampling without replacement (RDP; PLD has no
  such event). Replace-one and add/remove ε are different guarantees (a replacement is
  a removal and an addition), so the ledger says which it reports
  (``sampling.neighbouring``).

Every ε the ledger returns is one the mechanism guarantees: σ = 0 gives inf, an order
whose RDP dp-accounting cannot evaluate is dropped by it (a larger, still valid ε),
and a NaN becomes inf.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedmae.errors import ConfigError
from fedmae.privacy.skellam import SKELLAM_ORDERS, DistributedSkellam

LEDGER_FORMAT = "fedmae-privacy-ledger/1"
ACCOUNTANTS = ("rdp", "pld")
# Above this σ the noise on a mean over m sites is σ/m clip norms per coordinate: with
# the hundreds of sites a round can hold, σ = 100 already drowns any signal, so a target
# that needs more is a configuration mistake, not a run to start.
MAX_NOISE_MULTIPLIER = 100.0
_MIN_NOISE_MULTIPLIER = 1e-3  # the lower end of calibration's search


class _DroppedOrders(logging.Filter):
    """dp-accounting logs a WARNING for every low Rényi order it cannot evaluate at small
    σ (and drops it: the ε stays valid, see above); calibration asks dozens of times,
    which floods a server's log with lines that need no action. Those alone are hidden."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DroppedOrders())


@dataclass(frozen=True)
class PoissonSampling:
    """Each site takes part in a round independently with probability ``rate``."""

    rate: float

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, int | float) and 0 < self.rate <= 1):
            raise ConfigError(f"a Poisson sampling rate is in (0, 1], got {self.rate!r}")

    @property
    def neighbouring(self) -> str:
        return "add or remove one site"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "poisson", "rate": float(self.rate)}


@dataclass(frozen=True)
class FixedSizeSampling:
    """``sample_size`` of ``population`` sites per round, uniformly without replacement."""

    sample_size: int
    population: int

    def __post_init__(self) -> None:
        m, n = self.sample_size, self.population
        if not (isinstance(m, int) and isinstance(n, int) and 1 <= m <= n):
            raise ConfigError(
                f"fixed-size sampling takes 1 <= sample_size <= population sites, got {m!r} "
                f"of {n!r}"
            )

    @property
    def rate(self) -> float:
        return self.sample_size / self.population

    @property
    def neighbouring(self) -> str:
        return "replace one site"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "fixed_size",
            "sample_size": self.sample_size,
            "population": self.population,
        }


Sampling = PoissonSampling | FixedSizeSampling


def sampling_from_dict(data: dict[str, Any]) -> Sampling:
    """The inverse of ``to_dict`` (ConfigError on an unknown kind or bad values)."""
    kind = data.get("kind")
    if kind == "poisson":
        return PoissonSampling(rate=data["rate"])
    if kind == "fixed_size":
        return FixedSizeSampling(sample_size=data["sample_size"], population=data["population"])
    raise ConfigError(f"unknown sampling kind {kind!r}: 'poisson' or 'fixed_size'")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ConfigError(f"δ is in (0, 1) (e.g. 1e-5, below 1/number of sites), got {delta!r}")


def _check_noise(noise_multiplier: float) -> None:
    if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier)):
        raise ConfigError(f"the noise multiplier is a finite number, got {noise_multiplier!r}")
    if noise_multiplier < 0:
        raise ConfigError(f"the noise multiplier is >= 0, got {noise_multiplier}")


def _check_accountant(accountant: str, sampling: Sampling) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {accountant!r}: one of {', '.join(ACCOUNTANTS)}")
    if accountant == "pld" and isinstance(sampling, FixedSizeSampling):
        raise ConfigError(
            "the PLD accountant has no event for sampling without replacement; use the RDP "
            "accountant for fixed-size sampling"
        )


def round_event(noise_multiplier: float, sampling: Sampling) -> dp_accounting.DpEvent:
    """The dp-accounting event of one DP-FedAvg round (see the module docstring)."""
    gaussian = dp_accounting.GaussianDpEvent
    if isinstance(sampling, PoissonSampling):
        return dp_accounting.PoissonSampledDpEvent(sampling.rate, gaussian(noise_multiplier))
    # Replace-one moves the weighted sum by up to 2C: σC of noise is σ/2 of that.
    return dp_accounting.SampledWithoutReplacementDpEvent(
        sampling.population, sampling.sample_size, gaussian(noise_multiplier / 2)
    )


def _fresh(accountant: str, sampling: Sampling) -> dp_accounting.PrivacyAccountant:
    relation = dp_accounting.NeighboringRelation
    if isinstance(sampling, FixedSizeSampling):
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation.REPLACE_ONE)
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant(relation.ADD_OR_REMOVE_ONE)
    return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation.ADD_OR_REMOVE_ONE)


def _guaranteed(epsilon: float) -> float:
    """ε as reported: NaN (no bound found) becomes inf, never a number we cannot back."""
    return float(epsilon) if not math.isnan(epsilon) else math.inf


def epsilon_for(
    noise_multiplier: float, sampling: Sampling, delta: float, rounds: int, accountant: str = "rdp"
) -> float:
    """ε at ``delta`` after ``rounds`` rounds of the mechanism (0 for none, inf for σ = 0)."""
    _check_noise(noise_multiplier)
    _check_delta(delta)
    _check_accountant(accountant, sampling)
    if rounds < 0:
        raise ConfigError(f"rounds is >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(round_event(noise_multiplier, sampling), rounds)
    return _guaranteed(_fresh(accountant, sampling).compose(event).get_epsilon(delta))


class PrivacyLedger:
    """The rounds of one run's mechanism, and the ε they have spent at δ.

    Central Gaussian noise by default; with ``distributed`` (a ``DistributedSkellam``
    with the same σ) the rounds are accounted by the Skellam bound, without
    amplification by ``sampling`` (``fedmae.privacy.skellam``).

    The per-round RDP curve is computed once (a few hundred ms) and scaled by the round
    count, so ``epsilon_after`` (the budget check before each round) costs microseconds.
    The PLD accountant composes afresh on each query (seconds).
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling: Sampling,
        delta: float,
        rounds: int = 0,
        accountant: str = "rdp",
        distributed: DistributedSkellam | None = None,
    ):
        _check_noise(noise_multiplier)
        _check_delta(delta)
        _check_accountant(accountant, sampling)
        if distributed is not None and accountant != "rdp":
            raise ConfigError("distributed Skellam noise is accounted with the RDP accountant")
        if distributed is not None and distributed.noise_multiplier != noise_multiplier:
            raise ConfigError(
                f"the ledger's σ = {noise_multiplier} is not the distributed noise's "
                f"σ = {distributed.noise_multiplier}"
            )
        if not (isinstance(rounds, int) and rounds >= 0):
            raise ConfigError(f"rounds recorded is an integer >= 0, got {rounds!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.sampling = sampling
        self.delta = float(delta)
        self.accountant = accountant
        self.distributed = distributed
        self.rounds = rounds

    @cached_property
    def _rdp_per_round(self) -> tuple[np.ndarray, np.ndarray]:
        """(orders, RDP of one round at each order) from dp-accounting's RDP accountant,
        or the Skellam bound."""
        if self.distributed is not None:
            return SKELLAM_ORDERS, self.distributed.round_rdp()
        accountant = _fresh("rdp", self.sampling)
        accountant.compose(round_event(self.noise_multiplier, self.sampling))
        return np.asarray(accountant.orders), np.asarray(accountant.rdp)

    def record_round(self) -> None:
        """One more round ran with this mechanism (call once its noised model is out)."""
        self.rounds += 1

    def epsilon(self) -> float:
        """ε at δ after the rounds recorded so far."""
        return self.epsilon_after(self.rounds)

    def epsilon_after(self, rounds: int) -> float:
        """ε at δ had ``rounds`` rounds run (a what-if: the ledger does not change)."""
        if not (isinstance(rounds, int) and rounds >= 0):
            raise ConfigError(f"rounds is an integer >= 0, got {rounds!r}")
        if rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        if self.accountant == "pld":
            return epsilon_for(
                self.noise_multiplier, self.sampling, self.delta, rounds, self.accountant
            )
        orders, rdp = self._rdp_per_round
        epsilon, _ = rdp_privacy_accountant.compute_epsilon(orders, rounds * rdp, self.delta)
        return _guaranteed(epsilon)

    def budget_allows_next_round(self, target_epsilon: float) -> bool:
        """Whether one more round keeps ε at δ within ``target_epsilon`` (the budget stop)."""
        return self.epsilon_after(self.rounds + 1) <= target_epsilon

    def to_json(self) -> str:
        """The ledger as JSON, saved beside the model's checkpoint (no pickle).

        ``epsilon`` is there for a reader; ``from_json`` recomputes it."""
        return json.dumps(
            {
                "format": LEDGER_FORMAT,
                "noise_multiplier": self.noise_multiplier,
                "sampling": self.sampling.to_dict(),
                "delta": self.delta,
                "accountant": self.accountant,
                "rounds": self.rounds,
                "distributed": asdict(self.distributed) if self.distributed else None,
                "epsilon": self.epsilon(),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """A ledger back from ``to_json`` (ConfigError on another format or a bad value)."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"the privacy ledger is not JSON: {error}") from None
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise ConfigError(f"not a privacy ledger (expected format {LEDGER_FORMAT!r})")
        try:
            distributed = data.get("distributed")
            return cls(
                distributed=DistributedSkellam(**distributed) if distributed else None,
                noise_multiplier=data["noise_multiplier"],
                sampling=sampling_from_dict(data["sampling"]),
                delta=data["delta"],
                rounds=data["rounds"],
                accountant=data["accountant"],
            )
        except (KeyError, TypeError) as error:
            raise ConfigError(f"the privacy ledger lacks or garbles {error}") from None


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sampling: Sampling,
    rounds: int,
    accountant: str = "rdp",
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """The smallest noise multiplier σ (to ~1e-4) whose ε at ``delta`` after ``rounds``
    rounds is at most ``target_epsilon``; ConfigError if even ``max_noise_multiplier``
    does not meet it.

    dp-accounting's ``calibrate_dp_mechanism`` does the search (Brent's method) and
    guarantees the returned σ meets the target; we check it once more.
    """
    _check_delta(delta)
    _check_accountant(accountant, sampling)
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ConfigError(f"calibrating σ needs the planned rounds (>= 1), got {rounds!r}")
    if not (isinstance(target_epsilon, int | float) and 0 < target_epsilon < math.inf):
        raise ConfigError(f"the target ε is a positive finite number, got {target_epsilon!r}")

    def epsilon_at(sigma: float) -> float:
        return epsilon_for(sigma, sampling, delta, rounds, accountant)

    at_cap = epsilon_at(max_noise_multiplier)
    if at_cap > target_epsilon:
        raise ConfigError(
            f"ε = {target_epsilon:g} at δ = {delta:g} cannot be met in {rounds} round(s) with "
            f"sampling rate {sampling.rate:g}: even σ = {max_noise_multiplier:g} gives "
            f"ε = {at_cap:.3g}; raise the target, sample fewer sites per round or plan "
            "fewer rounds"
        )
    if epsilon_at(_MIN_NOISE_MULTIPLIER) <= target_epsilon:
        return _MIN_NOISE_MULTIPLIER  # a target this loose needs (almost) no noise
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        lambda: _fresh(accountant, sampling),
        lambda s: dp_accounting.SelfComposedDpEvent(round_event(s, sampling), rounds),
        target_epsilon,
        delta,
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(
            _MIN_NOISE_MULTIPLIER, max_noise_multiplier
        ),
        tol=1e-4,
    )
    if epsilon_at(sigma) > target_epsilon:  # dp-accounting promises this never happens
        raise ConfigError(f"calibration returned σ = {sigma} above the target ε; please report")
    return float(sigma)
