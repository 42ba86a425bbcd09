"""Who may call (issue 11: #4 admins are pinned and revocable, #6 expiry is checked on every
call). Real certificates, a real aggregator on 127.0.0.1 over mTLS, real SQLite."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from cryptography import x509
from federation_harness import (
    TIMEOUT,
    admin_call_error,
    identity_channel,
    make_identities,
    make_server,
)

from aggregator_service.registry import Registry
from fedmae.cli.main import main
from fedmae.errors import FailedPrecondition
from fedmae.pki.issue import issue_admin, issue_client
from fedmae.pki.peer import certificate_info
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.transfer import federation_stub, fetch_model

# ---------------------------------------------------------------- #4: admins are pinned


@pytest.fixture
def admin_server(tmp_path):
    certs, _ = make_identities(tmp_path, [])
    servers = []

    def start():
        servers.append(
            make_server(tmp_path / "state", certs, min_clients=2, rounds=1, min_participants=1)
        )
        return servers[-1], servers[-1].start()

    yield certs, start
    for s in servers:
        s.stop(grace=0)


def test_f4_an_unpinned_admin_certificate_is_refused(tmp_path, admin_server):
    certs, start = admin_server
    # Signed by the federation's CA with OU=admin, but never pinned.
    rogue = issue_client(certs, "mallory", tmp_path / "mallory", role="admin")
    _, port = start()
    assert admin_call_error(port, certs / "admin") is None
    refused = admin_call_error(port, rogue.dir)
    assert refused is not None and refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not pinned" in refused.details()


def test_f4_a_revoked_admin_is_refused_on_its_next_call(tmp_path, admin_server, capsys):
    certs, start = admin_server
    _, port = start()
    cli = ["--server", f"127.0.0.1:{port}", "--identity", str(certs / "admin")]
    assert main(["certs", "issue-admin", "--certs", str(certs), "--name", "bob",
                 "--out", str(tmp_path / "bob")]) == 0  # fmt: skip
    bob = tmp_path / "bob"
    assert admin_call_error(port, bob) is not None  # issued, but not pinned until added
    assert main(["admins", "add", "--cert", str(bob / "client.pem"), *cli]) == 0
    with identity_channel(port, bob) as bob_channel:
        bob_stub = apb_grpc.AdminStub(bob_channel)
        listed = bob_stub.ListAdmins(apb.ListAdminsRequest(), timeout=TIMEOUT).admins
        assert {(a.name, a.status, a.is_caller) for a in listed} == {
            ("admin", "active", False),
            ("bob", "active", True),
        }
        with pytest.raises(grpc.RpcError) as self_revoke:
            bob_stub.RevokeAdmin(apb.RevokeAdminRequest(name="bob"), timeout=TIMEOUT)
        assert self_revoke.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "your own" in self_revoke.value.details()
        assert main(["admins", "revoke", "bob", "--reason", "left the team", *cli]) == 0
        # The same open connection: refused from the next call on, no restart.
        with pytest.raises(grpc.RpcError) as revoked:
            bob_stub.Status(apb.StatusRequest(), timeout=TIMEOUT)
    assert revoked.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked (left the team)" in revoked.value.details()
    capsys.readouterr()
    assert main(["admins", "list", *cli]) == 0
    out = capsys.readouterr().out
    assert "admin (you)" in out and "left the team" in out
    assert main(["audit", "--json", *cli]) == 0
    actions = capsys.readouterr().out
    assert '"action": "admin.pin"' in actions and '"action": "admin.revoke"' in actions
    # Pinning a revoked certificate again is refused too.
    assert main(["admins", "add", "--cert", str(bob / "client.pem"), *cli]) == 2


def test_f4_pins_survive_a_restart_and_a_revoked_admin_is_never_repinned(tmp_path, admin_server):
    certs, start = admin_server
    issue_admin(certs, "bob", tmp_path / "bob")  # CERTS/admins/bob.pem: pinned at start
    server, port = start()
    assert admin_call_error(port, tmp_path / "bob") is None
    with identity_channel(port, certs / "admin") as ch:
        apb_grpc.AdminStub(ch).RevokeAdmin(
            apb.RevokeAdminRequest(name="bob", reason="key lost"), timeout=TIMEOUT
        )
    server.stop(grace=0)
    _, port = start()  # CERTS/admins/bob.pem is still there
    refused = admin_call_error(port, tmp_path / "bob")
    assert refused is not None and refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert admin_call_error(port, certs / "admin") is None


def test_f4_the_last_admin_cannot_be_revoked(tmp_path):
    registry = Registry(tmp_path / "fedmae.db")
    registry.pin_admin("test", "root-op", "ab" * 32, "1", time.time() + 3600)
    with pytest.raises(FailedPrecondition, match="last active admin"):
        registry.revoke_admin("insecure-admin", "root-op", "", caller_fingerprint="")
    registry.close()


# ---------------------------------------------------------------- #6: expiry on every call


def test_f6_an_expired_certificate_ends_the_stream(tmp_path):
    certs, _ = make_identities(tmp_path, [])
    short = issue_client(certs, "short", tmp_path / "short", days=600 / 86400)  # 10 min
    info = certificate_info(short.cert.read_bytes())
    registry = Registry(tmp_path / "state" / "fedmae.db")
    registry.register("test", "short", info.fingerprint, info.serial, info.not_after)
    registry.close()
    server = make_server(
        tmp_path / "state", certs, min_clients=2, rounds=1, min_participants=1
    )  # heartbeats 1 s
    port = server.start()
    events: queue.Queue = queue.Queue()
    try:
        with identity_channel(port, short.dir) as ch:
            call = federation_stub(ch).Subscribe(pb.SubscribeRequest(agent_version="test"))

            def pump():
                try:
                    for event in call:
                        events.put(event)
                except grpc.RpcError as err:
                    events.put(err)

            threading.Thread(target=pump, daemon=True).start()
            assert isinstance(events.get(timeout=TIMEOUT), pb.RoundEvent)  # streaming
            # The clock passes not_after: the next heartbeat check ends the stream.
            server.auth.clock = lambda: info.not_after + 1
            deadline = time.monotonic() + TIMEOUT
            while not isinstance(item := events.get(timeout=TIMEOUT), grpc.RpcError):
                assert time.monotonic() < deadline, "the stream kept going"
            assert item.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "expired at" in item.details() and "renew it" in item.details()
            # A new call is refused at once, an admin's too.
            with pytest.raises(grpc.RpcError) as fetch:
                fetch_model(federation_stub(ch), server.layout, 0, timeout=TIMEOUT)
            assert fetch.value.code() == grpc.StatusCode.UNAUTHENTICATED
        admin_not_after = x509.load_pem_x509_certificate(
            (certs / "admin" / "client.pem").read_bytes()
        ).not_valid_after_utc.timestamp()
        server.auth.clock = lambda: admin_not_after + 1
        expired = admin_call_error(port, certs / "admin")
        assert expired is not None and expired.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired at" in expired.details()
    finally:
        server.stop(grace=0)
