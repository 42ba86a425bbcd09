"""One secure-aggregation round at one site: the four phases of ``messages`` in order.

The site trusts nothing the server relays until it verifies: its peers' keys against
the federation CA, each sealed share by its AEAD tag, each unmask request against what
it knows (who shared with it, that it sent its own input, that no site is asked about
twice). Any failure raises ``SecAggAborted`` and the caller sends ``SecAggAbort``: an
unverified round is never completed, since that is where a dishonest server would learn
an input.
"""

from __future__ import annotations

import hashlib
import os
import secrets

import numpy as np
import torch

from fedmae.errors import KeysRejected, SecAggAborted
from fedmae.privacy.mechanisms import clip_to_norm
from fedmae.privacy.skellam import DistributedSkellam, noise_rng
from fedmae.secagg import fixed_point
from fedmae.secagg.aead import ShareDecryptionError, decrypt_from_peer, encrypt_for_peer
from fedmae.secagg.keys import (
    PURPOSE_MASK,
    SiteKeys,
    agree,
    generate_site_keys,
    load_public,
    pair_context,
    private_bytes,
)
from fedmae.secagg.masks import BLOCK, PAIRWISE_NONCE, SELF_NONCE, expand_range, ring_dtype
from fedmae.secagg.messages import (
    AdvertiseKeys,
    InboundShares,
    PeerKeys,
    RevealedShare,
    Roster,
    SealedShare,
    SecAggParams,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from fedmae.secagg.shamir import SHARE_BYTES, Share, split_at
from fedmae.secagg.signing import CertificateCheck, sign_keys

SEALED_PLAINTEXT_BYTES = 2 * SHARE_BYTES  # seed share || mask-key share


class SiteRound:
    """One round at one site: ``advertise``, ``share_keys``, ``masked_input``, ``unmask``.

    ``rng`` seeds the stochastic rounding (a test's reproducible run); keys, the
    self-mask seed and the Shamir coefficients always come from the OS.
    """

    def __init__(
        self,
        round: int,
        attempt: int,
        client_id: str,
        params: SecAggParams,
        key_pem: bytes,
        chain_pem: bytes,
        check: CertificateCheck,
        rng: np.random.Generator | None = None,
    ):
        self.round, self.attempt, self.client_id = round, attempt, client_id
        self.params = params
        self._key_pem, self._chain_pem, self._check = key_pem, chain_pem, check
        # One rounding seed per round: asked for its masked input again (a task resent
        # after a reconnect), the site sends the same bytes, never a second rounding of
        # the same masks (their difference would expose the rounding noise).
        source = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self._rounding_seed = int(source.integers(0, 2**63))
        # Distributed DP's noise: 256 bits from the OS (a server that guessed the seed
        # could take the noise off); a test's rng makes it reproducible.
        self._noise_seed = secrets.randbits(256) if rng is None else int(source.integers(0, 2**63))
        self._keys: SiteKeys | None = None
        self._advertisement: AdvertiseKeys | None = None
        self._roster: Roster | None = None
        self._peers: dict[int, PeerKeys] = {}
        self._shared: ShareKeys | None = None
        self._self_seed = b""
        self._own_shares: tuple[Share, Share] | None = None  # (seed, mask key) at my index
        self._held: dict[int, tuple[Share, Share]] = {}  # sender -> its shares I hold
        self._sent_input = False
        self._unmask: tuple[UnmaskRequest, UnmaskShares] | None = None

    # ADVERTISE_KEYS -------------------------------------------------------------------

    def advertise(self) -> AdvertiseKeys:
        """Fresh key pairs for this round, signed; the same advertisement if asked again."""
        if self._advertisement is None:
            self._keys = generate_site_keys()
            mask_pk, share_pk = self._keys.public_bytes()
            signature = sign_keys(
                self._key_pem, self.round, self.attempt, self.client_id, mask_pk, share_pk
            )
            self._advertisement = AdvertiseKeys(
                self.round, self.attempt, mask_pk, share_pk, self._chain_pem, signature
            )
        return self._advertisement

    # SHARE_KEYS -----------------------------------------------------------------------

    def share_keys(self, roster: Roster) -> ShareKeys:
        """Verify every neighbour, then seal a share of the self-mask seed and of the
        mask key for each (the same answer if the same roster comes again)."""
        if self._keys is None:
            raise self._abort("asked to share keys before advertising any")
        if self._shared is not None:
            if roster != self._roster:
                raise self._abort("the server sent a second, different roster")
            return self._shared
        self._check_roster(roster)
        self._roster = roster
        self._peers = {peer.index: peer for peer in roster.peers}
        self._self_seed = os.urandom(32)
        holders = [roster.index, *sorted(self._peers)]
        seed_shares = split_at(self._self_seed, roster.threshold, holders)
        key_shares = split_at(private_bytes(self._keys.mask), roster.threshold, holders)
        self._own_shares = (seed_shares[0], key_shares[0])
        sealed = tuple(
            SealedShare(
                roster.index,
                index,
                encrypt_for_peer(
                    self._keys.share,
                    load_public(self._peers[index].keys.share_public),
                    self.round,
                    roster.index,
                    index,
                    seed_share.to_bytes() + key_share.to_bytes(),
                ),
            )
            for index, seed_share, key_share in zip(
                holders[1:], seed_shares[1:], key_shares[1:], strict=True
            )
        )
        commitment = hashlib.sha256(self._self_seed).digest()
        self._shared = ShareKeys(self.round, self.attempt, sealed, commitment)
        return self._shared

    def _check_roster(self, roster: Roster) -> None:
        indices = [peer.index for peer in roster.peers]
        names = [peer.client_id for peer in roster.peers]
        if len(set(indices)) != len(indices) or len(set(names)) != len(names):
            raise self._abort("the roster names a neighbour twice")
        if roster.index in indices or self.client_id in names:
            raise self._abort("the roster lists this site as its own neighbour")
        if not all(0 < index < 2**16 for index in [roster.index, *indices]):
            raise self._abort(f"the roster has indices out of 1..65535: {sorted(indices)}")
        if not roster.peers:
            raise self._abort("the roster has no neighbours: this site's input would be alone")
        holders = len(roster.peers) + 1
        # t must be a strict majority of the holders: with t <= holders / 2 a server could
        # ask one half for a site's seed shares and the other half for its key shares.
        if not holders / 2 < roster.threshold <= holders:
            raise self._abort(
                f"the roster's threshold {roster.threshold} is not a strict majority of this "
                f"site's {holders} share holders (itself and {holders - 1} neighbours)"
            )
        for peer in roster.peers:
            try:
                self._check.verify(peer.keys, peer.client_id, self.round, self.attempt)
            except KeysRejected as err:
                raise self._abort(
                    f"the keys of site {peer.client_id} do not verify against the federation "
                    f"CA ({err}): the server or the network altered them"
                ) from None

    # MASKED_INPUT ---------------------------------------------------------------------

    def masked_input(
        self, inbound: InboundShares, delta: np.ndarray, num_samples: int
    ) -> np.ndarray:
        """Open the shares neighbours sealed for this site, then return
        encode(delta) ++ [weight] plus the self mask and the pairwise masks of every
        sender, in the ring (length d + 1), built block by block. Asked again with the
        same shares and delta, the same bytes. ValueError for a delta that is not flat
        and finite (a fault here, not the server's)."""
        if self._shared is None or self._roster is None or self._keys is None:
            raise self._abort("asked for a masked input before sharing keys")
        held = self._open(inbound)
        if self._sent_input and held.keys() != self._held.keys():
            raise self._abort("the server sent a second, different set of inbound shares")
        if len(held) + 1 < self._roster.threshold:
            raise self._abort(
                f"only {len(held)} neighbours shared keys with this site; with itself that is "
                f"under the threshold {self._roster.threshold}, so its shares could not be "
                "recovered"
            )
        self._held = held
        delta = np.asarray(delta)
        if delta.ndim != 1 or not np.all(np.isfinite(delta)):
            raise ValueError("a delta is a flat array of finite values")
        if num_samples < 0:
            raise ValueError(f"a sample count is non-negative, got {num_samples}")
        # Under distributed DP every site weighs 1: no sample count leaves the site.
        weight = 1 if self.params.distributed_dp else min(num_samples, self.params.weight_cap)
        out = self._masked(delta, weight)
        self._sent_input = True
        return out

    def _open(self, inbound: InboundShares) -> dict[int, tuple[Share, Share]]:
        assert self._roster is not None and self._keys is not None
        me = self._roster.index
        held: dict[int, tuple[Share, Share]] = {}
        for sealed in inbound.shares:
            peer = self._peers.get(sealed.sender)
            if peer is None or sealed.receiver != me or sealed.sender in held:
                raise self._abort(
                    f"the server relayed a share from index {sealed.sender} to {sealed.receiver}"
                    f", which is not one share from a neighbour of site {me}"
                )
            try:
                plain = decrypt_from_peer(
                    self._keys.share,
                    load_public(peer.keys.share_public),
                    self.round,
                    sealed.sender,
                    me,
                    sealed.ciphertext,
                )
                if len(plain) != SEALED_PLAINTEXT_BYTES:
                    raise ValueError(f"{len(plain)} bytes, not {SEALED_PLAINTEXT_BYTES}")
                pair = (
                    Share.from_bytes(plain[:SHARE_BYTES]),
                    Share.from_bytes(plain[SHARE_BYTES:]),
                )
                if pair[0].x != me or pair[1].x != me:
                    raise ValueError("shares for another index")
            except (ShareDecryptionError, ValueError) as err:
                raise self._abort(
                    f"the share site {peer.client_id} sealed for this site does not open ({err})"
                    ": the server or the network altered it"
                ) from None
            held[sealed.sender] = pair
        return held

    def _masked(self, delta: np.ndarray, weight: int) -> np.ndarray:
        assert self._roster is not None and self._keys is not None
        params, me, d = self.params, self._roster.index, delta.size
        rounding = np.random.default_rng(self._rounding_seed)
        pair_seeds = {
            peer: agree(
                self._keys.mask,
                load_public(self._peers[peer].keys.mask_public),
                pair_context(PURPOSE_MASK, self.round, me, peer),
            )
            for peer in sorted(self._held)
        }
        noised = self._noised(delta) if params.distributed_dp else None  # int64 [d]
        out = np.empty(d + 1, dtype=ring_dtype(params.ring_bits))  # [d + 1] ring
        scratch = np.empty(BLOCK, dtype=out.dtype)  # each mask's block, in turn
        for start in range(0, d + 1, BLOCK):
            stop = min(start + BLOCK, d + 1)
            block = out[start:stop]  # a view: the masks are added in place
            values = delta[start : min(stop, d)]
            if noised is not None:
                block[: values.size] = fixed_point.to_ring(noised[start : start + values.size],
                                                           params.ring_bits)  # fmt: skip
            else:
                block[: values.size] = fixed_point.encode(
                    values, params.clip, params.frac_bits, params.ring_bits, weight, rounding
                )
            if stop == d + 1:
                block[-1] = weight  # the last element: this site's weight, unscaled
            mask = scratch[: stop - start]
            block += expand_range(self._self_seed, start, mask.size, params.ring_bits,
                                  SELF_NONCE, out=mask)  # fmt: skip
            for peer, seed in pair_seeds.items():
                expand_range(seed, start, mask.size, params.ring_bits, PAIRWISE_NONCE, out=mask)
                if peer > me:
                    block += mask
                else:
                    block -= mask
        return out

    def _noised(self, delta: np.ndarray) -> np.ndarray:
        """Distributed DP: the delta clipped to L2 norm C, conditionally rounded, plus
        this site's share of the Skellam noise (int64, ``fedmae.privacy.skellam``). The
        generator is seeded once a round, so a resent input is the same draw."""
        p = self.params
        mechanism = DistributedSkellam(
            clip=p.dp_clip, noise_multiplier=p.dp_noise_multiplier, frac_bits=p.frac_bits,
            dim=delta.size, min_sites=p.dp_min_sites,
        )  # fmt: skip
        values = delta.astype(np.float64)  # [d], a copy
        clip_to_norm(torch.from_numpy(values), p.dp_clip)  # in place: the same memory
        return mechanism.encode(values, noise_rng(self._noise_seed))

    # UNMASK ---------------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Reveal, for each neighbour, the one secret the request names: seed shares of
        survivors, mask-key shares of dropped sites; never both for one site, and at
        most one answer per round (the same one again for the same request)."""
        if not self._sent_input or self._roster is None or self._own_shares is None:
            raise self._abort("asked to unmask before sending a masked input")
        if self._unmask is not None:
            answered, answer = self._unmask
            if request != answered:
                raise self._abort(
                    "asked to unmask a second time with other lists: a site answers once a round"
                )
            return answer
        self._check_request(request)
        me = self._roster.index
        held = {**self._held, me: self._own_shares}
        answer = UnmaskShares(
            self.round,
            self.attempt,
            tuple(RevealedShare(v, held[v][0].to_bytes()) for v in sorted(request.survivors)),
            tuple(RevealedShare(v, held[v][1].to_bytes()) for v in sorted(request.dropped)),
        )
        self._unmask = (request, answer)
        return answer

    def _check_request(self, request: UnmaskRequest) -> None:
        assert self._roster is not None
        me, threshold = self._roster.index, self._roster.threshold
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise self._abort("the unmask request names a site twice in one list")
        both = survivors & dropped
        if both:
            raise self._abort(
                f"the unmask request asks for both secrets of site(s) {sorted(both)}: that "
                "would reveal their input"
            )
        if me in dropped or me not in survivors:
            raise self._abort(
                "the unmask request calls this site dropped, but it sent its masked input"
            )
        strangers = (survivors | dropped) - set(self._held) - {me}
        if strangers:
            raise self._abort(
                f"the unmask request names site(s) {sorted(strangers)} that shared no keys "
                "with this site"
            )
        if len(survivors) < threshold:
            raise self._abort(
                f"only {len(survivors)} of this site's neighbourhood survived (itself "
                f"included), under the threshold {threshold}: unmasking would expose too few"
            )

    def _abort(self, reason: str) -> SecAggAborted:
        return SecAggAborted(
            f"site {self.client_id}, round {self.round} attempt {self.attempt}: {reason}; "
            "aborting the round"
        )
