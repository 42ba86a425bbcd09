"""Training progress for the aggregator: a report after the first step, then one at
most every ``every_s`` seconds of training (default 10).

The aggregator extends a round's deadline while every site it waits for reports a step
that keeps advancing (``aggregator_service.deadlines``), so a slow site is waited for
and a gone one is not. A report costs one small SubmitUpdate on the open channel (a
few hundred bytes every 10 s) and never stops training: it is sent without waiting for
the answer, and a failure is only logged (``FederationClient.send_progress``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fedmae.rounds import RoundTask, TrainingProgress
from fedmae.transport.federation_client import FederationClient


class ProgressReports:
    """The ``progress`` callback of one task's ``train_local``: sends a throttled report."""

    def __init__(
        self,
        client: FederationClient,
        task: RoundTask,
        every_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._client = client
        self._task = task
        self.every_s = every_s  # 0 = never report
        self._clock = clock
        self._sent: float | None = None  # when the last report went out

    def __call__(self, step: int, total: int) -> None:
        if not self.every_s:
            return
        now = self._clock()
        if self._sent is not None and now - self._sent < self.every_s:
            return
        report = TrainingProgress(self._task.round, self._task.attempt, step, total)
        if self._client.send_progress(report):  # False: the last one is still in flight
            self._sent = now
