"""What the secure-aggregation phases say, both ways: plain dataclasses, no wire.

One round of secure aggregation (Bonawitz et al. 2017, with Bell et al. 2020's sparse
neighbour graph) after a site has trained:

==============  ==========================================  ============================
phase           the server sends (in the phase's task)      the site answers
==============  ==========================================  ============================
ADVERTISE_KEYS  ``SecAggParams`` (with the training task)   ``AdvertiseKeys`` (signed)
SHARE_KEYS      ``Roster``: its index, threshold, the        ``ShareKeys``: sealed shares
                neighbours' signed keys and certificates     for each neighbour
MASKED_INPUT    ``InboundShares``: sealed shares for it      the masked input (an upload
                from neighbours that shared keys             in a ring encoding)
UNMASK          ``UnmaskRequest``: which neighbours sent     ``UnmaskShares``: for each,
                a masked input and which dropped             one secret's share, never
                                                             both
==============  ==========================================  ============================

A site may answer any phase with ``SecAggAbort`` (a check failed: the round cannot be
trusted); the server logs the reason and fails the round. ``fedmae.transport.secagg``
converts these to and from the ``fedmae.v1`` protobuf messages.

Sites are named by client id on the wire to the server and by a round index (1..n,
the Shamir x-coordinate and the id in key-agreement contexts) between sites.
"""

from __future__ import annotations

from dataclasses import dataclass

SIGNATURE_CONTEXT = b"fedmae-secagg/v1/advertise-keys"


@dataclass(frozen=True)
class SecAggParams:
    """The round's secure-aggregation settings, fixed by the server at start."""

    ring_bits: int  # 32 or 64: inputs and masks live in Z_{2^ring_bits}
    frac_bits: int  # fixed point: a value v is sent as round(v * weight * 2^frac_bits)
    clip: float  # each delta value is clipped to [-clip, clip] first
    weight_cap: int  # a site weighs min(its sample count, weight_cap)
    threshold: int = 0  # Shamir t; 0 = default (a strict majority of a site's holders)
    neighbours: int = 0  # SecAgg+ degree k above the complete-graph size; 0 = default
    # Distributed DP (--dp distributed; fedmae.privacy.skellam): with σ > 0 each site
    # clips its delta to L2 norm dp_clip, weighs it 1 (no sample count is sent), rounds
    # it conditionally and adds Skellam noise of variance σ²Δ₂²/dp_min_sites before
    # masking, so any sum of >= dp_min_sites inputs carries noise of variance σ²Δ₂².
    dp_noise_multiplier: float = 0.0  # σ; 0 = no distributed DP
    dp_clip: float = 0.0  # C, the L2 norm of a site's delta
    dp_min_sites: int = 0  # the fewest inputs a round publishes with

    @property
    def distributed_dp(self) -> bool:
        return self.dp_noise_multiplier > 0


@dataclass(frozen=True)
class AdvertiseKeys:
    """A site's two fresh public keys for one round, signed with its enrolled key."""

    round: int
    attempt: int
    mask_public: bytes  # X25519, 32 bytes: pairwise mask seeds
    share_public: bytes  # X25519, 32 bytes: encryption of the shares relayed
    certificate_chain: bytes  # PEM: the site's certificate, then its issuing CA(s)
    signature: bytes  # ECDSA-SHA256 over ``keys_statement`` by the certificate's key


def keys_statement(
    round_number: int, attempt: int, client_id: str, mask_public: bytes, share_public: bytes
) -> bytes:
    """The bytes a site signs: context, round, attempt, its id and both keys.

    Fixed-width fields and a length-prefixed id, so no two statements encode alike;
    the round and attempt in it make a replayed advertisement fail to verify.
    """
    name = client_id.encode()
    return b"".join(
        (
            SIGNATURE_CONTEXT,
            round_number.to_bytes(8, "big"),
            attempt.to_bytes(4, "big"),
            len(name).to_bytes(2, "big"),
            name,
            mask_public,
            share_public,
        )
    )


@dataclass(frozen=True)
class PeerKeys:
    """One neighbour as a site sees it in its roster."""

    index: int
    client_id: str
    keys: AdvertiseKeys


@dataclass(frozen=True)
class Roster:
    """SHARE_KEYS: who a site is this round and whom it masks with and shares to."""

    index: int  # the site's own index, 1..n
    threshold: int  # Shamir t for this round
    peers: tuple[PeerKeys, ...]  # its neighbours (never itself), by index


@dataclass(frozen=True)
class SealedShare:
    """A share pair (self-mask seed, mask key) sealed by ``sender`` for ``receiver``."""

    sender: int
    receiver: int
    ciphertext: bytes  # nonce || ChaCha20-Poly1305(seed share || key share) || tag


@dataclass(frozen=True)
class ShareKeys:
    """A site's sealed shares, one per neighbour, and a commitment to its self-mask seed."""

    round: int
    attempt: int
    shares: tuple[SealedShare, ...]
    seed_commitment: bytes  # sha256 of the self-mask seed: checks its reconstruction


@dataclass(frozen=True)
class InboundShares:
    """MASKED_INPUT: the sealed shares addressed to a site by neighbours that shared keys
    (their senders are the neighbours it masks with)."""

    shares: tuple[SealedShare, ...]


@dataclass(frozen=True)
class UnmaskRequest:
    """UNMASK: which of a site's neighbours the server has a masked input from
    (reveal their self-mask seed shares) and which shared keys but sent none (reveal
    their mask key shares). A site in neither list is not asked about."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class RevealedShare:
    owner: int  # the index of the site whose secret this is a share of
    share: bytes  # ``shamir.Share.to_bytes()``, 68 bytes


@dataclass(frozen=True)
class UnmaskShares:
    """A site's answer to UNMASK (its own seed share included when it survived)."""

    round: int
    attempt: int
    seed_shares: tuple[RevealedShare, ...]
    key_shares: tuple[RevealedShare, ...]


@dataclass(frozen=True)
class SecAggAbort:
    """A site stops the round: a check failed (a signature, a count, a share)."""

    round: int
    attempt: int
    reason: str
