"""Who may call what once enrolled, over real gRPC/TLS: unknown and foreign certificates,
roles, revocation (before and after an update is folded), the audit log."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch
from federation_harness import (
    TIMEOUT,
    fetch_flat,
    held_upload,
    raised_status,
    random_delta,
    wait_until,
)

from fedmae.pki.issue import init_certs, issue_client
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.transfer import submit_update


def test_unknown_or_foreign_certificates_and_roles(fed):
    f = fed(min_clients=2, min_participants=1)
    # Signed by our CA but never registered (e.g. issued offline without --state-dir).
    loose = issue_client(f.certs.dir, "loose", f.tmp / "loose")
    with pytest.raises(grpc.RpcError) as unknown:
        fetch_flat(f.connect(loose.dir, subscribe=False), f.server.layout, 0)
    assert raised_status(unknown) == grpc.StatusCode.UNAUTHENTICATED
    assert "not registered" in unknown.value.details()
    # Signed by another CA: refused in the handshake.
    other = init_certs(f.tmp / "other")
    foreign = issue_client(other.dir, "loose", f.tmp / "foreign")
    (foreign.dir / "ca.pem").write_bytes(f.ca_pem)
    with pytest.raises(grpc.RpcError) as handshake:
        fetch_flat(f.connect(foreign.dir, subscribe=False), f.server.layout, 0, resume_attempts=0)
    assert raised_status(handshake) == grpc.StatusCode.UNAVAILABLE
    # No certificate at all on the enrollment port: only Enrollment is served there.
    with grpc.secure_channel(f.enroll_addr, grpc.ssl_channel_credentials(f.ca_pem)) as ch:
        from fedmae.transport._proto import federation_pb2_grpc as pb_grpc

        with pytest.raises(grpc.RpcError) as anon:
            request = pb.FetchModelRequest(latest=True)
            list(pb_grpc.FederationStub(ch).FetchModel(request, timeout=TIMEOUT))
        assert raised_status(anon) == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as anon_admin:
            apb_grpc.AdminStub(ch).ListClients(apb.ListClientsRequest(), timeout=TIMEOUT)
        assert raised_status(anon_admin) == grpc.StatusCode.UNIMPLEMENTED
    # A client cannot call Admin; the admin cannot join as a client.
    member = f.connect(f.enroll(f.token(), name="member").identity.dir, subscribe=False)
    with pytest.raises(grpc.RpcError) as not_admin:
        apb_grpc.AdminStub(member.channel).CreateToken(apb.CreateTokenRequest(), timeout=TIMEOUT)
    assert raised_status(not_admin) == grpc.StatusCode.PERMISSION_DENIED
    admin_as_client = f.connect(f.certs.dir / "admin", subscribe=False)
    with pytest.raises(grpc.RpcError) as not_client:
        fetch_flat(admin_as_client, f.server.layout, 0)
    assert raised_status(not_client) == grpc.StatusCode.PERMISSION_DENIED


def test_revoked_client_is_cut_off_and_its_pending_update_dropped(fed):
    f = fed(min_clients=2, rounds=1, min_updates=1, min_participants=1)
    a = f.connect(f.enroll(f.token(), name="a").identity.dir)
    b = f.connect(f.enroll(f.token(), name="b").identity.dir)
    for c in (a, b):
        c.wait_for("task")
    layout = f.server.layout
    theta0 = fetch_flat(a, layout, 0)
    da, db = random_delta(layout, 1), random_delta(layout, 2, scale=1.0)
    release, started = threading.Event(), threading.Event()
    pending = held_upload(b, layout, db, 1, release, started)
    assert started.wait(TIMEOUT)
    wait_until(lambda: "b" in f.server.rounds.status()["uploading"], "b's upload to be held")
    info = f.admin.RevokeClient(
        apb.RevokeClientRequest(client_id="b", reason="device stolen"), timeout=TIMEOUT
    )
    assert info.status == "revoked"
    release.set()
    with pytest.raises(grpc.RpcError) as dropped:
        pending.result()
    assert raised_status(dropped) == grpc.StatusCode.PERMISSION_DENIED
    # b's open event stream was ended with the reason, and its next call is refused.
    with pytest.raises(grpc.RpcError) as next_call:
        fetch_flat(b, layout, 0)
    assert raised_status(next_call) == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in next_call.value.details() and "device stolen" in next_call.value.details()
    # The round closes with a alone (b no longer awaited); b's delta is nowhere in it.
    submit_update(a.stub, layout, da, round_=1, base_version=0, num_samples=5, timeout=TIMEOUT)
    a.wait_for("model_published", version=1)
    np.testing.assert_allclose(fetch_flat(a, layout, 1).numpy(), (theta0 + da).numpy(), atol=1e-6)
    record = f.server.rounds.round_log.read()[-1]
    assert record["participants"] == ["a"]
    assert any(r["client"] == "b" for r in record["rejected"])


def test_revocation_after_aggregation_fails_and_retries_the_round(fed):
    f = fed(min_clients=2, rounds=1, min_updates=1, retry_delay_s=0.1, min_participants=1)
    a = f.connect(f.enroll(f.token(), name="a").identity.dir)
    b = f.connect(f.enroll(f.token(), name="b").identity.dir)
    for x in (a, b):
        assert x.wait_for("task").task.round == 1
    f.connect(f.enroll(f.token(), name="c").identity.dir)  # joins for the retry
    layout = f.server.layout
    theta0 = fetch_flat(a, layout, 0)
    submit_update(b.stub, layout, random_delta(layout, 9, 1.0), round_=1, base_version=0,
                  num_samples=5, timeout=TIMEOUT)  # fmt: skip
    f.admin.RevokeClient(apb.RevokeClientRequest(client_id="b"), timeout=TIMEOUT)
    closed = a.wait_for("round_closed", round=1).round_closed
    assert not closed.success and "revoked after its update was aggregated" in closed.reason
    retry = a.wait_for("task", round=1, attempt=2).task
    assert retry.model_version == 0
    assert torch.equal(fetch_flat(a, layout, None), theta0)  # the latest is still version 0
    assert f.server.rounds.state.selected == ["a", "c"]


def test_admin_actions_and_enrollments_are_audited(fed):
    f = fed(min_participants=1)
    f.enroll(f.token(name="s1"), name="s1")
    f.admin.RevokeClient(apb.RevokeClientRequest(client_id="s1", reason="test"), timeout=TIMEOUT)
    entries = f.admin.Audit(apb.AuditRequest(), timeout=TIMEOUT).entries
    actions = [(e.actor.split(":")[0], e.action, e.target) for e in entries]
    assert ("server", "admin.pin", "admin") == actions[0]  # CERTS/admins, at start
    assert ("admin", "token.create", entries[1].target) == actions[1]
    assert ("token", "client.enroll", "s1") in actions
    assert ("admin", "client.revoke", "s1") in actions
    with pytest.raises(grpc.RpcError) as missing:
        f.admin.RevokeClient(apb.RevokeClientRequest(client_id="ghost"), timeout=TIMEOUT)
    assert raised_status(missing) == grpc.StatusCode.NOT_FOUND
