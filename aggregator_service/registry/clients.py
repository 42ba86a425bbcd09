"""Registered clients: their certificate, labels, status and activity."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from aggregator_service.registry.database import Database
from aggregator_service.registry.records import ClientRecord
from fedmae.errors import NotFound

LAST_SEEN_EVERY_S = 30.0  # last_seen is a hint; don't write on every call


class Clients(Database):
    def __init__(self, path: Path, *args: Any, **kwargs: Any):
        super().__init__(path, *args, **kwargs)
        self._seen: dict[str, float] = {}  # client id -> when last_seen was last written

    def client(self, client_id: str) -> ClientRecord:
        found = self.find_client(client_id)
        if found is None:
            raise NotFound(f"no client {client_id!r} is registered")
        return found

    def find_client(self, client_id: str) -> ClientRecord | None:
        return self._one(ClientRecord, "SELECT * FROM clients WHERE client_id = ?", (client_id,))

    def clients_page(self, after: str, limit: int) -> list[ClientRecord]:
        """Up to ``limit`` clients whose id sorts after ``after``, in id order."""
        return self._all(
            ClientRecord,
            "SELECT * FROM clients WHERE client_id > ? ORDER BY client_id LIMIT ?",
            (after, limit),
        )

    def clients(self) -> list[ClientRecord]:
        return self._all(ClientRecord, "SELECT * FROM clients ORDER BY client_id")

    def register(
        self,
        actor: str,
        client_id: str,
        fingerprint: str,
        serial: str,
        not_after: float | None,
        labels: dict[str, str] | None = None,
    ) -> ClientRecord:
        """Register (or re-key) a client whose certificate the operator issued directly."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO clients (client_id, fingerprint, serial, labels, created, not_after)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(client_id) DO UPDATE SET"
                " fingerprint = excluded.fingerprint, serial = excluded.serial,"
                " not_after = excluded.not_after, status = 'active', revoked_at = NULL,"
                " revoke_reason = NULL",
                (client_id, fingerprint, serial, json.dumps(labels or {}), time.time(), not_after),
            )
            self._audit(db, actor, "client.register", client_id, {"serial": serial})
        return self.client(client_id)

    def revoke_client(self, actor: str, client_id: str, reason: str = "") -> ClientRecord:
        with self._tx() as db:
            n = db.execute(
                "UPDATE clients SET status = 'revoked', revoked_at = ?, revoke_reason = ?"
                " WHERE client_id = ?",
                (time.time(), reason or None, client_id),
            ).rowcount
            if n == 0:
                raise NotFound(f"no client {client_id!r} is registered")
            self._audit(db, actor, "client.revoke", client_id, {"reason": reason})
        return self.client(client_id)

    def touch(self, client_id: str) -> None:
        """Record that a client called; written at most every ``LAST_SEEN_EVERY_S``."""
        now = time.time()
        if now - self._seen.get(client_id, 0.0) < LAST_SEEN_EVERY_S:
            return
        self._seen[client_id] = now
        with self._tx() as db:
            db.execute("UPDATE clients SET last_seen = ? WHERE client_id = ?", (now, client_id))
