"""One secure-aggregation round at the server: relay keys and shares, sum masked inputs,
unmask the sum and nothing else.

The server knows sites by client id (their mTLS identity) and gives them round indices
1..n by sorted id. Each ``close_*`` fixes who goes on (U1 advertised, U2 shared keys,
U3 sent a masked input); a site that misses a phase only drops out of the later ones.
The server only ever asks for one secret per site, the self-mask seed of a site in U3
or the mask key of a site in U2 but not U3, and accepts no other share, so it never
holds what would unmask a single input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np

from fedmae.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidRequest,
    InvalidUpdate,
    KeysRejected,
    SecAggFailed,
    StaleUpdate,
)
from fedmae.secagg import fixed_point, graph
from fedmae.secagg.aead import NONCE_BYTES, TAG_BYTES
from fedmae.secagg.masks import ring_dtype
from fedmae.secagg.messages import (
    AdvertiseKeys,
    InboundShares,
    PeerKeys,
    Roster,
    SealedShare,
    SecAggParams,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from fedmae.secagg.shamir import Share
from fedmae.secagg.signing import CertificateCheck
from fedmae.secagg.site import SEALED_PLAINTEXT_BYTES
from fedmae.secagg.unmasking import (
    SharesDisagree,
    dropped_pairs,
    matches_commitment,
    matches_public_key,
    recover,
    remove_masks,
)

log = logging.getLogger(__name__)

SEALED_BYTES = NONCE_BYTES + SEALED_PLAINTEXT_BYTES + TAG_BYTES  # 28 + 136
COMMITMENT_BYTES = 32
ADVERTISING, SHARING, MASKING, UNMASKING, DONE = (
    "advertising keys", "sharing keys", "collecting masked inputs", "unmasking", "done"
)  # fmt: skip


class SecureSum:
    """One round's secure sum at the server (see the module docstring)."""

    def __init__(self, round: int, attempt: int, params: SecAggParams, length: int,
                 check: CertificateCheck, seed: bytes | None = None):  # fmt: skip
        self.round, self.attempt, self.params, self.length = round, attempt, params, length
        self._check = check
        self._graph_seed = seed if seed is not None else os.urandom(32)
        self._phase = ADVERTISING
        self.abort_reason: str | None = None
        self.excluded: dict[str, str] = {}  # client id -> why it left the round
        self._keys: dict[str, AdvertiseKeys] = {}
        self._index: dict[str, int] = {}
        self._client: dict[int, str] = {}
        self._neighbours: dict[int, frozenset[int]] = {}
        self.threshold = 0
        self._sealed: dict[int, ShareKeys] = {}  # sender -> its ShareKeys
        self._u2: frozenset[int] = frozenset()
        self._sum: np.ndarray | None = None
        self._summed: set[int] = set()
        self._u3: frozenset[int] = frozenset()
        self._revealed: dict[int, UnmaskShares] = {}  # holder -> its answer
        self._result: tuple[np.ndarray, int] | None = None

    # Round log ------------------------------------------------------------------------

    @property
    def survivors(self) -> tuple[str, ...]:
        """Sites whose masked input is in the sum (U3), by client id."""
        return tuple(sorted(self._client[i] for i in self._u3))

    @property
    def dropped(self) -> tuple[str, ...]:
        """Sites that shared keys but sent no masked input (U2 minus U3)."""
        return tuple(sorted(self._client[i] for i in self._u2 - self._u3))

    @property
    def degree(self) -> int:
        """Neighbours per site in this round's graph (0 before it is drawn)."""
        return max((len(peers) for peers in self._neighbours.values()), default=0)

    @property
    def ring_dtype(self) -> np.dtype:
        return ring_dtype(self.params.ring_bits)

    @property
    def input_length(self) -> int:
        """d + 1: the delta's values, then the site's weight."""
        return self.length + 1

    def exclude(self, client_id: str, reason: str) -> None:
        """Drop a site from the phases to come (an input already added stays in the sum)."""
        self.excluded.setdefault(client_id, reason)
        log.info("secagg round %s: %s excluded: %s", self.round, client_id, reason)

    def aborted(self, client_id: str, reason: str) -> None:
        """A site sent ``SecAggAbort``: the round cannot be trusted, so it fails."""
        if self.abort_reason is None:
            self.abort_reason = f"site {client_id} aborted the round: {reason}"

    # ADVERTISE_KEYS -------------------------------------------------------------------

    def advertised(self, client_id: str, keys: AdvertiseKeys) -> None:
        self._expect(ADVERTISING, "key advertisement", keys.round, keys.attempt)
        if client_id in self._keys:
            raise FailedPrecondition(
                f"site {client_id} already advertised its keys for round {self.round}"
            )
        self._check.verify(keys, client_id, self.round, self.attempt)
        for other, theirs in self._keys.items():
            if keys.mask_public in (theirs.mask_public, theirs.share_public) or (
                keys.share_public in (theirs.mask_public, theirs.share_public)
            ):
                raise KeysRejected(f"site {client_id} advertised a public key of site {other}")
        self._keys[client_id] = keys

    def close_advertising(self) -> None:
        """Fix U1, the indices (by sorted client id), the neighbour graph and t."""
        self._expect(ADVERTISING, "closing of key advertisement")
        u1 = sorted(c for c in self._keys if c not in self.excluded)
        self._phase = SHARING
        if len(u1) < 2:
            raise self._fail(f"{len(u1)} site(s) advertised keys; secure aggregation needs 2")
        p = self.params
        try:
            fixed_point.check_ring(p.ring_bits, len(u1), p.weight_cap, p.clip, p.frac_bits)
        except ConfigError as err:
            raise self._fail(str(err)) from None
        self._index = {client: i for i, client in enumerate(u1, start=1)}
        self._client = {i: client for client, i in self._index.items()}
        k = p.neighbours or graph.default_degree(len(u1))
        self._neighbours = graph.neighbours(list(self._client), k, self._graph_seed)
        sizes = {len(peers) + 1 for peers in self._neighbours.values()}
        self.threshold = p.threshold or graph.default_threshold(max(sizes))
        if not max(sizes) / 2 < self.threshold <= min(sizes):
            raise self._fail(
                f"threshold {self.threshold} is not a strict majority of every site's "
                f"{min(sizes)}..{max(sizes)} share holders"
            )

    def roster(self, client_id: str) -> Roster:
        me = self._member(client_id, SHARING, self._client, "advertised no keys")
        peers = tuple(
            PeerKeys(i, self._client[i], self._keys[self._client[i]])
            for i in sorted(self._neighbours[me])
        )
        return Roster(me, self.threshold, peers)

    # SHARE_KEYS -----------------------------------------------------------------------

    def shared(self, client_id: str, msg: ShareKeys) -> None:
        self._expect(SHARING, "share of keys", msg.round, msg.attempt)
        me = self._member(client_id, SHARING, self._client, "advertised no keys")
        if me in self._sealed:
            raise FailedPrecondition(f"site {client_id} already shared its keys this round")
        receivers = [share.receiver for share in msg.shares]
        if sorted(receivers) != sorted(self._neighbours[me]):
            raise InvalidRequest(
                f"site {client_id} sealed shares for {sorted(receivers)}, not once for each "
                f"of its neighbours {sorted(self._neighbours[me])}"
            )
        for share in msg.shares:
            if share.sender != me or len(share.ciphertext) != SEALED_BYTES:
                raise InvalidRequest(
                    f"site {client_id}: a sealed share names sender {share.sender} (its index "
                    f"is {me}) or is {len(share.ciphertext)} bytes, not {SEALED_BYTES}"
                )
        if len(msg.seed_commitment) != COMMITMENT_BYTES:
            raise InvalidRequest(
                f"site {client_id}: a seed commitment is {COMMITMENT_BYTES} bytes, got "
                f"{len(msg.seed_commitment)}"
            )
        self._sealed[me] = msg

    def close_sharing(self) -> None:
        """Fix U2: the sites that shared keys, less any left with too few sharing
        neighbours for their own shares ever to be rebuilt."""
        self._expect(SHARING, "closing of key sharing")
        self._phase = MASKING
        u2 = {i for i in self._sealed if self._client[i] not in self.excluded}
        while short := {i for i in u2 if len(self._neighbours[i] & u2) + 1 < self.threshold}:
            for i in short:
                self.exclude(self._client[i], "too few of its neighbours shared keys")
            u2 -= short
        self._u2 = frozenset(u2)
        if len(self._u2) < 2:
            raise self._fail(f"{len(self._u2)} site(s) shared keys; secure aggregation needs 2")

    def inbound(self, client_id: str) -> InboundShares:
        me = self._member(client_id, MASKING, self._u2, "did not share keys")
        shares: list[SealedShare] = [
            share
            for sender in sorted(self._neighbours[me] & self._u2)
            for share in self._sealed[sender].shares
            if share.receiver == me
        ]
        return InboundShares(tuple(shares))

    # MASKED_INPUT ---------------------------------------------------------------------

    def add_masked(self, client_id: str, ring: np.ndarray, own: bool = False) -> bool:
        """Add a site's masked input into the running sum (in place, modulo 2^bits).
        ``own``: the caller gives ``ring`` (a receive buffer) up, and the round's first
        input becomes the sum instead of a model-sized copy; True when it did."""
        me = self._member(client_id, MASKING, self._u2, "did not share keys")
        if me in self._summed:
            raise FailedPrecondition(f"site {client_id} already sent its masked input")
        if not isinstance(ring, np.ndarray) or ring.dtype != self.ring_dtype:
            got = getattr(ring, "dtype", type(ring).__name__)
            raise InvalidUpdate(f"a masked input is {self.ring_dtype} in this round, got {got}")
        if ring.shape != (self.input_length,):
            n, got = self.input_length, ring.shape
            raise InvalidUpdate(f"a masked input has {n} elements (d + 1), got shape {got}")
        adopted = own and self._sum is None
        if self._sum is None:
            self._sum = ring if own else ring.copy()  # [d + 1]
        else:
            self._sum += ring
        self._summed.add(me)
        return adopted

    def close_masking(self) -> None:
        """Fix U3 and fail now, before any share is revealed, if some site's secret
        could not be rebuilt from the sites still in the round."""
        self._expect(MASKING, "closing of masked inputs")
        self._phase = UNMASKING
        self._u3 = frozenset(self._summed)
        if len(self._u3) < max(2, self.threshold):
            raise self._fail(
                f"{len(self._u3)} site(s) sent a masked input; at least "
                f"{max(2, self.threshold)} are needed"
            )
        for v in sorted(self._u2):
            holders = len(self._asked_about(v))
            if holders < self.threshold:
                kind = "self-mask seed" if v in self._u3 else "mask key"
                raise self._fail(
                    f"site {self._client[v]}'s {kind} could be asked of {holders} holders; "
                    f"{self.threshold} are needed"
                )

    def _asked_about(self, v: int) -> set[int]:
        """The sites in U3 (and not excluded) asked for a share of ``v``'s secret."""
        holders = (self._neighbours[v] | {v}) & self._u3
        return {h for h in holders if self._client[h] not in self.excluded}

    def unmask_request(self, client_id: str) -> UnmaskRequest:
        me = self._member(client_id, UNMASKING, self._u3, "sent no masked input")
        mine = self._neighbours[me]
        return UnmaskRequest(
            survivors=tuple(sorted((mine & self._u3) | {me})),
            dropped=tuple(sorted(mine & (self._u2 - self._u3))),
        )

    def unmasked(self, client_id: str, msg: UnmaskShares) -> None:
        self._expect(UNMASKING, "unmask answer", msg.round, msg.attempt)
        me = self._member(client_id, UNMASKING, self._u3, "sent no masked input")
        if me in self._revealed:
            raise FailedPrecondition(f"site {client_id} already answered the unmask request")
        asked = self.unmask_request(client_id)
        for kind, answer, owners in (
            ("seed", msg.seed_shares, asked.survivors),
            ("key", msg.key_shares, asked.dropped),
        ):
            given = [revealed.owner for revealed in answer]
            if len(set(given)) != len(given) or not set(given) <= set(owners):
                raise InvalidRequest(
                    f"site {client_id} revealed {kind} shares of {sorted(given)}; it was asked "
                    f"for those of {list(owners)}, each once"
                )
            for revealed in answer:
                try:
                    x = Share.from_bytes(revealed.share).x
                except ValueError as err:
                    raise InvalidRequest(
                        f"site {client_id} revealed a malformed share: {err}"
                    ) from None
                if x != me:
                    raise InvalidRequest(
                        f"site {client_id} revealed a share at point {x}, not at its index {me}"
                    )
        self._revealed[me] = msg

    # The result -----------------------------------------------------------------------

    def result(self) -> tuple[np.ndarray, int]:
        """(sum of weight x delta over U3, float64 [d]; sum of weights), or SecAggFailed."""
        if self._result is None:
            ring, weight = self._unmask()
            self._result = (fixed_point.decode_sum(ring, self.params.frac_bits), weight)
        return self._result

    def mean(self) -> tuple[np.ndarray, int]:
        """(weighted mean over U3 as float32 [d], in the sum's own memory; sum of weights)."""
        ring, weight = self._unmask()
        if weight <= 0:
            raise self._fail("the surviving sites' weights sum to 0")
        return fixed_point.decode_mean_in_place(ring, self.params.frac_bits, weight), weight

    def noised_sum(self) -> tuple[np.ndarray, int]:
        """Distributed DP: (the sum over U3 of the sites' clipped, noised deltas as float32
        [d], in the sum's own memory; the number of inputs). Every site weighs 1, so the
        weights must sum to |U3| (else a site broke the protocol: SecAggFailed)."""
        ring, weight = self._unmask()
        if weight != len(self._u3):
            raise self._fail(
                f"under distributed DP every site weighs 1, but the {len(self._u3)} inputs' "
                f"weights sum to {weight}"
            )
        return fixed_point.decode_mean_in_place(ring, self.params.frac_bits, 1), weight

    def _unmask(self) -> tuple[np.ndarray, int]:
        """Every mask taken off the sum: its d values (in place) and the sum of weights."""
        if self.abort_reason is not None:
            raise SecAggFailed(self.abort_reason)
        self._expect(UNMASKING, "result")
        assert self._sum is not None  # close_masking checked U3 is not empty
        answered = {h: m for h, m in self._revealed.items() if self._client[h] not in self.excluded}
        seeds = {v: self._secret(v, "seed", answered) for v in sorted(self._u3)}
        keys = {v: self._secret(v, "key", answered) for v in sorted(self._u2 - self._u3)}
        pairwise: list[tuple[bytes, int]] = []
        for v, key in keys.items():
            survivors = {w: self._mask_public(w) for w in self._neighbours[v] & self._u3}
            pairwise += dropped_pairs(self.round, v, key, survivors)
        total, self._sum, self._phase = self._sum, None, DONE
        remove_masks(total, seeds.values(), pairwise)
        return total[: self.length], int(total[self.length])

    def _mask_public(self, index: int) -> bytes:
        return self._keys[self._client[index]].mask_public

    def _secret(self, owner: int, kind: str, answered: Mapping[int, UnmaskShares]) -> bytes:
        shares = {
            holder: Share.from_bytes(revealed.share)
            for holder, msg in answered.items()
            for revealed in (msg.seed_shares if kind == "seed" else msg.key_shares)
            if revealed.owner == owner
        }
        name = self._client[owner]
        what = "self-mask seed" if kind == "seed" else "mask key"
        if len(shares) < self.threshold:
            raise self._fail(
                f"only {len(shares)} of the {len(self._asked_about(owner))} holders asked "
                f"revealed their share of site {name}'s {what}; {self.threshold} are needed"
            )
        is_right = (
            matches_commitment(self._sealed[owner].seed_commitment)
            if kind == "seed"
            else matches_public_key(self._mask_public(owner))
        )
        try:
            secret, offenders = recover(shares, self.threshold, is_right)
        except SharesDisagree as err:
            raise self._fail(f"site {name}'s {what}: {err}") from None
        for holder in offenders:
            self.exclude(self._client[holder], f"revealed a wrong share of site {name}'s {what}")
        return secret

    # Bookkeeping ----------------------------------------------------------------------

    def _expect(
        self, phase: str, what: str, round: int | None = None, attempt: int | None = None
    ) -> None:
        if round is not None and (round, attempt) != (self.round, self.attempt):
            raise StaleUpdate(
                f"a secure-aggregation {what} for round {round} attempt {attempt}; this is "
                f"round {self.round} attempt {self.attempt}"
            )
        if self._phase != phase:
            raise FailedPrecondition(
                f"a secure-aggregation {what} while round {self.round} is {self._phase}"
            )

    def _member(self, client_id: str, phase: str, members, missing: str) -> int:
        self._expect(phase, f"request of site {client_id}")
        index = self._index.get(client_id)
        if index is None or index not in members:
            raise FailedPrecondition(f"site {client_id} {missing} in round {self.round}")
        if client_id in self.excluded:
            raise FailedPrecondition(
                f"site {client_id} was excluded from round {self.round}: {self.excluded[client_id]}"
            )
        return index

    def _fail(self, reason: str) -> SecAggFailed:
        self.abort_reason = self.abort_reason or reason
        self._phase = DONE
        self._sum = None
        return SecAggFailed(f"secure aggregation of round {self.round} failed: {reason}")
