"""The state database's schema, versioned with ``PRAGMA user_version``.

``MIGRATIONS[i]`` moves a database from version i to i+1, so an existing state
directory is upgraded, never broken. Append new steps; never edit an old one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

MIGRATIONS: list[str] = [
    # 0 -> 1: clients, tokens, audit
    """
    CREATE TABLE clients (
        client_id     TEXT PRIMARY KEY,
        fingerprint   TEXT NOT NULL,          -- sha256 of the certificate DER, hex
        serial        TEXT NOT NULL,
        labels        TEXT NOT NULL DEFAULT '{}',
        status        TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
        created       REAL NOT NULL,
        last_seen     REAL,
        rounds_joined INTEGER NOT NULL DEFAULT 0,
        not_after     REAL,
        revoked_at    REAL,
        revoke_reason TEXT
    );
    CREATE TABLE tokens (
        token_id   TEXT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,      -- sha256 of the secret token, never the token
        name       TEXT,                      -- client id the token is bound to, if any
        labels     TEXT NOT NULL DEFAULT '{}',
        created    REAL NOT NULL,
        expires    REAL NOT NULL,
        uses       INTEGER NOT NULL,
        used       INTEGER NOT NULL DEFAULT 0,
        revoked    INTEGER NOT NULL DEFAULT 0,
        created_by TEXT NOT NULL
    );
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        time    REAL NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        target  TEXT NOT NULL DEFAULT '',
        details TEXT NOT NULL DEFAULT '{}'
    );
    """,
    # 1 -> 2: the round log, so watchers can replay it after a restart
    """
    CREATE TABLE rounds (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,
        round   INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        status  TEXT NOT NULL,
        version INTEGER NOT NULL,
        time    REAL NOT NULL,
        record  TEXT NOT NULL
    );
    CREATE INDEX rounds_by_round ON rounds (round);
    """,
    # 2 -> 3: pinned admin certificates (an OU=admin certificate alone is not enough)
    """
    CREATE TABLE admins (
        fingerprint   TEXT PRIMARY KEY,       -- sha256 of the certificate DER, hex
        name          TEXT NOT NULL,          -- the certificate's CN
        serial        TEXT NOT NULL,
        status        TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
        created       REAL NOT NULL,
        not_after     REAL,
        added_by      TEXT NOT NULL,
        revoked_at    REAL,
        revoke_reason TEXT
    );
    CREATE INDEX admins_by_name ON admins (name);
    """,
]


class _Statements(Protocol):
    def execute(self, sql: str, params: tuple = ()) -> object: ...
    def executescript_in_tx(self, script: str) -> None: ...


def migrate(db: _Statements, path: Path) -> None:
    """Bring the database to ``len(MIGRATIONS)``, inside the caller's transaction;
    ``RuntimeError`` if it was made by a newer fedmae."""
    version = db.execute("PRAGMA user_version").fetchone()[0]  # type: ignore[attr-defined]
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"{path} has schema version {version}, newer than this fedmae "
            f"({len(MIGRATIONS)}): upgrade fedmae"
        )
    for i in range(version, len(MIGRATIONS)):
        db.executescript_in_tx(MIGRATIONS[i])
        db.execute(f"PRAGMA user_version = {i + 1}")
        log.info("state database %s migrated to schema version %d", path, i + 1)
