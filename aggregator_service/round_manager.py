"""The round state machine: plain Python, driven by the servicer or by tests.

One round: wait for ``min_clients`` subscribers, select (seeded), send each selected
client a task, fold updates in as they complete, close when all selected reported or
at the deadline, publish a new version if at least ``min_updates`` were accepted,
else retry the round. All shared state is guarded by one condition variable.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from google.protobuf.timestamp_pb2 import Timestamp

from aggregator_service.checkpoint_store import Checkpoint, CheckpointStore
from aggregator_service.config import ServerConfig
from aggregator_service.idle_transfers import IdleWatchdog, Watch
from aggregator_service.round_log import RoundLog
from aggregator_service.strategies import Strategy
from aggregator_service.update_bounds import UpdateBounds
from aggregator_service.update_store import SPILL_FILE, UpdateStore
from fedmae.config import check_update_metrics
from fedmae.errors import (
    ConnectionReplaced,
    DuplicateUpdate,
    FedmaeError,
    InvalidUpdate,
    LimitExceeded,
    PermissionDenied,
    RoundClosedError,
    StaleUpdate,
)
from fedmae.payload.buffers import BufferPool
from fedmae.payload.chunks import iter_slices
from fedmae.payload.decoder import PayloadDecoder
from fedmae.payload.digest import payload_digest
from fedmae.payload.encodings import Encoding, encode, encoding_name
from fedmae.payload.layout import ModelLayout
from fedmae.runtime import release_free_memory
from fedmae.transport import frames as wire
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.messages import (
    manifest_from_proto,
    manifest_to_proto,
    training_config_to_proto,
)

log = logging.getLogger(__name__)

_RELEASE_EVERY = 8 << 20  # downloads: drop sent checkpoint pages from RSS this often
# Smallest download chunk: FetchModel(chunk_size=1) would send one message per byte
# (a 5 MB model: ~30 min of server CPU). Smaller requests are raised to this.
MIN_DOWNLOAD_CHUNK = 64 << 10


class RoundObserver:
    """Callbacks on round events, for metrics and the round feed. They run on the
    calling thread and must be quick; the defaults do nothing."""

    def update_accepted(self, client_id: str, nbytes: int) -> None:
        pass

    def update_rejected(self, client_id: str, reason: str, code: str) -> None:
        pass

    def round_closed(self, record: dict[str, Any]) -> None:
        pass

    def run_ended(self, completed: bool) -> None:
        pass


class Subscription:
    """One client's event stream. ``next`` blocks; ``None`` means the stream ends."""

    def __init__(self, client_id: str, peer: str = ""):
        self.client_id = client_id
        self.peer = peer
        self._queue: queue.Queue[pb.RoundEvent | None] = queue.Queue()
        self.closed = False
        self.error: FedmaeError | None = None  # why the server ended the stream, if it did

    def push(self, event: pb.RoundEvent) -> None:
        if not self.closed:
            self._queue.put(event)

    def close(self, error: FedmaeError | None = None) -> None:
        self.error = self.error or error  # the first reason stands (unsubscribe follows)
        self.closed = True
        self._queue.put(None)

    def next(self, timeout: float) -> pb.RoundEvent | None:
        """The next event; a heartbeat when nothing happened for ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            ts = Timestamp()
            ts.GetCurrentTime()
            return pb.RoundEvent(heartbeat=pb.Heartbeat(time=ts))


@dataclass
class ClientResult:
    client_id: str
    num_samples: int  # the aggregation weight used: the claim, capped (update_bounds)
    metrics: dict[str, float]
    bytes: int
    upload_s: float
    update_norm: float = 0.0  # of the delta as received, before clipping
    claimed_samples: int = 0  # num_samples as the client reported it
    clip_scale: float = 1.0  # the delta was folded in times this


@dataclass
class RoundState:
    round: int
    attempt: int
    base_version: int
    selected: list[str]
    deadline: float
    started: float
    encoding: Encoding
    accepted: dict[str, ClientResult] = field(default_factory=dict)
    uploading: set[str] = field(default_factory=set)
    rejected: dict[str, str] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    invalidated: str | None = None  # set when an aggregated update must not be published
    norm_bound: float | None = None  # L2 bound updates are clipped to; None = off
    closed: bool = False
    bytes_in: int = 0
    bytes_out: int = 0


class UploadSession:
    """One update being received: validated header, decoder, byte count."""

    def __init__(self, state: RoundState, client_id: str, header: pb.UpdateHeader, decoder):
        self.state = state
        self.client_id = client_id
        self.header = header
        self.decoder: PayloadDecoder = decoder
        self.started = time.monotonic()
        self.bytes = 0
        self.done = False  # accepted or refused; the client's slot is released
        self.chunks = 0
        self.max_chunks = decoder.total // 4096 + 16

    def write(self, chunk: pb.Chunk) -> None:
        self.chunks += 1
        if self.chunks > self.max_chunks:
            raise LimitExceeded(
                f"more than {self.max_chunks} chunks for {self.decoder.total} bytes: "
                "send chunks of at least 4 KiB"
            )
        self.decoder.write(chunk)
        self.bytes += len(chunk.data)


class Download:
    """A held download slot: ``touch`` on progress; an idle one is ended by the watchdog."""

    def __init__(self, client_id: str, watch: Watch):
        self.client_id = client_id
        self.watch = watch
        self.released = False

    def touch(self) -> None:
        self.watch.touch()


class RoundManager:
    def __init__(
        self,
        config: ServerConfig,
        layout: ModelLayout,
        global_flat: torch.Tensor,
        checkpoint: Checkpoint,
        store: CheckpointStore,
        strategy: Strategy,
        round_log: RoundLog,
    ):
        self.config = config
        self.policy = config.policy
        self.layout = layout
        self._global: torch.Tensor | None = global_flat
        self.checkpoint = checkpoint
        self.store = store
        self.strategy = strategy
        self.round_log = round_log
        self.bounds = UpdateBounds(config, history=round_log.read)
        self.version = checkpoint.version
        self.next_round = checkpoint.round + 1
        self._cond = threading.Condition()
        self._subs: dict[str, Subscription] = {}
        self._seq = 0
        self.state: RoundState | None = None
        self.finished = threading.Event()
        self.observers: list[RoundObserver] = []
        # strategies: a needs-all rule's accepted updates, spilled to disk for the round.
        self._updates: UpdateStore | None = None
        self.phase = "waiting"
        self.last_record: dict[str, Any] | None = None
        self._waited_s = 0.0
        self._encoded_cache: tuple[tuple[int, int], memoryview, str] | None = None
        # Receive buffers of finished uploads, reused by the next ones (at most one per
        # upload in flight, which the memory bound already counts).
        self._buffers = BufferPool(keep=config.max_uploads_in_flight)
        self._upload_queue: list[object] = []  # uploads waiting for a slot, in order
        # Downloads at once: each may queue up to a model's worth of frames in gRPC.
        # (In bytes: whole MiB rounded a 4.97 MiB model down to 4, 32 slots for 128 MiB.)
        budget = config.download_budget_mb << 20
        self.max_downloads = max(2, min(64, budget // (layout.numel * 4)))
        self._downloads = threading.BoundedSemaphore(self.max_downloads)
        self._client_downloads: dict[str, int] = {}
        self.idle_downloads = IdleWatchdog(config.download_idle_s, "download")
        # The newest version each client downloaded in full; after a completed run, the
        # clients (subscribed at the end, or since) that still have to fetch the final one.
        self._fetched: dict[str, int] = {}
        self.completed = False
        self._final_waiting: set[str] = set()

    @property
    def global_flat(self) -> torch.Tensor:
        """The published model as one flat vector, read back from its checkpoint when
        it was released (see ``_run_round``)."""
        if self._global is None:
            _, self._global = self.store.map(self.version, self.layout)
        return self._global

    # ------------------------------------------------------------ subscriptions

    def subscribe(self, client_id: str, peer: str = "") -> Subscription:
        """A new event stream for ``client_id``. One stream per identity: an older one
        is ended with ``ConnectionReplaced`` (after a reconnect it is a dead stream;
        otherwise two agents share the identity, and the older one must stop)."""
        sub = Subscription(client_id, peer)
        with self._cond:
            old = self._subs.get(client_id)
            self._subs[client_id] = sub
            if old is not None:
                old.close(
                    ConnectionReplaced(
                        f"replaced by a newer connection from {peer or 'an unknown peer'} "
                        f"with the same identity ({client_id}); two agents must not share "
                        "one identity"
                    )
                )
                log.warning("client %s: a newer connection from %s replaces the one from %s",
                            client_id, peer or "?", old.peer or "?")  # fmt: skip
            self._cond.notify_all()
            state = self.state
            if (
                self.finished.is_set()
                and self.policy.rounds
                and self.next_round > self.policy.rounds
            ):
                sub.push(self._event(run_finished=self._run_finished_msg()))
                if self.completed and self._fetched.get(client_id) != self.version:
                    self._final_waiting.add(client_id)
            elif (
                state is not None
                and not state.closed
                and client_id in state.selected
                and client_id not in state.accepted
                and client_id not in state.uploading
            ):
                sub.push(self._event(task=self._task_msg(state)))  # resend after a reconnect
        log.info("client %s subscribed (%d connected)", client_id, len(self._subs))
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._cond:
            if self._subs.get(sub.client_id) is sub:
                del self._subs[sub.client_id]
                log.info("client %s disconnected (%d connected)", sub.client_id, len(self._subs))
            self._cond.notify_all()
        sub.close()

    def connected(self) -> list[str]:
        with self._cond:
            return sorted(self._subs)

    def _event(self, **kwargs: Any) -> pb.RoundEvent:
        self._seq += 1
        return pb.RoundEvent(seq=self._seq, **kwargs)

    def _broadcast(self, **kwargs: Any) -> None:
        event = self._event(**kwargs)
        for sub in self._subs.values():
            sub.push(event)

    # ------------------------------------------------------------ rounds

    def _task_msg(self, state: RoundState) -> pb.RoundTask:
        deadline = Timestamp()
        deadline.FromNanoseconds(int((time.time() + state.deadline - time.monotonic()) * 1e9))
        return pb.RoundTask(
            round=state.round,
            attempt=state.attempt,
            model_version=state.base_version,
            phase=pb.PHASE_TRAIN,
            config=training_config_to_proto(self.config.training),
            deadline=deadline,
            selected_clients=len(state.selected),
        )

    def _run_finished_msg(self) -> pb.RunFinished:
        return pb.RunFinished(
            final_version=self.version,
            rounds=self.next_round - 1,
            reason="completed",
            model=self.config.training.model,
        )

    def run(self, stop: threading.Event) -> None:
        """The round loop; returns when round ``policy.rounds`` is published, or on stop.

        ``rounds`` counts rounds of the whole run, so a restarted aggregator finishes
        the rounds its predecessor did not. Only a completed run tells clients
        ``RunFinished``; on a stop their streams just end and they reconnect.
        """
        attempt = 1
        completed = False
        try:
            while not stop.is_set():
                if self.policy.rounds and self.next_round > self.policy.rounds:
                    completed = True
                    break
                if not self._wait_for_clients(stop):
                    break
                ok = self._run_round(attempt, stop)
                if ok:
                    attempt = 1
                elif not stop.is_set():
                    attempt += 1
                    if self.policy.max_attempts and attempt > self.policy.max_attempts:
                        log.error(
                            "round %d failed %d times; stopping", self.next_round, attempt - 1
                        )
                        break
                    stop.wait(self.policy.retry_delay_s)
        finally:
            self._buffers.clear()
            with self._cond:
                self.completed = completed
                self.finished.set()
                if completed:
                    self._broadcast(run_finished=self._run_finished_msg())
                    self._final_waiting = {
                        c for c in self._subs if self._fetched.get(c) != self.version
                    }
                self._cond.notify_all()
            for observer in self.observers:
                observer.run_ended(completed)
            if completed:
                log.info("run finished: round %d published version %d", self.next_round - 1,
                         self.version)  # fmt: skip
            else:
                log.info("round loop stopped at version %d", self.version)

    def _wait_for_clients(self, stop: threading.Event) -> bool:
        last_note = 0.0
        t0 = time.monotonic()
        with self._cond:
            self.phase = "waiting"
            while len(self._subs) < self.policy.min_clients:
                if stop.is_set():
                    return False
                if time.monotonic() - last_note > 10:
                    log.info(
                        "waiting for clients: %d of %d connected",
                        len(self._subs),
                        self.policy.min_clients,
                    )
                    last_note = time.monotonic()
                self._cond.wait(timeout=0.5)
        self._waited_s = time.monotonic() - t0
        return True

    def _run_round(self, attempt: int, stop: threading.Event) -> bool:
        phases: dict[str, float] = {"waiting_s": round(self._waited_s, 3)}
        with self._cond:
            round_ = self.next_round
            selected = self.strategy.configure_round(
                round_,
                attempt,
                sorted(self._subs),
                self.policy.fraction,
                self.policy.min_clients,
                self.policy.seed,
            )
            norm_bound = self.bounds.round_bound(round_, lambda: self.global_flat)
            now = time.monotonic()
            state = RoundState(
                round=round_,
                attempt=attempt,
                base_version=self.version,
                selected=selected,
                deadline=now + self.policy.round_timeout_s,
                started=now,
                encoding=self.config.training.encoding,
                norm_bound=norm_bound,
            )
            # The checkpoint holds the base version and downloads stream from it, so the
            # round needs no copy in memory until it aggregates: peak RSS stays at the
            # accumulator plus the uploads in flight. (The last model may be the
            # strategy's accumulator, which begin_round resets: drop it first.)
            self._global = None
            self.strategy.begin_round(self.layout.numel)
            if self.strategy.needs_all_updates:  # strategies: spill, not RAM
                self._updates = UpdateStore(
                    self.config.state_dir / SPILL_FILE, self.layout.numel, len(selected)
                )
            self.state = state
            self.phase = "training"
            task = self._event(task=self._task_msg(state))
            for cid in selected:
                self._subs[cid].push(task)
            log.info(
                "round %d (attempt %d) started: %d of %d clients selected, base version %d",
                round_,
                attempt,
                len(selected),
                len(self._subs),
                self.version,
            )
            gone_since: float | None = None
            while (
                len(state.accepted) < self._needed(state)
                and not stop.is_set()
                and not state.invalidated
            ):
                now = time.monotonic()
                if now >= state.deadline:
                    break
                if self._owing_all_gone(state):
                    gone_since = gone_since or now
                    if now - gone_since >= self.policy.dropout_grace_s:
                        log.info("round %d: every client still owing an update is gone; "
                                 "closing early", round_)  # fmt: skip
                        break
                else:
                    gone_since = None
                self._cond.wait(timeout=min(state.deadline - now, 0.5))
            state.closed = True  # later completions get DEADLINE_EXCEEDED
            self.phase = "closing"
            phases["training_s"] = round(time.monotonic() - state.started, 3)
            reported = len(state.accepted)
            required = self.strategy.updates_to_publish(self.policy.required_updates)  # strategies
            extra: dict[str, Any] = {}
            if state.invalidated:
                status, reason = "failed", state.invalidated
            elif reported >= required:
                status, reason = "published", ""
                t0 = time.monotonic()
                self._buffers.trim(1)  # uploads are done: keep one buffer for the next round
                self._global = self.strategy.aggregate(self.global_flat, self._updates)
                phases["aggregation_s"] = round(time.monotonic() - t0, 3)
                self.version += 1
                t0 = time.monotonic()
                self.checkpoint = self.store.save(
                    self.version, round_, self.config.training.model, self.layout, self.global_flat
                )
                phases["checkpoint_s"] = round(time.monotonic() - t0, 3)
                t0 = time.monotonic()
                eval_loss = self.strategy.evaluate(self.layout, self.global_flat)  # strategies
                if eval_loss is not None:
                    extra["eval_loss"] = eval_loss
                    phases["evaluation_s"] = round(time.monotonic() - t0, 3)
                self.next_round = round_ + 1
            elif stop.is_set():
                status, reason = "aborted", "aggregator stopped during the round"
            else:
                status = "failed"
                reason = f"only {reported} of {required} required updates"
            if self._updates is not None:  # strategies: the round's spill file goes
                self._updates.close()
                self._updates = None
            success = status == "published"
            if reason:
                extra["reason"] = reason
            record = self._record(state, status, phases, **extra)
            self.last_record = record
            if success:
                self.bounds.published(record)  # the next round's auto norm bound
            # Durable before anyone hears of it: a client or monitor that sees version N
            # finds round N in the log. Status and downloads read the version under this
            # lock, so none sees it before the line is on disk (one small fsync, after the
            # checkpoint's big one).
            self.round_log.append(record)
            if success:
                self._broadcast(
                    model_published=pb.ModelPublished(
                        version=self.version,
                        round=round_,
                        manifest=manifest_to_proto(
                            self.layout.manifest(digest=self.checkpoint.payload_digest)
                        ),
                    )
                )
            train_loss, val_loss = (
                self._weighted(state, "train_loss"),
                self._weighted(state, "val_loss"),
            )
            self._broadcast(
                round_closed=pb.RoundClosed(
                    round=round_,
                    attempt=attempt,
                    success=success,
                    version=self.version,
                    participants=sorted(state.accepted),
                    num_samples=sum(r.num_samples for r in state.accepted.values()),
                    train_loss=train_loss or 0.0,
                    val_loss=val_loss or 0.0,
                    reason=reason,
                )
            )
            self.phase = "waiting"
        self.round_log.echo_record(record)
        release_free_memory()  # the round's transfer buffers, freed but kept by malloc
        for observer in self.observers:
            observer.round_closed(record)
        if success:
            log.info(
                "round %d published version %d: %d clients, %d samples, val_loss %.4f, %.1fs",
                round_,
                self.version,
                len(state.accepted),
                record["num_samples"],
                record["val_loss"] or float("nan"),
                record["duration_s"],
            )
        else:
            log.warning("round %d attempt %d %s: %s", round_, attempt, status, reason)
        return success

    def _needed(self, state: RoundState) -> int:
        """Updates that close the round early: every selected client, or the target."""
        available = len(set(state.selected) - state.revoked)
        return self.strategy.updates_to_close(available, self.policy.target_updates)

    def _owing_all_gone(self, state: RoundState) -> bool:
        owing = set(state.selected) - set(state.accepted) - state.revoked
        return bool(owing) and not (owing & set(self._subs)) and not (owing & state.uploading)

    def _dropped(self, state: RoundState) -> dict[str, str]:
        owing = set(state.selected) - set(state.accepted) - set(state.rejected)
        return {
            c: "disconnected" if c not in self._subs else "no update before the round closed"
            for c in sorted(owing)
        }

    @staticmethod
    def _weighted(state: RoundState, key: str) -> float | None:
        pairs = [
            (r.num_samples, r.metrics[key]) for r in state.accepted.values() if key in r.metrics
        ]
        n = sum(w for w, _ in pairs)
        return sum(w * v for w, v in pairs) / n if n else None

    def _record(
        self, state: RoundState, status: str, phases: dict[str, float], **extra: Any
    ) -> dict[str, Any]:
        """The round-log record (schema: docs/round-log.md)."""
        results = sorted(state.accepted.values(), key=lambda r: r.client_id)
        norms = sorted(r.update_norm for r in results)
        record = {
            "round": state.round,
            "attempt": state.attempt,
            "status": status,
            "version": self.version,
            "base_version": state.base_version,
            "selected": state.selected,
            "participants": [r.client_id for r in results],
            "dropped": sorted(self._dropped(state)),
            "dropped_reasons": self._dropped(state),
            "rejected": [{"client": c, "reason": r} for c, r in sorted(state.rejected.items())],
            "num_samples": sum(r.num_samples for r in results),
            "train_loss": self._weighted(state, "train_loss"),
            "val_loss": self._weighted(state, "val_loss"),
            "eval_loss": None,
            "update_norm": {
                "min": norms[0],
                "median": float(statistics.median(norms)),
                "max": norms[-1],
            }
            if norms
            else None,  # fmt: skip
            "norm_bound": state.norm_bound,
            "weight_cap": self.bounds.cap,
            "duration_s": round(time.monotonic() - state.started, 3),
            "phases": phases,
            "bytes_in": state.bytes_in,
            "bytes_out": state.bytes_out,
            "encoding": encoding_name(state.encoding),
            "strategy": self.strategy.name,
            "clients": [
                {
                    "id": r.client_id,
                    "samples": r.num_samples,
                    "samples_claimed": r.claimed_samples,
                    "capped": r.num_samples < r.claimed_samples,
                    "train_loss": r.metrics.get("train_loss"),
                    "val_loss": r.metrics.get("val_loss"),
                    "update_norm": r.update_norm,
                    "clipped": r.clip_scale < 1.0,
                    "bytes": r.bytes,
                    "upload_s": round(r.upload_s, 3),
                }
                for r in results
            ],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }
        eval_loss = record.get("eval_loss")
        if eval_loss is not None and not math.isfinite(eval_loss):
            # The round log is strict JSON (no NaN/Infinity): a diverged model's loss is
            # reported here and recorded as unknown.
            log.error("round %d: the new model's evaluation loss is %s", state.round, eval_loss)
            record["eval_loss"] = None
        return record

    def recovered_record(self, round_: int, version: int) -> dict[str, Any]:
        """The record of a round whose checkpoint survived a crash but whose log line
        did not: the round happened, its details are lost."""
        return {
            "round": round_, "attempt": 1, "status": "published", "version": version,
            "base_version": version - 1, "selected": [], "participants": [], "dropped": [],
            "dropped_reasons": {}, "rejected": [], "num_samples": 0, "train_loss": None,
            "val_loss": None, "eval_loss": None, "update_norm": None, "norm_bound": None,
            "weight_cap": None, "duration_s": 0.0,
            "phases": {}, "bytes_in": 0, "bytes_out": 0,
            "encoding": encoding_name(self.config.training.encoding),
            "strategy": self.strategy.name, "clients": [],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "recovered": True,
            "reason": "the aggregator stopped after publishing this version, before logging it",
        }  # fmt: skip

    def status(self) -> dict[str, Any]:
        """A snapshot for ``Admin.Status`` and ``fedmae status``."""
        with self._cond:
            state = self.state
            open_round = state is not None and not state.closed
            now = time.monotonic()
            return {
                "state": "finished" if self.finished.is_set() else self.phase,
                "round": state.round if open_round else self.next_round,
                "attempt": state.attempt if open_round else 0,
                "version": self.version,
                "rounds_target": self.policy.rounds,
                "connected": sorted(self._subs),
                "selected": list(state.selected) if open_round else [],
                "reported": sorted(state.accepted) if open_round else [],
                "uploading": sorted(state.uploading) if open_round else [],
                "round_elapsed_s": now - state.started if open_round else 0.0,
                "deadline_in_s": max(0.0, state.deadline - now) if open_round else 0.0,
                "min_clients": self.policy.min_clients,
                "last_record": self.last_record,
            }

    def revoke(self, client_id: str, reason: str = "") -> None:
        """Cut a revoked client off now: end its stream, drop its pending update.

        An update already folded into this round's aggregate cannot be taken out of
        the running sum, so the round is failed and retried without that client.
        """
        why = f" ({reason})" if reason else ""
        with self._cond:
            sub = self._subs.pop(client_id, None)
            if sub is not None:
                sub.close(
                    PermissionDenied(f"client {client_id!r} was revoked by the operator{why}")
                )
            state = self.state
            if state is not None and not state.closed and client_id in state.selected:
                state.revoked.add(client_id)
                if client_id in state.accepted:
                    state.invalidated = (
                        f"client {client_id} was revoked after its update was aggregated; "
                        "the round is retried without it"
                    )
                else:
                    state.rejected[client_id] = f"revoked{why}"
            self._cond.notify_all()
        log.warning("client %s revoked%s: disconnected, pending update dropped", client_id, why)

    # ------------------------------------------------------------ uploads

    def open_upload(
        self, client_id: str, header: pb.UpdateHeader, alive: Callable[[], bool] = lambda: True
    ) -> UploadSession:
        """Validate an update's header against the round; reserve the client's slot.

        When ``max_uploads_in_flight`` uploads are running, the upload waits for a slot
        (first come, first served) up to ``transfer_wait_s``, then gets RESOURCE_EXHAUSTED.
        A waiting upload costs a thread and the stream's flow-control window, not a
        receive buffer; ``alive`` tells whether its caller is still there.
        """
        deadline = time.monotonic() + self.config.transfer_wait_s
        ticket: object | None = None
        with self._cond:
            try:
                while True:
                    state = self._check_upload(client_id, header)
                    busy = len(state.uploading)
                    if busy < self.config.max_uploads_in_flight and (
                        not self._upload_queue or self._upload_queue[0] is ticket
                    ):
                        break
                    if ticket is None:
                        ticket = object()
                        self._upload_queue.append(ticket)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not alive():
                        raise LimitExceeded(
                            f"{busy} uploads are in flight (the limit is "
                            f"{self.config.max_uploads_in_flight}) and {len(self._upload_queue)} "
                            f"are waiting; no slot freed within {self.config.transfer_wait_s:g}s: "
                            "retry later"
                        )
                    self._cond.wait(min(remaining, 1.0))
            finally:
                if ticket is not None:
                    self._upload_queue.remove(ticket)
                    self._cond.notify_all()
            decoder = PayloadDecoder(
                self.layout,
                manifest_from_proto(header.manifest),
                pool=self._buffers,
                require_digest=True,
            )
            state.uploading.add(client_id)
            return UploadSession(state, client_id, header, decoder)

    def _check_upload(self, client_id: str, header: pb.UpdateHeader) -> RoundState:
        """The open round, if this update may join it (called under the lock)."""
        state = self.state
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
        if header.num_samples <= 0:
            raise InvalidUpdate(f"num_samples must be positive, got {header.num_samples}")
        check_update_metrics(header.metrics)
        return state

    def complete_upload(self, session: UploadSession, digest: str) -> pb.UpdateReceipt:
        """Check the payload and fold it into the round's aggregate."""
        # A refused payload raises: the servicer frees the slot (abort_upload).
        delta = session.decoder.finish(digest)  # outside the lock: hashing/decoding is slow
        weighing = self.bounds.weigh(
            int(session.header.num_samples), session.decoder.norm, session.state.norm_bound
        )
        with self._cond:
            state = session.state
            session.done = True
            state.uploading.discard(session.client_id)
            state.bytes_in += session.bytes
            if session.client_id in state.revoked:
                session.decoder.release()
                state.rejected[session.client_id] = "client revoked during the upload"
                self._notify_rejected(session.client_id, "revoked", "permission_denied")
                raise PermissionDenied(
                    f"client {session.client_id} was revoked; its update is not aggregated"
                )
            if state is not self.state or state.closed:
                session.decoder.release()
                state.rejected[session.client_id] = "round closed before the upload completed"
                self._notify_rejected(session.client_id, "late", "deadline_exceeded")
                raise RoundClosedError(
                    f"round {state.round} closed before the update from "
                    f"{session.client_id} completed"
                )
            if self._updates is not None:  # strategies: a needs-all rule reads them at the close
                self._updates.append(delta, weighing.weight, weighing.scale)
            else:
                self.strategy.accumulate(delta, weighing.weight, weighing.scale)
            del delta
            session.decoder.release()  # before the slot frees: the next upload reuses it
            state.rejected.pop(session.client_id, None)  # an earlier refused try is moot now
            state.accepted[session.client_id] = ClientResult(
                client_id=session.client_id,
                num_samples=weighing.weight,
                metrics=dict(session.header.metrics),
                bytes=session.bytes,
                upload_s=time.monotonic() - session.started,
                update_norm=weighing.norm,
                claimed_samples=weighing.claimed,
                clip_scale=weighing.scale,
            )
            self._cond.notify_all()
            log.info(
                "round %d: accepted update from %s (%d samples, %d bytes, %d/%d)",
                state.round,
                session.client_id,
                weighing.weight,
                session.bytes,
                len(state.accepted),
                len(state.selected),
            )
            if weighing.capped:
                log.warning(
                    "round %d: %s claims %d samples, more than the cap of %d: weighted as %d",
                    state.round, session.client_id, weighing.claimed, self.bounds.cap,
                    weighing.weight,
                )  # fmt: skip
            if weighing.clipped:
                log.warning(
                    "round %d: update from %s has L2 norm %.4g, over the bound %.4g: "
                    "clipped (scaled by %.3g)", state.round, session.client_id, weighing.norm,
                    state.norm_bound, weighing.scale,
                )  # fmt: skip
            receipt = pb.UpdateReceipt(
                round=state.round,
                bytes_received=session.bytes,
                digest=session.decoder.digest,
                updates_received=len(state.accepted),
            )
        for observer in self.observers:
            observer.update_accepted(session.client_id, session.bytes)
        return receipt

    def _notify_rejected(self, client_id: str, reason: str, code: str) -> None:
        for observer in self.observers:
            observer.update_rejected(client_id, reason, code)

    def abort_upload(self, session: UploadSession, reason: str, code: str = "cancelled") -> None:
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

    # ------------------------------------------------------------ downloads

    def acquire_download(
        self,
        client_id: str,
        alive: Callable[[], bool] = lambda: True,
        on_idle: Callable[[], None] = lambda: None,
    ) -> Download:
        """One of the ``max_downloads`` slots (``release_download`` frees it).

        A client holds at most ``max_downloads_per_client`` at once (more: refused at
        once). A free slot is waited for at most ``transfer_wait_s``; RESOURCE_EXHAUSTED
        after that. ``on_idle`` ends the download (``context.cancel``) when the client
        reads nothing for ``download_idle_s``: its ``finally`` then frees the slot.
        """
        cap = self.config.max_downloads_per_client
        with self._cond:
            held = self._client_downloads.get(client_id, 0)
            if cap and held >= cap:
                raise LimitExceeded(
                    f"client {client_id} already has {held} downloads in flight (the limit "
                    f"per client is {cap}): finish or cancel one first"
                )
            self._client_downloads[client_id] = held + 1
        try:
            deadline = time.monotonic() + self.config.transfer_wait_s
            while not self._downloads.acquire(timeout=min(1.0, self.config.transfer_wait_s)):
                if time.monotonic() >= deadline or not alive():
                    raise LimitExceeded(
                        f"{self.max_downloads} downloads are in flight (the limit for this "
                        f"model size); no slot freed within {self.config.transfer_wait_s:g}s: "
                        "retry later"
                    )
        except BaseException:
            self._forget_download(client_id)
            raise

        def idle() -> None:
            log.warning(
                "download by %s read nothing for %gs: cancelled, its slot is free",
                client_id,
                self.config.download_idle_s,
            )
            on_idle()

        return Download(client_id, self.idle_downloads.watch(idle))

    def release_download(self, download: Download) -> None:
        """Free a download's slot (idempotent)."""
        with self._cond:
            if download.released:
                return
            download.released = True
        download.watch.close()
        self._downloads.release()
        self._forget_download(download.client_id)

    def _forget_download(self, client_id: str) -> None:
        with self._cond:
            left = self._client_downloads.get(client_id, 1) - 1
            if left > 0:
                self._client_downloads[client_id] = left
            else:
                self._client_downloads.pop(client_id, None)

    def download_finished(self, client_id: str, version: int) -> None:
        """A client received all of ``version``: after a completed run, the final
        version's downloads are what the server still waits for."""
        with self._cond:
            self._fetched[client_id] = max(version, self._fetched.get(client_id, version))
            if not self.completed or version != self.version:
                return
            if client_id in self._final_waiting:
                self._final_waiting.discard(client_id)
                log.info("client %s fetched the final version %d (%d still to fetch it)",
                         client_id, version, len(self._final_waiting))  # fmt: skip
                self._cond.notify_all()

    def wait_final_fetches(self, timeout: float) -> list[str]:
        """After a completed run: wait up to ``timeout`` s until every client subscribed
        at the end (or since) has fetched the final version; return those still owing."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._final_waiting and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            return sorted(self._final_waiting)

    def model_stream(
        self, version: int | None, encoding: Encoding, chunk_size: int, offset: int = 0
    ) -> tuple[pb.ModelHeader, Iterator[bytes]]:
        """Header and serialized chunk messages (``fedmae.transport.frames`` frames) of a published
        version (``None`` = the latest); fp32 is read from the checkpoint file.

        ``chunk_size`` (0 = the server's) is clamped to ``MIN_DOWNLOAD_CHUNK`` (or the
        server's chunk size if that is smaller) .. 4 × the server's chunk size.
        """
        with self._cond:
            version = self.version if version is None else version
            current = self.checkpoint if version == self.version else None
        ckpt = current or self.store.describe(version, self.layout)
        default = self.config.chunk_size
        chunk_size = max(min(MIN_DOWNLOAD_CHUNK, default), min(chunk_size or default, 4 * default))
        if encoding == Encoding.FP32:
            manifest = self.layout.manifest(encoding, digest=ckpt.payload_digest)
        else:
            payload, digest = self._encoded(version, encoding)
            manifest = self.layout.manifest(encoding, digest=digest)
        if offset > manifest.total_bytes:
            raise InvalidUpdate(f"offset {offset} is past the model's {manifest.total_bytes} bytes")
        if encoding == Encoding.FP32:
            chunks = self._file_chunks(ckpt, chunk_size, offset)
        else:
            chunks = iter_slices(payload, chunk_size, offset)
        header = pb.ModelHeader(
            version=ckpt.version,
            round=ckpt.round,
            model=ckpt.model,
            manifest=manifest_to_proto(manifest),
        )
        return header, self._frames(chunks)

    def _encoded(self, version: int, encoding: Encoding) -> tuple[memoryview, str]:
        """A version in another encoding, made once and shared by every client that asks
        (not re-encoded per download); only the latest such payload is kept."""
        with self._cond:
            cached = self._encoded_cache
            if cached is not None and cached[0] == (version, encoding):
                return cached[1], cached[2]
        _, flat = self.store.map(version, self.layout)  # read once, from the page cache
        payload = encode(flat, encoding)
        digest = payload_digest(payload)
        with self._cond:
            self._encoded_cache = ((version, encoding), payload, digest)
        return payload, digest

    def _file_chunks(
        self, ckpt: Checkpoint, chunk_size: int, offset: int
    ) -> Iterator[tuple[int, memoryview]]:
        """Pieces of the checkpoint's data section as views of a read-only mapping:
        framing copies them once, straight from the page cache. Sent pages are dropped
        from this process's resident set as the stream goes (the page cache keeps
        them), so a download holds at most ``_RELEASE_EVERY`` bytes of the file."""
        base, end = ckpt.data_offset, ckpt.data_offset + ckpt.total_bytes
        with open(ckpt.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < end:
                raise FedmaeError(f"checkpoint {ckpt.path} is truncated")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        released = (base + offset) // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            while offset < ckpt.total_bytes:
                n = min(chunk_size, ckpt.total_bytes - offset)
                with view[base + offset : base + offset + n] as piece:
                    yield offset, piece
                offset += n
                sent = (base + offset) // mmap.PAGESIZE * mmap.PAGESIZE
                if sent - released >= _RELEASE_EVERY or offset == ckpt.total_bytes:
                    mm.madvise(mmap.MADV_DONTNEED, released, sent - released)
                    released = sent
        finally:
            view.release()
            mm.close()

    def _frames(self, chunks: Iterator[tuple[int, bytes | memoryview]]) -> Iterator[bytes]:
        for offset, data in chunks:
            state = self.state
            if state is not None and not state.closed:
                state.bytes_out += len(data)  # GIL-atomic enough for a statistic
            yield wire.frame(offset, data)
