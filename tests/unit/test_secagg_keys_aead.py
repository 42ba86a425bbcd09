"""Pairwise seeds (X25519 + HKDF) and the sealing of shares (ChaCha20-Poly1305)."""

from __future__ import annotations

import pytest

from fedmae.secagg import aead, keys


def _pair():
    return keys.generate_site_keys(), keys.generate_site_keys()


def test_both_ends_derive_the_same_seed():
    alice, bob = _pair()
    a_to_b = keys.agree(
        alice.mask, bob.mask.public_key(), keys.pair_context(keys.PURPOSE_MASK, 3, 1, 2)
    )
    b_to_a = keys.agree(
        bob.mask, alice.mask.public_key(), keys.pair_context(keys.PURPOSE_MASK, 3, 2, 1)
    )
    assert a_to_b == b_to_a
    assert len(a_to_b) == keys.SEED_BYTES


def test_seeds_differ_across_rounds_pairs_and_purposes():
    alice, bob = _pair()
    carol = keys.generate_site_keys()
    theirs = bob.mask.public_key()
    seeds = {
        keys.agree(alice.mask, theirs, keys.pair_context(keys.PURPOSE_MASK, 3, 1, 2)),
        keys.agree(alice.mask, theirs, keys.pair_context(keys.PURPOSE_MASK, 4, 1, 2)),
        keys.agree(alice.mask, theirs, keys.pair_context(keys.PURPOSE_MASK, 3, 1, 5)),
        keys.agree(alice.mask, theirs, keys.pair_context(keys.PURPOSE_SHARE_ENCRYPTION, 3, 1, 2)),
        keys.agree(
            alice.mask, carol.mask.public_key(), keys.pair_context(keys.PURPOSE_MASK, 3, 1, 2)
        ),
    }
    assert len(seeds) == 5


def test_context_is_unambiguous_and_refuses_self_pairs():
    assert keys.pair_context(b"p", 1, 2, 3) == keys.pair_context(b"p", 1, 3, 2)
    assert keys.pair_context(b"p", 1, 2, 3) != keys.pair_context(b"p", 2, 1, 3)
    with pytest.raises(ValueError, match="itself"):
        keys.pair_context(b"p", 1, 4, 4)
    with pytest.raises(ValueError, match="64 bits"):
        keys.pair_context(b"p", -1, 1, 2)


def test_public_and_private_keys_round_trip_as_raw_bytes():
    site = keys.generate_site_keys()
    mask_public, share_public = site.public_bytes()
    assert len(mask_public) == len(share_public) == keys.PUBLIC_KEY_BYTES
    assert mask_public != share_public
    assert keys.public_bytes(keys.load_public(mask_public)) == mask_public
    restored = keys.load_private(keys.private_bytes(site.mask))
    assert keys.public_bytes(restored) == mask_public
    with pytest.raises(ValueError, match="32 bytes"):
        keys.load_public(mask_public[:31])


def test_a_low_order_public_key_is_refused():
    # The all-zero point gives an all-zero shared secret: a server must not force a seed.
    alice = keys.generate_site_keys()
    with pytest.raises(ValueError):
        keys.agree(alice.mask, keys.load_public(bytes(32)), keys.pair_context(b"p", 1, 1, 2))


def _sealed(round_number=7, sender=1, receiver=2, plaintext=b"a share of 68 bytes, say"):
    alice, bob = _pair()
    sealed = aead.encrypt_for_peer(
        alice.share, bob.share.public_key(), round_number, sender, receiver, plaintext
    )
    return alice, bob, sealed


def test_a_sealed_share_opens_for_its_receiver_only():
    alice, bob, sealed = _sealed()
    opened = aead.decrypt_from_peer(bob.share, alice.share.public_key(), 7, 1, 2, sealed)
    assert opened == b"a share of 68 bytes, say"
    assert b"a share" not in sealed
    outsider = keys.generate_site_keys()
    with pytest.raises(aead.ShareDecryptionError):
        aead.decrypt_from_peer(outsider.share, alice.share.public_key(), 7, 1, 2, sealed)


def test_share_key_is_not_the_mask_seed():
    alice, bob = _pair()
    # Same key pair on purpose: only the context separates the two uses.
    mask_seed = keys.agree(
        alice.share, bob.share.public_key(), keys.pair_context(keys.PURPOSE_MASK, 7, 1, 2)
    )
    assert aead.share_key(alice.share, bob.share.public_key(), 7, 1, 2) != mask_seed


@pytest.mark.parametrize("position", [0, 12, 20, -1])
def test_any_flipped_bit_is_detected(position):
    alice, bob, sealed = _sealed()
    tampered = bytearray(sealed)
    tampered[position] ^= 0x01
    with pytest.raises(aead.ShareDecryptionError, match="failed authentication"):
        aead.decrypt_from_peer(bob.share, alice.share.public_key(), 7, 1, 2, bytes(tampered))


@pytest.mark.parametrize(
    ("round_number", "sender", "receiver"),
    [(8, 1, 2), (6, 1, 2), (7, 2, 1), (7, 1, 3)],
    ids=["replayed-into-next-round", "earlier-round", "sender-receiver-swapped", "misdirected"],
)
def test_a_share_bound_to_another_round_or_pair_is_refused(round_number, sender, receiver):
    alice, bob, sealed = _sealed()
    with pytest.raises(aead.ShareDecryptionError):
        aead.decrypt_from_peer(
            bob.share, alice.share.public_key(), round_number, sender, receiver, sealed
        )


def test_truncated_ciphertext_is_refused():
    alice, bob, sealed = _sealed()
    with pytest.raises(aead.ShareDecryptionError, match="at least 28 bytes"):
        aead.decrypt_from_peer(bob.share, alice.share.public_key(), 7, 1, 2, sealed[:20])
    with pytest.raises(aead.ShareDecryptionError):
        aead.decrypt_from_peer(bob.share, alice.share.public_key(), 7, 1, 2, sealed[:-1])


def test_two_sealings_of_one_share_differ():
    alice, bob = _pair()
    first = aead.encrypt_for_peer(alice.share, bob.share.public_key(), 1, 1, 2, b"x")
    second = aead.encrypt_for_peer(alice.share, bob.share.public_key(), 1, 1, 2, b"x")
    assert first != second
