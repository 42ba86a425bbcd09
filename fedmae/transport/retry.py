"""When to try a gRPC call again, and how long to wait first: the one retry policy.

Exponential backoff with jitter (clients that lost the server together do not return
in lockstep), capped at a maximum delay, interruptible by ``stop()``. Which codes are
worth another try is part of each policy (``retry_on``); whatever the policy,
UNKNOWN and INTERNAL, the codes of a fault in the server rather than of a lost
connection, are tried again at most ``max_fault_retries`` times in a row and then
given up with a ``ServerFault`` that says so. (The agent used to take UNKNOWN for a lost
connection: a server bug made every client reconnect forever.)

Each call site keeps its policy as a constant next to the call; a ``Retries`` is one
sequence of tries under it::

    retries = POLICY.start(stop_event)
    receipt = retries.call(lambda: stub.SubmitUpdate(...), "upload")
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from fedmae import errors
from fedmae.transport.status import status_code

log = logging.getLogger(__name__)

T = TypeVar("T")

S = grpc.StatusCode
# The server is away, busy, or slow: worth another try later.
TRANSIENT = frozenset({S.UNAVAILABLE, S.RESOURCE_EXHAUSTED, S.DEADLINE_EXCEEDED})
# The connection went, not the request: a stream cut, or cancelled by the server to
# free an idle download slot.
CONNECTION_LOST = frozenset({S.UNAVAILABLE, S.CANCELLED})
# A fault in the server (INTERNAL: fedmae's answer to a bug; UNKNOWN: gRPC's, or an
# exception in the client's own request iterator): tried again a few times only.
SERVER_FAULTS = frozenset({S.UNKNOWN, S.INTERNAL})

Failure = grpc.RpcError | errors.FedmaeError  # a failed call, as gRPC or the domain says it


def _code(err: Failure) -> grpc.StatusCode:
    """The code a failure came with; a domain error raised on this side (not from an
    answer) counts as the code the server would answer it with."""
    return err.code() if isinstance(err, grpc.RpcError) else status_code(err)


def connection_failed(err: Failure) -> bool:
    """Whether ``err`` says the connection failed, not the request: a lost connection,
    or UNKNOWN (gRPC's answer when a stream broke, or our own request iterator raised).
    A client reconnects after it; after anything else only that request is lost."""
    code = _code(err)
    return code in CONNECTION_LOST or code == S.UNKNOWN


class Verdict(enum.Enum):
    RETRY = "retry"
    REFUSED = "refused"  # a code the policy does not try again
    EXHAUSTED = "exhausted"  # max_retries used up
    SERVER_FAULT = "server fault"  # UNKNOWN/INTERNAL more than max_fault_retries in a row
    TIMED_OUT = "timed out"  # give_up_after_s passed since the first failure


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    delay_s: float = 0.0  # how long to wait before the next try (RETRY only)

    @property
    def retry(self) -> bool:
        return self.verdict is Verdict.RETRY


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures to try again, how often and how long to wait: the ``n``-th retry
    waits ``min(max_s, initial_s * multiplier**n * (1 ± jitter))``."""

    retry_on: frozenset[grpc.StatusCode] = TRANSIENT
    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5  # the delay is drawn from [1 - jitter, 1 + jitter] times the base
    max_retries: int | None = None  # None: no limit on retries of ``retry_on`` codes
    max_fault_retries: int = 3  # UNKNOWN/INTERNAL in a row before giving up (0: never retry)
    give_up_after_s: float | None = None  # since the first failure; None: no limit

    def start(
        self,
        stop: threading.Event | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        wait: Callable[[float], bool] | None = None,
    ) -> Retries:
        """A new sequence of tries. ``stop`` (set by ``Retries.stop()`` or its owner)
        cuts a wait short; ``clock``, ``rng`` and ``wait`` (seconds -> True if
        stopped) are there for tests."""
        return Retries(self, stop or threading.Event(), clock, rng or random.Random(), wait)


class ServerFault(errors.ServerFault, grpc.RpcError):
    """UNKNOWN or INTERNAL too many times in a row: a fault in the server, which trying
    again will not mend. Keeps the last error's code; its details say what happened.
    Both the domain's ``ServerFault`` and a ``grpc.RpcError``."""

    def __init__(self, last: grpc.RpcError, times: int):
        super().__init__(last)
        self.last = last
        self.times = times

    def code(self) -> grpc.StatusCode:
        return self.last.code()

    def details(self) -> str:
        return (
            f"{self.last.code().name} {self.times} times in a row, the last: "
            f"{self.last.details()}; not trying again: this is a fault in the server (see "
            "its log), not a lost connection"
        )

    def __str__(self) -> str:
        return self.details()


class Retries:
    """One sequence of tries under a ``RetryPolicy``: counts retries and server faults
    since the last ``reset()`` (a success), draws each delay and waits it out."""

    def __init__(
        self,
        policy: RetryPolicy,
        stop: threading.Event,
        clock: Callable[[], float],
        rng: random.Random,
        wait: Callable[[float], bool] | None,
    ):
        self.policy = policy
        self._stop = stop
        self._clock = clock
        self._rng = rng
        self._wait = wait or stop.wait
        self.retries = 0
        self.faults = 0
        self._first_failure: float | None = None

    def decide(self, err: Failure) -> Decision:
        """Whether to try again after ``err``, and after how long. A RETRY counts."""
        policy, code = self.policy, _code(err)
        now = self._clock()
        if self._first_failure is None:
            self._first_failure = now
        fault = code in SERVER_FAULTS
        if not fault and code not in policy.retry_on:
            return Decision(Verdict.REFUSED)
        if fault and self.faults >= policy.max_fault_retries:
            return Decision(Verdict.SERVER_FAULT)
        if policy.max_retries is not None and self.retries >= policy.max_retries:
            return Decision(Verdict.EXHAUSTED)
        if (
            policy.give_up_after_s is not None
            and now - self._first_failure > policy.give_up_after_s
        ):
            return Decision(Verdict.TIMED_OUT)
        base = policy.initial_s * policy.multiplier**self.retries
        spread = 1 + policy.jitter * (2 * self._rng.random() - 1)
        self.retries += 1
        self.faults += fault
        return Decision(Verdict.RETRY, min(policy.max_s, base * spread))

    def wait(self, delay_s: float) -> bool:
        """Wait ``delay_s`` seconds; False if ``stop()`` came first (or meanwhile)."""
        return not self._stop.is_set() and not self._wait(delay_s)

    def stop(self) -> None:
        """End the wait in progress, and every later one, at once."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def reset(self) -> None:
        """A success (the server answered): count and back off afresh from here."""
        self.retries = self.faults = 0
        self._first_failure = None

    def failing_for(self) -> float:
        """Seconds since the first failure after the last success (0 if none)."""
        return 0.0 if self._first_failure is None else self._clock() - self._first_failure

    def give_up(self, err: Failure, decision: Decision) -> Failure:
        """The error to raise when ``decision`` says stop: ``err`` itself, or a
        ``ServerFault`` wrapping it after too many UNKNOWN/INTERNAL."""
        if decision.verdict is Verdict.SERVER_FAULT and isinstance(err, grpc.RpcError):
            return ServerFault(err, self.faults + 1)
        return err

    def call(
        self,
        attempt: Callable[[], T],
        what: str,
        give_up_if: Callable[[grpc.RpcError], bool] = lambda err: False,
        logger: logging.Logger = log,
    ) -> T:
        """``attempt()`` until it returns, trying again as the policy says; raises the
        last error (``give_up``) when it says stop, or when ``stop()`` cuts a wait.
        Each retry is logged (INFO, to ``logger``: the caller's) as ``what: CODE ...``."""
        while True:
            try:
                result = attempt()
            except grpc.RpcError as err:
                decision = Decision(Verdict.REFUSED) if give_up_if(err) else self.decide(err)
                if not decision.retry:
                    final = self.give_up(err, decision)
                    if final is err:
                        raise
                    raise final from err
                logger.info("%s: %s (%s); trying again in %.1fs", what, err.code().name,
                            err.details(), decision.delay_s)  # fmt: skip
                if not self.wait(decision.delay_s):
                    raise
            else:
                self.reset()
                return result
