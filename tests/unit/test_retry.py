"""The retry policy: which codes are tried again, the delays, the limits, and stop()."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
from failed_call import Failed

from fedmae.transport.retry import (
    CONNECTION_LOST,
    TRANSIENT,
    RetryPolicy,
    ServerFault,
    Verdict,
)

S = grpc.StatusCode


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _start(policy: RetryPolicy, clock=None, seed: int = 1):
    """Retries whose waits are recorded (and advance ``clock``), never slept."""
    waited: list[float] = []

    def wait(seconds: float) -> bool:
        waited.append(seconds)
        if clock is not None:
            clock.now += seconds
        return False  # not stopped

    return policy.start(clock=clock or FakeClock(), rng=random.Random(seed), wait=wait), waited


@pytest.mark.parametrize("code", sorted(TRANSIENT, key=str))
def test_transient_codes_are_retried_by_default(code):
    retries, _ = _start(RetryPolicy())
    assert retries.decide(Failed(code)).retry


@pytest.mark.parametrize(
    "code",
    [S.INVALID_ARGUMENT, S.PERMISSION_DENIED, S.UNAUTHENTICATED, S.FAILED_PRECONDITION,
     S.ABORTED, S.NOT_FOUND, S.CANCELLED],
)  # fmt: skip
def test_other_codes_are_refused_at_once(code):
    retries, _ = _start(RetryPolicy())
    assert retries.decide(Failed(code)).verdict is Verdict.REFUSED


def test_a_policy_chooses_its_codes():
    retries, _ = _start(RetryPolicy(retry_on=CONNECTION_LOST))
    assert retries.decide(Failed(S.CANCELLED)).retry
    assert retries.decide(Failed(S.RESOURCE_EXHAUSTED)).verdict is Verdict.REFUSED


@pytest.mark.parametrize("code", [S.UNKNOWN, S.INTERNAL])
def test_server_faults_are_retried_a_few_times_only(code):
    """A server bug must not make a client reconnect forever, even under a policy with
    no limit of its own."""
    retries, _ = _start(RetryPolicy(max_retries=None, max_fault_retries=3))
    verdicts = [retries.decide(Failed(code)).verdict for _ in range(5)]
    assert verdicts == [Verdict.RETRY] * 3 + [Verdict.SERVER_FAULT] * 2


def test_server_faults_are_counted_in_a_row_until_a_success():
    retries, _ = _start(RetryPolicy(max_fault_retries=2))
    assert retries.decide(Failed(S.INTERNAL)).retry
    assert retries.decide(Failed(S.UNAVAILABLE)).retry  # a lost connection between
    assert retries.decide(Failed(S.INTERNAL)).retry
    assert retries.decide(Failed(S.INTERNAL)).verdict is Verdict.SERVER_FAULT
    retries.reset()  # the server answered
    assert retries.decide(Failed(S.INTERNAL)).retry


def test_giving_up_on_a_server_fault_says_so():
    retries, _ = _start(RetryPolicy(max_fault_retries=1))
    last = Failed(S.INTERNAL, "internal error in the server (ref 0011aabb)")
    assert retries.decide(last).retry
    decision = retries.decide(last)
    error = retries.give_up(last, decision)
    assert isinstance(error, ServerFault) and isinstance(error, grpc.RpcError)
    assert error.code() == S.INTERNAL
    assert error.details().startswith("INTERNAL 2 times in a row, the last: internal error")
    assert "fault in the server" in error.details()
    refused = Failed(S.PERMISSION_DENIED)
    assert retries.give_up(refused, retries.decide(refused)) is refused


def test_delays_grow_exponentially_with_jitter_up_to_the_maximum():
    policy = RetryPolicy(initial_s=1.0, multiplier=2.0, max_s=10.0, jitter=0.5)
    retries, _ = _start(policy)
    delays = [retries.decide(Failed(S.UNAVAILABLE)).delay_s for _ in range(8)]
    for n, delay in enumerate(delays):
        base = 2.0**n
        assert min(10.0, 0.5 * base) <= delay <= min(10.0, 1.5 * base), (n, delay)
    assert delays[-1] <= 10.0 and max(delays) <= 10.0
    # jitter: two clients that failed together do not come back together
    other, _ = _start(policy, seed=2)
    assert [other.decide(Failed(S.UNAVAILABLE)).delay_s for _ in range(3)] != delays[:3]


def test_without_jitter_the_delays_are_exact():
    retries, _ = _start(RetryPolicy(initial_s=0.25, multiplier=2.0, max_s=1.0, jitter=0.0))
    assert [retries.decide(Failed(S.UNAVAILABLE)).delay_s for _ in range(5)] == [
        0.25, 0.5, 1.0, 1.0, 1.0,
    ]  # fmt: skip


def test_reset_backs_off_afresh():
    retries, _ = _start(RetryPolicy(initial_s=1.0, jitter=0.0))
    for _ in range(4):
        retries.decide(Failed(S.UNAVAILABLE))
    retries.reset()
    assert retries.decide(Failed(S.UNAVAILABLE)).delay_s == 1.0


def test_max_retries_bounds_the_tries():
    retries, _ = _start(RetryPolicy(max_retries=2))
    verdicts = [retries.decide(Failed(S.RESOURCE_EXHAUSTED)).verdict for _ in range(3)]
    assert verdicts == [Verdict.RETRY, Verdict.RETRY, Verdict.EXHAUSTED]


def test_give_up_after_counts_from_the_first_failure():
    clock = FakeClock()
    retries, _ = _start(RetryPolicy(give_up_after_s=10.0, jitter=0.0, initial_s=4.0), clock)
    assert retries.decide(Failed(S.UNAVAILABLE)).retry
    clock.now += 9.0
    assert retries.decide(Failed(S.UNAVAILABLE)).retry
    assert retries.failing_for() == 9.0
    clock.now += 2.0
    assert retries.decide(Failed(S.UNAVAILABLE)).verdict is Verdict.TIMED_OUT


def test_call_tries_until_success_waiting_the_drawn_delays():
    answers = [Failed(S.UNAVAILABLE), Failed(S.RESOURCE_EXHAUSTED), "done"]

    def attempt():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    retries, waited = _start(RetryPolicy(initial_s=1.0, jitter=0.0))
    assert retries.call(attempt, "test") == "done"
    assert waited == [1.0, 2.0]
    assert retries.retries == 0  # the success reset the count


def test_call_raises_the_refusal_itself_and_a_server_fault_wrapped():
    refused = Failed(S.PERMISSION_DENIED)
    retries, waited = _start(RetryPolicy())
    with pytest.raises(Failed) as caught:
        retries.call(lambda: (_ for _ in ()).throw(refused), "test")
    assert caught.value is refused and waited == []

    calls = []

    def broken():
        calls.append(1)
        raise Failed(S.INTERNAL, "internal error in the server (ref 1)")

    retries, waited = _start(RetryPolicy(max_fault_retries=2))
    with pytest.raises(ServerFault) as fault:
        retries.call(broken, "test")
    assert len(calls) == 3 and len(waited) == 2
    assert fault.value.code() == S.INTERNAL and fault.value.times == 3


def test_call_gives_up_when_the_caller_says_so():
    too_big = Failed(S.RESOURCE_EXHAUSTED, "Received message larger than max")
    retries, waited = _start(RetryPolicy())
    with pytest.raises(Failed):
        retries.call(lambda: (_ for _ in ()).throw(too_big), "test",
                     give_up_if=lambda err: "larger than max" in err.details())  # fmt: skip
    assert waited == []


def test_stop_interrupts_a_wait_in_progress():
    retries = RetryPolicy().start()
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(retries.wait(600.0)))
    t0 = time.monotonic()
    waiter.start()
    retries.stop()
    waiter.join(timeout=30)
    assert result == [False]  # stopped, not waited out
    assert time.monotonic() - t0 < 30
    assert retries.stopped and retries.wait(600.0) is False  # and every later wait


def test_an_owners_stop_event_interrupts_call():
    stop = threading.Event()
    retries = RetryPolicy(initial_s=600.0).start(stop)
    tries = []

    def attempt():
        tries.append(1)
        stop.set()  # e.g. the agent's stop() while the server is away
        raise Failed(S.UNAVAILABLE)

    with pytest.raises(Failed):
        retries.call(attempt, "test")
    assert tries == [1]
