"""Share encryption: ChaCha20-Poly1305 between two sites, relayed by the server.

The key is an X25519 agreement of the sites' share keys, derived with its own HKDF
context (so it never equals a mask seed); the associated data binds round, sender
and receiver, so the server cannot replay a ciphertext into another round or hand it
to another site, nor swap sender and receiver.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedmae.secagg.keys import PURPOSE_SHARE_ENCRYPTION, agree, pair_context

NONCE_BYTES = 12
TAG_BYTES = 16


class ShareDecryptionError(ValueError):
    """A relayed share failed authentication: tampered, misdirected, or from another round."""


def associated_data(round_number: int, sender: int, receiver: int) -> bytes:
    """The bytes each ciphertext is bound to: round, sender, receiver (ordered, not sorted)."""
    fields = b"".join(v.to_bytes(8, "big") for v in (round_number, sender, receiver))
    return b"fedmae-secagg/v1/share/" + fields


def share_key(
    my_private: X25519PrivateKey, their_public: X25519PublicKey, round_number: int, a: int, b: int
) -> bytes:
    """The 32-byte ChaCha20-Poly1305 key of the pair (a, b) in this round (same from both ends)."""
    return agree(
        my_private, their_public, pair_context(PURPOSE_SHARE_ENCRYPTION, round_number, a, b)
    )


def encrypt_for_peer(
    my_share_private: X25519PrivateKey,
    their_share_public: X25519PublicKey,
    round_number: int,
    sender: int,
    receiver: int,
    plaintext: bytes,
) -> bytes:
    """``nonce || ciphertext || tag`` of ``plaintext`` for ``receiver``.

    The nonce is random: both directions of a pair use one key, so a counter would
    need coordination; 96 random bits are ample for a handful of messages per key.
    """
    key = share_key(my_share_private, their_share_public, round_number, sender, receiver)
    nonce = os.urandom(NONCE_BYTES)
    ad = associated_data(round_number, sender, receiver)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def decrypt_from_peer(
    my_share_private: X25519PrivateKey,
    their_share_public: X25519PublicKey,
    round_number: int,
    sender: int,
    receiver: int,
    sealed: bytes,
) -> bytes:
    """The plaintext ``sender`` sealed for ``receiver``; ShareDecryptionError if it fails."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise ShareDecryptionError(f"a sealed share is at least 28 bytes, got {len(sealed)}")
    key = share_key(my_share_private, their_share_public, round_number, sender, receiver)
    ad = associated_data(round_number, sender, receiver)
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], ad)
    except InvalidTag:
        raise ShareDecryptionError(
            f"the share from site {sender} to site {receiver} in round {round_number} "
            "failed authentication (tampered, misdirected or replayed)"
        ) from None
