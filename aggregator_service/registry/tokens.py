"""One-time enrollment tokens: made by an operator, stored only as a hash."""

from __future__ import annotations

import hashlib
import json
import secrets

from aggregator_service.registry.database import Database
from aggregator_service.registry.records import TokenRecord
from fedmae.enrollment_policy import check_client_name, check_labels
from fedmae.errors import InvalidRequest, NotFound

TOKEN_PREFIX = "fmt"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens(Database):
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
        found = self._one(TokenRecord, "SELECT * FROM tokens WHERE token_id = ?", (token_id,))
        if found is None:
            raise NotFound(f"no token with id {token_id!r}")
        return found

    def tokens(self, include_inactive: bool = False) -> list[TokenRecord]:
        records = self._all(TokenRecord, "SELECT * FROM tokens ORDER BY created")
        now = self.clock()
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

    def token_id_of(self, token: str) -> str | None:
        """The public id of a stored token given its secret (None if there is none)."""
        found = self._one(
            TokenRecord, "SELECT * FROM tokens WHERE token_hash = ?", (hash_token(token),)
        )
        return None if found is None else found.token_id
