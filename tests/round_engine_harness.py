"""The round engine without a network: a fake clock, in-memory clients, a tiny model.

The engine runs its real loop on a thread, with a real checkpoint store, round log and
FedAvg; only time is fake. ``FakeClock.advance`` moves time and wakes whoever waits on
it, so deadlines and grace periods pass without sleeping. Clients call the engine and
its parts the way the gRPC servicer does (``uploads.open`` / ``write`` / ``complete``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aggregator_service.checkpoint_store import CheckpointStore
from aggregator_service.config import RoundPolicy, ServerConfig
from aggregator_service.engine import RoundEngine
from aggregator_service.private_rounds import PrivateRounds
from aggregator_service.round_log import RoundLog
from aggregator_service.strategies import FedAvg, Strategy
from fedmae.config import TrainingConfig
from fedmae.errors import FedmaeError
from fedmae.payload.digest import payload_digest
from fedmae.payload.encodings import encoding_from_name
from fedmae.payload.layout import ModelLayout
from fedmae.rounds import Heartbeat, RoundEvent, UpdateHeader, UpdateReceipt
from fedmae.secagg.signing import CertificateCheck
from fedmae.transport.frames import RawChunk
from fedmae.transport.status import status_code

WAIT_S = 10.0  # real seconds an in-memory client waits for an event before failing
FP32 = encoding_from_name("fp32")


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self, start: float = 1000.0):
        self._now = start
        self._lock = threading.Condition()
        self._conds: set[threading.Condition] = set()
        self._waits = 0  # calls of wait() so far

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return 1_700_000_000.0 + self._now

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        if timeout <= 0:
            return
        with self._lock:
            self._conds.add(cond)
            self._waits += 1
            self._lock.notify_all()
        # Woken by a notify or by advance(); the short real-time cap makes a waiter
        # look again now and then (the caller re-checks; fake time has not moved).
        cond.wait(timeout=0.1)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            conds = list(self._conds)
        for cond in conds:
            with cond:
                cond.notify_all()

    def settle(self, alive: Callable[[], bool]) -> None:
        """Block until a thread waits for time again after this call began: it has seen
        everything that happened before (or ``alive()`` turned false)."""
        with self._lock:
            mark = self._waits
            for _ in range(int(WAIT_S / 0.05)):
                if self._waits > mark or not alive():
                    return
                self._lock.wait(0.05)
        raise AssertionError("nobody waited for time to pass")


def tiny_layout() -> tuple[ModelLayout, torch.Tensor]:
    """A real model of 3,136 parameters (Linear 48 -> 64), seeded."""
    torch.manual_seed(0)
    state = torch.nn.Linear(48, 64).state_dict()
    layout = ModelLayout.from_state(state)
    return layout, layout.flatten(state)


def make_engine(
    state_dir: Path,
    clock: FakeClock,
    strategy: Strategy | None = None,
    server: dict | None = None,
    keys_check: CertificateCheck | None = None,
    private: PrivateRounds | None = None,
    **policy: object,
) -> RoundEngine:
    """An engine over a fresh (or existing) state directory; version 0 is the seeded model
    (``keys_check``: the CA check of a secure round's keys, with ``server={"secure": ...}``)."""
    layout, flat = tiny_layout()
    store = CheckpointStore(state_dir / "checkpoints")
    config = ServerConfig(
        state_dir=state_dir,
        policy=RoundPolicy(**{"round_timeout_s": 60.0, "dropout_grace_s": 5.0, **policy}),
        training=TrainingConfig(model="tiny"),
        **{"max_update_norm": "off", **(server or {})},
    )
    latest = store.latest()
    if latest is None:
        checkpoint = store.save(0, 0, "tiny", layout, flat)
    else:
        checkpoint, flat = store.map(latest, layout)
    round_log = RoundLog(state_dir / "rounds.jsonl")
    return RoundEngine(
        config, layout, flat, checkpoint, store, strategy or FedAvg(), round_log, clock=clock,
        keys_check=keys_check, private=private,
    )  # fmt: skip


def start_engine(
    state_dir: Path,
    clock: FakeClock,
    ids: str,
    strategy: Strategy | None = None,
    **policy: object,
) -> tuple[RoundEngine, dict[str, Client], EngineThread]:
    """An engine (``make_engine``), an in-memory client per id in ``ids``, and its round
    loop running on a thread."""
    engine = make_engine(state_dir, clock, strategy, **policy)
    clients = {c: Client(engine, c) for c in ids}
    return engine, clients, EngineThread(engine)


def start_round_c_owes(
    state_dir: Path, clock: FakeClock
) -> tuple[RoundEngine, dict[str, Client], EngineThread]:
    """Round 1 of 1 for clients a, b, c (it closes on 2 updates, min_participants 2):
    a and b have sent theirs, c owes one. The caller stops the loop."""
    engine, clients, loop = start_engine(
        state_dir, clock, "abc", min_clients=3, min_updates=2, rounds=1, min_participants=2
    )
    try:
        for c in "ab":
            clients[c].take_part(round_=1)
    except BaseException:
        loop.stop()
        raise
    return engine, clients, loop


class EngineThread:
    """``engine.run()`` on a thread; ``stop()`` ends it and checks that it ended."""

    def __init__(self, engine: RoundEngine):
        self.engine = engine
        self.thread = threading.Thread(target=engine.run, name="engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.engine.stop()
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive(), "the round loop did not stop"

    def settle(self, clock: FakeClock) -> None:
        """Return once the round loop idles again (or ended): it has acted on
        everything done before this call."""
        clock.settle(self.thread.is_alive)

    def join(self) -> None:
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive(), "the round loop did not end"


class Client:
    """A client in memory: its event stream and the servicer's upload calls."""

    def __init__(self, engine: RoundEngine, client_id: str):
        self.engine = engine
        self.id = client_id
        self.sub = engine.subscribe(client_id, peer=f"memory:{client_id}")
        self.seen: list[RoundEvent] = []

    def next_event(self, kind: str, **fields: object) -> object:
        """The next event of ``kind`` whose fields match (others are kept in ``seen``)."""
        for _ in range(int(WAIT_S / 0.05)):
            event = self.sub.next(timeout=0.05)
            if event is None:
                raise AssertionError(f"{self.id}: stream ended waiting for {kind} {fields}")
            if isinstance(event.body, Heartbeat):
                continue
            self.seen.append(event)
            body = event.body
            if body.kind == kind and all(getattr(body, k) == v for k, v in fields.items()):
                return body
        raise AssertionError(f"{self.id}: no {kind} {fields} within {WAIT_S}s")

    def pending(self) -> list[object]:
        """Events already queued (without waiting)."""
        out = []
        while (event := self.sub.next(timeout=0)) is not None:
            if isinstance(event.body, Heartbeat):  # what next() says when the queue is empty
                break
            out.append(event.body)
        return out

    def open(self, delta: torch.Tensor, round_: int, base_version: int = 0, samples: int = 10,
             metrics: dict[str, float] | None = None):  # fmt: skip
        """Admit an update (header only); returns the session and the payload."""
        payload = memoryview(delta.contiguous().numpy().view(np.uint8))
        manifest = self.engine.layout.manifest(FP32, digest=payload_digest(payload))
        header = UpdateHeader(round_, base_version, samples, manifest, dict(metrics or {}))
        return self.engine.uploads.open(self.id, header), payload

    def finish(self, session, payload: memoryview, chunk: int = 4096) -> UpdateReceipt:
        """Send the chunks and complete, refusing the session on an error (as the
        servicer does)."""
        try:
            for offset in range(0, len(payload), chunk):
                session.write(RawChunk(offset, payload[offset : offset + chunk]))
            return self.engine.uploads.complete(session, "")
        except FedmaeError as err:
            self.engine.uploads.abort(session, str(err), status_code(err).name.lower())
            raise
        finally:
            session.decoder.release()

    def submit(self, delta: torch.Tensor, round_: int, base_version: int = 0, samples: int = 10,
               metrics: dict[str, float] | None = None) -> UpdateReceipt:  # fmt: skip
        session, payload = self.open(delta, round_, base_version, samples, metrics)
        return self.finish(session, payload)

    def take_part(self, round_: int = 1) -> UpdateReceipt:
        """Wait for the round's task and submit a small delta (seeded by the client id)."""
        self.next_event("task", round=round_)
        return self.submit(delta(self.engine.layout, seed=ord(self.id[0])), round_)

    def leave(self) -> None:
        self.engine.unsubscribe(self.sub)


def delta(layout: ModelLayout, seed: int, scale: float = 0.01) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.standard_normal(layout.numel) * scale).astype(np.float32))
