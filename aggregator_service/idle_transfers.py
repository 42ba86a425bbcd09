"""Transfers that stopped moving lose their slot.

A download or upload slot is a scarce thing (a thread, a model-sized buffer, a share of
the download memory budget), so a client that takes one and then moves no data must
not keep it. gRPC gives neither direction a per-message timeout:

- a server-streaming handler blocks in gRPC's send once the client stops reading (flow
  control; measured: an unread ``FetchModel`` of the 5.2 MB tiny model stalls after
  about 4 MB are queued), so the handler cannot notice by itself. ``IdleWatchdog``
  watches from one thread and ends a stalled transfer (``context.cancel()``, which
  unblocks the send at once and runs the handler's ``finally``).
- a client-streaming handler blocks reading the next message. ``read_with_idle_limit``
  reads one message ahead on a helper thread, so the handler waits for each with a
  timeout and refuses the upload with a status the client can read.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Watch:
    """One watched transfer: ``touch`` on progress, ``close`` when it ends."""

    def __init__(self, watchdog: IdleWatchdog, on_idle: Callable[[], None]):
        self._watchdog = watchdog
        self.on_idle = on_idle
        self.last = time.monotonic()
        self.fired = False

    def touch(self) -> None:
        self.last = time.monotonic()  # a float store: no lock needed

    def close(self) -> None:
        self._watchdog._forget(self)


class IdleWatchdog:
    """Calls ``on_idle`` (once) for a watched transfer not touched for ``timeout`` s.

    One daemon thread, running only while something is watched, checks four times per
    timeout (so a stalled transfer ends within 1.25 × timeout). ``timeout`` 0 = off.
    """

    def __init__(self, timeout: float, what: str):
        self.timeout = timeout
        self.what = what
        self.fired = 0  # transfers ended for idleness, for tests and status
        self._watches: set[Watch] = set()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, on_idle: Callable[[], None]) -> Watch:
        w = Watch(self, on_idle)
        if self.timeout <= 0:
            return w
        with self._lock:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"idle-{self.what}", daemon=True
                )
                self._thread.start()
        return w

    def _forget(self, w: Watch) -> None:
        with self._lock:
            self._watches.discard(w)

    def _run(self) -> None:
        period = self.timeout / 4
        while True:
            with self._lock:
                if not self._watches:
                    self._thread = None
                    return
                now = time.monotonic()
                idle = [w for w in self._watches if now - w.last >= self.timeout]
                for w in idle:
                    self._watches.discard(w)
                    w.fired = True
                self.fired += len(idle)
            for w in idle:
                try:
                    w.on_idle()
                except Exception:  # a callback must not kill the watchdog
                    log.exception("ending an idle %s failed", self.what)
            time.sleep(period)  # a fixed period: timing, not synchronisation


_END = object()


def read_with_idle_limit(
    messages: Iterator[T], timeout: float, idle: Callable[[], Exception]
) -> Iterator[T]:
    """``messages``, raising ``idle()`` when none arrives for ``timeout`` seconds
    (0 = wait forever).

    A helper thread reads at most one message ahead (the stream's flow control still
    holds the client back) and ends with the stream, which ends once the handler
    returns. Errors of the stream (a cancelled call) are raised here as they were.
    """
    if timeout <= 0:
        yield from messages
        return
    box: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=1)
    done = threading.Event()

    def put(item: tuple[object, BaseException | None]) -> bool:
        while not done.is_set():
            try:
                box.put(item, timeout=0.25)  # returns as soon as the handler took the last
                return True
            except queue.Full:
                pass
        return False

    def pump() -> None:
        try:
            for msg in messages:
                if not put((msg, None)):
                    return
        except Exception as err:  # grpc.RpcError of a cancelled call
            put((_END, err))
        else:
            put((_END, None))

    threading.Thread(target=pump, name="upload-reader", daemon=True).start()
    try:
        while True:
            try:
                item, err = box.get(timeout=timeout)
            except queue.Empty:
                raise idle() from None
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item  # type: ignore[misc]
    finally:
        done.set()
