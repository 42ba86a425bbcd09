"""Signing: keys, the certificate builder every certificate goes through, CSRs, and
the ``CertificateAuthority`` that signs enrolled clients."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmae.errors import ConfigError, InvalidRequest
from fedmae.pki.files import ServerCerts, check_private_file, read_file, validate_client_id
from fedmae.pki.peer import IssuedCertificate, fingerprint

log = logging.getLogger(__name__)

# Lifetimes (days). The root signs rarely and offline; the enrollment CA sits in the
# network-facing aggregator, so it is short-lived and `certs init` renews it while it
# still outlives any leaf it may sign (a leaf never outlives its issuer: see sign_certificate).
ROOT_CA_DAYS = 1826  # 5 years
ENROLLMENT_CA_DAYS = 730  # 2 years
ENROLLMENT_CA_RENEW_DAYS = 400  # renewed by `certs init` below this, > MAX_LEAF_DAYS
LEAF_DAYS = 365  # server, admin, health and client certificates
MAX_LEAF_DAYS = 366
LEAF_RENEW_DAYS = 30  # `certs init` re-issues the server, admin and health certificates
ROOT_WARN_DAYS = 180


def new_key() -> ec.EllipticCurvePrivateKey:
    """A new EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (written 0600 only)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def subject_name(cn: str, role: str | None = None) -> x509.Name:
    """O=fedmae, OU=``role`` (if any), CN=``cn``."""
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmae")]
    if role:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _key_usage(*, signature: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def sign_certificate(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate | None,
    ca_key: ec.EllipticCurvePrivateKey,
    days: float,
    kind: str,
    server_hosts: list[str] | None = None,
) -> x509.Certificate:
    """A certificate of ``kind``: root, enrollment-ca, server or client.

    Leaves get KeyUsage digitalSignature (all an ECDHE handshake needs) and one EKU.
    The enrollment CA may sign client certificates only: its EKU is clientAuth and TLS
    libraries apply an intermediate's EKU to the whole chain (BoringSSL refuses a server
    certificate under it with "unsupported certificate purpose"); path length 0 stops
    it from making CAs. A certificate never outlives its issuer.
    """
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)
    if ca_cert is not None:
        not_after = min(not_after, ca_cert.not_valid_after_utc)
    is_ca = kind in ("root", "enrollment-ca")
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject if ca_cert else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(
                ca=is_ca, path_length=(1 if kind == "root" else 0) if is_ca else None
            ),
            True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(_key_usage(signature=kind != "enrollment-ca", cert_sign=is_ca), True)
    )
    if ca_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), False
        )
    if kind == "server":
        builder = builder.add_extension(_san(server_hosts or []), False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    elif kind in ("client", "enrollment-ca"):
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
        )
    elif kind != "root":
        raise ValueError(f"unknown certificate kind {kind!r}")
    return builder.sign(ca_key, hashes.SHA256())


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The EC private key in ``path`` (``ConfigError`` for any other kind)."""
    key = serialization.load_pem_private_key(read_file(path), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an EC private key")
    return key


def is_key_of(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private key of ``cert``."""
    return key.public_key().public_numbers() == cert.public_key().public_numbers()


def make_key_and_csr(name: str = "") -> tuple[bytes, bytes]:
    """A new private key (PEM, stays on the device) and a CSR for it (PEM)."""
    key = new_key()
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)] if name else []
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .sign(key, hashes.SHA256())
    )
    return key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


class CertificateAuthority:
    """The CA that signs enrolled clients' CSRs: the enrollment CA, or the root itself for
    a certificates directory made without one (or with ``--ca-key`` naming the root key).

    ``key_path`` (``--ca-key``) names the key; without it the enrollment CA's key in
    CERTS is used if present, else ``CERTS/ca.key``. It must not be readable by group or
    others, and must be the key of ``enrollment-ca.pem`` or ``ca.pem``.
    """

    def __init__(self, certs: ServerCerts, key_path: Path | None = None):
        self.root_path = certs.ca_cert
        if key_path is None:
            key_path = certs.enrollment_ca_key if certs.enrollment_ca_key.exists() else certs.ca_key
        self.key_path = key_path
        check_private_file(self.key_path)
        self.root = x509.load_pem_x509_certificate(read_file(self.root_path))
        key = load_key(self.key_path)
        self.chain_pem = b""  # certificates between a leaf and the root, sent with the leaf
        if is_key_of(key, self.root):
            self.cert = self.root
        elif certs.enrollment_ca_cert.exists() and is_key_of(
            key, enrollment := x509.load_pem_x509_certificate(read_file(certs.enrollment_ca_cert))
        ):
            try:
                enrollment.verify_directly_issued_by(self.root)
            except (ValueError, TypeError, InvalidSignature):
                raise ConfigError(
                    f"{certs.enrollment_ca_cert} is not signed by the CA in {self.root_path}: "
                    "run 'fedmae certs init' again"
                ) from None
            self.cert = enrollment
            self.chain_pem = certificate_pem(enrollment)
        else:
            raise ConfigError(
                f"{self.key_path} is not the key of the CA in {self.root_path} (nor of the "
                f"enrollment CA in {certs.enrollment_ca_cert})"
            )
        self._key = key
        days_left = (self.cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
        if days_left < MAX_LEAF_DAYS:
            log.warning(
                "the signing CA %s expires in %d days: certificates it signs end then too; "
                "run 'fedmae certs init' (with --signer) and restart", self.key_path, days_left,
            )  # fmt: skip

    @property
    def cert_pem(self) -> bytes:
        """The root certificate clients trust (never a key)."""
        return certificate_pem(self.root)

    def sign_csr(self, csr_pem: bytes, client_id: str, days: float) -> IssuedCertificate:
        """Sign a client CSR; the subject is ours (CN = ``client_id``), never the CSR's."""
        validate_client_id(client_id)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as err:
            raise InvalidRequest(f"not a PEM certificate signing request: {err}") from None
        if not csr.is_signature_valid:
            raise InvalidRequest("the CSR's signature does not match its public key")
        public_key = csr.public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if public_key.curve.name not in ("secp256r1", "secp384r1"):
                raise InvalidRequest(f"unsupported EC curve {public_key.curve.name}; use P-256")
        else:
            from cryptography.hazmat.primitives.asymmetric import rsa

            if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < 2048:
                raise InvalidRequest("the CSR key must be EC P-256/P-384 or RSA >= 2048 bits")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if cns and cns[0].value != client_id:
            raise InvalidRequest(
                f"the CSR asks for the name {cns[0].value!r}, but this enrollment is for "
                f"{client_id!r}"
            )
        if not 0 < days <= MAX_LEAF_DAYS:
            raise InvalidRequest(f"certificate validity must be up to {MAX_LEAF_DAYS} days")
        subject = subject_name(client_id)
        cert = sign_certificate(subject, public_key, self.cert, self._key, days, "client")
        return IssuedCertificate(
            pem=certificate_pem(cert) + self.chain_pem,  # the leaf first: TLS presents the chain
            fingerprint=fingerprint(cert),
            serial=format(cert.serial_number, "x"),
            not_after=cert.not_valid_after_utc.timestamp(),
        )
