"""Time for the round engine, injected so that tests drive deadlines without sleeping."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """What the round engine asks of time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, durations)."""

    def time(self) -> float:
        """Wall-clock Unix seconds (task deadlines for clients, record times)."""

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        """Wait on ``cond`` (held by the caller) until notified or ``timeout`` seconds
        of this clock pass. Callers re-check their condition: a wake-up may be early."""


class SystemClock:
    """The real clocks; ``wait`` is ``Condition.wait``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        cond.wait(timeout=max(0.0, timeout))


SYSTEM_CLOCK = SystemClock()
