"""The round log in the database, so watchers can replay it after a restart."""

from __future__ import annotations

import time
from typing import Any

from aggregator_service.registry.database import Database
from aggregator_service.round_log import record_json


class RoundsFeed(Database):
    def add_round(self, record: dict[str, Any]) -> int:
        """Store a closed round; count it for its participants. Returns its seq."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO rounds (round, attempt, status, version, time, record)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (record["round"], record["attempt"], record["status"], record["version"],
                 time.time(), record_json(record)),
            )  # fmt: skip
            if record["status"] == "published":
                db.executemany(
                    "UPDATE clients SET rounds_joined = rounds_joined + 1 WHERE client_id = ?",
                    [(c,) for c in record["participants"]],
                )
            return int(cur.lastrowid)

    def rounds_after(self, after_seq: int, from_round: int = 0) -> list[tuple[int, str]]:
        """``(seq, record JSON)`` of the rounds stored after ``after_seq``, from a round on."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, record FROM rounds WHERE seq > ? AND round >= ? ORDER BY seq",
                (after_seq, from_round),
            ).fetchall()
        return [(r["seq"], r["record"]) for r in rows]

    def has_published(self, version: int) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM rounds WHERE status = 'published' AND version = ?", (version,)
            ).fetchone()
        return row is not None

    def last_round_seq(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM rounds").fetchone()[0]
