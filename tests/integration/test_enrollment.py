"""Enrollment, registry, authorization and the Admin service over real gRPC/TLS."""

from __future__ import annotations

import sqlite3
import time

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from federation_harness import (
    TIMEOUT,
    EnrollmentFederation,
    fetch_flat,
    make_server,
    raised_status,
    random_delta,
)

from aggregator_service.registry import Registry
from aggregator_service.registry.schema import MIGRATIONS
from fedmae.errors import ConfigError
from fedmae.pki.ca import CertificateAuthority, make_key_and_csr
from fedmae.pki.files import save_identity
from fedmae.pki.issue import init_certs
from fedmae.pki.peer import certificate_info
from fedmae.transport._proto import admin_pb2 as apb
from fedmae.transport._proto import admin_pb2_grpc as apb_grpc
from fedmae.transport._proto import enrollment_pb2 as epb
from fedmae.transport._proto import enrollment_pb2_grpc as epb_grpc
from fedmae.transport.credentials import channel_credentials
from fedmae.transport.transfer import submit_update


def test_enrolled_client_completes_a_round(fed):
    f = fed(min_clients=1, rounds=1, min_participants=1)
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
    f = fed(min_participants=1)
    once = f.token()
    f.enroll(once, out="first")
    with pytest.raises(grpc.RpcError) as reused:
        f.enroll(once, out="second")
    assert raised_status(reused) == grpc.StatusCode.UNAUTHENTICATED
    assert "used up" in reused.value.details()

    short = f.token(ttl=60)
    f.server.registry.clock = lambda: time.time() + 61  # a minute later, for the registry
    with pytest.raises(grpc.RpcError) as expired:
        f.enroll(short, out="late")
    f.server.registry.clock = time.time
    assert raised_status(expired) == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in expired.value.details()

    with pytest.raises(grpc.RpcError) as unknown:
        f.enroll("fmt_00000000_" + "x" * 43, out="guess")
    assert raised_status(unknown) == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown enrollment token" in unknown.value.details()

    revoked = f.admin.CreateToken(apb.CreateTokenRequest(), timeout=TIMEOUT)
    f.admin.RevokeToken(apb.RevokeTokenRequest(token_id=revoked.info.token_id), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as rv:
        f.enroll(revoked.token, out="rv")
    assert raised_status(rv) == grpc.StatusCode.UNAUTHENTICATED and "revoked" in rv.value.details()
    # A token with two uses enrolls two devices, then no more.
    two = f.token(uses=2)
    assert f.enroll(two, out="d1").client_id != f.enroll(two, out="d2").client_id
    with pytest.raises(grpc.RpcError):
        f.enroll(two, out="d3")
    # Nothing refused left a client behind: the first enrollment and the two devices.
    listed = f.admin.ListClients(apb.ListClientsRequest(), timeout=TIMEOUT).clients
    assert len(listed) == 3


def test_the_token_store_keeps_only_hashes(fed):
    f = fed(min_participants=1)
    token = f.token(name="site-x")
    db = sqlite3.connect(f.server.registry.path)
    dump = "\n".join(db.iterdump())
    db.close()
    prefix, token_id, secret = token.split("_", 2)  # fmt_<id>_<secret>: the id has no "_"
    assert prefix == "fmt" and len(secret) >= 43
    assert token not in dump and secret not in dump


def _enroll_raw(f: EnrollmentFederation, token: str, csr_pem: bytes, name: str = ""):
    with grpc.secure_channel(f.enroll_addr, grpc.ssl_channel_credentials(f.ca_pem)) as ch:
        return epb_grpc.EnrollmentStub(ch).Enroll(
            epb.EnrollRequest(token=token, csr_pem=csr_pem, requested_name=name), timeout=TIMEOUT
        )


def test_forged_names_and_bad_csrs_are_refused(fed):
    f = fed(min_participants=1)
    bound = f.token(name="hospital-a", uses=5)
    with pytest.raises(grpc.RpcError) as other_name:
        f.enroll(bound, name="hospital-b")
    assert raised_status(other_name) == grpc.StatusCode.PERMISSION_DENIED
    assert "hospital-a" in other_name.value.details()

    _, csr_b = make_key_and_csr("hospital-b")  # CSR claims another name
    with pytest.raises(grpc.RpcError) as csr_name:
        _enroll_raw(f, bound, csr_b)
    assert raised_status(csr_name) == grpc.StatusCode.INVALID_ARGUMENT
    assert "asks for the name" in csr_name.value.details()

    # A CSR whose signature does not match its public key (not signed by its key).
    _, good = make_key_and_csr("hospital-a")
    csr = x509.load_pem_x509_csr(good)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # inside the signature value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(grpc.RpcError) as badsig:
        _enroll_raw(f, bound, tampered)
    assert raised_status(badsig) == grpc.StatusCode.INVALID_ARGUMENT
    assert "signature" in badsig.value.details()

    with pytest.raises(grpc.RpcError) as garbage:
        _enroll_raw(f, bound, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
    assert raised_status(garbage) == grpc.StatusCode.INVALID_ARGUMENT

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
    assert raised_status(denied) == grpc.StatusCode.PERMISSION_DENIED


def test_enrollment_response_never_carries_the_ca_key(fed):
    f = fed(min_participants=1)
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
    f = fed(min_clients=2, min_participants=1)  # no round starts: only authorization is exercised
    first = f.enroll(f.token(), name="lab-1", out="lab-1-old")
    with pytest.raises(grpc.RpcError) as taken:
        f.enroll(f.token(), name="lab-1", out="thief")  # unbound token, existing name
    assert raised_status(taken) == grpc.StatusCode.ALREADY_EXISTS
    old = f.connect(first.identity.dir, subscribe=False)
    fetch_flat(old, f.server.layout, 0)  # the old certificate works ...
    renewed = f.enroll(f.token(name="lab-1"), name="lab-1", out="lab-1-new")
    assert renewed.renewed and renewed.client_id == "lab-1"
    with pytest.raises(grpc.RpcError) as replaced:
        fetch_flat(old, f.server.layout, 0)  # ... until it is replaced
    assert raised_status(replaced) == grpc.StatusCode.UNAUTHENTICATED
    assert "replaced" in replaced.value.details()
    fetch_flat(f.connect(renewed.identity.dir, subscribe=False), f.server.layout, 0)


def test_ca_key_permissions_and_separate_path(tmp_path):
    certs = init_certs(tmp_path / "certs")
    certs.enrollment_ca_key.chmod(0o644)  # the key the aggregator signs enrollments with
    with pytest.raises(ConfigError, match="chmod 600"):
        make_server(tmp_path / "state", certs.dir, 1, 1, min_participants=1)
    certs.enrollment_ca_key.unlink()  # a CERTS made before the enrollment CA: the root signs
    certs.ca_key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        make_server(tmp_path / "state", certs.dir, 1, 1, min_participants=1)
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
