"""Signed key advertisements: a site vouches for its round keys with its enrolled mTLS key.

Without the signature the server could hand each site keys it made itself and read
every input (a man in the middle of every pair). Each site signs ``keys_statement``
(round, attempt, its id, both public keys) with the EC P-256 key of its client
certificate; the server and every peer check the signature, the chain to the
federation's root CA, clientAuth, the validity dates and that the certificate's common
name is the site the keys are attributed to.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from fedmae.errors import KeysRejected
from fedmae.secagg.keys import PUBLIC_KEY_BYTES
from fedmae.secagg.messages import AdvertiseKeys, keys_statement

# fedmae's client certificates carry no subjectAltName (the identity is the CN), which
# the Web PKI policy requires of a leaf: allow it to be absent, keep every other check.
_LEAF_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca()


def sign_keys(
    private_key_pem: bytes,
    round: int,
    attempt: int,
    client_id: str,
    mask_pk: bytes,
    share_pk: bytes,
) -> bytes:
    """ECDSA-SHA256 signature (DER) of ``keys_statement`` with the site's enrolled key."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("a site's enrolled key is an EC private key")
    statement = keys_statement(round, attempt, client_id, mask_pk, share_pk)
    return key.sign(statement, ec.ECDSA(hashes.SHA256()))


class CertificateCheck:
    """Verifies advertised keys against the federation's root CA (``root_pem``).

    ``now`` is the clock the validity dates are checked against (a test's fixed time).
    """

    def __init__(self, root_pem: bytes, now: Callable[[], float] = time.time):
        self._store = Store(x509.load_pem_x509_certificates(root_pem))
        self._now = now

    def verify(self, keys: AdvertiseKeys, client_id: str, round: int, attempt: int) -> None:
        """None when ``keys`` are ``client_id``'s for this round and attempt, else
        ``KeysRejected`` naming the site and the check that failed."""
        who = f"the keys advertised for site {client_id!r}"
        if (keys.round, keys.attempt) != (round, attempt):
            raise KeysRejected(
                f"{who} are for round {keys.round} attempt {keys.attempt}, not round {round} "
                f"attempt {attempt} (a replayed advertisement)"
            )
        for name, raw in (("mask", keys.mask_public), ("share", keys.share_public)):
            if len(raw) != PUBLIC_KEY_BYTES:
                raise KeysRejected(
                    f"{who}: the {name} public key is {len(raw)} bytes, not {PUBLIC_KEY_BYTES}"
                )
        leaf = self._verified_leaf(keys.certificate_chain, who)
        names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(names[0].value) if names else ""
        if common_name != client_id:
            raise KeysRejected(
                f"{who} are signed with the certificate of {common_name!r}: a site signs "
                "only its own keys"
            )
        public = leaf.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise KeysRejected(f"{who}: the certificate's key is not an EC key")
        statement = keys_statement(round, attempt, client_id, keys.mask_public, keys.share_public)
        try:
            public.verify(keys.signature, statement, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise KeysRejected(
                f"{who}: the signature does not match the keys (altered after signing, or "
                "signed for another round)"
            ) from None

    def _verified_leaf(self, chain_pem: bytes, who: str) -> x509.Certificate:
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as err:
            raise KeysRejected(f"{who}: the certificate chain is not PEM ({err})") from None
        if not chain:
            raise KeysRejected(f"{who}: no certificate came with them")
        moment = dt.datetime.fromtimestamp(self._now(), dt.UTC)
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(moment)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_LEAF_POLICY)
            .build_client_verifier()
        )
        try:
            verifier.verify(chain[0], chain[1:])
        except VerificationError as err:
            raise KeysRejected(f"{who}: {_reason(chain[0], moment, err)}") from None
        return chain[0]


def _reason(leaf: x509.Certificate, moment: dt.datetime, err: VerificationError) -> str:
    """Why a chain failed, in words: the dates first (the commonest cause), else the
    verifier's own message."""
    if moment > leaf.not_valid_after_utc:
        return f"the certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    if moment < leaf.not_valid_before_utc:
        return (
            f"the certificate is valid only from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    return (
        f"the certificate does not chain to this federation's root CA as a client "
        f"certificate ({err})"
    )
