"""Making a certificates directory (``fedmae certs init``) and issuing identities
from it (``fedmae certs issue-client|issue-admin``): the operator's side of the PKI.
Edge devices enroll with a CSR instead (``CertificateAuthority.sign_csr``)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedmae.errors import ConfigError
from fedmae.pki.ca import (
    ENROLLMENT_CA_DAYS,
    ENROLLMENT_CA_RENEW_DAYS,
    LEAF_DAYS,
    LEAF_RENEW_DAYS,
    MAX_LEAF_DAYS,
    ROOT_CA_DAYS,
    ROOT_WARN_DAYS,
    CertificateAuthority,
    certificate_pem,
    is_key_of,
    key_pem,
    load_key,
    new_key,
    sign_certificate,
    subject_name,
)
from fedmae.pki.files import (
    ADMIN_ROLE,
    HEALTH_ROLE,
    ClientIdentity,
    ServerCerts,
    check_private_file,
    read_file,
    validate_client_id,
    write_file,
)
from fedmae.private_files import PRIVATE_FILE, private_dir, write_atomic

log = logging.getLogger(__name__)

DEFAULT_SERVER_HOSTS = ("localhost", "127.0.0.1", "::1", "aggregator")


def _days_left(cert_path: Path) -> float:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def _fresh(cert_path: Path, renew_days: float) -> bool:
    return cert_path.exists() and _days_left(cert_path) > renew_days


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
            write_atomic(path, read_file(certs.ca_key), PRIVATE_FILE)
            log.warning("moved the root CA key from %s to %s", certs.ca_key, path)
        elif read_file(path) != read_file(certs.ca_key):
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
        root_key = new_key()
        root = sign_certificate(subject_name("fedmae CA"), root_key.public_key(), None,
                                root_key, ROOT_CA_DAYS, "root")  # fmt: skip
        write_file(key_path, key_pem(root_key), private=True)
        write_file(certs.ca_cert, certificate_pem(root))
        log.info("created the root CA in %s (key in %s)", certs.dir, key_path)
        force = True
    root = x509.load_pem_x509_certificate(read_file(certs.ca_cert))
    if root_key is None and key_path.exists():
        check_private_file(key_path)
        root_key = load_key(key_path)
        if not is_key_of(root_key, root):
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
        key = new_key()
        cert = sign_certificate(subject_name("fedmae aggregator"), key.public_key(), root,
                                ca_key, days, "server", server_hosts=wanted)  # fmt: skip
        write_file(certs.server_key, key_pem(key), private=True)
        write_file(certs.server_cert, certificate_pem(cert))
        log.info("issued server certificate for %s", ", ".join(dict.fromkeys(wanted)))
    _init_enrollment_ca(certs, root, force, signing_key)
    if force or not _fresh(ClientIdentity(certs.health_dir).cert, LEAF_RENEW_DAYS):
        _issue(ClientIdentity(certs.health_dir), "health", HEALTH_ROLE, root,
               signing_key("the health identity"), b"", certificate_pem(root), days)  # fmt: skip
        log.info("issued the health-check identity in %s", certs.health_dir)
    admin = ClientIdentity(Path(admin_out) if admin_out else certs.dir / "admin")
    pinned = certs.admins_dir / "admin.pem"
    if force or not (
        _fresh(admin.cert, LEAF_RENEW_DAYS)
        # issued by an earlier run into another --admin-out: its key is there, not here
        or (not admin.cert.exists() and _fresh(pinned, LEAF_RENEW_DAYS))
    ):
        _issue(admin, "admin", ADMIN_ROLE, root, signing_key("the admin identity"), b"",
               certificate_pem(root), days)  # fmt: skip
        log.info("issued the admin identity in %s", admin.dir)
    if admin.cert.exists() and (
        not pinned.exists() or pinned.read_bytes() != read_file(admin.cert)
    ):
        write_file(pinned, read_file(admin.cert))
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
    key = new_key()
    cert = sign_certificate(subject_name("fedmae enrollment CA"), key.public_key(), root, ca_key,
                            ENROLLMENT_CA_DAYS, "enrollment-ca")  # fmt: skip
    write_file(certs.enrollment_ca_key, key_pem(key), private=True)
    write_file(certs.enrollment_ca_cert, certificate_pem(cert))
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
    key = new_key()
    subject = subject_name(name, role)
    cert = sign_certificate(subject, key.public_key(), issuer, issuer_key, days, "client")
    write_file(ident.key, key_pem(key), private=True)
    write_file(ident.cert, certificate_pem(cert) + chain)
    write_file(ident.ca_cert, root_pem)
    return ident


def _root_signer(certs: ServerCerts, signer: Path | None) -> ec.EllipticCurvePrivateKey:
    path = (signer / "ca.key") if signer else certs.ca_key
    if not path.exists():
        raise ConfigError(
            f"the root CA key is not in {path.parent}: pass --signer DIR (the directory "
            "given to 'fedmae certs init --signer')"
        )
    check_private_file(path)
    key = load_key(path)
    if not is_key_of(key, x509.load_pem_x509_certificate(read_file(certs.ca_cert))):
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
    root_pem = read_file(certs.ca_cert)
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
    write_file(certs.admins_dir / f"{name}.pem", read_file(ident.cert))
    return ident
