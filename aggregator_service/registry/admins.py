"""Pinned admin certificates: an OU=admin certificate alone is not enough."""

from __future__ import annotations

import time

from aggregator_service.registry.database import Database
from aggregator_service.registry.records import AdminRecord, from_row
from fedmae.errors import AlreadyExists, FailedPrecondition, NotFound, PermissionDenied


class Admins(Database):
    def find_admin(self, fingerprint: str) -> AdminRecord | None:
        return self._one(AdminRecord, "SELECT * FROM admins WHERE fingerprint = ?", (fingerprint,))

    def admins(self) -> list[AdminRecord]:
        return self._all(AdminRecord, "SELECT * FROM admins ORDER BY created, name")

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
                known = from_row(AdminRecord, row)
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
            rows = [from_row(AdminRecord, r) for r in db.execute("SELECT * FROM admins")]
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
