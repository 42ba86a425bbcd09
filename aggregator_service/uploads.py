"""Updates coming in: admission to the open round, upload sessions, the fold into the
strategy's aggregate (``begin_round``, ``accumulate``, ``aggregate``).

Admission and the round's bookkeeping run under the engine's condition variable; the
fold (``strategy.accumulate``, one full-model ``add_``) runs under a lock of its own,
so Subscribe, status, heartbeats and the metrics gauges never wait for it. A client
being folded in is in ``RoundState.folding``: the engine waits for that set to empty
before it aggregates, and a revocation during the fold fails the round like one after.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from aggregator_service.clock import Clock
from aggregator_service.config import ServerConfig
from aggregator_service.private_rounds import PrivateRounds
from aggregator_service.round_state import ClientResult, RoundState
from aggregator_service.strategies import Strategy
from aggregator_service.subscriptions import RoundObserver
from aggregator_service.update_bounds import UpdateBounds
from aggregator_service.update_store import SPILL_FILE, UpdateStore
from fedmae.config import check_update_metrics
from fedmae.errors import (
    DuplicateUpdate,
    InvalidUpdate,
    LimitExceeded,
    PermissionDenied,
    RoundClosedError,
    SecAggFailed,
    StaleUpdate,
)
from fedmae.payload.buffers import BufferPool
from fedmae.payload.decoder import PayloadDecoder
from fedmae.payload.layout import ModelLayout
from fedmae.rounds import Phase, UpdateHeader, UpdateReceipt

log = logging.getLogger(__name__)


class UploadSession:
    """One update being received: validated header, decoder, byte count."""

    def __init__(
        self, state: RoundState, client_id: str, header: UpdateHeader, decoder: PayloadDecoder,
        started: float,
    ):  # fmt: skip
        self.state = state
        self.client_id = client_id
        self.header = header
        self.decoder = decoder
        self.started = started
        self.bytes = 0
        self.done = False  # accepted or refused; the client's slot is (being) released
        self.chunks = 0
        self.max_chunks = decoder.total // 4096 + 16

    def write(self, chunk) -> None:
        """Add one chunk (``offset``, ``data``) of the payload."""
        self.chunks += 1
        if self.chunks > self.max_chunks:
            raise LimitExceeded(
                f"more than {self.max_chunks} chunks for {self.decoder.total} bytes: "
                "send chunks of at least 4 KiB"
            )
        self.decoder.write(chunk)
        self.bytes += len(chunk.data)


class Uploads:
    """Admits updates to the open round and folds them into the strategy's aggregate."""

    def __init__(
        self,
        config: ServerConfig,
        layout: ModelLayout,
        strategy: Strategy,
        bounds: UpdateBounds,
        cond: threading.Condition,
        clock: Clock,
        current: Callable[[], RoundState | None],
        observers: list[RoundObserver],
        private: PrivateRounds | None = None,
    ):
        self.config = config
        self.private = private  # central DP: each delta re-clipped to C, weighed 1
        self.layout = layout
        self.strategy = strategy
        self.bounds = bounds
        self._cond = cond  # the engine's: guards RoundState
        self._clock = clock
        self._current = current
        self.observers = observers
        self.fold_lock = threading.Lock()  # the strategy's aggregate
        # Receive buffers of finished uploads, reused by the next ones (at most one per
        # upload in flight, which the memory bound already counts).
        self.buffers = BufferPool(keep=config.max_uploads_in_flight)
        self.queue: list[object] = []  # uploads waiting for a slot, in order
        # A needs-all rule's accepted updates, spilled to disk for the round (not RAM).
        self.store: UpdateStore | None = None

    def begin_round(self) -> None:
        """Reset the strategy's aggregate before a round's first update."""
        with self.fold_lock:
            self.strategy.begin_round(self.layout.numel)

    def open_store(self, selected: int) -> None:
        """For a rule that needs every update: a memory-mapped store for the round's
        ``selected`` clients, in the state directory."""
        if self.strategy.needs_all_updates and selected:
            path = self.config.state_dir / SPILL_FILE
            self.store = UpdateStore(path, self.layout.numel, selected)

    def aggregate(self, global_flat: torch.Tensor) -> torch.Tensor:
        """The next global model from the updates folded in (the round is closed)."""
        self.buffers.trim(1)  # uploads are done: keep one buffer for the next round
        with self.fold_lock:
            return self.strategy.aggregate(global_flat, self.store)

    def end_round(self) -> None:
        """The round is closed (published, failed or aborted): its spilled updates go."""
        with self.fold_lock:
            if self.store is not None:
                self.store.close()
                self.store = None

    def open(
        self, client_id: str, header: UpdateHeader, alive: Callable[[], bool] = lambda: True
    ) -> UploadSession:
        """Validate an update's header against the round; reserve the client's slot.

        When ``max_uploads_in_flight`` uploads are running, the upload waits for a slot
        (first come, first served) up to ``transfer_wait_s``, then gets RESOURCE_EXHAUSTED.
        A waiting upload costs a thread and the stream's flow-control window, not a
        receive buffer; ``alive`` tells whether its caller is still there.
        """
        limit = self.config.max_uploads_in_flight
        deadline = self._clock.monotonic() + self.config.transfer_wait_s
        ticket: object | None = None
        with self._cond:
            try:
                while True:
                    state = self._admissible(client_id, header)
                    busy = len(state.uploading)
                    if busy < limit and (not self.queue or self.queue[0] is ticket):
                        break
                    if ticket is None:
                        ticket = object()
                        self.queue.append(ticket)
                    remaining = deadline - self._clock.monotonic()
                    if remaining <= 0 or not alive():
                        raise LimitExceeded(
                            f"{busy} uploads are in flight (the limit is {limit}) and "
                            f"{len(self.queue)} are waiting; no slot freed within "
                            f"{self.config.transfer_wait_s:g}s: retry later"
                        )
                    self._clock.wait(self._cond, min(remaining, 1.0))
            finally:
                if ticket is not None:
                    self.queue.remove(ticket)
                    self._cond.notify_all()
            if state.secure is not None:  # a masked input: ring elements, never decoded
                decoder = state.secure.receiver(client_id, header, self.buffers)
            else:
                decoder = PayloadDecoder(
                    self.layout, header.manifest, pool=self.buffers, require_digest=True
                )
            state.uploading.add(client_id)
            return UploadSession(state, client_id, header, decoder, self._clock.monotonic())

    def _admissible(self, client_id: str, header: UpdateHeader) -> RoundState:
        """The open round, if this update may join it (called under the lock)."""
        state = self._current()
        if state is None or state.closed:
            raise StaleUpdate(
                f"no round is open for updates (update names round {header.round}); "
                "wait for the next task"
            )
        if header.round != state.round:
            raise StaleUpdate(
                f"update is for round {header.round}, but round {state.round} is open"
            )
        if header.base_version != state.base_version:
            raise StaleUpdate(
                f"update is relative to model version {header.base_version}, but round "
                f"{state.round} trains version {state.base_version}; fetch the current model"
            )
        if client_id not in state.selected:
            raise PermissionDenied(f"client {client_id} was not selected for round {state.round}")
        if client_id in state.revoked:
            raise PermissionDenied(f"client {client_id} was revoked")
        if client_id in state.accepted or client_id in state.uploading:
            raise DuplicateUpdate(
                f"client {client_id} already sent an update for round {state.round}"
            )
        if state.secure is not None:
            state.secure.admit_masked(state, client_id, header)
            return state
        if header.num_samples <= 0:
            raise InvalidUpdate(f"num_samples must be positive, got {header.num_samples}")
        check_update_metrics(header.metrics)
        return state

    def complete(self, session: UploadSession, digest: str) -> UpdateReceipt:
        """Check the payload and fold it into the round's aggregate."""
        # A refused payload raises; the caller (the servicer) frees the slot with ``abort``.
        if session.state.secure is not None:
            return self._complete_masked(session, digest)
        delta = session.decoder.finish(digest)  # outside the lock: hashing/decoding is slow
        weighing = self.bounds.weigh(
            int(session.header.num_samples), session.decoder.norm, session.state.norm_bound
        )
        fold_scale = weighing.scale
        if self.private is not None:  # the DP step on each update: clipped here, in place
            weighing, fold_scale = self.private.clip_(delta, weighing), 1.0
        client, state = session.client_id, session.state
        with self._cond:
            session.done = True
            if client in state.revoked or state is not self._current() or state.closed:
                revoked = client in state.revoked
                state.uploading.discard(client)
                state.bytes_in += session.bytes
                session.decoder.release()
                self._cond.notify_all()
                if revoked:
                    state.rejected[client] = "client revoked during the upload"
                    self._notify_rejected(client, "revoked", "permission_denied")
                    raise PermissionDenied(
                        f"client {client} was revoked; its update is not aggregated"
                    )
                state.rejected[client] = "round closed before the upload completed"
                self._notify_rejected(client, "late", "deadline_exceeded")
                raise RoundClosedError(
                    f"round {state.round} closed before the update from {client} completed"
                )
            state.folding.add(client)  # from here on it counts: the round waits for it
        folded = False
        try:
            with self.fold_lock:
                if self.store is not None:  # a needs-all rule reads them at the close
                    self.store.append(delta, weighing.weight, fold_scale)
                else:
                    self.strategy.accumulate(delta, weighing.weight, fold_scale)
            folded = True
        finally:
            del delta
            session.decoder.release()  # before the slot frees: the next upload reuses it
            with self._cond:
                state.folding.discard(client)
                state.uploading.discard(client)
                state.bytes_in += session.bytes
                if folded:
                    state.rejected.pop(client, None)  # an earlier refused try is moot now
                    state.accepted[client] = ClientResult(
                        client_id=client,
                        num_samples=weighing.weight,
                        metrics=dict(session.header.metrics),
                        bytes=session.bytes,
                        upload_s=self._clock.monotonic() - session.started,
                        update_norm=weighing.norm,
                        claimed_samples=weighing.claimed,
                        clip_scale=weighing.scale,
                    )
                else:  # the aggregate may hold part of it: it must not be published
                    state.invalidated = state.invalidated or f"folding {client}'s update failed"
                accepted = len(state.accepted)
                self._cond.notify_all()
        log.info("round %d: accepted update from %s (%d samples, %d bytes, %d/%d)",
                 state.round, client, weighing.weight, session.bytes, accepted,
                 len(state.selected))  # fmt: skip
        if weighing.capped and self.private is None:  # under DP every site weighs 1
            log.warning(
                "round %d: %s claims %d samples, more than the cap of %d: weighted as %d",
                state.round, client, weighing.claimed, self.bounds.cap, weighing.weight,
            )  # fmt: skip
        if weighing.clipped:
            log.warning(
                "round %d: update from %s has L2 norm %.4g, over the bound %.4g: "
                "clipped (scaled by %.3g)", state.round, client, weighing.norm,
                self.private.clip if self.private else state.norm_bound, weighing.scale,
            )  # fmt: skip
        for observer in self.observers:
            observer.update_accepted(client, session.bytes)
        return UpdateReceipt(state.round, session.bytes, session.decoder.digest, accepted)

    def _complete_masked(self, session: UploadSession, digest: str) -> UpdateReceipt:
        """Add a masked input into the round's masked sum (all the server can do with it)."""
        ring = session.decoder.finish(digest)
        client, state = session.client_id, session.state
        with self._cond:
            session.done = True
            if client in state.revoked or state is not self._current() or state.closed:
                state.uploading.discard(client)
                session.decoder.release()
                self._cond.notify_all()
                raise RoundClosedError(
                    f"round {state.round} closed before the masked input from {client} completed"
                )
            state.folding.add(client)
        added = False
        try:
            with self.fold_lock:  # refuses before it adds; the first input becomes the sum
                if state.secure.sum.add_masked(client, ring, own=True):
                    session.decoder.hand_over()
            added = True
        finally:
            del ring
            session.decoder.release()
            with self._cond:
                state.folding.discard(client)
                state.uploading.discard(client)
                state.bytes_in += session.bytes
                if added:
                    state.secure.masked(client)
                    state.accepted[client] = ClientResult(client, 0, {}, 0, 0.0)
                else:
                    state.secure.exclude(client, "its masked input was refused")
                accepted = len(state.accepted)
                self._cond.notify_all()
        log.info("round %d: masked input from %s added (%d/%d)", state.round, client,
                 accepted, len(state.secure.asked.get(Phase.MASKED_INPUT, ())))  # fmt: skip
        return UpdateReceipt(state.round, session.bytes, session.decoder.digest, accepted)

    def unmask(self, state: RoundState) -> None:
        """A secure round's close: unmask the sum and fold the weighted mean into the
        strategy's aggregate; a failure (too few shares) fails the round, revealing
        nothing."""
        try:
            with self.fold_lock:
                if state.secure.params.distributed_dp:  # the sites' noised sum, ÷ q·N later
                    total, weight = state.secure.sum.noised_sum()  # float32 [P]; inputs
                    self.strategy.accumulate(torch.from_numpy(total), 1)
                    del total
                else:
                    mean, weight = state.secure.sum.mean()  # float32 [P], sum of weights
                    self.strategy.accumulate(torch.from_numpy(mean), weight)
                    del mean  # the round's masked sum, decoded in place
        except SecAggFailed as err:
            with self._cond:
                state.invalidated = state.invalidated or str(err)
            return
        state.secure.total_weight = weight

    def abort(self, session: UploadSession, reason: str, code: str = "cancelled") -> None:
        """Release a refused or broken upload's slot (idempotent)."""
        with self._cond:
            if session.done:
                return
            session.done = True
            session.decoder.release()  # its buffer serves the next upload, which may now start
            session.state.uploading.discard(session.client_id)
            session.state.bytes_in += session.bytes
            session.state.rejected[session.client_id] = reason
            self._cond.notify_all()
        self._notify_rejected(session.client_id, reason, code)
        log.warning(
            "round %d: update from %s refused: %s", session.state.round, session.client_id, reason
        )

    def _notify_rejected(self, client_id: str, reason: str, code: str) -> None:
        for observer in self.observers:
            observer.update_rejected(client_id, reason, code)
