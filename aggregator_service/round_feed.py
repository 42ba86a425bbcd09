"""Closed rounds for watchers: stored in SQLite, replayed from any point, then live.

Every record gets a ``seq`` (strictly increasing, kept across restarts), so a watcher
that reconnects with the last ``seq`` it saw gets each round exactly once, in order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from aggregator_service.records import RoundRecord
from aggregator_service.registry import Registry
from aggregator_service.subscriptions import RoundObserver


class RoundFeed(RoundObserver):
    def __init__(self, registry: Registry):
        self.registry = registry
        self._cond = threading.Condition()
        self._last_seq = registry.last_round_seq()
        self._closed = False

    def round_closed(self, record: RoundRecord) -> None:
        seq = self.registry.add_round(record.to_json())
        with self._cond:
            self._last_seq = seq
            self._cond.notify_all()

    def run_ended(self, completed: bool) -> None:
        # Only a completed run ends the watchers' streams normally; on a stop they are
        # cut (UNAVAILABLE) and reconnect to the restarted aggregator.
        if completed:
            self.close()

    def close(self) -> None:
        """No more rounds will close (run finished or server stopping)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def watch(
        self,
        from_round: int = 0,
        after_seq: int = 0,
        follow: bool = True,
        active: Callable[[], bool] = lambda: True,
    ) -> Iterator[tuple[int, str]]:
        """``(seq, record_json)`` from the history, then live ones as they close."""
        sent = after_seq
        while True:
            for seq, record in self.registry.rounds_after(sent, from_round):
                yield seq, record
                sent = seq
            if not follow:
                return
            with self._cond:
                self._cond.wait_for(
                    lambda s=sent: self._last_seq > s or self._closed or not active(), timeout=1.0
                )
                if (self._closed and self._last_seq <= sent) or not active():
                    return
