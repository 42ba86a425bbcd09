"""Who hears of rounds: clients' event streams and in-process observers.

Events are the plain dataclasses of ``fedmae.rounds``; ``fedmae.transport.events``
turns them into the wire's ``RoundEvent`` messages. ``Subscribers`` holds one stream per
client identity and is used under the round engine's lock (it has none of its own).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

from aggregator_service.records import RoundRecord
from fedmae.errors import ConnectionReplaced, FedmaeError
from fedmae.rounds import EventBody, Heartbeat, RoundEvent

log = logging.getLogger(__name__)


class Subscription:
    """One client's event stream. ``next`` blocks; ``None`` means the stream ends."""

    def __init__(self, client_id: str, peer: str = "", now: Callable[[], float] | None = None):
        self.client_id = client_id
        self.peer = peer
        self._queue: queue.Queue[RoundEvent | None] = queue.Queue()
        self._now = now
        self.closed = False
        self.error: FedmaeError | None = None  # why the server ended the stream, if it did

    def push(self, event: RoundEvent) -> None:
        if not self.closed:
            self._queue.put(event)

    def close(self, error: FedmaeError | None = None) -> None:
        self.error = self.error or error  # the first reason stands (unsubscribe follows)
        self.closed = True
        self._queue.put(None)

    def next(self, timeout: float) -> RoundEvent | None:
        """The next event; a heartbeat when nothing happened for ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return RoundEvent(0, Heartbeat((self._now or time.time)()))


class Subscribers:
    """The open event streams, one per client identity (guarded by the caller's lock)."""

    def __init__(self) -> None:
        self._subs: dict[str, Subscription] = {}
        self._seq = 0
        self._left: dict[str, float] = {}  # when each disconnected client's stream ended

    def __len__(self) -> int:
        return len(self._subs)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._subs

    def ids(self) -> set[str]:
        return set(self._subs)

    def add(self, sub: Subscription) -> None:
        """Register ``sub``. An older stream of the identity is ended with
        ``ConnectionReplaced`` (after a reconnect it is a dead stream; otherwise two
        agents share the identity, and the older one must stop)."""
        old = self._subs.get(sub.client_id)
        self._subs[sub.client_id] = sub
        self._left.pop(sub.client_id, None)
        if old is not None:
            old.close(
                ConnectionReplaced(
                    f"replaced by a newer connection from {sub.peer or 'an unknown peer'} "
                    f"with the same identity ({sub.client_id}); two agents must not share "
                    "one identity"
                )
            )
            log.warning("client %s: a newer connection from %s replaces the one from %s",
                        sub.client_id, sub.peer or "?", old.peer or "?")  # fmt: skip

    def remove(self, sub: Subscription, now: float) -> bool:
        """Forget ``sub`` if it is still the identity's stream; True if it was."""
        if self._subs.get(sub.client_id) is sub:
            del self._subs[sub.client_id]
            self._left[sub.client_id] = now
            return True
        return False

    def pop(self, client_id: str, now: float) -> Subscription | None:
        sub = self._subs.pop(client_id, None)
        if sub is not None:
            self._left[client_id] = now
        return sub

    def gone_since(self, clients: set[str], default: float) -> float | None:
        """When the last of ``clients`` disconnected (``default`` for one that never
        had a stream); None while any of them is connected."""
        if not clients or clients & self._subs.keys():
            return None
        return max(self._left.get(c, default) for c in clients)

    def event(self, body: EventBody) -> RoundEvent:
        self._seq += 1
        return RoundEvent(self._seq, body)

    def send(self, body: EventBody, to: list[str] | None = None) -> None:
        """One event to the given clients (that are connected), or to everyone."""
        event = self.event(body)
        targets = self._subs.values() if to is None else (self._subs.get(c) for c in to)
        for sub in targets:
            if sub is not None:
                sub.push(event)


class RoundObserver:
    """Callbacks on round events, for metrics and the round feed. They run on the
    calling thread and must be quick; the defaults do nothing."""

    def update_accepted(self, client_id: str, nbytes: int) -> None:
        pass

    def update_rejected(self, client_id: str, reason: str, code: str) -> None:
        pass

    def round_closed(self, record: RoundRecord) -> None:
        pass

    def run_ended(self, completed: bool) -> None:
        pass
