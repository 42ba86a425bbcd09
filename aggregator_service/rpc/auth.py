"""Who may call what: every Federation and Admin call is checked here.

TLS has already verified the certificate chain against the federation's CA, but only at
the handshake. Here, on every call (and every Subscribe heartbeat), the certificate must
still be within its validity, and is checked against the registry: a client by its id
(CN; the fingerprint must be the registered one, status active), an admin by its pinned
fingerprint (OU=admin and pinned, not revoked). The health identity (OU=health) has no
rights here: the standard gRPC health service needs no authorization.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import grpc

from aggregator_service.registry import Registry
from aggregator_service.registry.records import AdminRecord
from aggregator_service.rpc.rate_limit import RateLimiter
from fedmae.errors import FedmaeError, LimitExceeded, PermissionDenied, Unauthenticated
from fedmae.pki.files import ADMIN_ROLE, HEALTH_ROLE
from fedmae.pki.peer import PeerCertificate, utc
from fedmae.transport.credentials import peer_certificate
from fedmae.transport.status import status_code

log = logging.getLogger(__name__)

INSECURE_ID_HEADER = "x-fedmae-client-id"


def _audited(role: str):
    """Audit an identity check's refusal (rate-limited by the registry), then re-raise."""

    def wrap(check):
        @functools.wraps(check)
        def checked(self: Authorizer, context: grpc.ServicerContext) -> str:
            try:
                return check(self, context)
            except (Unauthenticated, PermissionDenied) as err:
                self.audit_refusal(context, role, err)
                raise

        return checked

    return wrap


class Authorizer:
    def __init__(
        self,
        registry: Registry,
        insecure: bool = False,
        max_requests_per_s: float = 0,
        clock: Callable[[], float] = time.time,
    ):
        self.registry = registry
        self.insecure = insecure
        self.limiter = RateLimiter(max_requests_per_s)
        self.clock = clock  # wall clock, compared with certificates' not_after
        self.root_pem = b""  # the root CA certificate: an admin to pin must be signed by it

    def _peer(self, context: grpc.ServicerContext) -> PeerCertificate | None:
        peer = peer_certificate(context)
        if peer is not None and self.clock() >= peer.not_after:
            raise Unauthenticated(
                f"the certificate of {peer.common_name!r} expired at {utc(peer.not_after)}; "
                + (
                    "renew it: issue a new one with 'fedmae certs issue-admin' and pin it"
                    if peer.role == ADMIN_ROLE
                    else "renew it: enroll again with a token bound to this name"
                )
            )
        return peer

    def audit_refusal(self, context: grpc.ServicerContext, role: str, err: FedmaeError) -> None:
        peer = self._peer(context)
        self.registry.audit_refusal(
            f"cert:{peer.common_name}" if peer else "anonymous", "auth.refused", role,
            context.peer(), err, status_code(err).name,
            **({"fingerprint": peer.fingerprint[:16]} if peer else {}),
        )  # fmt: skip

    @_audited("client")
    def client(self, context: grpc.ServicerContext) -> str:
        """The calling client's id; raises unless it is enrolled, current and active."""
        peer = self._peer(context)
        if peer is None:
            if self.insecure:
                for key, value in context.invocation_metadata():
                    if key == INSECURE_ID_HEADER and value:
                        return str(value)
            raise Unauthenticated(
                "no client certificate: connect to the federation port with the identity "
                "made by 'fedmae enroll'"
            )
        if peer.role == ADMIN_ROLE:
            raise PermissionDenied(
                "an admin certificate cannot join the federation as a client: enroll a client"
            )
        if peer.role == HEALTH_ROLE:
            raise PermissionDenied(
                "the health-check identity may only call grpc.health.v1.Health, not the "
                "Federation service"
            )
        self.check_client(peer.common_name, peer.fingerprint)
        if not self.limiter.allow(peer.common_name):
            raise LimitExceeded(
                f"client {peer.common_name!r} sends more than {self.limiter.rate:g} requests "
                "per second: slow down"
            )
        self.registry.touch(peer.common_name)
        return peer.common_name

    def check_client(self, client_id: str, fingerprint: str) -> None:
        record = self.registry.find_client(client_id)
        if record is None:
            raise Unauthenticated(
                f"client {client_id!r} is not registered with this aggregator: enroll it with "
                "a token ('fedmae token create' then 'fedmae enroll')"
            )
        if record.status == "revoked":
            why = f" ({record.revoke_reason})" if record.revoke_reason else ""
            raise PermissionDenied(
                f"client {client_id!r} was revoked by the operator{why}; "
                "ask the operator for a new enrollment token"
            )
        if record.fingerprint != fingerprint:
            raise Unauthenticated(
                f"this certificate for {client_id!r} is not the one registered "
                f"(serial {record.serial}); it was replaced by a newer enrollment"
            )

    @_audited("admin")
    def admin(self, context: grpc.ServicerContext) -> str:
        """The calling operator's name; raises unless the certificate has the admin role
        and its fingerprint is pinned and active in the registry."""
        peer = self._peer(context)
        if peer is None:
            raise Unauthenticated("the Admin service needs the operator's admin certificate")
        self.admin_record(peer)
        return f"admin:{peer.common_name}"

    def admin_record(self, peer: PeerCertificate) -> AdminRecord:
        if peer.role != ADMIN_ROLE:
            raise PermissionDenied(
                f"{peer.common_name!r} is not an admin: use the admin identity made by "
                "'fedmae certs init' (CERTS/admin, or its --admin-out)"
            )
        record = self.registry.find_admin(peer.fingerprint)
        if record is None:
            raise Unauthenticated(
                f"admin certificate {peer.common_name!r} (serial {peer.serial}) is not pinned "
                "on this aggregator: an admin must pin it ('fedmae admins add --cert'), or "
                "put it in CERTS/admins/ before the aggregator starts"
            )
        if record.status != "active":
            why = f" ({record.revoke_reason})" if record.revoke_reason else ""
            raise PermissionDenied(
                f"admin certificate {peer.common_name!r} (serial {peer.serial}) was revoked{why}"
            )
        return record

    def admin_peer(self, context: grpc.ServicerContext) -> PeerCertificate | None:
        """The verified certificate of the calling admin (None without TLS), after
        ``admin()`` accepted the call."""
        return peer_certificate(context)
