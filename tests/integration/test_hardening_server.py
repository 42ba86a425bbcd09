"""Issue 11, findings 1, 6 (connection age) and 13: what each port serves, and the limits
that keep an outsider from stalling the federation. Real servers on 127.0.0.1 over TLS."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from federation_harness import (
    TIMEOUT,
    ScriptedClient,
    code_of,
    make_identities,
    make_server,
    open_admin,
    random_delta,
    tls_only_channel,
    wait_until,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aggregator_service.config import ServerConfig
from client_agent.agent import AgentConfig, ClientAgent
from fedmae.errors import ConfigError
from fedmae.ml.fashion_mnist import load_fashion_mnist
from fedmae.ml.partitions import client_split
from fedmae.pki.files import ServerCerts
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport.transfer import submit_update


def _services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)
    return {s.name for r in responses for s in r.list_services_response.service}


@pytest.mark.parametrize("reflection", [False, True])
def test_f1_reflection_only_when_asked_and_only_on_the_mtls_port(tmp_path, reflection):
    certs, ids = make_identities(tmp_path, ["a"])
    server = make_server(
        tmp_path / "state", certs, 2, 1, server={"reflection": reflection}, min_participants=1
    )
    port = server.start()
    client = ScriptedClient(port, ids["a"], subscribe=False)
    outsider = tls_only_channel(f"127.0.0.1:{server.enroll_port}", (certs / "ca.pem").read_bytes())
    try:
        if reflection:
            assert _services(client.channel) == {
                "fedmae.v1.Federation", "fedmae.v1.Admin", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }  # fmt: skip
        else:
            assert code_of(lambda: _services(client.channel)) == grpc.StatusCode.UNIMPLEMENTED
        assert code_of(lambda: _services(outsider)) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        client.close()
        outsider.close()
        server.stop(grace=0)


def test_f1_agent_backs_off_while_the_server_is_at_its_call_limit(tmp_path):
    """``--max-workers`` calls at once on the mTLS port; one more gets RESOURCE_EXHAUSTED
    at once (instead of waiting forever behind long streams). The agent takes that as
    "busy": it backs off and joins once a call ends, instead of giving up."""
    certs, ids = make_identities(tmp_path, ["s1"])
    server = make_server(
        tmp_path / "state", certs, 1, 1, server={"max_workers": 3}, min_participants=1
    )
    port = server.start()
    admin_channel, admin = open_admin(port, certs)
    watches = [
        admin.WatchRounds(apb.WatchRoundsRequest(follow=True), timeout=TIMEOUT) for _ in range(3)
    ]
    status_file = tmp_path / "agent.json"
    agent = ClientAgent(
        AgentConfig(
            server=f"127.0.0.1:{port}", identity=ids["s1"], backoff_initial_s=0.1,
            backoff_max_s=0.5, give_up_after_s=60, status_file=status_file,
            overrides={"batch_size": 32},
        ),
        client_split(load_fashion_mnist(), 0, 1, seed=0, limit=100),
    )  # fmt: skip
    rc: list[int] = []
    thread = threading.Thread(target=lambda: rc.append(agent.run()), daemon=True)
    try:

        def turned_away():
            try:
                admin.Status(apb.StatusRequest(), timeout=TIMEOUT)
            except grpc.RpcError as err:
                return err.code()
            return None  # the watches have not all reached the server yet

        # The three watches hold every call the server takes.
        assert wait_until(turned_away, "a full server") == grpc.StatusCode.RESOURCE_EXHAUSTED
        thread.start()

        def backing_off():
            try:
                state = json.loads(status_file.read_text())
            except (OSError, ValueError):
                return False
            return state["state"] == "reconnecting" and state["error"] == "RESOURCE_EXHAUSTED"

        wait_until(lambda: backing_off() or rc, "the agent to be turned away")
        assert rc == []  # still trying
        for w in watches:
            w.cancel()
        assert server.wait(timeout=120), "the round did not finish"
        thread.join(timeout=30)
        assert rc == [0] and agent.rounds_done == 1
    finally:
        agent.stop()
        for w in watches:
            w.cancel()
        admin_channel.close()
        server.stop(grace=0)


def _short_lived_identity(certs: Path, name: str, seconds: float) -> grpc.ChannelCredentials:
    ca_cert = x509.load_pem_x509_certificate(ServerCerts(certs).root_pem())
    ca_key = serialization.load_pem_private_key(ServerCerts(certs).ca_key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(seconds=seconds))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    return grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_chain=cert.public_bytes(serialization.Encoding.PEM),
    )


def test_f6_connection_age_makes_callers_handshake_again_without_cutting_a_round(tmp_path):
    """A connection made with a certificate that then expires is retired after
    ``max_connection_age_s``: the next call needs a new TLS handshake, which the expired
    certificate fails. (Health is outside the authorizer: only the handshake can refuse
    it.) Calls already running are not cut: the subscribed client's event stream, older
    than the age, still delivers its round."""
    certs, ids = make_identities(tmp_path, ["a"])
    server = make_server(
        tmp_path / "state", certs, 1, 1, server={"max_connection_age_s": 1.0}, min_participants=1
    )
    port = server.start()
    client = channel = None
    try:
        client = ScriptedClient(port, ids["a"])
        task = client.wait_for("task").task
        expires = time.time() + 4
        channel = grpc.secure_channel(f"127.0.0.1:{port}", _short_lived_identity(certs, "brief", 4))
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="fedmae.v1.Federation")
        assert (
            health.Check(request, timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING
        )

        def refused():
            try:
                health.Check(request, timeout=TIMEOUT)
            except grpc.RpcError as err:
                return err.code()
            return None

        assert wait_until(refused, "a new handshake", every=0.2) == grpc.StatusCode.UNAVAILABLE
        assert time.time() >= expires - 1  # refused for its expiry, not before
        submit_update(
            client.stub, server.layout, random_delta(server.layout, 1), round_=1,
            base_version=task.model_version, num_samples=5, timeout=TIMEOUT,
        )  # fmt: skip
        client.wait_for("model_published", version=1)  # on the stream opened before
    finally:
        if channel is not None:
            channel.close()
        if client is not None:
            client.close()
        server.stop(grace=0)


@pytest.mark.parametrize(
    "listen, ok",
    [
        ("127.0.0.1:0", True),
        ("127.8.9.10:50051", True),
        ("[::1]:0", True),
        ("localhost:0", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("192.168.1.20:50051", False),
        ("fl.example.org:50051", False),
    ],
)
def test_f13_insecure_listens_on_loopback_only(tmp_path, listen, ok):
    def config():
        return ServerConfig(state_dir=tmp_path, listen=listen, insecure=True)

    if ok:
        assert config().insecure
    else:
        with pytest.raises(ConfigError, match="loopback"):
            config()
    ServerConfig(state_dir=tmp_path, listen=listen)  # any address with mTLS


def test_f13_insecure_mode_serves_no_admin(tmp_path):
    server = make_server(
        tmp_path / "state", tmp_path / "certs", 1, 1, server={"insecure": True}, min_participants=1
    )
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        admin = apb_grpc.AdminStub(channel)
        for call in (
            lambda: admin.Status(apb.StatusRequest(), timeout=TIMEOUT),
            lambda: admin.CreateToken(apb.CreateTokenRequest(), timeout=TIMEOUT),
            lambda: admin.ListClients(apb.ListClientsRequest(), timeout=TIMEOUT),
        ):
            assert code_of(call) == grpc.StatusCode.UNIMPLEMENTED
        assert server.enroll_port is None
    finally:
        channel.close()
        server.stop(grace=0)


def test_round_is_logged_before_it_is_announced(tmp_path):
    """Whoever hears of version N (ModelPublished, RoundClosed, Status) finds round N in
    rounds.jsonl: the line is written (fsynced) before the events go out."""
    certs, ids = make_identities(tmp_path, ["a"])
    server = make_server(tmp_path / "state", certs, 1, 1, min_participants=1)
    order: list[str] = []
    rounds = server.rounds
    append, send = rounds.round_log.append, rounds.subscribers.send

    def logged(record):
        append(record)
        order.append(f"logged round {record['round']}")

    def announced(event, to=None):
        order.append(f"announced {event.kind}")
        send(event, to)

    rounds.round_log.append, rounds.subscribers.send = logged, announced
    port = server.start()
    client = ScriptedClient(port, ids["a"])
    try:
        task = client.wait_for("task").task
        submit_update(
            client.stub, server.layout, random_delta(server.layout, 1), round_=1,
            base_version=task.model_version, num_samples=5, timeout=TIMEOUT,
        )  # fmt: skip
        client.wait_for("model_published", version=1)
        assert [r["round"] for r in rounds.round_log.read()] == [1]
        logged = order.index("logged round 1")
        assert logged < order.index("announced model_published")
        assert logged < order.index("announced round_closed")
    finally:
        client.close()
        server.stop(grace=0)
