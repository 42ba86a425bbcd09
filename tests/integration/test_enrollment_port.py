"""Issue 11, finding 1: the enrollment port (TLS, no client certificate) and its limits
keep an outsider from stalling the federation. Real servers on 127.0.0.1."""

from __future__ import annotations

import grpc
import pytest
from federation_harness import (
    TIMEOUT,
    code_of,
    make_identities,
    make_server,
    open_admin,
    tls_only_channel,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator_service.rpc.rate_limit import peer_address
from client_agent.enrollment import enroll
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport._proto import enrollment_pb2 as epb
from fedmae.transport._proto import enrollment_pb2_grpc as epb_grpc


def test_f1_enrollment_port_serves_enrollment_only_with_small_limits(tmp_path):
    certs, _ = make_identities(tmp_path, [])
    # 0.1 enrollments per second per address: one call, then nothing for 10 s.
    server = make_server(
        tmp_path / "state", certs, 1, 1, server={"enroll_rate": 0.1}, min_participants=1
    )
    server.start()
    channel = tls_only_channel(f"127.0.0.1:{server.enroll_port}", (certs / "ca.pem").read_bytes())
    try:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest()
        assert (
            code_of(lambda: health.Check(check, timeout=TIMEOUT)) == grpc.StatusCode.UNIMPLEMENTED
        )
        admin = apb_grpc.AdminStub(channel)
        status = apb.StatusRequest()
        assert (
            code_of(lambda: admin.Status(status, timeout=TIMEOUT)) == grpc.StatusCode.UNIMPLEMENTED
        )
        enroll = epb_grpc.EnrollmentStub(channel).Enroll
        # Over the message cap (a CSR, a token and a few labels are under 2 KB): refused
        # before it is parsed, and before it counts against the rate.
        huge = epb.EnrollRequest(token="fmt_x", labels={"blob": "x" * (100 << 10)})
        with pytest.raises(grpc.RpcError) as too_big:
            enroll(huge, timeout=TIMEOUT)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        bogus = epb.EnrollRequest(token="fmt_00000000_" + "x" * 43)
        with pytest.raises(grpc.RpcError) as first:
            enroll(bogus, timeout=TIMEOUT)
        assert first.value.code() == grpc.StatusCode.UNAUTHENTICATED  # checked, refused
        with pytest.raises(grpc.RpcError) as second:
            enroll(bogus, timeout=TIMEOUT)
        assert second.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than 0.1 requests per second from 127.0.0.1" in second.value.details()
    finally:
        channel.close()
        server.stop(grace=0)


def test_f1_enroll_waits_out_the_rate_limit(tmp_path, caplog):
    """A script enrolling many devices from one address is slowed down, not refused:
    ``enroll`` waits and tries again on RESOURCE_EXHAUSTED."""
    certs, _ = make_identities(tmp_path, [])
    server = make_server(
        tmp_path / "state", certs, 1, 1, server={"enroll_rate": 2.0}, min_participants=1
    )
    port = server.start()
    admin_channel, admin = open_admin(port, certs)
    ca_pem = (certs / "ca.pem").read_bytes()
    try:
        request = apb.CreateTokenRequest(uses=7, ttl_seconds=600)
        token = admin.CreateToken(request, timeout=TIMEOUT).token
        with caplog.at_level("INFO", logger="client_agent.enrollment"):
            enrolled = {
                enroll(
                    f"127.0.0.1:{server.enroll_port}", ca_pem, token, tmp_path / f"d{i}"
                ).client_id
                for i in range(7)  # a burst of 4 passes, then 2 per second
            }
        assert len(enrolled) == 7
        assert "enrollment port busy" in caplog.text
    finally:
        admin_channel.close()
        server.stop(grace=0)


def test_f1_peer_address_is_the_rate_limit_key():
    assert peer_address("ipv4:203.0.113.7:51234") == "203.0.113.7"
    assert peer_address("ipv6:[2001:db8:1:2:3:4:5:6]:443") == "2001:db8:1:2::/64"
    assert peer_address("ipv6:[::ffff:198.51.100.1]:443") == "198.51.100.1"
    assert peer_address("ipv6:[::1]:50052") == "::/64"
    assert peer_address("unix:/tmp/socket") == "unix:/tmp/socket"
