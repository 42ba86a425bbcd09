"""The round engine: select, open, fold, close. Plain Python, no network.

One round: wait for ``min_clients`` subscribers, select (seeded; under ``--dp
central`` a Poisson sample, ``private_rounds``, which also clips, noises and accounts),
run the round's phases (``round_state.ROUND_PHASES``; today TRAIN), close when every
phase is done or at the deadline, publish a new version (``published_model``) if at
least ``min_updates`` (and ``min_participants``) were accepted, else retry the round.
``docs/architecture.md`` walks through it.

The servicers in ``aggregator_service.rpc`` translate the wire to calls on this object
and its parts ``uploads`` (admission, the fold) and ``downloads`` (slots, streams).
Round state is guarded by one condition variable. The fold runs under its own lock
(``uploads.fold_lock``), aggregation, checkpoint and evaluation outside the engine's,
so Subscribe, status and heartbeats never wait for a full-model pass. Time comes from
an injected ``Clock``: tests drive deadlines with a fake one.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import replace

import torch

from aggregator_service.checkpoint_store import Checkpoint, CheckpointStore
from aggregator_service.client_calls import ClientCalls
from aggregator_service.clock import SYSTEM_CLOCK, Clock
from aggregator_service.config import ServerConfig
from aggregator_service.downloads import Downloads, FinalFetches
from aggregator_service.private_rounds import BUDGET_SPENT, PrivateRounds
from aggregator_service.published_model import PublishedModel
from aggregator_service.records import RoundRecord, recover
from aggregator_service.round_log import RoundLog
from aggregator_service.round_state import ROUND_PHASES, DropoutWatch, RoundPhase, RoundState
from aggregator_service.secure_rounds import SECURE_PHASES, SecureRound, plan_params
from aggregator_service.strategies import Strategy
from aggregator_service.subscriptions import RoundObserver, Subscribers
from aggregator_service.update_bounds import UpdateBounds
from aggregator_service.uploads import Uploads
from fedmae.errors import ConfigError
from fedmae.payload.encodings import encoding_from_name, encoding_name
from fedmae.payload.layout import ModelLayout
from fedmae.rounds import (
    ModelPublished,
    RoundClosed,
    RoundTask,
    RunFinished,
)
from fedmae.runtime import release_free_memory
from fedmae.secagg.messages import SecAggParams
from fedmae.secagg.signing import CertificateCheck

log = logging.getLogger(__name__)

POLL_S = 0.5  # longest wait between looks at a stop event set from outside


class RoundEngine(ClientCalls):
    """Runs the rounds of one federation (``run``); answers its clients with the calls
    of ``ClientCalls`` (``client_calls.py``)."""

    def __init__(
        self,
        config: ServerConfig,
        layout: ModelLayout,
        global_flat: torch.Tensor,
        checkpoint: Checkpoint,
        store: CheckpointStore,
        strategy: Strategy,
        round_log: RoundLog,
        clock: Clock = SYSTEM_CLOCK,
        phases: tuple[RoundPhase, ...] | None = None,
        keys_check: CertificateCheck | None = None,
        private: PrivateRounds | None = None,
    ):
        self.config = config
        self.policy = config.policy
        self.layout = layout
        self._cond = threading.Condition()
        self.model = PublishedModel(
            store, layout, checkpoint, global_flat, config.training.model, clock, self._cond
        )
        self.strategy = strategy
        self.round_log = round_log
        self.clock = clock
        self.bounds = UpdateBounds(config, history=round_log.read)
        # Secure aggregation: its phases, and the parameters every round sends (the ring
        # planned now, so a configuration that could overflow fails at start).
        self.secagg: SecAggParams | None = None
        if config.secure is not None:
            if keys_check is None:
                raise ConfigError("secure aggregation needs the federation's CA to check keys")
            noise = private.skellam if private is not None else None  # --dp distributed
            self.secagg = plan_params(config.secure, self.bounds.cap, noise)
        self.keys_check = keys_check
        self.phases = phases or (SECURE_PHASES if self.secagg else ROUND_PHASES)
        self.next_round = checkpoint.round + 1
        self._stop = threading.Event()
        self.subscribers = Subscribers()
        self.state: RoundState | None = None
        self.finished = threading.Event()
        self.observers: list[RoundObserver] = []
        self.phase = "waiting"  # for status: waiting, a phase's label, closing
        self.last_record: RoundRecord | None = None
        self._waited_s = 0.0
        self._started_once = False  # start_clients gates the first round only
        self._closed_at = 0.0  # when the last round closed (the clock's monotonic time)
        # Central DP (--dp central): sampling, the DP step and the ledger, in one place.
        self.private = private
        if private is not None:
            strategy.noised_mean = private.mean_  # a FedAvg: ServerConfig checked it
        self.uploads = Uploads(
            config, layout, strategy, self.bounds, self._cond, clock,
            current=lambda: self.state, observers=self.observers, private=private,
        )  # fmt: skip
        self.downloads = Downloads(
            config, layout, store, clock, published=self.model.current, sent=self._count_sent
        )
        self.final_fetches = FinalFetches(clock)
        self.completed = False
        self.finish_reason = "completed"  # or BUDGET_SPENT (RunFinished's reason)

    # The published model's version, checkpoint and flat vector (see ``PublishedModel``).
    @property
    def version(self) -> int:
        return self.model.version

    @property
    def checkpoint(self) -> Checkpoint:
        return self.model.checkpoint

    @property
    def global_flat(self) -> torch.Tensor:
        return self.model.flat

    # ------------------------------------------------------------ the round loop

    def run(self, stop: threading.Event | None = None) -> None:
        """The round loop; returns when round ``policy.rounds`` is published, or on stop.

        ``rounds`` counts rounds of the whole run, so a restarted aggregator finishes
        the rounds its predecessor did not. Only a completed run tells clients
        ``RunFinished``; on a stop their streams just end and they reconnect.
        """
        if stop is not None:
            self._stop = stop
        stop = self._stop  # the helpers below read self._stop
        attempt, completed = 1, False
        try:
            while not stop.is_set():
                if completed := self._run_done():
                    break
                if self.private is not None and self.private.budget_spent():
                    completed, self.finish_reason = True, BUDGET_SPENT
                    log.warning("%s: round %d would take ε above --dp-target-epsilon %g; "
                                "the run ends", BUDGET_SPENT, self.next_round,
                                self.private.config.target_epsilon)  # fmt: skip
                    break
                if not self._wait_for_clients():
                    break
                if self._run_round(attempt):
                    attempt = 1
                elif not stop.is_set():
                    attempt += 1
                    if self.policy.max_attempts and attempt > self.policy.max_attempts:
                        log.error("round %d failed %d times; stopping", self.next_round,
                                  attempt - 1)  # fmt: skip
                        break
                    with self._cond:  # counted from the close, as a client sees it
                        self._wait_until(stop.is_set, self._closed_at + self.policy.retry_delay_s)
        finally:
            self.uploads.buffers.clear()
            with self._cond:
                self.completed = completed
                self.finished.set()
                if completed:
                    self.subscribers.send(self._run_finished())
                    self.final_fetches.expect(sorted(self.subscribers.ids()), self.version)
                self._cond.notify_all()
            for observer in self.observers:
                observer.run_ended(completed)
            log.info("run finished (%s): round %d published version %d" if completed else
                     "round loop stopped after round %d at version %d",
                     *((self.finish_reason,) if completed else ()), self.next_round - 1,
                     self.version)  # fmt: skip

    def stop(self) -> None:
        """End the round loop (an open round is logged as aborted)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _wait_for_clients(self) -> bool:
        t0, need, stop = self.clock.monotonic(), self.policy.min_clients, self._stop
        if not self._started_once:  # the first round of this process waits for more
            need = max(need, self.policy.start_clients)

        def enough() -> bool:
            return len(self.subscribers) >= need or stop.is_set()

        with self._cond:
            self.phase = "waiting"
            while not enough():
                log.info("waiting for clients: %d of %d connected", len(self.subscribers), need)
                self._wait_until(enough, self.clock.monotonic() + 10.0)
        self._waited_s = self.clock.monotonic() - t0
        self._started_once = True
        return not stop.is_set()

    def _wait_until(self, ready: Callable[[], bool], end: float) -> bool:
        """Wait (holding the lock) until ``ready()`` or the clock reads ``end``."""
        while not ready() and (left := end - self.clock.monotonic()) > 0:
            self.clock.wait(self._cond, min(left, POLL_S))
        return ready()

    def _run_round(self, attempt: int) -> bool:
        timings: dict[str, float] = {"waiting_s": round(self._waited_s, 3)}
        state = self._open_round(attempt)
        for phase in self.phases:
            self._run_phase(state, phase, timings)
            if state.invalidated or self._stop.is_set() or not phase.goes_on(state):
                break
        return self._close_round(state, timings)

    def _open_round(self, attempt: int) -> RoundState:
        # No copy of the model in memory until the round aggregates (see
        # ``PublishedModel``). Full-model passes (the accumulator's reset, the base norm
        # for the bound) run outside the engine's lock.
        round_ = self.next_round  # written by this thread only
        self.model.release()
        self.uploads.begin_round()
        norm_bound = self.bounds.round_bound(round_, lambda: self.model.flat)
        self.model.release()
        with self._cond:
            if self.private is not None:  # Poisson, as accounted: never topped up
                selected = self.private.sample(sorted(self.subscribers.ids()))
            else:
                selected = self.strategy.configure_round(
                    round_, attempt, sorted(self.subscribers.ids()), self.policy.fraction,
                    self.policy.min_clients, self.policy.seed,
                )  # fmt: skip
            if self.config.secure is not None:  # the ring is planned for this many at most
                selected = selected[: self.config.secure.max_sites]
            self.state = state = RoundState.opened(
                round_, attempt, self.version, selected, self.config, self.strategy,
                norm_bound=norm_bound, now=self.clock.monotonic(),
            )  # fmt: skip
            if self.secagg is not None:
                state.secure = SecureRound.open(
                    state, self.secagg, self.config.secure, self.layout.numel, self.keys_check,
                    required=state.to_publish(),
                )  # fmt: skip
            log.info("round %d (attempt %d) started: %d of %d clients selected, base version %d",
                     round_, attempt, len(selected), len(self.subscribers),
                     self.version)  # fmt: skip
        self.uploads.open_store(len(selected))
        return state

    def _run_phase(self, state: RoundState, phase: RoundPhase, timings: dict[str, float]) -> None:
        """Send the phase's task to the clients it waits for; wait until the phase is
        done, the deadline passes (a training phase's moves on while every site it
        waits for progresses: ``deadlines``), or every client it waits for has been
        gone for ``dropout_grace_s`` (early close)."""
        with self._cond:
            started = self.clock.monotonic()
            state.phase, self.phase = phase, phase.label
            if phase.start is not None:
                phase.start(state, started)
            if state.invalidated:
                return
            for client in sorted(phase.owing(state)):
                self.subscribers.send(self._task(state, client), to=[client])
            dropouts = DropoutWatch(self.policy.dropout_grace_s, busy=started)
            while not phase.done(state) and not self._stop.is_set() and not state.invalidated:
                now = self.clock.monotonic()
                if now >= state.deadline and not state.extend_deadline(self.subscribers.ids(), now):
                    break
                owing = phase.owing(state)
                if dropouts.all_gone(owing, state.uploading, self.subscribers.gone_since, now):
                    log.info("round %d: every client still owing an update is gone; "
                             "closing early", state.round)  # fmt: skip
                    break
                self.clock.wait(self._cond, min(state.deadline - now, POLL_S))
            state.close_training(self.subscribers.ids(), self.clock.monotonic())
            timings[f"{phase.label}_s"] = round(self.clock.monotonic() - started, 3)

    def _close_round(self, state: RoundState, timings: dict[str, float]) -> bool:
        """Close the round, publish its model if enough updates came, log it, tell all."""
        with self._cond:
            state.closed = True  # later completions get DEADLINE_EXCEEDED
            self.phase = "closing"
            self._wait_until(lambda: not state.folding, math.inf)  # admitted before: they count
        if state.secure is not None and not state.invalidated and not self._stop.is_set():
            started = self.clock.monotonic()
            self.uploads.unmask(state)  # outside the lock: a pass over the model per mask
            timings["unmasking_s"] = round(self.clock.monotonic() - started, 3)
        with self._cond:
            status, reason = state.outcome(stopping=self._stop.is_set())
        success = status == "published"
        next_version = None
        if success:  # outside the engine's lock: full-model passes and an fsync
            next_version = self.model.prepare(
                state.round, self.uploads.aggregate, self.strategy.evaluate, timings,
                self.strategy.state, self._next_ledger(state) if self.private else None,
            )  # fmt: skip
        self.uploads.end_round()
        with self._cond:
            if next_version is not None:
                self.model.publish(next_version)
                self.next_round = state.round + 1
                if self.private is not None:
                    self.private.record()  # its ledger is on disk with the checkpoint
            record = RoundRecord.closed(
                state, status=status, version=self.version, connected=self.subscribers.ids(),
                strategy=self.strategy.name, encoding=encoding_name(state.encoding),
                weight_cap=self.bounds.cap, phases=timings, now=self.clock.monotonic(),
                wall_time=self.clock.time(), reason=reason,
                eval_loss=next_version.eval_loss if next_version else None,
                dp=self.private.summary() if self.private else None,
            )  # fmt: skip
            self.last_record, self._closed_at = record, self.clock.monotonic()
            if success:
                self.bounds.published(record.to_json())  # the next round's auto norm bound
            # Durable before anyone hears of it: a client or monitor that sees version N
            # finds round N in the log. Status and downloads read the version under this
            # lock, so none sees it before the line is on disk.
            self.round_log.append(record.to_json())
            if success:
                self.subscribers.send(
                    ModelPublished(self.version, state.round, self.model.manifest())
                )
            closed = RoundClosed.of(record)
            self.subscribers.send(self.private.for_sites(closed) if self.private else closed)
            self.phase = "waiting"
        self.round_log.echo_record(record.to_json())
        release_free_memory()  # the round's transfer buffers, freed but kept by malloc
        for observer in self.observers:
            observer.round_closed(record)
        log.log(logging.INFO if success else logging.WARNING, "%s", record.summary())
        return success

    # ------------------------------------------------------------ run end, recovery

    def recover_log(self) -> RoundRecord | None:
        """The record of the published version after a crash (see ``records.recover``)."""
        return recover(
            self.round_log, self.version, self.checkpoint.round, strategy=self.strategy.name,
            encoding=encoding_name(encoding_from_name(self.config.training.update_encoding)),
            wall_time=self.clock.time(),
        )  # fmt: skip

    # ------------------------------------------------------------ helpers

    def _task(self, state: RoundState, client_id: str) -> RoundTask:
        """The running phase's task for one client (a secure phase's part is its own)."""
        wall_deadline = self.clock.time() + state.deadline - self.clock.monotonic()
        phase = state.phase
        data = phase.task_data(state, client_id) if phase and phase.task_data else None
        training = self.strategy.training_config(self.config.training)  # FedProx: its μ
        if self.private is not None:  # sites clip to C too (the server re-clips)
            training = replace(training, dp_clip=self.private.clip)
        return RoundTask.of(state, training, wall_deadline, secagg=self.secagg, phase_data=data)

    def _run_done(self) -> bool:
        """Round ``policy.rounds`` is published (never, when rounds = 0)."""
        return bool(self.policy.rounds) and self.next_round > self.policy.rounds

    def _next_ledger(self, state: RoundState) -> str:
        """The ledger to save with the round's model (adaptive clipping: its C moved by
        the folded deltas' norms)."""
        assert self.private is not None
        return self.private.next_ledger([r.update_norm for r in state.accepted.values()])

    def _finish_reason(self) -> str:
        """Why the finished run ended (status): its reason, or "stopped" before its end."""
        return self.finish_reason if self.completed else "stopped"

    def _run_finished(self) -> RunFinished:
        return RunFinished(self.version, self.next_round - 1, self.finish_reason,
                           self.config.training.model)  # fmt: skip

    def _count_sent(self, nbytes: int) -> None:
        if (state := self.state) is not None and not state.closed:
            state.bytes_out += nbytes  # GIL-atomic enough for a statistic
