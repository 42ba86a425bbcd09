"""How many refusals reach the audit table: enough to see an attack, too few to be one.

Refused enrollments and authentication failures come from outside, as fast as a peer
can send them. Each audit entry is a synchronous SQLite commit (an fsync), so writing
every one would let a flood fill the disk and queue enrollments and heartbeats behind
the registry lock. ``AuditThrottle`` admits, per window of ``window_s`` (60 s):

- at most ``per_key`` entries for one key (peer IP, action, status code), and
- at most ``total`` entries for all keys together;

and counts the rest. When a window closes, what it held back is reported once per key
that hit its own limit, and once for everything the global limit held back, so the
table grows by at most ``total + total // per_key + 2`` rows per window whatever the
flood. At most ``max_keys`` keys are tracked (memory stays bounded when a flood comes
from many addresses); beyond that, new keys share ``OVERFLOW_KEY``.
The clock is injected (tests move it; the server uses ``time.monotonic``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

Key = tuple[str, str, str]  # (peer IP, action, status code)

OVERFLOW_KEY: Key = ("*", "*", "*")  # keys beyond max_keys, and the global limit's count


@dataclass
class _Window:
    start: float
    written: int = 0
    suppressed: int = 0


@dataclass(frozen=True)
class Suppressed:
    """Entries a closed window held back: ``count`` of ``key`` over ``seconds``."""

    key: Key
    count: int
    seconds: float


class AuditThrottle:
    def __init__(
        self,
        per_key: int = 10,
        total: int = 60,
        window_s: float = 60.0,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.per_key = per_key
        self.total = total
        self.window_s = window_s
        self.max_keys = max_keys
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: OrderedDict[Key, _Window] = OrderedDict()  # oldest window first
        self._global = _Window(start=clock())
        self._closed: list[Suppressed] = []  # closed windows whose count is not reported yet

    def admit(self, key: Key) -> bool:
        """Whether an entry for ``key`` may be written now (if not, it is counted)."""
        now = self.clock()
        with self._lock:
            if now - self._global.start >= self.window_s:
                self._close(OVERFLOW_KEY, self._global, now)
                self._global = _Window(start=now)
            if key not in self._windows and len(self._windows) >= self.max_keys:
                key = OVERFLOW_KEY
            window = self._windows.get(key)
            if window is None or now - window.start >= self.window_s:
                if window is not None:
                    self._close(key, window, now)
                    del self._windows[key]
                window = self._windows[key] = _Window(start=now)  # the youngest: last
            if window.written >= self.per_key:
                window.suppressed += 1
                return False
            if self._global.written >= self.total:
                self._global.suppressed += 1
                return False
            window.written += 1
            self._global.written += 1
            return True

    def due(self, flush: bool = False) -> list[Suppressed]:
        """Counts of windows that closed having held entries back (all of them, closed or
        not, when ``flush``, e.g. at shutdown); each count is returned once."""
        now = self.clock()
        with self._lock:
            while self._windows:
                key, window = next(iter(self._windows.items()))
                if not flush and now - window.start < self.window_s:
                    break  # ordered by start: the rest are younger
                del self._windows[key]
                self._close(key, window, now)
            if flush or now - self._global.start >= self.window_s:
                self._close(OVERFLOW_KEY, self._global, now)
                self._global = _Window(start=now)
            out, self._closed = self._closed, []
        return out

    def _close(self, key: Key, window: _Window, now: float) -> None:
        if window.suppressed:
            self._closed.append(Suppressed(key, window.suppressed, now - window.start))


def peer_ip(peer: str) -> str:
    """The address part of a gRPC peer (``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``,
    ``ipv6:[::1]:51234`` or ``ipv6:%5B::1%5D:51234`` -> ``::1``); others whole."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0] if rest.startswith("[") else rest
        return host.strip("[]")
    return peer
