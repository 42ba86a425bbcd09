"""Facts about a certificate: who it names (``PeerCertificate``), its fingerprint,
serial and expiry, and the checks an admin certificate must pass to be pinned."""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from fedmae.errors import InvalidRequest
from fedmae.pki.files import ADMIN_ROLE, CLIENT_ID_RE


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the certificate's DER encoding, hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class IssuedCertificate:
    pem: bytes
    fingerprint: str
    serial: str
    not_after: float  # unix time


@dataclass(frozen=True)
class PeerCertificate:
    common_name: str
    role: str | None  # OU: "admin" for an operator, "health" for health checks
    fingerprint: str
    serial: str
    not_after: float  # unix time; TLS checks it at the handshake only, auth.py on every call


def peer_of(cert: x509.Certificate) -> PeerCertificate:
    """Who a certificate names: CN, role (OU), fingerprint, serial, expiry."""
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return PeerCertificate(
        common_name=str(cn[0].value) if cn else "",
        role=str(ou[0].value) if ou else None,
        fingerprint=fingerprint(cert),
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


@functools.lru_cache(maxsize=4096)
def peer_from_pem(pem: bytes) -> PeerCertificate:
    """``peer_of`` a PEM certificate; cached, as every call of a peer parses its certificate."""
    return peer_of(x509.load_pem_x509_certificate(pem))


def admin_certificate(pem: bytes, root_pem: bytes, now: float) -> PeerCertificate:
    """Check an admin certificate before pinning it: one certificate, OU=admin, a valid
    name, signed directly by the root CA in ``root_pem``, not a CA, and not expired."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise InvalidRequest(f"not a PEM certificate: {err}") from None
    root = x509.load_pem_x509_certificate(root_pem)
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidRequest(
            "this certificate is not signed by this federation's root CA: issue admin "
            "certificates with 'fedmae certs issue-admin'"
        ) from None
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise InvalidRequest("a CA certificate cannot be an admin")
    except x509.ExtensionNotFound:
        pass
    peer = peer_of(cert)
    if peer.role != ADMIN_ROLE:
        raise InvalidRequest(
            f"certificate {peer.common_name!r} has role {peer.role or 'none'!r}, not "
            f"{ADMIN_ROLE!r}: issue it with 'fedmae certs issue-admin'"
        )
    if not CLIENT_ID_RE.match(peer.common_name):
        raise InvalidRequest(f"invalid admin name {peer.common_name!r}")
    if peer.not_after <= now:
        raise InvalidRequest(f"certificate {peer.common_name!r} expired at {utc(peer.not_after)}")
    return peer


def utc(unix_time: float) -> str:
    """``2026-01-31 12:00:00 UTC``: how messages name a certificate's expiry."""
    return dt.datetime.fromtimestamp(unix_time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def certificate_info(pem: bytes) -> IssuedCertificate:
    """Fingerprint, serial and expiry of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    return IssuedCertificate(
        pem=pem,
        fingerprint=fingerprint(cert),
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc.timestamp(),
    )
