"""The aggregator's SQLite state: clients, admins, enrollment tokens, audit trail.

One file, ``<state-dir>/fedmae.db`` (mode 0600, as are its WAL and SHM files, in a
0700 directory), stdlib ``sqlite3`` in WAL mode. The schema is
versioned with ``PRAGMA user_version``; ``MIGRATIONS[i]`` moves a database from
version i to i+1, so an existing state directory is upgraded, never broken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator_service.audit_throttle import OVERFLOW_KEY, AuditThrottle, Suppressed, peer_ip
from aggregator_service.round_log import record_json
from fedmae.enrollment_policy import (
    check_client_name,
    check_labels,
    is_generated_id,
    printable,
)
from fedmae.errors import (
    AlreadyExists,
    FailedPrecondition,
    FedmaeError,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from fedmae.private_files import private_dir, private_file

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

TOKEN_PREFIX = "fmt"
LAST_SEEN_EVERY_S = 30.0  # last_seen is a hint; don't write on every call
MAX_REASON_CHARS = 300  # a refusal's message in the audit table (names in it are escaped)


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    fingerprint: str
    serial: str
    labels: dict[str, str]
    status: str
    created: float
    last_seen: float | None
    rounds_joined: int
    not_after: float | None
    revoked_at: float | None
    revoke_reason: str | None

    @property
    def active(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True)
class AdminRecord:
    fingerprint: str
    name: str
    serial: str
    status: str
    created: float
    not_after: float | None
    added_by: str
    revoked_at: float | None
    revoke_reason: str | None

    def usable(self, now: float) -> bool:
        return self.status == "active" and (self.not_after is None or now < self.not_after)


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    name: str | None
    labels: dict[str, str]
    created: float
    expires: float
    uses: int
    used: int
    revoked: bool
    created_by: str

    def usable(self, now: float) -> bool:
        return not self.revoked and self.used < self.uses and now < self.expires


@dataclass
class AuditRecord:
    time: float
    actor: str
    action: str
    target: str
    details: dict[str, Any] = field(default_factory=dict)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Registry:
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
        self._migrate()
        self._seen: dict[str, float] = {}
        self.refusal_throttle = AuditThrottle()  # refused requests come at a peer's pace

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path} has schema version {version}, newer than this fedmae "
                    f"({len(MIGRATIONS)}): upgrade fedmae"
                )
            for i in range(version, len(MIGRATIONS)):
                db.executescript_in_tx(MIGRATIONS[i])
                db.execute(f"PRAGMA user_version = {i + 1}")
                log.info("state database %s migrated to schema version %d", self.path, i + 1)

    @contextmanager
    def _tx(self) -> Iterator[_Tx]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._audit_suppressed(self.refusal_throttle.due(flush=True))
            self._db.close()

    # ------------------------------------------------------------ audit

    def audit(self, actor: str, action: str, target: str = "", **details: Any) -> None:
        with self._tx() as db:
            self._audit(db, actor, action, target, details)

    def _audit(self, db: _Tx, actor: str, action: str, target: str, details: dict) -> None:
        db.execute(
            "INSERT INTO audit (time, actor, action, target, details) VALUES (?, ?, ?, ?, ?)",
            (time.time(), actor, action, target, json.dumps(details, sort_keys=True)),
        )
        log.info("audit: %s %s %s %s", actor, action, target, json.dumps(details, sort_keys=True))

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
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [
            AuditRecord(r["time"], r["actor"], r["action"], r["target"], json.loads(r["details"]))
            for r in reversed(rows)
        ]

    # ------------------------------------------------------------ tokens

    def create_token(
        self,
        actor: str,
        name: str | None = None,
        ttl_s: float = 3600.0,
        uses: int = 1,
        labels: dict[str, str] | None = None,
    ) -> tuple[str, TokenRecord]:
        """Make a token; return the secret (shown once) and its record."""
        if ttl_s <= 0 or ttl_s > 366 * 86400:
            raise InvalidRequest("token ttl must be between 1 second and 366 days")
        if not 1 <= uses <= 10_000:
            raise InvalidRequest("token uses must be between 1 and 10000")
        if name:
            check_client_name(name)
        check_labels(labels or {}, "token labels")
        token_id = secrets.token_hex(4)
        token = f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
        now = self.clock()
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens (token_id, token_hash, name, labels, created, expires, uses,"
                " created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (token_id, hash_token(token), name or None, json.dumps(labels or {}), now,
                 now + ttl_s, uses, actor),
            )  # fmt: skip
            self._audit(
                db, actor, "token.create", token_id, {"name": name, "ttl_s": ttl_s, "uses": uses}
            )
        return token, self.token(token_id)

    def token(self, token_id: str) -> TokenRecord:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM tokens WHERE token_id = ?", (token_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no token with id {token_id!r}")
        return _token(row)

    def tokens(self, include_inactive: bool = False) -> list[TokenRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM tokens ORDER BY created").fetchall()
        now = self.clock()
        records = [_token(r) for r in rows]
        return records if include_inactive else [t for t in records if t.usable(now)]

    def revoke_token(self, actor: str, token_id: str) -> TokenRecord:
        with self._tx() as db:
            if (
                db.execute("UPDATE tokens SET revoked = 1 WHERE token_id = ?", (token_id,)).rowcount
                == 0
            ):
                raise NotFound(f"no token with id {token_id!r}")
            self._audit(db, actor, "token.revoke", token_id, {})
        return self.token(token_id)

    # ------------------------------------------------------------ enrollment

    def enroll(
        self,
        token: str,
        requested_name: str,
        make_id: Any,
        issue: Any,
        labels: dict[str, str],
        peer: str,
    ) -> tuple[ClientRecord, Any, bool, int]:
        """Spend ``token`` and register (or renew) a client, atomically.

        Returns the client, the issued certificate, whether it was a renewal, and which
        use of the token this was (0 for the first).

        ``make_id()`` proposes an id when neither the token nor the request names one;
        ``issue(client_id)`` signs the certificate and returns ``(cert, fingerprint,
        serial, not_after)``. Nothing is written unless every check passes.
        """
        now = self.clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM tokens WHERE token_hash = ?", (hash_token(token),)
            ).fetchone()
            if row is None:
                raise Unauthenticated("unknown enrollment token: check it was copied whole")
            tok = _token(row)
            if tok.revoked:
                raise Unauthenticated(f"enrollment token {tok.token_id} was revoked")
            if now >= tok.expires:
                raise Unauthenticated(
                    f"enrollment token {tok.token_id} expired "
                    f"{_ago(now - tok.expires)} ago: ask the operator for a new one"
                )
            if tok.used >= tok.uses:
                raise Unauthenticated(
                    f"enrollment token {tok.token_id} is used up ({tok.used} of {tok.uses} uses)"
                )
            # The binding first: a token bound to another name learns nothing about the
            # name asked for (reserved, generated-looking, taken or free: same answer).
            if tok.name and requested_name and requested_name != tok.name:
                raise PermissionDenied(
                    f"this token is bound to another name: it is for client {tok.name!r}, "
                    f"not {requested_name!r}"
                )
            if requested_name and requested_name != tok.name and is_generated_id(requested_name):
                raise InvalidRequest(
                    f"the client name {requested_name!r} has the form of the ids the server "
                    "generates (client-xxxxxx) and is reserved for them: choose another, or "
                    "enroll without a name"
                )
            merged = check_labels(
                {**tok.labels, **labels}, "labels (the token's and the request's together)"
            )
            client_id = tok.name or requested_name or self._free_id(db, make_id)
            existing = db.execute(
                "SELECT * FROM clients WHERE client_id = ?", (client_id,)
            ).fetchone()
            renewed = existing is not None
            if renewed and not tok.name:
                # Renewing an existing identity needs a token the operator bound to it;
                # otherwise any token holder could take over another client's name.
                raise AlreadyExists(
                    f"client id {client_id!r} is already enrolled: ask the operator for a token "
                    f"bound to it ('fedmae token create --name {client_id}') to renew"
                )
            cert, fingerprint, serial, not_after = issue(client_id)
            if renewed:
                db.execute(
                    "UPDATE clients SET fingerprint = ?, serial = ?, labels = ?, status = 'active',"
                    " not_after = ?, revoked_at = NULL, revoke_reason = NULL WHERE client_id = ?",
                    (fingerprint, serial, json.dumps(merged), not_after, client_id),
                )
            else:
                db.execute(
                    "INSERT INTO clients (client_id, fingerprint, serial, labels, created,"
                    " not_after) VALUES (?, ?, ?, ?, ?, ?)",
                    (client_id, fingerprint, serial, json.dumps(merged), now, not_after),
                )
            db.execute("UPDATE tokens SET used = used + 1 WHERE token_id = ?", (tok.token_id,))
            self._audit(
                db, f"token:{tok.token_id}", "client.renew" if renewed else "client.enroll",
                client_id, {"serial": serial, "fingerprint": fingerprint[:16], "peer": peer},
            )  # fmt: skip
        return self.client(client_id), cert, renewed, tok.used

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

    # ------------------------------------------------------------ clients

    def client(self, client_id: str) -> ClientRecord:
        found = self.find_client(client_id)
        if found is None:
            raise NotFound(f"no client {client_id!r} is registered")
        return found

    def find_client(self, client_id: str) -> ClientRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM clients WHERE client_id = ?", (client_id,)
            ).fetchone()
        return None if row is None else _client(row)

    def _free_id(self, db: _Tx, make_id: Any) -> str:
        """A generated id no client has and no token is bound to."""
        for _ in range(16):
            client_id = make_id()
            if not db.execute(
                "SELECT 1 FROM clients WHERE client_id = ? UNION ALL "
                "SELECT 1 FROM tokens WHERE name = ?",
                (client_id, client_id),
            ).fetchone():
                return client_id
        raise LimitExceeded("could not generate a free client id: enroll with a name")

    def token_id_of(self, token: str) -> str | None:
        """The public id of a stored token given its secret (None if there is none)."""
        with self._lock:
            row = self._db.execute(
                "SELECT token_id FROM tokens WHERE token_hash = ?", (hash_token(token),)
            ).fetchone()
        return None if row is None else row["token_id"]

    def clients_page(self, after: str, limit: int) -> list[ClientRecord]:
        """Up to ``limit`` clients whose id sorts after ``after``, in id order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM clients WHERE client_id > ? ORDER BY client_id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [_client(r) for r in rows]

    def clients(self) -> list[ClientRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM clients ORDER BY client_id").fetchall()
        return [_client(r) for r in rows]

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

    # ------------------------------------------------------------ admins

    def find_admin(self, fingerprint: str) -> AdminRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM admins WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
        return None if row is None else _admin(row)

    def admins(self) -> list[AdminRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM admins ORDER BY created, name").fetchall()
        return [_admin(r) for r in rows]

    def pin_admin(
        self,
        actor: str,
        name: str,
        fingerprint: str,
        serial: str,
        not_after: float | None,
        if_new: bool = False,
    ) -> AdminRecord | None:
        """Pin an admin certificate. A known one is refused (or, with ``if_new``, left
        as it is and None returned): a revoked certificate is never pinned again."""
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM admins WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
            if row is not None:
                if if_new:
                    return None
                known = _admin(row)
                if known.status == "revoked":
                    raise PermissionDenied(
                        f"admin certificate {known.name!r} (serial {known.serial}) was revoked "
                        f"by the operator; a revoked certificate is never pinned again: issue "
                        "a new one with 'fedmae certs issue-admin'"
                    )
                raise AlreadyExists(f"admin certificate {known.name!r} is already pinned")
            db.execute(
                "INSERT INTO admins (fingerprint, name, serial, created, not_after, added_by)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (fingerprint, name, serial, time.time(), not_after, actor),
            )
            self._audit(
                db, actor, "admin.pin", name, {"serial": serial, "fingerprint": fingerprint[:16]}
            )
        return self.find_admin(fingerprint)

    def revoke_admin(
        self, actor: str, name: str, reason: str, caller_fingerprint: str
    ) -> list[AdminRecord]:
        """Revoke every active certificate of admin ``name``, unless that revokes the
        caller or leaves no usable admin (then nobody could run the federation)."""
        now = time.time()
        with self._tx() as db:
            rows = [_admin(r) for r in db.execute("SELECT * FROM admins").fetchall()]
            targets = [a for a in rows if a.name == name and a.status == "active"]
            if not targets:
                if any(a.name == name for a in rows):
                    raise NotFound(f"admin {name!r} has no active certificate (already revoked)")
                raise NotFound(f"no admin {name!r} is pinned: see 'fedmae admins list'")
            if any(a.fingerprint == caller_fingerprint for a in targets):
                raise FailedPrecondition(
                    f"you cannot revoke your own admin certificate ({name!r}): another admin "
                    "must do it"
                )
            if not any(a.usable(now) and a not in targets for a in rows):
                raise FailedPrecondition(
                    f"{name!r} is the last active admin: pin another admin first "
                    "('fedmae certs issue-admin', then 'fedmae admins add --cert')"
                )
            db.executemany(
                "UPDATE admins SET status = 'revoked', revoked_at = ?, revoke_reason = ?"
                " WHERE fingerprint = ?",
                [(now, reason or None, a.fingerprint) for a in targets],
            )
            self._audit(
                db, actor, "admin.revoke", name,
                {"reason": reason, "serials": [a.serial for a in targets]},
            )  # fmt: skip
        return [self.find_admin(a.fingerprint) for a in targets]  # type: ignore[misc]

    # ------------------------------------------------------------ rounds

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


class _Tx:
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


def _suppressed_entry(s: Suppressed) -> tuple[str, str, str, dict[str, Any]]:
    ip, action, code = s.key
    details = {"suppressed": s.count, "window_s": round(s.seconds), "code": code}
    if s.key == OVERFLOW_KEY:
        details["peer_ip"] = "* (over the limit for all peers together)"
    else:
        details["peer_ip"] = ip
    return "fedmae:audit", "audit.suppressed", action, details


def _client(row: sqlite3.Row) -> ClientRecord:
    return ClientRecord(
        client_id=row["client_id"],
        fingerprint=row["fingerprint"],
        serial=row["serial"],
        labels=json.loads(row["labels"]),
        status=row["status"],
        created=row["created"],
        last_seen=row["last_seen"],
        rounds_joined=row["rounds_joined"],
        not_after=row["not_after"],
        revoked_at=row["revoked_at"],
        revoke_reason=row["revoke_reason"],
    )


def _admin(row: sqlite3.Row) -> AdminRecord:
    return AdminRecord(
        fingerprint=row["fingerprint"],
        name=row["name"],
        serial=row["serial"],
        status=row["status"],
        created=row["created"],
        not_after=row["not_after"],
        added_by=row["added_by"],
        revoked_at=row["revoked_at"],
        revoke_reason=row["revoke_reason"],
    )


def _token(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        token_id=row["token_id"],
        name=row["name"],
        labels=json.loads(row["labels"]),
        created=row["created"],
        expires=row["expires"],
        uses=row["uses"],
        used=row["used"],
        revoked=bool(row["revoked"]),
        created_by=row["created_by"],
    )


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
