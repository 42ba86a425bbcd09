"""The calls a round engine answers for its clients: their event streams, revocation,
status, training progress, secure-aggregation answers and final fetches.

``ClientCalls`` is mixed into ``engine.RoundEngine`` and works on its state under its
lock: the servicers in ``aggregator_service.rpc`` call these, the round loop in
``engine`` calls none of them. Kept apart so each file reads as one thing: the round
loop there, what a client may ask of it here.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from aggregator_service.subscriptions import Subscribers, Subscription
from fedmae.errors import PermissionDenied, StaleUpdate
from fedmae.rounds import TrainingProgress, UpdateReceipt

if TYPE_CHECKING:
    from aggregator_service.clock import Clock
    from aggregator_service.config import RoundPolicy
    from aggregator_service.downloads import FinalFetches
    from aggregator_service.published_model import PublishedModel
    from aggregator_service.records import RoundRecord
    from aggregator_service.round_state import RoundState

log = logging.getLogger("aggregator_service.engine")


class ClientCalls:
    """What clients (through the servicers) ask of the round engine."""

    # The engine's state these calls read and change (set in ``RoundEngine.__init__``).
    _cond: threading.Condition
    clock: Clock
    subscribers: Subscribers
    state: RoundState | None
    finished: threading.Event
    completed: bool
    final_fetches: FinalFetches
    model: PublishedModel
    phase: str
    next_round: int
    last_record: RoundRecord | None
    policy: RoundPolicy
    version: int  # the published version (a property of the engine)
    # and the engine's helpers: _task(state, client_id), _run_done(), _run_finished(),
    # _finish_reason()

    def subscribe(self, client_id: str, peer: str = "") -> Subscription:
        """A new event stream for ``client_id`` (an older one of the identity ends).
        A client that reconnects mid-round gets its task again; after a completed run,
        a new stream hears ``RunFinished`` at once."""
        sub = Subscription(client_id, peer, now=self.clock.time)
        with self._cond:
            self.subscribers.add(sub)
            self._cond.notify_all()
            state = self.state
            if self.finished.is_set() and self._run_done():
                sub.push(self.subscribers.event(self._run_finished()))
                if self.completed:
                    self.final_fetches.expect([client_id], self.version)
            elif state is not None and state.awaits(client_id):
                # Resend after a reconnect.
                sub.push(self.subscribers.event(self._task(state, client_id)))
            connected = len(self.subscribers)
        log.info("client %s subscribed (%d connected)", client_id, connected)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """The client's stream ended (it disconnected, or the server ended it)."""
        with self._cond:
            if self.subscribers.remove(sub, self.clock.monotonic()):
                log.info("client %s disconnected (%d connected)", sub.client_id,
                         len(self.subscribers))  # fmt: skip
            self._cond.notify_all()
        sub.close()

    def connected(self) -> list[str]:
        """Client ids with an open event stream."""
        with self._cond:
            return sorted(self.subscribers.ids())

    def revoke(self, client_id: str, reason: str = "") -> None:
        """Cut a revoked client off now: end its stream, drop its pending update.

        An update already folded into this round's aggregate (or being folded) cannot be
        taken out of the running sum, so the round fails and is retried without it.
        """
        why = f" ({reason})" if reason else ""
        with self._cond:
            sub = self.subscribers.pop(client_id, self.clock.monotonic())
            if sub is not None:
                sub.close(
                    PermissionDenied(f"client {client_id!r} was revoked by the operator{why}")
                )
            if self.state is not None:
                self.state.revoke(client_id, why)
            self._cond.notify_all()
        log.warning("client %s revoked%s: disconnected, pending update dropped", client_id, why)

    def status(self) -> dict[str, Any]:
        """A snapshot for ``Admin.Status`` and ``fedmae status``."""
        with self._cond:
            snapshot: dict[str, Any] = {
                "state": "finished" if self.finished.is_set() else self.phase,
                "round": self.next_round, "attempt": 0, "version": self.version,
                "rounds_target": self.policy.rounds, "min_clients": self.policy.min_clients,
                "connected": sorted(self.subscribers.ids()),
                "selected": [], "reported": [], "uploading": [],
                "round_elapsed_s": 0.0, "deadline_in_s": 0.0, "progress": {},
                "last_record": self.last_record.to_json() if self.last_record else None,
                "finish_reason": self._finish_reason() if self.finished.is_set() else "",
            }  # fmt: skip
            if (state := self.state) is not None and not state.closed:
                snapshot.update(state.progress(self.clock.monotonic()))
            return snapshot

    def download_finished(self, client_id: str, version: int) -> None:
        """A client received all of ``version`` (after a run: see ``final_fetches``)."""
        self.final_fetches.fetched(client_id, version)

    def wait_final_fetches(self, timeout: float) -> list[str]:
        """After a completed run: wait up to ``timeout`` s until every client subscribed
        at the end (or since) has fetched the final version; return those still owing."""
        return self.final_fetches.wait(timeout)

    def training_progress(self, client_id: str, progress: TrainingProgress) -> UpdateReceipt:
        """A site's training progress report (``RoundState.report_progress``)."""
        with self._cond:
            if (state := self.state) is None:
                raise StaleUpdate(f"no round is open (the report names round {progress.round})")
            state.report_progress(client_id, progress, self.clock.monotonic())
            return UpdateReceipt(state.round, 0, "", len(state.accepted))

    def secagg_answer(self, client_id: str, message: object) -> UpdateReceipt:
        """A client's secure-aggregation message (keys, shares, unmask shares, abort)."""
        with self._cond:
            state = self.state
            if state is None or state.secure is None or state.closed:
                raise StaleUpdate(
                    f"no secure round is open (the message names round {message.round})"
                )
            answered = state.secure.answer(state, client_id, message)
            self._cond.notify_all()
            return UpdateReceipt(state.round, 0, "", answered)
