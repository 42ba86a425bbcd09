"""The Admin service as an operator's client sees it: calls in, ``fedmae.admin_view``
values out, and a refused call raised as a domain error (``fedmae.errors``, its message
``CODE: details``), so the CLI imports neither gRPC nor the generated code."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from fedmae.admin_view import (
    AdminInfo,
    AuditEntry,
    ClientInfo,
    IssuedToken,
    RunStatus,
    SiteProgress,
    TokenInfo,
)
from fedmae.pki.files import ClientIdentity
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport.channels import open_channel
from fedmae.transport.retry import CONNECTION_LOST, RetryPolicy
from fedmae.transport.status import shown_error

# The aggregator away (a restart?): a watch reconnects for as long as it takes; anything
# else ends it with the error.
WATCH_RETRY = RetryPolicy(retry_on=CONNECTION_LOST, initial_s=0.5, max_s=10.0, max_fault_retries=0)
CALL_TIMEOUT_S = 30.0


def _seconds(ts) -> int | None:
    """A protobuf Timestamp -> seconds since the epoch; None for an unset one."""
    return ts.seconds or None


def _token(t: apb.TokenInfo) -> TokenInfo:
    return TokenInfo(
        token_id=t.token_id, name=t.name, created=_seconds(t.created),
        expires=_seconds(t.expires), uses=t.uses, used=t.used, revoked=t.revoked,
        created_by=t.created_by,
    )  # fmt: skip


def _client(c: apb.ClientInfo) -> ClientInfo:
    return ClientInfo(
        client_id=c.client_id, status=c.status, connected=c.connected,
        rounds_joined=c.rounds_joined, serial=c.serial, fingerprint_sha256=c.fingerprint_sha256,
        created=_seconds(c.created), last_seen=_seconds(c.last_seen),
        not_after=_seconds(c.not_after), revoked_at=_seconds(c.revoked_at),
        labels=dict(c.labels), labels_omitted=c.labels_omitted,
    )  # fmt: skip


def _admin(a: apb.AdminInfo) -> AdminInfo:
    return AdminInfo(
        name=a.name, status=a.status, serial=a.serial, fingerprint_sha256=a.fingerprint_sha256,
        created=_seconds(a.created), not_after=_seconds(a.not_after), added_by=a.added_by,
        revoked_at=_seconds(a.revoked_at), revoke_reason=a.revoke_reason, is_caller=a.is_caller,
    )  # fmt: skip


def _status(s: apb.StatusResponse) -> RunStatus:
    return RunStatus(
        state=s.state, round=s.round, attempt=s.attempt, version=s.version,
        rounds_target=s.rounds_target, min_clients=s.min_clients, connected=list(s.connected),
        selected=list(s.selected), reported=list(s.reported), uploading=list(s.uploading),
        round_elapsed_s=s.round_elapsed_s, deadline_in_s=s.deadline_in_s,
        last_record=json.loads(s.last_record_json) if s.last_record_json else None,
        progress={c: SiteProgress(p.step, p.total, p.since_step_s) for c, p in s.progress.items()},
        finish_reason=s.finish_reason,
    )  # fmt: skip


class AdminClient:
    """An operator's connection to one aggregator's Admin service, over mTLS with an
    admin identity. A context manager; ``close()`` ends the connection."""

    def __init__(self, target: str, identity: ClientIdentity):
        self.target = target
        self.identity = identity
        self._channel = open_channel(target, identity)
        self._stub = apb_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as err:
            raise shown_error(err) from err

    def status(self, timeout: float = CALL_TIMEOUT_S) -> RunStatus:
        """One snapshot of the run."""
        return _status(self._call("Status", apb.StatusRequest(), timeout))

    def status_if_reachable(self, timeout: float) -> RunStatus | None:
        """``status()``, or None while the aggregator is away (a connection lost, as a
        watch tolerates it); any other failure is raised."""
        try:
            return _status(self._stub.Status(apb.StatusRequest(), timeout=timeout))
        except grpc.RpcError as err:
            if err.code() in WATCH_RETRY.retry_on:
                return None
            raise shown_error(err) from err

    def create_token(self, name: str = "", ttl_s: int = 0, uses: int = 0) -> IssuedToken:
        """A one-time enrollment token (``name``: bound to that client id; 0 = the
        server's default ttl and one use)."""
        request = apb.CreateTokenRequest(name=name, ttl_seconds=ttl_s, uses=uses)
        resp = self._call("CreateToken", request)
        return IssuedToken(token=resp.token, info=_token(resp.info))

    def list_tokens(self, include_inactive: bool = False) -> list[TokenInfo]:
        """The usable tokens (``include_inactive``: also expired, used-up and revoked)."""
        resp = self._call("ListTokens", apb.ListTokensRequest(include_inactive=include_inactive))
        return [_token(t) for t in resp.tokens]

    def revoke_token(self, token_id: str) -> TokenInfo:
        return _token(self._call("RevokeToken", apb.RevokeTokenRequest(token_id=token_id)))

    def list_clients(self) -> list[ClientInfo]:
        """Every client, a page per call (one response never nears the message cap)."""
        clients: list[ClientInfo] = []
        token = ""
        while True:
            resp = self._call("ListClients", apb.ListClientsRequest(page_token=token))
            clients.extend(_client(c) for c in resp.clients)
            token = resp.next_page_token
            if not token:
                return clients

    def get_client(self, client_id: str) -> ClientInfo:
        return _client(self._call("GetClient", apb.GetClientRequest(client_id=client_id)))

    def revoke_client(self, client_id: str, reason: str = "") -> ClientInfo:
        """Revoke a client: refused from its next call on, disconnected now."""
        request = apb.RevokeClientRequest(client_id=client_id, reason=reason)
        return _client(self._call("RevokeClient", request))

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        """The newest ``limit`` entries of the audit log."""
        resp = self._call("Audit", apb.AuditRequest(limit=limit))
        return [
            AuditEntry(time=_seconds(e.time), actor=e.actor, action=e.action, target=e.target,
                       details=e.details)
            for e in resp.entries
        ]  # fmt: skip

    def list_admins(self) -> list[AdminInfo]:
        """Every pinned admin certificate, active and revoked."""
        return [_admin(a) for a in self._call("ListAdmins", apb.ListAdminsRequest()).admins]

    def add_admin(self, certificate_pem: bytes) -> AdminInfo:
        """Pin another admin's certificate (the public part only)."""
        return _admin(self._call("AddAdmin", apb.AddAdminRequest(certificate_pem=certificate_pem)))

    def revoke_admin(self, name: str, reason: str = "") -> list[AdminInfo]:
        """Revoke every certificate of the admin ``name``; the ones revoked."""
        resp = self._call("RevokeAdmin", apb.RevokeAdminRequest(name=name, reason=reason))
        return [_admin(a) for a in resp.revoked]

    def watch_rounds(
        self, from_round: int = 0, stop: threading.Event | None = None
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(seq, record)`` for every closed round from ``from_round`` on (0 = all),
        then each as it closes, until the run has finished or ``stop`` is set. While the
        aggregator restarts it reconnects (``WATCH_RETRY``) and resumes after the last
        record it gave; any other failure is raised as a domain error."""
        stop = stop or threading.Event()
        after_seq = 0
        retries = WATCH_RETRY.start(stop)
        while not stop.is_set():
            try:
                # A fresh channel each try: one that saw the server go backs off its
                # reconnects for up to minutes.
                with open_channel(self.target, self.identity) as channel:
                    request = apb.WatchRoundsRequest(
                        from_round=from_round, after_seq=after_seq, follow=True
                    )
                    for msg in apb_grpc.AdminStub(channel).WatchRounds(request):
                        retries.reset()
                        after_seq = msg.seq
                        yield msg.seq, json.loads(msg.record_json)
                        if stop.is_set():
                            return
                return  # the stream ended normally: the run finished
            except grpc.RpcError as err:
                decision = retries.decide(err)
                if not decision.retry:
                    raise shown_error(err) from err
                retries.wait(decision.delay_s)  # then resume after the last record
