"""The training phase's deadline: extended while every site it waits for is alive and
progressing, up to a hard limit; and, when training closes, why each missing site is
missing (slow or gone).

A fixed deadline threw work away: a full-data 3-site run on a busy machine failed its
round after 300 s while all three sites were still training (issue 14). Sites now
report their step (``fedmae.rounds.TrainingProgress``, every ~10 s). When the deadline
comes and every site the phase still waits for has an event stream (or an upload in
flight) and advanced its step within ``progress_timeout_s``, the deadline moves to the
first moment one of them could have gone ``progress_timeout_s`` without advancing
(never past the hard limit), and the check repeats there. So a site that stops is
noticed within ``progress_timeout_s``, and one that goes on is waited for.

Only training phases are extended (TRAIN; ADVERTISE_KEYS of a secure round); the
phases after them keep their own deadlines. Guarded by the engine's lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedmae.rounds import TrainingProgress


@dataclass
class SiteProgress:
    """A site's latest report in this round (times on the engine's monotonic clock)."""

    step: int
    total: int
    heard: float  # the last report
    advanced: float  # the last report whose step was higher than the one before


@dataclass
class TrainingDeadline:
    """One round's progress reports and how far its training deadline may move."""

    original: float  # the deadline the round opened with (monotonic)
    hard: float  # never extended past this (== original when extension is off)
    progress_timeout_s: float  # a site that advanced within this is progressing
    sites: dict[str, SiteProgress] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # fixed when training closed
    extended_s: float = 0.0  # how far the deadline had moved when training closed

    @classmethod
    def opened(cls, deadline: float, started: float, hard_timeout_s: float,
               progress_timeout_s: float) -> TrainingDeadline:  # fmt: skip
        """A new round's: ``hard_timeout_s`` after ``started`` at most (0 = no extension)."""
        hard = max(deadline, started + hard_timeout_s) if hard_timeout_s else deadline
        return cls(deadline, hard, progress_timeout_s)

    def report(self, client_id: str, progress: TrainingProgress, now: float) -> None:
        """Record a site's report (the caller checked round, attempt and selection)."""
        last = self.sites.get(client_id)
        if last is None or progress.step > last.step:
            self.sites[client_id] = SiteProgress(progress.step, progress.total, now, now)
        else:
            last.heard = now

    def progressing(self, client_id: str, now: float) -> bool:
        site = self.sites.get(client_id)
        return site is not None and now - site.advanced < self.progress_timeout_s

    def extension(
        self, owing: set[str], connected: set[str], uploading: set[str], now: float
    ) -> float | None:
        """The deadline moved on, or None when it may not move: a site still owed is
        gone or stalled, or the hard limit is reached. A site uploading counts as
        progressing."""
        if not owing or now >= self.hard:
            return None
        until = []
        for client in owing:
            if client in uploading:
                until.append(now + self.progress_timeout_s)
            elif client in connected and self.progressing(client, now):
                until.append(self.sites[client].advanced + self.progress_timeout_s)
            else:
                return None
        return min(min(until), self.hard)

    def close(self, owing: set[str], connected: set[str], deadline: float, now: float) -> None:
        """Training closed: say why each site still owed sent nothing, as far as its
        reports tell (a site that never reported gets the record's plain reason)."""
        self.extended_s = max(0.0, round(deadline - self.original, 3))
        for client in owing:
            site = self.sites.get(client)
            if client not in connected:
                self.reasons[client] = "disconnected"
            elif site is None:
                continue
            elif not self.progressing(client, now):
                self.reasons[client] = (
                    f"no progress for {now - site.advanced:.0f} s "
                    f"(last step {site.step}/{site.total})"
                )
            else:
                when = (
                    "at the hard deadline" if self.hard > self.original and now >= self.hard
                    else "at the deadline" if now >= deadline
                    else "when the round closed"
                )  # fmt: skip
                self.reasons[client] = f"slow: step {site.step}/{site.total} {when}"

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        """Each reporting site's progress, for ``Admin.Status``."""
        return {
            c: {"step": s.step, "total": s.total, "since_step_s": round(now - s.advanced, 1)}
            for c, s in sorted(self.sites.items())
        }
