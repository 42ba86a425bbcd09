"""Signed key advertisements, checked with certificates from fedmae's own PKI: good keys
verify, and each way of passing off other keys is refused with a reason a person reads."""

from __future__ import annotations

import dataclasses
import time

import pytest
from secagg_cases import ATTEMPT, ROUND, Pki

from fedmae.errors import InvalidRequest, KeysRejected
from fedmae.secagg.keys import generate_site_keys
from fedmae.secagg.messages import AdvertiseKeys
from fedmae.secagg.signing import CertificateCheck, sign_keys

DAY = 86400.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("other-pki"))


def _advertise(pki: Pki, client_id: str, round_number=ROUND, attempt=ATTEMPT) -> AdvertiseKeys:
    ident = pki.identity(client_id)
    mask_pk, share_pk = generate_site_keys().public_bytes()
    signature = sign_keys(ident.key_pem, round_number, attempt, client_id, mask_pk, share_pk)
    return AdvertiseKeys(round_number, attempt, mask_pk, share_pk, ident.chain_pem, signature)


def _rejected(check: CertificateCheck, keys: AdvertiseKeys, client_id: str) -> str:
    with pytest.raises(KeysRejected) as caught:
        check.verify(keys, client_id, ROUND, ATTEMPT)
    return str(caught.value)


def test_the_chain_is_leaf_then_enrollment_ca(pki):
    chain = pki.identity("alice").chain_pem
    assert chain.count(b"BEGIN CERTIFICATE") == 2


def test_good_keys_verify(pki):
    pki.check().verify(_advertise(pki, "alice"), "alice", ROUND, ATTEMPT)


def test_a_swapped_key_is_refused(pki):
    keys = _advertise(pki, "alice")
    other_mask, _ = generate_site_keys().public_bytes()
    for swapped in (
        dataclasses.replace(keys, mask_public=other_mask),
        dataclasses.replace(keys, share_public=other_mask),
        dataclasses.replace(keys, mask_public=keys.share_public, share_public=keys.mask_public),
    ):
        message = _rejected(pki.check(), swapped, "alice")
        assert "'alice'" in message and "signature does not match the keys" in message


@pytest.mark.parametrize("field", ["round", "attempt"])
def test_a_replayed_advertisement_is_refused(pki, field):
    # An advertisement from another round or attempt, signed for it: the statement binds both.
    old = _advertise(pki, "alice", ROUND - 1 if field == "round" else ROUND, ATTEMPT + 1)
    message = _rejected(pki.check(), old, "alice")
    assert "replayed" in message and f"not round {ROUND} attempt {ATTEMPT}" in message
    # Relabelled as this round's, its signature no longer matches.
    relabelled = dataclasses.replace(old, round=ROUND, attempt=ATTEMPT)
    assert "signature does not match" in _rejected(pki.check(), relabelled, "alice")


def test_another_sites_certificate_is_refused(pki):
    # bob signs keys as bob; the server (or a peer) is told they are alice's.
    message = _rejected(pki.check(), _advertise(pki, "bob"), "alice")
    assert "site 'alice'" in message and "certificate of 'bob'" in message


def test_a_certificate_from_another_ca_is_refused(pki, other_pki):
    message = _rejected(pki.check(), _advertise(other_pki, "alice"), "alice")
    assert "does not chain to this federation's root CA" in message


def test_an_expired_certificate_is_refused(pki):
    keys = _advertise(pki, "alice")
    message = _rejected(
        CertificateCheck(pki.root_pem, lambda: time.time() + 400 * DAY), keys, "alice"
    )
    assert "expired at" in message
    early = CertificateCheck(pki.root_pem, lambda: time.time() - DAY)
    assert "valid only from" in _rejected(early, keys, "alice")


def test_a_server_certificate_is_no_client_identity(pki):
    # The aggregator's own key signs keys as a "site": not a clientAuth certificate.
    mask_pk, share_pk = generate_site_keys().public_bytes()
    key_pem = pki.certs.server_key.read_bytes()
    signature = sign_keys(key_pem, ROUND, ATTEMPT, "fedmae aggregator", mask_pk, share_pk)
    chain = pki.certs.server_cert.read_bytes()
    keys = AdvertiseKeys(ROUND, ATTEMPT, mask_pk, share_pk, chain, signature)
    message = _rejected(pki.check(), keys, "fedmae aggregator")
    assert "as a client certificate" in message


def test_garbage_is_refused(pki):
    keys = _advertise(pki, "alice")
    assert "not PEM" in _rejected(
        pki.check(), dataclasses.replace(keys, certificate_chain=b"junk"), "alice"
    )
    truncated = dataclasses.replace(keys, mask_public=keys.mask_public[:31])
    assert "31 bytes" in _rejected(pki.check(), truncated, "alice")
    assert "signature" in _rejected(
        pki.check(), dataclasses.replace(keys, signature=b"\x30\x00"), "alice"
    )


def test_keys_rejected_is_an_invalid_request():
    assert issubclass(KeysRejected, InvalidRequest)
