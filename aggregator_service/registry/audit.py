"""The audit trail: who changed what, and which requests were refused."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from aggregator_service.audit_throttle import OVERFLOW_KEY, AuditThrottle, Suppressed, peer_ip
from aggregator_service.registry.database import Database
from aggregator_service.registry.records import AuditRecord
from fedmae.enrollment_policy import printable
from fedmae.errors import FedmaeError

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 300  # a refusal's message in the audit table (names in it are escaped)


class AuditTrail(Database):
    def __init__(self, path: Path, *args: Any, **kwargs: Any):
        super().__init__(path, *args, **kwargs)
        self.refusal_throttle = AuditThrottle()  # refused requests come at a peer's pace

    def close(self) -> None:
        with self._lock:
            self._audit_suppressed(self.refusal_throttle.due(flush=True))
            super().close()

    def audit(self, actor: str, action: str, target: str = "", **details: Any) -> None:
        with self._tx() as db:
            self._audit(db, actor, action, target, details)

    def audit_refusal(
        self,
        actor: str,
        action: str,
        target: str,
        peer: str,
        error: FedmaeError,
        code: str,
        **details: Any,
    ) -> bool:
        """Audit a refused request from ``peer`` answered with status ``code`` (its name,
        e.g. ``UNAUTHENTICATED``), rate-limited (``AuditThrottle``: per peer IP, action
        and status code); True if this one was written.

        Never raises: a refusal is answered with its own error even if the table cannot be
        written (the process log still has it).
        """
        admitted = self.refusal_throttle.admit((peer_ip(peer), action, code))
        due = self.refusal_throttle.due()
        if not (admitted or due):
            return False
        row = {"peer": peer, "code": code, **details}
        row["reason"] = printable(str(error), MAX_REASON_CHARS)
        try:
            with self._tx() as db:
                for s in due:
                    self._audit(db, *_suppressed_entry(s))
                if admitted:
                    self._audit(db, actor, action, printable(target, 80), row)
        except sqlite3.Error as err:
            log.warning("could not audit a refusal (%s): %s %s %s", err, actor, action, row)
            return False
        return admitted

    def _audit_suppressed(self, due: list[Suppressed]) -> None:
        if due:
            with self._tx() as db:
                for s in due:
                    self._audit(db, *_suppressed_entry(s))

    def audit_log(self, limit: int = 100) -> list[AuditRecord]:
        self._audit_suppressed(self.refusal_throttle.due())  # what a closed window held back
        rows = self._all(AuditRecord, "SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return rows[::-1]


def _suppressed_entry(s: Suppressed) -> tuple[str, str, str, dict[str, Any]]:
    ip, action, code = s.key
    details = {"suppressed": s.count, "window_s": round(s.seconds), "code": code}
    if s.key == OVERFLOW_KEY:
        details["peer_ip"] = "* (over the limit for all peers together)"
    else:
        details["peer_ip"] = ip
    return "fedmae:audit", "audit.suppressed", action, details
