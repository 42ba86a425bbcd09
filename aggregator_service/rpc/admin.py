"""The Admin servicer: tokens, clients, admins, revocation, audit. Pinned admins only.

Each method checks the caller (``Authorizer.admin``), then translates and delegates;
domain errors are answered by ``fedmae.transport.status.StatusInterceptor``."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterator

from google.protobuf.timestamp_pb2 import Timestamp

from aggregator_service import admin_pins
from aggregator_service.engine import RoundEngine
from aggregator_service.registry import Registry
from aggregator_service.registry.records import AdminRecord, ClientRecord, TokenRecord
from aggregator_service.round_feed import RoundFeed
from aggregator_service.round_log import record_json
from aggregator_service.rpc.auth import Authorizer
from fedmae.enrollment_policy import clamp_labels
from fedmae.errors import FailedPrecondition, InvalidRequest
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc

log = logging.getLogger(__name__)

DEFAULT_TOKEN_TTL_S = 3600
# A ListClients page holds at most MAX_PAGE_SIZE clients of at most ~5.6 KB each (16
# labels of 64 + 256 bytes, clamp_labels), ~1.1 MB: far below the 5 MiB message cap.
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 200
MAX_AUDIT_ENTRIES = 1000  # an entry is under ~1 KB (reasons are cut to 300 characters)


def _ts(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def token_info(t: TokenRecord) -> apb.TokenInfo:
    return apb.TokenInfo(
        token_id=t.token_id,
        name=t.name or "",
        created=_ts(t.created),
        expires=_ts(t.expires),
        uses=t.uses,
        used=t.used,
        revoked=t.revoked,
        created_by=t.created_by,
    )


def client_info(c: ClientRecord, connected: bool) -> apb.ClientInfo:
    labels, omitted = clamp_labels(c.labels)  # rows from before the limits may hold any
    return apb.ClientInfo(
        client_id=c.client_id,
        status=c.status,
        fingerprint_sha256=c.fingerprint,
        serial=c.serial,
        labels=labels,
        labels_omitted=omitted,
        created=_ts(c.created),
        last_seen=_ts(c.last_seen),
        rounds_joined=c.rounds_joined,
        not_after=_ts(c.not_after),
        connected=connected,
        revoked_at=_ts(c.revoked_at),
    )


def _page_token(last_client_id: str) -> str:
    return base64.urlsafe_b64encode(last_client_id.encode()).decode()


def _page_after(token: str) -> str:
    """The client id a page token says to continue after ("" for the first page)."""
    if not token:
        return ""
    try:
        return base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidRequest(
            "invalid page_token: pass the next_page_token of the previous page unchanged"
        ) from None


def admin_info(a: AdminRecord, caller_fingerprint: str) -> apb.AdminInfo:
    return apb.AdminInfo(
        name=a.name,
        status=a.status,
        fingerprint_sha256=a.fingerprint,
        serial=a.serial,
        created=_ts(a.created),
        not_after=_ts(a.not_after),
        added_by=a.added_by,
        revoked_at=_ts(a.revoked_at),
        revoke_reason=a.revoke_reason or "",
        is_caller=a.fingerprint == caller_fingerprint,
    )


class AdminServicer(apb_grpc.AdminServicer):
    def __init__(self, registry: Registry, rounds: RoundEngine, auth: Authorizer, feed: RoundFeed):
        self.registry = registry
        self.rounds = rounds
        self.auth = auth
        self.feed = feed

    def WatchRounds(self, request: apb.WatchRoundsRequest, context) -> Iterator[apb.RoundRecord]:
        self.auth.admin(context)
        for seq, record in self.feed.watch(
            from_round=request.from_round,
            after_seq=request.after_seq,
            follow=request.follow,
            active=context.is_active,
        ):
            yield apb.RoundRecord(seq=seq, record_json=record)

    def Status(self, request: apb.StatusRequest, context) -> apb.StatusResponse:
        self.auth.admin(context)
        snap = self.rounds.status()
        last = snap.pop("last_record")
        progress = {c: apb.SiteProgress(**p) for c, p in snap.pop("progress").items()}
        return apb.StatusResponse(
            **snap, progress=progress, last_record_json=record_json(last) if last else ""
        )

    def CreateToken(self, request: apb.CreateTokenRequest, context) -> apb.CreateTokenResponse:
        actor = self.auth.admin(context)
        token, record = self.registry.create_token(
            actor,
            name=request.name or None,
            ttl_s=request.ttl_seconds or DEFAULT_TOKEN_TTL_S,
            uses=request.uses or 1,
            labels=dict(request.labels),
        )
        return apb.CreateTokenResponse(token=token, info=token_info(record))

    def ListTokens(self, request: apb.ListTokensRequest, context) -> apb.ListTokensResponse:
        actor = self.auth.admin(context)
        tokens = self.registry.tokens(include_inactive=request.include_inactive)
        self.registry.audit(actor, "token.list")
        return apb.ListTokensResponse(tokens=[token_info(t) for t in tokens])

    def RevokeToken(self, request: apb.RevokeTokenRequest, context) -> apb.TokenInfo:
        actor = self.auth.admin(context)
        return token_info(self.registry.revoke_token(actor, request.token_id))

    def ListClients(self, request: apb.ListClientsRequest, context) -> apb.ListClientsResponse:
        actor = self.auth.admin(context)
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        page = self.registry.clients_page(_page_after(request.page_token), size + 1)
        connected = set(self.rounds.connected())
        self.registry.audit(actor, "client.list")
        more = len(page) > size
        page = page[:size]
        return apb.ListClientsResponse(
            clients=[client_info(c, c.client_id in connected) for c in page],
            next_page_token=_page_token(page[-1].client_id) if more else "",
        )

    def GetClient(self, request: apb.GetClientRequest, context) -> apb.ClientInfo:
        actor = self.auth.admin(context)
        record = self.registry.client(request.client_id)
        self.registry.audit(actor, "client.show", request.client_id)
        return client_info(record, request.client_id in self.rounds.connected())

    def RevokeClient(self, request: apb.RevokeClientRequest, context) -> apb.ClientInfo:
        actor = self.auth.admin(context)
        if not request.client_id:
            raise InvalidRequest("client_id is required")
        record = self.registry.revoke_client(actor, request.client_id, request.reason)
        self.rounds.revoke(request.client_id, request.reason)
        return client_info(record, connected=False)

    def Audit(self, request: apb.AuditRequest, context) -> apb.AuditResponse:
        self.auth.admin(context)
        entries = self.registry.audit_log(min(request.limit or 100, MAX_AUDIT_ENTRIES))
        return apb.AuditResponse(
            entries=[
                apb.AuditEntry(
                    time=_ts(e.time),
                    actor=e.actor,
                    action=e.action,
                    target=e.target,
                    details=json.dumps(e.details, sort_keys=True),
                )
                for e in entries
            ]
        )

    def _caller_fingerprint(self, context) -> str:
        peer = self.auth.admin_peer(context)
        return peer.fingerprint if peer is not None else ""

    def ListAdmins(self, request: apb.ListAdminsRequest, context) -> apb.ListAdminsResponse:
        actor = self.auth.admin(context)
        caller = self._caller_fingerprint(context)
        self.registry.audit(actor, "admin.list")
        return apb.ListAdminsResponse(
            admins=[admin_info(a, caller) for a in self.registry.admins()]
        )

    def AddAdmin(self, request: apb.AddAdminRequest, context) -> apb.AdminInfo:
        actor = self.auth.admin(context)
        if not request.certificate_pem:
            raise InvalidRequest("certificate_pem is required (the admin's client.pem)")
        if not self.auth.root_pem:
            raise FailedPrecondition("this aggregator runs without certificates (--insecure)")
        record = admin_pins.pin_admin(
            self.registry, actor, bytes(request.certificate_pem), self.auth.root_pem
        )
        return admin_info(record, self._caller_fingerprint(context))

    def RevokeAdmin(self, request: apb.RevokeAdminRequest, context) -> apb.RevokeAdminResponse:
        actor = self.auth.admin(context)
        if not request.name:
            raise InvalidRequest("name is required")
        caller = self._caller_fingerprint(context)
        revoked = self.registry.revoke_admin(actor, request.name, request.reason, caller)
        return apb.RevokeAdminResponse(revoked=[admin_info(a, caller) for a in revoked])
