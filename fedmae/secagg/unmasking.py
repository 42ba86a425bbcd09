"""The server's last step: rebuild the revealed secrets and take the masks off the sum.

Split from ``aggregation`` (which keeps the phase bookkeeping) because it is the one
place that turns shares back into secrets: a corrupt share must be found and named, not
silently give a wrong seed, and the mask removal must not hold more than one block of
keystream beside the sum.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from fedmae.secagg.keys import (
    PURPOSE_MASK,
    agree,
    load_private,
    load_public,
    pair_context,
    public_bytes,
)
from fedmae.secagg.masks import BLOCK, PAIRWISE_NONCE, SELF_NONCE, bits_of, expand_range
from fedmae.secagg.shamir import Share, interpolate_at, reconstruct


class SharesDisagree(ValueError):
    """The revealed shares of one secret rebuild nothing that passes its check."""


def recover(
    shares: Mapping[int, Share], threshold: int, is_right: Callable[[bytes], bool]
) -> tuple[bytes, tuple[int, ...]]:
    """The secret from ``shares`` (holder -> share) and the holders whose shares were
    wrong: ``is_right`` checks a candidate (a seed against its commitment, a key against
    its advertised public key).

    With more than ``threshold`` shares a wrong one is found by leaving one holder out
    at a time: the first ``threshold`` of the rest rebuild the secret exactly when the
    wrong share is the one left out. The holders named are those whose shares lie off
    the polynomial that rebuilt the secret (when another share confirms it).
    ``SharesDisagree`` when no candidate passes (two or more wrong shares among the
    first, or exactly ``threshold`` shares with one wrong).
    """
    holders = sorted(shares)
    subsets = [holders]
    if len(holders) > threshold:
        subsets += [[h for h in holders if h != left_out] for left_out in holders]
    for subset in subsets:
        used = [shares[h] for h in subset[:threshold]]
        secret = _try(used, threshold, is_right)
        if secret is not None:
            return secret, _off_the_polynomial(used, [shares[h] for h in holders])
    raise SharesDisagree(
        f"the {len(holders)} revealed shares (threshold {threshold}) rebuild no secret that "
        "matches its commitment: more than one holder sent a wrong share"
        if len(holders) > threshold
        else f"the {len(holders)} revealed shares (threshold {threshold}) rebuild no secret "
        "that matches its commitment, and there is no spare share to find the wrong one"
    )


def _off_the_polynomial(used: list[Share], every: list[Share]) -> tuple[int, ...]:
    """The holders of shares off the polynomial through ``used``, once a share outside
    ``used`` confirms that polynomial. Unconfirmed (wrong shares among ``used`` whose
    errors happen to cancel at 0: the secret is still right), nobody is blamed."""
    points = {share.x for share in used}
    others = [share for share in every if share.x not in points]
    off = tuple(s.x for s in others if interpolate_at(used, s.x) != s.y)
    return off if len(off) < len(others) else ()


def matches_commitment(commitment: bytes) -> Callable[[bytes], bool]:
    """The check of a rebuilt self-mask seed: its sha256 is the site's commitment."""
    return lambda secret: hashlib.sha256(secret).digest() == commitment


def matches_public_key(public: bytes) -> Callable[[bytes], bool]:
    """The check of a rebuilt mask key: its public key is the one the site advertised."""
    return lambda secret: public_bytes(load_private(secret)) == public


def _try(used: list[Share], threshold: int, is_right: Callable[[bytes], bool]) -> bytes | None:
    try:
        candidate = reconstruct(used, threshold)
    except ValueError:  # interpolates to no 32-byte value: a wrong share among them
        return None
    return candidate if is_right(candidate) else None


def remove_masks(
    total: np.ndarray, self_seeds: Iterable[bytes], pairwise: Iterable[tuple[bytes, int]]
) -> None:
    """Take the survivors' self masks and the dropped sites' leftover pairwise masks off
    ``total`` in place, one block of keystream at a time.

    ``pairwise`` holds (seed, sign): the contribution ``sign x pairwise_mask(seed)`` a
    survivor added for a neighbour that then dropped (its counterpart never came).
    """
    bits = bits_of(total)
    seeds, pairs = list(self_seeds), list(pairwise)
    scratch = np.empty(BLOCK, dtype=total.dtype)  # each mask's block, in turn
    for start in range(0, total.size, BLOCK):
        block = total[start : start + BLOCK]  # a view: subtracted in place
        mask = scratch[: block.size]
        for seed in seeds:
            block -= expand_range(seed, start, block.size, bits, SELF_NONCE, out=mask)
        for seed, sign in pairs:
            expand_range(seed, start, block.size, bits, PAIRWISE_NONCE, out=mask)
            if sign > 0:
                block -= mask
            else:
                block += mask


def dropped_pairs(
    round: int, dropped: int, mask_key: bytes, survivors: Mapping[int, bytes]
) -> list[tuple[bytes, int]]:
    """(seed, sign) of what each survivor ``w`` (index -> mask public key) added for its
    pair with ``dropped``, whose mask key was rebuilt: +mask if dropped > w, else -mask."""
    private = load_private(mask_key)
    return [
        (
            agree(private, load_public(public), pair_context(PURPOSE_MASK, round, w, dropped)),
            1 if dropped > w else -1,
        )
        for w, public in sorted(survivors.items())
    ]
