"""X25519 key pairs and pairwise seed agreement (HKDF-SHA256 over the shared secret).

Each site holds two key pairs per round, as in Bonawitz et al. 2017: one whose
agreements seed the pairwise masks, one whose agreements key the encryption of the
Shamir shares the server relays. A seed is bound to its purpose, the round and the
two site ids (sorted, so both ends derive the same bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32

PURPOSE_MASK = b"pairwise-mask"
PURPOSE_SHARE_ENCRYPTION = b"share-encryption"


@dataclass(frozen=True)
class SiteKeys:
    """A site's two key pairs for one round: ``mask`` (pairwise masks), ``share`` (AEAD)."""

    mask: X25519PrivateKey
    share: X25519PrivateKey

    def public_bytes(self) -> tuple[bytes, bytes]:
        """The raw 32-byte public keys (mask, share) a site advertises."""
        return public_bytes(self.mask), public_bytes(self.share)


def generate_site_keys() -> SiteKeys:
    """Two fresh X25519 key pairs (never reuse them across rounds)."""
    return SiteKeys(mask=X25519PrivateKey.generate(), share=X25519PrivateKey.generate())


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The raw 32-byte public key of a private or public X25519 key."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public(raw: bytes) -> X25519PublicKey:
    """An advertised public key from its 32 raw bytes; ValueError on any other length."""
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (what a site Shamir-shares for dropout recovery)."""
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def load_private(raw: bytes) -> X25519PrivateKey:
    """A private key from its 32 raw bytes (a reconstructed mask key)."""
    if len(raw) != SEED_BYTES:
        raise ValueError(f"an X25519 private key is {SEED_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def pair_context(purpose: bytes, round_number: int, site_a: int, site_b: int) -> bytes:
    """The HKDF info for one pair in one round: purpose, round, both ids sorted.

    Sorting makes the context the same from both ends; the fixed-width fields keep
    distinct (round, ids) from ever encoding to the same bytes.
    """
    if site_a == site_b:
        raise ValueError(f"a site does not agree a seed with itself (id {site_a})")
    low, high = sorted((site_a, site_b))
    for value in (round_number, low, high):
        if not 0 <= value < 2**64:
            raise ValueError(f"round numbers and site ids must fit in 64 bits, got {value}")
    fields = b"".join(v.to_bytes(8, "big") for v in (round_number, low, high))
    return b"fedmae-secagg/v1/" + purpose + b"/" + fields


def agree(my_private: X25519PrivateKey, their_public: X25519PublicKey, context: bytes) -> bytes:
    """A 32-byte seed both ends derive: HKDF-SHA256(X25519(mine, theirs), info=context).

    ``cryptography`` refuses a low-order peer key (an all-zero shared secret) with
    ValueError, so a server cannot force a known seed.
    """
    shared = my_private.exchange(their_public)
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=context).derive(
        shared
    )
