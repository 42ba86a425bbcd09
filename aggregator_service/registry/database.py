"""The connection to the state database: one per process, one lock, WAL mode.

One file, ``<state-dir>/fedmae.db`` (mode 0600, as are its WAL and SHM files, in a
0700 directory), stdlib ``sqlite3``. Every change runs in a transaction with the
audit row that records it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aggregator_service.registry.records import Record, from_row
from aggregator_service.registry.schema import migrate
from fedmae.private_files import private_dir, private_file

log = logging.getLogger(__name__)


class Transaction:
    """The connection inside a transaction (``executescript`` would commit it)."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple]) -> sqlite3.Cursor:
        return self._db.executemany(sql, rows)

    def executescript_in_tx(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)


class Database:
    """Thread-safe access to the state database (one connection, one lock)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time):
        self.path = path
        self.clock = clock  # the time tokens are made and expire by (tests move it)
        private_dir(path.parent)
        # SQLite gives the -wal and -shm files the database file's mode: make it 0600
        # before SQLite creates it (and tighten one made by an older fedmae).
        for existing in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm"))):
            if existing == path or existing.exists():
                private_file(existing)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed enrollment survives a crash
        self._db.execute("PRAGMA busy_timeout=5000")  # another process (the CLI) may write
        with self._tx() as db:
            migrate(db, path)

    @contextmanager
    def _tx(self) -> Iterator[Transaction]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, cls: type[Record], sql: str, params: tuple = ()) -> Record | None:
        """The record of the first row ``sql`` selects, or None."""
        with self._lock:
            row = self._db.execute(sql, params).fetchone()
        return None if row is None else from_row(cls, row)

    def _all(self, cls: type[Record], sql: str, params: tuple = ()) -> list[Record]:
        """The records of every row ``sql`` selects, in its order."""
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [from_row(cls, r) for r in rows]

    def _audit(self, db: Transaction, actor: str, action: str, target: str, details: dict) -> None:
        """An audit row, in the transaction of the change it records."""
        db.execute(
            "INSERT INTO audit (time, actor, action, target, details) VALUES (?, ?, ?, ?, ?)",
            (time.time(), actor, action, target, json.dumps(details, sort_keys=True)),
        )
        log.info("audit: %s %s %s %s", actor, action, target, json.dumps(details, sort_keys=True))

    def close(self) -> None:
        with self._lock:
            self._db.close()
