"""Identity: the CA, server and client certificates, and the one place that builds
gRPC TLS credentials.

Layout of a certificates directory (``fedmae certs init --out DIR``)::

    ca.pem  ca.key          the federation's CA (EC P-256); ca.key is 0600
    server.pem server.key   the aggregator; SANs: localhost, 127.0.0.1, ::1, aggregator, --host

Layout of a client identity directory (``fedmae certs issue-client``, later ``fedmae
enroll``)::

    ca.pem  client.pem  client.key   CN of client.pem = the client id
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmae.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_SERVER_HOSTS = ("localhost", "127.0.0.1", "::1", "aggregator")
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ServerCerts:
    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"


@dataclass(frozen=True)
class ClientIdentity:
    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.dir / "client.pem"

    @property
    def key(self) -> Path:
        return self.dir / "client.key"

    @property
    def client_id(self) -> str:
        cert = x509.load_pem_x509_certificate(_read(self.cert))
        return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def validate_client_id(name: str) -> str:
    if not CLIENT_ID_RE.match(name):
        raise ConfigError(
            f"invalid client id {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# ---------------------------------------------------------------- making certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"missing file {path}") from None


def _name(cn: str, role: str | None = None) -> x509.Name:
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


def _sign(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate | None,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
    *,
    is_ca: bool = False,
    server_hosts: list[str] | None = None,
    client: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject if ca_cert else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
    else:
        assert ca_cert is not None
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), False
        )
    if server_hosts:
        builder = builder.add_extension(_san(server_hosts), False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
        )
    return builder.sign(ca_key, hashes.SHA256())


def init_certs(
    out_dir: Path | str, hosts: list[str] | None = None, days: int = 825, force: bool = False
) -> ServerCerts:
    """Create the CA and the server certificate in ``out_dir``.

    Idempotent: an existing CA is reused (adding clients never rotates it), unless
    ``force``. The server certificate is re-issued when ``hosts`` adds names.
    """
    certs = ServerCerts(Path(out_dir))
    certs.dir.mkdir(parents=True, exist_ok=True)
    if force or not (certs.ca_cert.exists() and certs.ca_key.exists()):
        ca_key = _new_key()
        ca_cert = _sign(_name("fedmae CA"), ca_key.public_key(), None, ca_key, days * 4, is_ca=True)
        _write(certs.ca_key, _key_pem(ca_key), private=True)
        _write(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        log.info("created CA in %s", certs.dir)
        force = True
    ca_cert, ca_key = load_ca(certs)
    wanted = list(DEFAULT_SERVER_HOSTS) + list(hosts or [])
    if force or not certs.server_cert.exists() or not _covers(certs.server_cert, wanted):
        key = _new_key()
        cert = _sign(
            _name("fedmae aggregator"), key.public_key(), ca_cert, ca_key, days, server_hosts=wanted
        )
        _write(certs.server_key, _key_pem(key), private=True)
        _write(certs.server_cert, cert.public_bytes(serialization.Encoding.PEM))
        log.info("issued server certificate for %s", ", ".join(dict.fromkeys(wanted)))
    if not (certs.dir / "admin" / "client.pem").exists():
        # The operator's identity (admin role), also used for health checks.
        issue_client(certs.dir, "admin", certs.dir / "admin", days=days, role="admin")
    return certs


def _covers(cert_path: Path, hosts: list[str]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(
        san.get_values_for_type(x509.DNSName)
    )
    return all(str(ipaddress.ip_address(h)) in have if _is_ip(h) else h in have for h in hosts)


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


def load_ca(certs: ServerCerts) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(_read(certs.ca_cert))
    key = serialization.load_pem_private_key(_read(certs.ca_key), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{certs.ca_key} is not an EC private key")
    return cert, key


def issue_client(
    certs_dir: Path | str,
    client_id: str,
    out_dir: Path | str,
    days: int = 365,
    role: str | None = None,
) -> ClientIdentity:
    """Issue a client certificate (CN = ``client_id``) signed by the CA in ``certs_dir``.

    The operator-side shortcut for tests and demos; edge devices enroll with a CSR
    instead, so their key never leaves them.
    """
    validate_client_id(client_id)
    certs = ServerCerts(Path(certs_dir))
    ca_cert, ca_key = load_ca(certs)
    ident = ClientIdentity(Path(out_dir))
    key = _new_key()
    cert = _sign(_name(client_id, role), key.public_key(), ca_cert, ca_key, days, client=True)
    _write(ident.key, _key_pem(key), private=True)
    _write(ident.cert, cert.public_bytes(serialization.Encoding.PEM))
    _write(ident.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    return ident


# ---------------------------------------------------------------- gRPC credentials


def server_credentials(
    certs: ServerCerts, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """TLS for the aggregator; with ``require_client_auth`` only CA-signed clients connect."""
    return grpc.ssl_server_credentials(
        [(_read(certs.server_key), _read(certs.server_cert))],
        root_certificates=_read(certs.ca_cert),
        require_client_auth=require_client_auth,
    )


def channel_credentials(identity: ClientIdentity) -> grpc.ChannelCredentials:
    """TLS for a client: trusts only the federation's CA, presents the client cert."""
    if not identity.ca_cert.exists():
        raise ConfigError(
            f"no ca.pem in identity directory {identity.dir}: create it with "
            "'fedmae certs issue-client' (or 'fedmae enroll')"
        )
    if identity.cert.exists() and identity.key.exists():
        return grpc.ssl_channel_credentials(
            root_certificates=_read(identity.ca_cert),
            private_key=_read(identity.key),
            certificate_chain=_read(identity.cert),
        )
    return grpc.ssl_channel_credentials(root_certificates=_read(identity.ca_cert))


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """CN of the verified peer certificate, or None on a connection without one."""
    values = context.auth_context().get("x509_common_name")
    if not values:
        return None
    value = values[0]
    return value.decode() if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------- enrollment: CSR and signing

ADMIN_ROLE = "admin"


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the certificate's DER encoding, hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def make_key_and_csr(name: str = "") -> tuple[bytes, bytes]:
    """A new private key (PEM, stays on the device) and a CSR for it (PEM)."""
    key = _new_key()
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)] if name else []
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class IssuedCertificate:
    pem: bytes
    fingerprint: str
    serial: str
    not_after: float  # unix time


class CertificateAuthority:
    """The federation's CA, able to sign client CSRs.

    The key is read from ``<certs>/ca.key`` or from ``key_path`` (to keep it outside
    the state directory). Either way it must not be readable by group or others.
    """

    def __init__(self, certs: ServerCerts, key_path: Path | None = None):
        self.cert_path = certs.ca_cert
        self.key_path = key_path or certs.ca_key
        check_private_file(self.key_path)
        self.cert = x509.load_pem_x509_certificate(_read(self.cert_path))
        key = serialization.load_pem_private_key(_read(self.key_path), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{self.key_path} is not an EC private key")
        if key.public_key().public_numbers() != self.cert.public_key().public_numbers():
            raise ConfigError(f"{self.key_path} is not the key of the CA in {self.cert_path}")
        self._key = key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def sign_csr(self, csr_pem: bytes, client_id: str, days: int) -> IssuedCertificate:
        """Sign a client CSR; the subject is ours (CN = ``client_id``), never the CSR's."""
        from fedmae.errors import InvalidRequest

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
        if not 1 <= days <= 3650:
            raise InvalidRequest("certificate validity must be 1 to 3650 days")
        cert = _sign(_name(client_id), public_key, self.cert, self._key, days, client=True)
        return IssuedCertificate(
            pem=cert.public_bytes(serialization.Encoding.PEM),
            fingerprint=fingerprint(cert),
            serial=format(cert.serial_number, "x"),
            not_after=cert.not_valid_after_utc.timestamp(),
        )


def check_private_file(path: Path) -> None:
    """Refuse a key file that group or others can read, or that another user owns."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"CA key {path} not found") from None
    if st.st_mode & 0o077:
        raise ConfigError(
            f"CA key {path} is accessible by group or others (mode {st.st_mode & 0o777:o}): "
            f"run 'chmod 600 {path}'"
        )
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ConfigError(f"CA key {path} is owned by uid {st.st_uid}, not by this user")


@dataclass(frozen=True)
class PeerCertificate:
    common_name: str
    role: str | None  # OU, "admin" for the operator
    fingerprint: str
    serial: str


@functools.lru_cache(maxsize=4096)
def _parse_peer(pem: bytes) -> PeerCertificate:
    cert = x509.load_pem_x509_certificate(pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return PeerCertificate(
        common_name=str(cn[0].value) if cn else "",
        role=str(ou[0].value) if ou else None,
        fingerprint=fingerprint(cert),
        serial=format(cert.serial_number, "x"),
    )


def peer_certificate(context: grpc.ServicerContext) -> PeerCertificate | None:
    """The verified peer certificate (chain checked by TLS), or None without one."""
    values = context.auth_context().get("x509_pem_cert")
    if not values:
        return None
    return _parse_peer(bytes(values[0]))


def certificate_info(pem: bytes) -> IssuedCertificate:
    cert = x509.load_pem_x509_certificate(pem)
    return IssuedCertificate(
        pem=pem,
        fingerprint=fingerprint(cert),
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def save_identity(
    out_dir: Path | str, key_pem: bytes, cert_pem: bytes, ca_pem: bytes
) -> ClientIdentity:
    """Write an identity directory (the key 0600) that ``fedmae client`` can use."""
    ident = ClientIdentity(Path(out_dir))
    _write(ident.key, key_pem, private=True)
    _write(ident.cert, cert_pem)
    _write(ident.ca_cert, ca_pem)
    return ident
