"""Identity: the CAs, server and client certificates, and the one place that builds
gRPC TLS credentials.

Layout of a certificates directory (``fedmae certs init --out CERTS``), mode 0700::

    ca.pem                      the federation's root CA (EC P-256, 5 years): what clients trust
    ca.key                      its key, 0600; with ``--signer DIR`` it lives in DIR/ca.key instead
                                and never in CERTS (the aggregator does not need it)
    enrollment-ca.pem/.key      the enrollment CA (2 years), signed by the root: signs the
                                certificates of enrolled clients; clientAuth only and no sub-CAs,
                                so its key cannot make a server certificate a client accepts
    server.pem  server.key      the aggregator (1 year); SANs: localhost, 127.0.0.1, ::1,
                                aggregator, --host
    admins/NAME.pem             public certificates of the admins the server pins at start
    admin/                      the operator's identity (OU=admin); ``--admin-out DIR`` puts it
                                elsewhere (keep its key away from the aggregator)
    health/                     a health-check identity (OU=health): no rights but gRPC health

Layout of a client identity directory (``fedmae certs issue-client``, later ``fedmae
enroll``), mode 0700::

    ca.pem  client.pem  client.key   CN of client.pem = the client id; client.pem holds the
                                     certificate, then the enrollment CA that signed it
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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmae.errors import ConfigError
from fedmae.private_files import PRIVATE_FILE, PUBLIC_FILE, private_dir, write_atomic

log = logging.getLogger(__name__)

DEFAULT_SERVER_HOSTS = ("localhost", "127.0.0.1", "::1", "aggregator")
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

ADMIN_ROLE = "admin"
HEALTH_ROLE = "health"  # may call grpc.health.v1.Health only (needs no app-level auth)

# Lifetimes (days). The root signs rarely and offline; the enrollment CA sits in the
# network-facing aggregator, so it is short-lived and `certs init` renews it while it
# still outlives any leaf it may sign (a leaf never outlives its issuer: see _sign).
ROOT_CA_DAYS = 1826  # 5 years
ENROLLMENT_CA_DAYS = 730  # 2 years
ENROLLMENT_CA_RENEW_DAYS = 400  # renewed by `certs init` below this, > MAX_LEAF_DAYS
LEAF_DAYS = 365  # server, admin, health and client certificates
MAX_LEAF_DAYS = 366
LEAF_RENEW_DAYS = 30  # `certs init` re-issues the server, admin and health certificates
ROOT_WARN_DAYS = 180


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
    def enrollment_ca_cert(self) -> Path:
        return self.dir / "enrollment-ca.pem"

    @property
    def enrollment_ca_key(self) -> Path:
        return self.dir / "enrollment-ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    def root_pem(self) -> bytes:
        return _read(self.ca_cert)

    @property
    def admins_dir(self) -> Path:
        """Public certificates of admins to pin (``NAME.pem``)."""
        return self.dir / "admins"

    @property
    def health_dir(self) -> Path:
        return self.dir / "health"


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


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    private_dir(path.parent)
    write_atomic(path, data, PRIVATE_FILE if private else PUBLIC_FILE)


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


def _sign(
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


def _days_left(cert_path: Path) -> float:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def _fresh(cert_path: Path, renew_days: float) -> bool:
    return cert_path.exists() and _days_left(cert_path) > renew_days


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(_read(path), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an EC private key")
    return key


def _is_key_of(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    return key.public_key().public_numbers() == cert.public_key().public_numbers()


def _root_key_path(certs: ServerCerts, signer: Path | None) -> Path:
    """Where the root key is: ``signer/ca.key`` with a signer directory, else CERTS/ca.key.

    A key found in CERTS while a signer is given is moved there (a layout made before
    ``--signer``): the point of the signer is that CERTS, which the aggregator mounts,
    holds no root key.
    """
    if signer is None:
        return certs.ca_key
    private_dir(signer)
    path = signer / "ca.key"
    if certs.ca_key.exists():
        if not path.exists():
            write_atomic(path, _read(certs.ca_key), PRIVATE_FILE)
            log.warning("moved the root CA key from %s to %s", certs.ca_key, path)
        elif _read(path) != _read(certs.ca_key):
            raise ConfigError(
                f"two different CA keys: {certs.ca_key} and {path}; keep the one that "
                f"matches {certs.ca_cert} in {path} and delete the other"
            )
        certs.ca_key.unlink()
    return path


def init_certs(
    out_dir: Path | str,
    hosts: list[str] | None = None,
    days: float = LEAF_DAYS,
    force: bool = False,
    signer: Path | str | None = None,
    admin_out: Path | str | None = None,
) -> ServerCerts:
    """Create the root CA, the enrollment CA, the server, admin and health identities.

    Idempotent: an existing root CA is reused (adding clients never rotates it), unless
    ``force``. The server certificate is re-issued when ``hosts`` adds names; the server,
    admin and health certificates when they have under ``LEAF_RENEW_DAYS`` left, the
    enrollment CA under ``ENROLLMENT_CA_RENEW_DAYS`` (the server loads it at start).

    ``signer``: keep the root key in this directory (0700), not in ``out_dir``.
    ``admin_out``: write the admin identity there instead of ``out_dir/admin``; its
    public certificate always goes to ``out_dir/admins/admin.pem`` for the server to pin.
    """
    certs = ServerCerts(Path(out_dir))
    private_dir(certs.dir)
    key_path = _root_key_path(certs, Path(signer) if signer else None)
    root_key: ec.EllipticCurvePrivateKey | None = None
    if force or not certs.ca_cert.exists():
        root_key = _new_key()
        root = _sign(_name("fedmae CA"), root_key.public_key(), None, root_key, ROOT_CA_DAYS,
                     "root")  # fmt: skip
        _write(key_path, _key_pem(root_key), private=True)
        _write(certs.ca_cert, _pem(root))
        log.info("created the root CA in %s (key in %s)", certs.dir, key_path)
        force = True
    root = x509.load_pem_x509_certificate(_read(certs.ca_cert))
    if root_key is None and key_path.exists():
        check_private_file(key_path)
        root_key = _load_key(key_path)
        if not _is_key_of(root_key, root):
            raise ConfigError(f"{key_path} is not the key of the CA in {certs.ca_cert}")
    if _days_left(certs.ca_cert) < ROOT_WARN_DAYS:
        log.warning(
            "the root CA %s expires in %.0f days: plan 'fedmae certs init --force' "
            "(every client enrolls again)", certs.ca_cert, _days_left(certs.ca_cert),
        )  # fmt: skip

    def signing_key(what: str) -> ec.EllipticCurvePrivateKey:
        if root_key is None:
            raise ConfigError(
                f"{what} must be (re)issued, which needs the root CA key, but {key_path} "
                "does not exist: pass --signer DIR (the directory that holds ca.key)"
            )
        return root_key

    wanted = list(DEFAULT_SERVER_HOSTS) + list(hosts or [])
    if (
        force
        or not _fresh(certs.server_cert, LEAF_RENEW_DAYS)
        or not _covers(certs.server_cert, wanted)
    ):
        ca_key = signing_key("the server certificate")
        key = _new_key()
        cert = _sign(_name("fedmae aggregator"), key.public_key(), root, ca_key, days, "server",
                     server_hosts=wanted)  # fmt: skip
        _write(certs.server_key, _key_pem(key), private=True)
        _write(certs.server_cert, _pem(cert))
        log.info("issued server certificate for %s", ", ".join(dict.fromkeys(wanted)))
    _init_enrollment_ca(certs, root, force, signing_key)
    if force or not _fresh(ClientIdentity(certs.health_dir).cert, LEAF_RENEW_DAYS):
        _issue(ClientIdentity(certs.health_dir), "health", HEALTH_ROLE, root,
               signing_key("the health identity"), b"", _pem(root), days)  # fmt: skip
        log.info("issued the health-check identity in %s", certs.health_dir)
    admin = ClientIdentity(Path(admin_out) if admin_out else certs.dir / "admin")
    pinned = certs.admins_dir / "admin.pem"
    if force or not (
        _fresh(admin.cert, LEAF_RENEW_DAYS)
        # issued by an earlier run into another --admin-out: its key is there, not here
        or (not admin.cert.exists() and _fresh(pinned, LEAF_RENEW_DAYS))
    ):
        _issue(admin, "admin", ADMIN_ROLE, root, signing_key("the admin identity"), b"",
               _pem(root), days)  # fmt: skip
        log.info("issued the admin identity in %s", admin.dir)
    if admin.cert.exists() and (not pinned.exists() or pinned.read_bytes() != _read(admin.cert)):
        _write(pinned, _read(admin.cert))
    return certs


def _init_enrollment_ca(certs: ServerCerts, root: x509.Certificate, force: bool, signing_key):
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    if constraints.path_length == 0:
        # A root made before the enrollment CA existed cannot have one under it: the
        # aggregator keeps signing clients with the root key (CERTS/ca.key or --ca-key).
        log.warning(
            "the root CA in %s allows no intermediate CA (made by an older fedmae): no "
            "enrollment CA; 'fedmae certs init --force' makes a new root (clients re-enroll)",
            certs.dir,
        )
        return
    if (
        not force
        and certs.enrollment_ca_key.exists()
        and _fresh(certs.enrollment_ca_cert, ENROLLMENT_CA_RENEW_DAYS)
    ):
        return
    ca_key = signing_key("the enrollment CA")
    key = _new_key()
    cert = _sign(_name("fedmae enrollment CA"), key.public_key(), root, ca_key,
                 ENROLLMENT_CA_DAYS, "enrollment-ca")  # fmt: skip
    _write(certs.enrollment_ca_key, _key_pem(key), private=True)
    _write(certs.enrollment_ca_cert, _pem(cert))
    log.info("issued the enrollment CA in %s (restart the aggregator to use it)", certs.dir)


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


def _issue(
    ident: ClientIdentity,
    name: str,
    role: str | None,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    chain: bytes,
    root_pem: bytes,
    days: float,
) -> ClientIdentity:
    validate_client_id(name)
    if not 0 < days <= MAX_LEAF_DAYS:
        raise ConfigError(f"certificate validity must be up to {MAX_LEAF_DAYS} days, not {days}")
    private_dir(ident.dir)
    key = _new_key()
    cert = _sign(_name(name, role), key.public_key(), issuer, issuer_key, days, "client")
    _write(ident.key, _key_pem(key), private=True)
    _write(ident.cert, _pem(cert) + chain)
    _write(ident.ca_cert, root_pem)
    return ident


def _root_signer(certs: ServerCerts, signer: Path | None) -> ec.EllipticCurvePrivateKey:
    path = (signer / "ca.key") if signer else certs.ca_key
    if not path.exists():
        raise ConfigError(
            f"the root CA key is not in {path.parent}: pass --signer DIR (the directory "
            "given to 'fedmae certs init --signer')"
        )
    check_private_file(path)
    key = _load_key(path)
    if not _is_key_of(key, x509.load_pem_x509_certificate(_read(certs.ca_cert))):
        raise ConfigError(f"{path} is not the key of the CA in {certs.ca_cert}")
    return key


def issue_client(
    certs_dir: Path | str,
    client_id: str,
    out_dir: Path | str,
    days: float = LEAF_DAYS,
    role: str | None = None,
    signer: Path | str | None = None,
) -> ClientIdentity:
    """Issue a client certificate (CN = ``client_id``) for the CA in ``certs_dir``.

    The operator-side shortcut for tests and demos; edge devices enroll with a CSR
    instead, so their key never leaves them. A plain client is signed like an enrolled
    one, by the enrollment CA (the root for a CERTS made without one); an identity with
    a ``role`` (admin, health) by the root, whose key is in ``signer`` or CERTS.
    ``days`` may be a fraction (a test's short-lived certificate).
    """
    certs = ServerCerts(Path(certs_dir))
    root_pem = _read(certs.ca_cert)
    if role is None and certs.enrollment_ca_key.exists():
        ca = CertificateAuthority(certs, certs.enrollment_ca_key)
        return _issue(ClientIdentity(Path(out_dir)), client_id, None, ca.cert, ca._key,
                      ca.chain_pem, root_pem, days)  # fmt: skip
    key = _root_signer(certs, Path(signer) if signer else None)
    root = x509.load_pem_x509_certificate(root_pem)
    return _issue(ClientIdentity(Path(out_dir)), client_id, role, root, key, b"", root_pem, days)


def issue_admin(
    certs_dir: Path | str,
    name: str,
    out_dir: Path | str,
    days: float = LEAF_DAYS,
    signer: Path | str | None = None,
) -> ClientIdentity:
    """A new admin identity (OU=admin) signed by the root CA, and its public certificate
    in ``CERTS/admins/NAME.pem`` (pinned when the aggregator next starts; pin it at once
    with ``fedmae admins add --cert``)."""
    certs = ServerCerts(Path(certs_dir))
    ident = issue_client(certs.dir, name, out_dir, days=days, role=ADMIN_ROLE, signer=signer)
    _write(certs.admins_dir / f"{name}.pem", _read(ident.cert))
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
        self.root = x509.load_pem_x509_certificate(_read(self.root_path))
        key = _load_key(self.key_path)
        self.chain_pem = b""  # certificates between a leaf and the root, sent with the leaf
        if _is_key_of(key, self.root):
            self.cert = self.root
        elif certs.enrollment_ca_cert.exists() and _is_key_of(
            key, enrollment := x509.load_pem_x509_certificate(_read(certs.enrollment_ca_cert))
        ):
            try:
                enrollment.verify_directly_issued_by(self.root)
            except (ValueError, TypeError, InvalidSignature):
                raise ConfigError(
                    f"{certs.enrollment_ca_cert} is not signed by the CA in {self.root_path}: "
                    "run 'fedmae certs init' again"
                ) from None
            self.cert = enrollment
            self.chain_pem = _pem(enrollment)
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
        return _pem(self.root)

    def sign_csr(self, csr_pem: bytes, client_id: str, days: float) -> IssuedCertificate:
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
        if not 0 < days <= MAX_LEAF_DAYS:
            raise InvalidRequest(f"certificate validity must be up to {MAX_LEAF_DAYS} days")
        cert = _sign(_name(client_id), public_key, self.cert, self._key, days, "client")
        return IssuedCertificate(
            pem=_pem(cert) + self.chain_pem,  # the leaf first: TLS presents the chain
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
    role: str | None  # OU: "admin" for an operator, "health" for health checks
    fingerprint: str
    serial: str
    not_after: float  # unix time; TLS checks it at the handshake only, auth.py on every call


def _peer_of(cert: x509.Certificate) -> PeerCertificate:
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
def _parse_peer(pem: bytes) -> PeerCertificate:
    return _peer_of(x509.load_pem_x509_certificate(pem))


def peer_certificate(context: grpc.ServicerContext) -> PeerCertificate | None:
    """The verified peer certificate (chain checked by TLS), or None without one."""
    values = context.auth_context().get("x509_pem_cert")
    if not values:
        return None
    return _parse_peer(bytes(values[0]))


def admin_certificate(pem: bytes, root_pem: bytes, now: float) -> PeerCertificate:
    """Check an admin certificate before pinning it: one certificate, OU=admin, a valid
    name, signed directly by the root CA in ``root_pem``, not a CA, and not expired."""
    from fedmae.errors import InvalidRequest

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
    peer = _peer_of(cert)
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
    """Write an identity directory (0700, the key 0600) that ``fedmae client`` can use.

    ``cert_pem`` is the certificate followed by the CA certificates between it and the
    root (the enrollment CA): gRPC presents the whole chain.
    """
    ident = ClientIdentity(Path(out_dir))
    private_dir(ident.dir)
    _write(ident.key, key_pem, private=True)
    _write(ident.cert, cert_pem)
    _write(ident.ca_cert, ca_pem)
    return ident
