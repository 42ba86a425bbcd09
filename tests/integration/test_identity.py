"""The PKI and who may call what (issue 11: #4 admins, #5 CA key, #6 expiry, #7 files).

Real certificates, a real aggregator on 127.0.0.1 over mTLS, real SQLite.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from federation_harness import (
    TIMEOUT,
    admin_call_error,
    identity_channel,
    make_identities,
    make_server,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aggregator_service.round_log import RoundLog
from client_agent.enrollment import enroll
from fedmae.cli.main import main
from fedmae.pki.ca import CertificateAuthority, make_key_and_csr
from fedmae.pki.issue import init_certs, issue_client
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport.transfer import federation_stub, fetch_model


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def umask_022():
    """The usual umask, so a file's mode shows what the code chose, not the environment."""
    old = os.umask(0o022)
    yield
    os.umask(old)


# ---------------------------------------------------------------- #5: the CA key, the enrollment CA


def test_f5_certs_init_with_signer_keeps_the_root_key_out_of_certs(tmp_path, umask_022):
    certs, signer, admin = tmp_path / "certs", tmp_path / "signer", tmp_path / "admin"
    argv = ["certs", "init", "--out", str(certs), "--signer", str(signer),
            "--admin-out", str(admin), "--host", "fl.example.org"]  # fmt: skip
    assert main(argv) == 0
    root_value = (
        serialization.load_pem_private_key((signer / "ca.key").read_bytes(), None)
        .private_numbers()
        .private_value
    )
    for path in certs.rglob("*"):  # no copy of the root key anywhere the aggregator mounts
        assert path.name != "ca.key"
        if path.is_file():
            assert root_value.to_bytes(32, "big") not in path.read_bytes()
        if path.suffix == ".key":
            key = serialization.load_pem_private_key(path.read_bytes(), None)
            assert key.private_numbers().private_value != root_value, path
    assert _mode(signer) == 0o700 and _mode(signer / "ca.key") == 0o600
    assert not (certs / "admin").exists() and (admin / "client.key").exists()
    assert (certs / "admins" / "admin.pem").read_bytes() == (admin / "client.pem").read_bytes()
    health_cert = _cert(certs / "health" / "client.pem")
    ou = health_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert ou[0].value == "health"

    root, enrollment = _cert(certs / "ca.pem"), _cert(certs / "enrollment-ca.pem")
    enrollment.verify_directly_issued_by(root)
    assert enrollment.extensions.get_extension_for_class(x509.BasicConstraints).value == (
        x509.BasicConstraints(ca=True, path_length=0)
    )
    usage = enrollment.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    eku = enrollment.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert enrollment.not_valid_after_utc < root.not_valid_after_utc

    # Idempotent: a second run changes nothing, with or without --signer.
    before = {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    assert main(argv) == 0
    assert main(["certs", "init", "--out", str(certs), "--admin-out", str(admin),
                 "--host", "fl.example.org"]) == 0  # fmt: skip
    assert {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()} == before


def test_f5_a_root_key_left_in_certs_moves_to_the_signer(tmp_path):
    certs = init_certs(tmp_path / "certs")  # the layout before --signer
    key = certs.ca_key.read_bytes()
    init_certs(certs.dir, signer=tmp_path / "signer")
    assert not certs.ca_key.exists() and (tmp_path / "signer" / "ca.key").read_bytes() == key


def _health_server(cert_pem: bytes, key_pem: bytes) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    server.start()
    return server, port


def _check(port: int, ca_pem: bytes) -> grpc.RpcError | None:
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(f"localhost:{port}", creds) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as err:
            return err
    return None


def test_f5_enrollment_ca_cannot_mint_a_server_certificate_that_clients_accept(tmp_path):
    """Whoever steals the aggregator's enrollment CA key cannot impersonate the server:
    the intermediate's EKU (clientAuth only) binds the whole chain, and BoringSSL checks
    it ("unsupported certificate purpose")."""
    certs = init_certs(tmp_path / "certs")
    ca_pem = certs.ca_cert.read_bytes()
    enrollment = _cert(certs.enrollment_ca_cert)
    enrollment_key = serialization.load_pem_private_key(certs.enrollment_ca_key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmae aggregator")]))
        .issuer_name(enrollment.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(enrollment_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    chain = forged.public_bytes(serialization.Encoding.PEM) + certs.enrollment_ca_cert.read_bytes()
    server, port = _health_server(chain, key_pem)
    try:
        refused = _check(port, ca_pem)
    finally:
        server.stop(0)
    assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
    # The control: the real server certificate (signed by the root) is accepted.
    server, port = _health_server(certs.server_cert.read_bytes(), certs.server_key.read_bytes())
    try:
        assert _check(port, ca_pem) is None
    finally:
        server.stop(0)


def test_f5_aggregator_enrolls_with_the_enrollment_ca_and_no_root_key(tmp_path, capsys):
    certs, signer, admin = tmp_path / "certs", tmp_path / "signer", tmp_path / "admin"
    init_certs(certs, signer=signer, admin_out=admin)
    server = make_server(tmp_path / "state", certs, min_clients=2, rounds=1, min_participants=1)
    port = server.start()
    try:
        assert server.ca is not None and server.ca.key_path == certs / "enrollment-ca.key"
        with identity_channel(port, admin) as ch:
            token = (
                apb_grpc.AdminStub(ch)
                .CreateToken(apb.CreateTokenRequest(name="site-1"), timeout=TIMEOUT)
                .token
            )
        result = enroll(f"127.0.0.1:{server.enroll_port}", (certs / "ca.pem").read_bytes(),
                        token, tmp_path / "site-1", name="site-1")  # fmt: skip
        chain = x509.load_pem_x509_certificates(result.identity.cert.read_bytes())
        assert [c.issuer for c in chain] == [_cert(certs / "enrollment-ca.pem").subject,
                                             _cert(certs / "ca.pem").subject]  # fmt: skip
        # The client presents leaf + enrollment CA; the server trusts only the root.
        with identity_channel(port, result.identity.dir) as ch:
            version, _ = fetch_model(federation_stub(ch), server.layout, 0, timeout=TIMEOUT)
        assert version.version == 0

        # The health identity: gRPC health works, nothing else does.
        assert main(["health", "--server", f"127.0.0.1:{port}",
                     "--identity", str(certs / "health")]) == 0  # fmt: skip
        assert "SERVING" in capsys.readouterr().out
        denied = admin_call_error(port, certs / "health")
        assert denied is not None and denied.code() == grpc.StatusCode.PERMISSION_DENIED
        with identity_channel(port, certs / "health") as ch:
            with pytest.raises(grpc.RpcError) as federation:
                fetch_model(federation_stub(ch), server.layout, 0, timeout=TIMEOUT)
        assert federation.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "health" in federation.value.details()
    finally:
        server.stop(grace=0)


# ---------------------------------------------------------------- #7: keys, files and modes


def test_f7_a_planted_tmp_symlink_is_not_followed_and_the_key_ends_0600(tmp_path, umask_022):
    certs = init_certs(tmp_path / "certs")
    ident = tmp_path / "ids" / "site-1"
    ident.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    victim.chmod(0o644)
    (ident / "client.key.tmp").symlink_to(victim)  # planted
    (ident / "client.pem.tmp").write_text("stale")  # a crash's leftover, 0644
    issue_client(certs.dir, "site-1", ident)
    assert victim.read_text() == "do not touch" and _mode(victim) == 0o644
    key = ident / "client.key"
    assert not key.is_symlink() and _mode(key) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes()
    assert not (ident / "client.key.tmp").exists() and not (ident / "client.pem.tmp").exists()
    assert _mode(ident) == 0o700 and _mode(certs.dir) == 0o700


def test_f7_state_files_and_directories_are_private(tmp_path, umask_022):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    RoundLog(state / "rounds.jsonl").append({"round": 1})  # an existing 0644 log is tightened
    (state / "rounds.jsonl").chmod(0o644)
    certs, _ = make_identities(tmp_path, [], state_dir=state)
    server = make_server(state, certs, min_clients=2, rounds=1, min_participants=1)
    server.rounds.round_log.append({"round": 2})
    server.registry.create_token("test")  # a write: SQLite has made its -wal and -shm
    try:
        assert _mode(state) == 0o700
        for name in ("fedmae.db", "fedmae.db-wal", "fedmae.db-shm", "rounds.jsonl"):
            assert _mode(state / name) == 0o600, name
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        RoundLog(fresh / "rounds.jsonl").append({"round": 1})
        assert _mode(fresh / "rounds.jsonl") == 0o600
        for path in (certs, certs / "admin", certs / "health", certs / "admins"):
            assert _mode(path) == 0o700, path
        for path in certs.rglob("*.key"):
            assert _mode(path) == 0o600, path
    finally:
        server.stop(grace=0)
        server.registry.close()


def test_f7_certificates_have_key_usage_and_bounded_lifetimes(tmp_path):
    certs = init_certs(tmp_path / "certs")
    client = issue_client(certs.dir, "site-1", tmp_path / "site-1")
    now = dt.datetime.now(dt.UTC)
    leaves = {
        "server": (certs.server_cert, ExtendedKeyUsageOID.SERVER_AUTH),
        "admin": (certs.dir / "admin" / "client.pem", ExtendedKeyUsageOID.CLIENT_AUTH),
        "health": (certs.dir / "health" / "client.pem", ExtendedKeyUsageOID.CLIENT_AUTH),
        "client": (client.cert, ExtendedKeyUsageOID.CLIENT_AUTH),
    }
    for name, (path, purpose) in leaves.items():
        cert = _cert(path)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical and usage.value.digital_signature, name
        assert not usage.value.key_cert_sign, name
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [purpose], name
        assert cert.not_valid_after_utc - now <= dt.timedelta(days=366), name
    assert _cert(certs.ca_cert).not_valid_after_utc - now <= dt.timedelta(days=5 * 365 + 2)
    assert _cert(certs.enrollment_ca_cert).not_valid_after_utc - now <= dt.timedelta(days=731)
    # A leaf never outlives the CA that signed it.
    ca = CertificateAuthority(certs)
    _, csr = make_key_and_csr("site-2")
    issued = x509.load_pem_x509_certificates(ca.sign_csr(csr, "site-2", 366).pem)
    assert issued[0].not_valid_after_utc <= issued[1].not_valid_after_utc
