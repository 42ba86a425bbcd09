"""A secure round at the aggregator: its phases, who answered which, and who is out.

``SECURE_PHASES`` replaces the plain round's TRAIN with the four phases of secure
aggregation (``fedmae.secagg.messages`` has the table of what each says). The protocol
itself is ``fedmae.secagg.aggregation.SecureSum``; this module is its bookkeeping in
the round engine: the clients each phase asks, their answers (``answer``, from the
Federation servicer), a phase's own deadline, and the exclusion of a client whose
answer is malformed, out of turn or refused (it is left out of the phases to come,
and the round goes on while enough honest sites remain).

What the server keeps of a secure round is what the protocol needs: public keys,
sealed shares it relays, the running masked sum and, at the end, the revealed shares.
No per-site sample count, norm, loss or byte count is recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aggregator_service.config import SecureAggregation
from aggregator_service.round_state import RoundPhase, RoundState
from fedmae.errors import (
    FailedPrecondition,
    FedmaeError,
    InvalidUpdate,
    SecAggFailed,
    StaleUpdate,
)
from fedmae.payload.buffers import BufferPool
from fedmae.payload.ring import RingDecoder
from fedmae.privacy.skellam import DistributedSkellam
from fedmae.rounds import Phase, UpdateHeader
from fedmae.secagg.aggregation import SecureSum
from fedmae.secagg.fixed_point import plan_ring
from fedmae.secagg.messages import (
    AdvertiseKeys,
    SecAggAbort,
    SecAggParams,
    ShareKeys,
    UnmaskShares,
)
from fedmae.secagg.signing import CertificateCheck

log = logging.getLogger(__name__)

SECURE = (Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT, Phase.UNMASK)
_PHASE_OF = {AdvertiseKeys: Phase.ADVERTISE_KEYS, ShareKeys: Phase.SHARE_KEYS,
             UnmaskShares: Phase.UNMASK}  # fmt: skip
_WORDS = {
    Phase.ADVERTISE_KEYS: "trained and advertised keys",
    Phase.SHARE_KEYS: "shared keys",
    Phase.MASKED_INPUT: "sent a masked input",
    Phase.UNMASK: "sent their unmasking shares",
}


def plan_params(
    settings: SecureAggregation, weight_cap: int, noise: DistributedSkellam | None = None
) -> SecAggParams:
    """The round parameters: the ring and fixed point planned for the configuration
    (ConfigError, at start, when no ring fits it). With distributed DP's ``noise`` the
    fixed point is the noise's, and the ring the smaller that holds its sums."""
    if noise is not None:
        return SecAggParams(
            ring_bits=noise.ring_bits(settings.max_sites, settings.ring_bits),
            frac_bits=noise.frac_bits, clip=noise.clip, weight_cap=1,
            threshold=settings.threshold, neighbours=settings.neighbours,
            dp_noise_multiplier=noise.noise_multiplier, dp_clip=noise.clip,
            dp_min_sites=noise.min_sites,
        )  # fmt: skip
    bits, frac = plan_ring(settings.max_sites, weight_cap, settings.clip, settings.ring_bits)
    return SecAggParams(
        ring_bits=bits, frac_bits=frac, clip=settings.clip, weight_cap=weight_cap,
        threshold=settings.threshold, neighbours=settings.neighbours,
    )  # fmt: skip


@dataclass
class SecureRound:
    """One round's secure-aggregation state in the engine (guarded by its lock)."""

    sum: SecureSum
    params: SecAggParams
    required: int  # survivors the round needs to publish
    phase_timeout_s: float
    asked: dict[Phase, set[str]] = field(default_factory=dict)
    answered: dict[Phase, set[str]] = field(default_factory=lambda: {p: set() for p in SECURE})
    excluded: dict[str, str] = field(default_factory=dict)

    total_weight: int = 0  # the survivors' summed weight, once unmasked

    @classmethod
    def open(
        cls, state: RoundState, params: SecAggParams, settings: SecureAggregation, length: int,
        check: CertificateCheck, required: int,
    ) -> SecureRound:  # fmt: skip
        """A new round's secure state: every selected site is asked to advertise keys."""
        secure = cls(
            SecureSum(state.round, state.attempt, params, length, check),
            params,
            required=max(2, required),
            phase_timeout_s=settings.phase_timeout_s,
        )
        secure.asked[Phase.ADVERTISE_KEYS] = set(state.selected)
        return secure

    def owing(self, phase: Phase, state: RoundState) -> set[str]:
        asked = self.asked.get(phase, set())
        return asked - self.answered[phase] - self.excluded.keys() - state.revoked

    def exclude(self, client_id: str, reason: str) -> None:
        """Leave a client out of the phases still to come (idempotent)."""
        if client_id not in self.excluded:
            self.excluded[client_id] = reason
            self.sum.exclude(client_id, reason)
            log.warning("round %d: %s excluded from secure aggregation: %s",
                        self.sum.round, client_id, reason)  # fmt: skip

    def answer(self, state: RoundState, client_id: str, message: object) -> int:
        """A client's answer to a phase; returns how many answered that phase so far.

        An answer for another round or attempt is refused (FAILED_PRECONDITION) and
        changes nothing. For this round, an answer that is out of turn, repeated or
        malformed is refused and its sender excluded from the round.
        """
        if (message.round, message.attempt) != (state.round, state.attempt):
            raise StaleUpdate(
                f"a secure-aggregation message for round {message.round} attempt "
                f"{message.attempt}, but round {state.round} attempt {state.attempt} is open"
            )
        if isinstance(message, SecAggAbort):
            reason = f"{client_id} aborted secure aggregation: {message.reason}"
            self.sum.aborted(client_id, message.reason)
            state.invalidated = state.invalidated or reason
            log.error("round %d: %s", state.round, reason)
            return 0
        phase = _PHASE_OF[type(message)]
        running = state.phase.phase if state.phase is not None else None
        try:
            if state.closed or running != phase or client_id not in self.asked.get(phase, ()):
                raise FailedPrecondition(
                    f"{client_id} was not asked for {phase.name} now (round {state.round} is "
                    f"in {running.name if running else 'no phase'})"
                )
            if client_id in self.answered[phase]:
                raise FailedPrecondition(f"{client_id} already answered {phase.name}")
            if client_id in self.excluded:
                raise FailedPrecondition(
                    f"{client_id} was excluded from this round: {self.excluded[client_id]}"
                )
            if isinstance(message, AdvertiseKeys):
                self.sum.advertised(client_id, message)
            elif isinstance(message, ShareKeys):
                self.sum.shared(client_id, message)
            else:
                self.sum.unmasked(client_id, message)
        except FedmaeError as err:
            if client_id in state.selected:
                self.exclude(client_id, f"{type(err).__name__}: {err}")
            raise
        self.answered[phase].add(client_id)
        return len(self.answered[phase])

    def admit_masked(self, state: RoundState, client_id: str, header: UpdateHeader) -> None:
        """May this upload be ``client_id``'s masked input now? (Else refused, and the
        client excluded.) It carries no metrics: the server keeps no per-site losses."""
        running = state.phase.phase if state.phase is not None else None
        try:
            if running != Phase.MASKED_INPUT or client_id not in self.asked.get(running, ()):
                raise FailedPrecondition(
                    f"{client_id} was not asked for a masked input now (round {state.round} "
                    f"is in {running.name if running else 'no phase'})"
                )
            if client_id in self.excluded:
                raise FailedPrecondition(
                    f"{client_id} was excluded from this round: {self.excluded[client_id]}"
                )
            if header.metrics:
                raise InvalidUpdate(
                    "a masked input carries no metrics (a secure round keeps no per-site "
                    f"losses); got {sorted(header.metrics)}"
                )
        except FedmaeError as err:
            self.exclude(client_id, f"{type(err).__name__}: {err}")
            raise

    def receiver(self, client_id: str, header: UpdateHeader, pool: BufferPool) -> RingDecoder:
        """The receive buffer of an admitted masked input; a manifest that is not the
        round's (size, ring, encoding) is refused and its sender excluded."""
        try:
            return RingDecoder(header.manifest, self.sum.input_length, self.params.ring_bits, pool)
        except FedmaeError as err:
            self.exclude(client_id, f"{type(err).__name__}: {err}")
            raise

    def masked(self, client_id: str) -> None:
        """``client_id``'s masked input was added to the sum."""
        self.answered[Phase.MASKED_INPUT].add(client_id)

    def summary(self) -> dict[str, object]:
        """The round log's ``secagg`` entry: parameters and counts, nothing per site."""
        return {
            **({"distributed_dp": True} if self.params.distributed_dp else {}),
            "ring_bits": self.params.ring_bits,
            "frac_bits": self.params.frac_bits,
            "clip": self.params.clip,
            "threshold": self.sum.threshold,
            "neighbours": self.sum.degree,
            **{p.name.lower(): len(self.answered[p]) for p in SECURE},
            "excluded": dict(sorted(self.excluded.items())),
        }


def _secure(state: RoundState) -> SecureRound:
    assert state.secure is not None, "a secure phase runs in a secure round only"
    return state.secure


def _owing(phase: Phase):
    return lambda state: _secure(state).owing(phase, state)


def _all_answered(phase: Phase):
    return lambda state: not _secure(state).owing(phase, state)


def _advertise_done(state: RoundState) -> bool:
    """Training ends when enough sites advertised keys (the target, with over-selection)
    or none it asked still owes them (the rest were excluded or revoked)."""
    secure = _secure(state)
    return len(secure.answered[Phase.ADVERTISE_KEYS]) >= state.needed() or not secure.owing(
        Phase.ADVERTISE_KEYS, state
    )


def _enough(phase: Phase):
    """After the wait: fail the round when fewer than it needs answered the phase."""

    def settle(state: RoundState) -> None:
        secure = _secure(state)
        got = len(secure.answered[phase] - secure.excluded.keys())
        if got < secure.required:
            state.invalidated = state.invalidated or (
                f"secure aggregation: only {got} of {len(secure.asked.get(phase, ()))} "
                f"sites {_WORDS[phase]} (the round needs {secure.required}); nothing "
                "was revealed"
            )

    return settle


def _begin(phase: Phase, previous: Phase, close: str):
    """A phase after training: fix who answered the last one, ask them; own deadline."""

    def start(state: RoundState, now: float) -> None:
        secure = _secure(state)
        try:
            getattr(secure.sum, close)()
        except SecAggFailed as err:
            state.invalidated = state.invalidated or str(err)
            return
        secure.asked[phase] = secure.answered[previous] - secure.excluded.keys() - state.revoked
        state.deadline = now + secure.phase_timeout_s

    return start


ADVERTISE_KEYS = RoundPhase(
    Phase.ADVERTISE_KEYS, "training", owing=_owing(Phase.ADVERTISE_KEYS),
    done=_advertise_done, settle=_enough(Phase.ADVERTISE_KEYS), trains=True,
)  # fmt: skip
SHARE_KEYS = RoundPhase(
    Phase.SHARE_KEYS, "share_keys", owing=_owing(Phase.SHARE_KEYS),
    done=_all_answered(Phase.SHARE_KEYS), settle=_enough(Phase.SHARE_KEYS),
    start=_begin(Phase.SHARE_KEYS, Phase.ADVERTISE_KEYS, "close_advertising"),
    task_data=lambda state, client: _secure(state).sum.roster(client),
)  # fmt: skip
MASKED_INPUT = RoundPhase(
    Phase.MASKED_INPUT, "masked_input", owing=_owing(Phase.MASKED_INPUT),
    done=_all_answered(Phase.MASKED_INPUT), settle=_enough(Phase.MASKED_INPUT),
    start=_begin(Phase.MASKED_INPUT, Phase.SHARE_KEYS, "close_sharing"),
    task_data=lambda state, client: _secure(state).sum.inbound(client),
)  # fmt: skip
UNMASK = RoundPhase(
    Phase.UNMASK, "unmask", owing=_owing(Phase.UNMASK), done=_all_answered(Phase.UNMASK),
    settle=lambda state: None,  # the unmasking at the close decides (enough shares?)
    start=_begin(Phase.UNMASK, Phase.MASKED_INPUT, "close_masking"),
    task_data=lambda state, client: _secure(state).sum.unmask_request(client),
)  # fmt: skip

# The phases of every secure round, in order.
SECURE_PHASES: tuple[RoundPhase, ...] = (ADVERTISE_KEYS, SHARE_KEYS, MASKED_INPUT, UNMASK)
