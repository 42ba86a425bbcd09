"""Enrollment: spend a token and register (or renew) a client, in one transaction."""

from __future__ import annotations

import json
from typing import Any

from aggregator_service.registry.clients import Clients
from aggregator_service.registry.database import Transaction
from aggregator_service.registry.records import ClientRecord, TokenRecord, from_row
from aggregator_service.registry.tokens import Tokens, hash_token
from fedmae.enrollment_policy import check_labels, is_generated_id
from fedmae.errors import (
    AlreadyExists,
    InvalidRequest,
    LimitExceeded,
    PermissionDenied,
    Unauthenticated,
)


class Enrollment(Clients, Tokens):
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
            tok = from_row(TokenRecord, row)
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
            client_id = tok.name or requested_name or _free_id(db, make_id)
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


def _free_id(db: Transaction, make_id: Any) -> str:
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


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
