"""What an operator sees of a running aggregator: tokens, clients, admins, the audit log
and the run's status, as plain values (no gRPC, no protobuf).

``fedmae.transport.admin_client.AdminClient`` answers with these; the CLI formats them.
Times are seconds since the epoch, ``None`` where the aggregator has none (a client
never seen, a certificate never revoked).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TokenInfo:
    """An enrollment token as the aggregator keeps it (the secret is never kept)."""

    token_id: str  # the public handle, for list and revoke
    name: str  # the client id the token is bound to; "" = any
    created: int | None
    expires: int | None
    uses: int
    used: int
    revoked: bool
    created_by: str

    def state(self, now: float | None = None) -> str:
        """``revoked``, ``used up``, ``expired`` or ``usable`` (at ``now``, default now)."""
        if self.revoked:
            return "revoked"
        if self.used >= self.uses:
            return "used up"
        if (self.expires or 0) <= (time.time() if now is None else now):
            return "expired"
        return "usable"


@dataclass(frozen=True)
class IssuedToken:
    """A token just made: its secret, shown once, and what the aggregator keeps of it."""

    token: str
    info: TokenInfo


@dataclass(frozen=True)
class ClientInfo:
    """An enrolled client."""

    client_id: str
    status: str  # active | revoked
    connected: bool
    rounds_joined: int
    serial: str
    fingerprint_sha256: str
    created: int | None
    last_seen: int | None
    not_after: int | None
    revoked_at: int | None
    labels: dict[str, str] = field(default_factory=dict)
    labels_omitted: int = 0  # labels the aggregator left out of the answer (over its cap)


@dataclass(frozen=True)
class AdminInfo:
    """A pinned admin certificate."""

    name: str  # the certificate's CN
    status: str  # active | revoked
    serial: str
    fingerprint_sha256: str
    created: int | None  # when it was pinned
    not_after: int | None
    added_by: str
    revoked_at: int | None
    revoke_reason: str
    is_caller: bool  # the certificate the question was asked with


@dataclass(frozen=True)
class AuditEntry:
    """One line of the audit log; ``details`` is JSON text, as the aggregator wrote it."""

    time: int | None
    actor: str
    action: str
    target: str
    details: str


@dataclass(frozen=True)
class SiteProgress:
    """How far one site's local training got in the open round."""

    step: int
    total: int
    since_step_s: float  # since its step last advanced


@dataclass(frozen=True)
class RunStatus:
    """One snapshot of the run."""

    state: str  # waiting | training | closing | finished
    round: int  # the open round, or the next one
    attempt: int
    version: int  # the latest published model version
    rounds_target: int  # 0 = until stopped
    min_clients: int
    connected: list[str]
    selected: list[str]
    reported: list[str]
    uploading: list[str]
    round_elapsed_s: float
    deadline_in_s: float
    last_record: dict[str, Any] | None  # the latest closed round, round-log schema
    progress: dict[str, SiteProgress] = field(default_factory=dict)  # training sites' reports
    finish_reason: str = ""  # once finished: completed | privacy budget spent | stopped


def dp_line(dp: dict) -> str:
    """A round-log ``dp`` object in words: ε spent, of what budget, by what mechanism."""
    budget = f" of {dp['target_epsilon']:g}" if dp.get("target_epsilon") else ""
    return (
        f"ε = {dp['epsilon']:.3g}{budget} at δ = {dp['delta']:g} after {dp['rounds']} "
        f"round(s) ({dp['mode']} DP, σ = {dp['noise_multiplier']:.3g}, C = {dp['clip']:g}, "
        f"q = {dp['q']:g}, N = {dp['population']}, {dp['accountant']})"
    )
