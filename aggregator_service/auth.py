"""Who may call what: every Federation and Admin call is checked here.

TLS has already verified the certificate chain against the federation's CA. Here the
certificate is checked against the registry (client id = CN, fingerprint must be the
registered one, status active) or for the admin role (OU=admin).
"""

from __future__ import annotations

import logging

import grpc

from aggregator_service.rate_limit import RateLimiter
from aggregator_service.registry import Registry
from fedmae.errors import LimitExceeded, PermissionDenied, Unauthenticated
from fedmae.tls import ADMIN_ROLE, PeerCertificate, peer_certificate

log = logging.getLogger(__name__)

INSECURE_ID_HEADER = "x-fedmae-client-id"


class Authorizer:
    def __init__(self, registry: Registry, insecure: bool = False, max_requests_per_s: float = 0):
        self.registry = registry
        self.insecure = insecure
        self.limiter = RateLimiter(max_requests_per_s)

    def _peer(self, context: grpc.ServicerContext) -> PeerCertificate | None:
        return peer_certificate(context)

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

    def admin(self, context: grpc.ServicerContext) -> str:
        """The calling operator's name; raises unless the certificate has the admin role."""
        peer = self._peer(context)
        if peer is None:
            raise Unauthenticated("the Admin service needs the operator's admin certificate")
        if peer.role != ADMIN_ROLE:
            raise PermissionDenied(
                f"{peer.common_name!r} is not an admin: use the admin identity made by "
                "'fedmae certs init' (CERTS/admin)"
            )
        return f"admin:{peer.common_name}"
