"""What the registry stores, as records, and the one mapping from a table row."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar


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


Record = TypeVar("Record", ClientRecord, AdminRecord, TokenRecord, AuditRecord)

# Columns stored as something other than the field's type, by the field's annotation:
# dicts are JSON text, booleans are 0/1 integers.
_FROM_COLUMN = {"dict[str, str]": json.loads, "dict[str, Any]": json.loads, "bool": bool}


def from_row(cls: type[Record], row: sqlite3.Row) -> Record:
    """The record of a row of its table (columns named as the record's fields)."""
    return cls(
        **{f.name: _FROM_COLUMN.get(f.type, _same)(row[f.name]) for f in fields(cls)}  # type: ignore[arg-type]
    )


def _same(value: Any) -> Any:
    return value
