"""Enrollment, registry, authorization and the Admin service over real gRPC/TLS."""

from __future__ import annotations

import sqlite3
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from federation_harness import (
    TIMEOUT,
    ScriptedClient,
    fetch_flat,
    held_upload,
    make_server,
    random_delta,
    wait_until,
)

from aggregator_service.registry import Registry
from aggregator_service.registry.schema import MIGRATIONS
from client_agent.enrollment import enroll
from client_agent.transfer import submit_update
from fedmae.errors import ConfigError
from fedmae.pki.ca import CertificateAuthority, make_key_and_csr
from fedmae.pki.files import ClientIdentity, save_identity
from fedmae.pki.issue import init_certs, issue_client
from fedmae.pki.peer import certificate_info
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport._proto import enrollment_pb2 as epb
from fedmae.transport._proto import enrollment_pb2_grpc as epb_grpc
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.credentials import channel_credentials


class Fed:
    """A running aggregator (no pre-registered clients) and the operator's admin stub."""

    def __init__(self, tmp_path, min_clients=1, rounds=1, **policy):
        self.tmp = tmp_path
        self.certs = init_certs(tmp_path / "certs")
        self.server = make_server(tmp_path / "state", self.certs.dir, min_clients, rounds, **policy)
        self.port = self.server.start()
        self.enroll_addr = f"127.0.0.1:{self.server.enroll_port}"
        self.admin_channel = grpc.secure_channel(
            f"127.0.0.1:{self.port}",
            channel_credentials(ClientIdentity(self.certs.dir / "admin")),
        )
        self.admin = apb_grpc.AdminStub(self.admin_channel)
        self.ca_pem = self.certs.ca_cert.read_bytes()
        self.clients: list[ScriptedClient] = []

    def token(self, name: str = "", ttl: int = 3600, uses: int = 1) -> str:
        req = apb.CreateTokenRequest(name=name, ttl_seconds=ttl, uses=uses)
        return self.admin.CreateToken(req, timeout=TIMEOUT).token

    def enroll(self, token: str, name: str = "", out: str | None = None):
        return enroll(self.enroll_addr, self.ca_pem, token, self.tmp / "ids" / (out or name or
                      "anon"), name=name)  # fmt: skip

    def connect(self, identity_dir, subscribe=True) -> ScriptedClient:
        client = ScriptedClient(self.port, identity_dir, subscribe=subscribe)
        self.clients.append(client)
        return client

    def close(self):
        for c in self.clients:
            c.close()
        self.admin_channel.close()
        self.server.stop(grace=0)


@pytest.fixture
def fed(tmp_path):
    made = []

    def start(**kwargs) -> Fed:
        made.append(Fed(tmp_path, **kwargs))
        return made[-1]

    yield start
    for f in made:
        f.close()


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


def test_enrolled_client_completes_a_round(fed):
    f = fed(min_clients=1, rounds=1)
    result = f.enroll(f.token(), name="hospital-a")
    assert result.client_id == "hospital-a" and not result.renewed
    assert oct((result.identity.key).stat().st_mode & 0o777) == "0o600"
    client = f.connect(result.identity.dir)
    task = client.wait_for("task").task
    layout = f.server.layout
    theta0 = fetch_flat(client, layout, 0)
    delta = random_delta(layout, 1)
    submit_update(
        client.stub, layout, delta, round_=task.round, base_version=0, num_samples=7,
        timeout=TIMEOUT,
    )  # fmt: skip
    client.wait_for("run_finished")
    np.testing.assert_allclose(
        fetch_flat(client, layout, 1).numpy(), (theta0 + delta).numpy(), atol=1e-6
    )
    info = f.admin.GetClient(apb.GetClientRequest(client_id="hospital-a"), timeout=TIMEOUT)
    assert info.status == "active" and info.rounds_joined == 1
    assert (
        info.fingerprint_sha256 == certificate_info(result.identity.cert.read_bytes()).fingerprint
    )


def test_token_reuse_expiry_and_unknown_are_refused(fed):
    f = fed()
    once = f.token()
    f.enroll(once, out="first")
    with pytest.raises(grpc.RpcError) as reused:
        f.enroll(once, out="second")
    assert _code(reused) == grpc.StatusCode.UNAUTHENTICATED
    assert "used up" in reused.value.details()

    short = f.token(ttl=60)
    f.server.registry.clock = lambda: time.time() + 61  # a minute later, for the registry
    with pytest.raises(grpc.RpcError) as expired:
        f.enroll(short, out="late")
    f.server.registry.clock = time.time
    assert _code(expired) == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in expired.value.details()

    with pytest.raises(grpc.RpcError) as unknown:
        f.enroll("fmt_00000000_" + "x" * 43, out="guess")
    assert _code(unknown) == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown enrollment token" in unknown.value.details()

    revoked = f.admin.CreateToken(apb.CreateTokenRequest(), timeout=TIMEOUT)
    f.admin.RevokeToken(apb.RevokeTokenRequest(token_id=revoked.info.token_id), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as rv:
        f.enroll(revoked.token, out="rv")
    assert _code(rv) == grpc.StatusCode.UNAUTHENTICATED and "revoked" in rv.value.details()
    # A token with two uses enrolls two devices, then no more.
    two = f.token(uses=2)
    assert f.enroll(two, out="d1").client_id != f.enroll(two, out="d2").client_id
    with pytest.raises(grpc.RpcError):
        f.enroll(two, out="d3")
    # Nothing refused left a client behind: the first enrollment and the two devices.
    listed = f.admin.ListClients(apb.ListClientsRequest(), timeout=TIMEOUT).clients
    assert len(listed) == 3


def test_the_token_store_keeps_only_hashes(fed):
    f = fed()
    token = f.token(name="site-x")
    db = sqlite3.connect(f.server.registry.path)
    dump = "\n".join(db.iterdump())
    db.close()
    prefix, token_id, secret = token.split("_", 2)  # fmt_<id>_<secret>: the id has no "_"
    assert prefix == "fmt" and len(secret) >= 43
    assert token not in dump and secret not in dump


def _enroll_raw(f: Fed, token: str, csr_pem: bytes, name: str = ""):
    with grpc.secure_channel(f.enroll_addr, grpc.ssl_channel_credentials(f.ca_pem)) as ch:
        return epb_grpc.EnrollmentStub(ch).Enroll(
            epb.EnrollRequest(token=token, csr_pem=csr_pem, requested_name=name), timeout=TIMEOUT
        )


def test_forged_names_and_bad_csrs_are_refused(fed):
    f = fed()
    bound = f.token(name="hospital-a", uses=5)
    with pytest.raises(grpc.RpcError) as other_name:
        f.enroll(bound, name="hospital-b")
    assert _code(other_name) == grpc.StatusCode.PERMISSION_DENIED
    assert "hospital-a" in other_name.value.details()

    _, csr_b = make_key_and_csr("hospital-b")  # CSR claims another name
    with pytest.raises(grpc.RpcError) as csr_name:
        _enroll_raw(f, bound, csr_b)
    assert _code(csr_name) == grpc.StatusCode.INVALID_ARGUMENT
    assert "asks for the name" in csr_name.value.details()

    # A CSR whose signature does not match its public key (not signed by its key).
    _, good = make_key_and_csr("hospital-a")
    csr = x509.load_pem_x509_csr(good)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # inside the signature value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(grpc.RpcError) as badsig:
        _enroll_raw(f, bound, tampered)
    assert _code(badsig) == grpc.StatusCode.INVALID_ARGUMENT
    assert "signature" in badsig.value.details()

    with pytest.raises(grpc.RpcError) as garbage:
        _enroll_raw(f, bound, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
    assert _code(garbage) == grpc.StatusCode.INVALID_ARGUMENT

    # A CSR asking for the admin role gets a plain client certificate.
    key = ec.generate_private_key(ec.SECP256R1())
    sneaky = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "hospital-a"),
                ]
            )
        )  # fmt: skip
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    resp = _enroll_raw(f, bound, sneaky.public_bytes(serialization.Encoding.PEM))
    cert = x509.load_pem_x509_certificate(resp.certificate_pem)
    assert not cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # ... and cannot use the Admin service with it.
    ident = save_identity(
        f.tmp / "sneaky",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),  # fmt: skip
        resp.certificate_pem,
        f.ca_pem,
    )
    with grpc.secure_channel(f"127.0.0.1:{f.port}", channel_credentials(ident)) as ch:
        with pytest.raises(grpc.RpcError) as denied:
            apb_grpc.AdminStub(ch).ListClients(apb.ListClientsRequest(), timeout=TIMEOUT)
    assert _code(denied) == grpc.StatusCode.PERMISSION_DENIED


def test_enrollment_response_never_carries_the_ca_key(fed):
    f = fed()
    _, csr = make_key_and_csr("site-1")
    resp = _enroll_raw(f, f.token(), csr, name="site-1")
    wire = resp.SerializeToString()
    assert b"PRIVATE KEY" not in wire
    for key_file in (f.certs.ca_key, f.certs.enrollment_ca_key):
        ca_key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        secret = ca_key.private_numbers().private_value.to_bytes(32, "big")
        assert key_file.read_bytes() not in wire and secret not in wire
    assert resp.ca_certificate_pem == f.ca_pem
    # The certificate, then the enrollment CA that signed it (which the root signed).
    cert, enrollment_ca = x509.load_pem_x509_certificates(resp.certificate_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-1"
    cert.verify_directly_issued_by(enrollment_ca)
    enrollment_ca.verify_directly_issued_by(x509.load_pem_x509_certificate(f.ca_pem))


def test_renewal_needs_a_bound_token_and_replaces_the_old_certificate(fed):
    f = fed(min_clients=2)  # no round starts: only authorization is exercised
    first = f.enroll(f.token(), name="lab-1", out="lab-1-old")
    with pytest.raises(grpc.RpcError) as taken:
        f.enroll(f.token(), name="lab-1", out="thief")  # unbound token, existing name
    assert _code(taken) == grpc.StatusCode.ALREADY_EXISTS
    old = f.connect(first.identity.dir, subscribe=False)
    fetch_flat(old, f.server.layout, 0)  # the old certificate works ...
    renewed = f.enroll(f.token(name="lab-1"), name="lab-1", out="lab-1-new")
    assert renewed.renewed and renewed.client_id == "lab-1"
    with pytest.raises(grpc.RpcError) as replaced:
        fetch_flat(old, f.server.layout, 0)  # ... until it is replaced
    assert _code(replaced) == grpc.StatusCode.UNAUTHENTICATED
    assert "replaced" in replaced.value.details()
    fetch_flat(f.connect(renewed.identity.dir, subscribe=False), f.server.layout, 0)


def test_unknown_or_foreign_certificates_and_roles(fed):
    f = fed(min_clients=2)
    # Signed by our CA but never registered (e.g. issued offline without --state-dir).
    loose = issue_client(f.certs.dir, "loose", f.tmp / "loose")
    with pytest.raises(grpc.RpcError) as unknown:
        fetch_flat(f.connect(loose.dir, subscribe=False), f.server.layout, 0)
    assert _code(unknown) == grpc.StatusCode.UNAUTHENTICATED
    assert "not registered" in unknown.value.details()
    # Signed by another CA: refused in the handshake.
    other = init_certs(f.tmp / "other")
    foreign = issue_client(other.dir, "loose", f.tmp / "foreign")
    (foreign.dir / "ca.pem").write_bytes(f.ca_pem)
    with pytest.raises(grpc.RpcError) as handshake:
        fetch_flat(f.connect(foreign.dir, subscribe=False), f.server.layout, 0)
    assert _code(handshake) == grpc.StatusCode.UNAVAILABLE
    # No certificate at all on the enrollment port: only Enrollment is served there.
    with grpc.secure_channel(f.enroll_addr, grpc.ssl_channel_credentials(f.ca_pem)) as ch:
        from fedmae.transport._proto import federation_pb2_grpc as pb_grpc

        with pytest.raises(grpc.RpcError) as anon:
            request = pb.FetchModelRequest(latest=True)
            list(pb_grpc.FederationStub(ch).FetchModel(request, timeout=TIMEOUT))
        assert _code(anon) == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as anon_admin:
            apb_grpc.AdminStub(ch).ListClients(apb.ListClientsRequest(), timeout=TIMEOUT)
        assert _code(anon_admin) == grpc.StatusCode.UNIMPLEMENTED
    # A client cannot call Admin; the admin cannot join as a client.
    member = f.connect(f.enroll(f.token(), name="member").identity.dir, subscribe=False)
    with pytest.raises(grpc.RpcError) as not_admin:
        apb_grpc.AdminStub(member.channel).CreateToken(apb.CreateTokenRequest(), timeout=TIMEOUT)
    assert _code(not_admin) == grpc.StatusCode.PERMISSION_DENIED
    admin_as_client = f.connect(f.certs.dir / "admin", subscribe=False)
    with pytest.raises(grpc.RpcError) as not_client:
        fetch_flat(admin_as_client, f.server.layout, 0)
    assert _code(not_client) == grpc.StatusCode.PERMISSION_DENIED


def test_revoked_client_is_cut_off_and_its_pending_update_dropped(fed):
    f = fed(min_clients=2, rounds=1, min_updates=1)
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
    assert _code(dropped) == grpc.StatusCode.PERMISSION_DENIED
    # b's open event stream was ended with the reason, and its next call is refused.
    with pytest.raises(grpc.RpcError) as next_call:
        fetch_flat(b, layout, 0)
    assert _code(next_call) == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in next_call.value.details() and "device stolen" in next_call.value.details()
    # The round closes with a alone (b no longer awaited); b's delta is nowhere in it.
    submit_update(a.stub, layout, da, round_=1, base_version=0, num_samples=5, timeout=TIMEOUT)
    a.wait_for("model_published", version=1)
    np.testing.assert_allclose(fetch_flat(a, layout, 1).numpy(), (theta0 + da).numpy(), atol=1e-6)
    record = f.server.rounds.round_log.read()[-1]
    assert record["participants"] == ["a"]
    assert any(r["client"] == "b" for r in record["rejected"])


def test_revocation_after_aggregation_fails_and_retries_the_round(fed):
    f = fed(min_clients=2, rounds=1, min_updates=1, retry_delay_s=0.1)
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
    f = fed()
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
    assert _code(missing) == grpc.StatusCode.NOT_FOUND


def test_ca_key_permissions_and_separate_path(tmp_path):
    certs = init_certs(tmp_path / "certs")
    certs.enrollment_ca_key.chmod(0o644)  # the key the aggregator signs enrollments with
    with pytest.raises(ConfigError, match="chmod 600"):
        make_server(tmp_path / "state", certs.dir, 1, 1)
    certs.enrollment_ca_key.unlink()  # a CERTS made before the enrollment CA: the root signs
    certs.ca_key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        make_server(tmp_path / "state", certs.dir, 1, 1)
    outside = tmp_path / "vault" / "ca.key"
    outside.parent.mkdir()
    certs.ca_key.rename(outside)
    outside.chmod(0o600)
    ca = CertificateAuthority(certs, key_path=outside)
    _, csr = make_key_and_csr("x1")
    assert b"CERTIFICATE" in ca.sign_csr(csr, "x1", 30).pem
    wrong = init_certs(tmp_path / "other").ca_key
    with pytest.raises(ConfigError, match="not the key of the CA"):
        CertificateAuthority(certs, key_path=wrong)


def test_registry_schema_is_versioned(tmp_path):
    path = tmp_path / "fedmae.db"
    Registry(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="newer than this fedmae"):
        Registry(path)
