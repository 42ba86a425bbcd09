"""The neighbour graph: who masks with and shares to whom.

Small rounds use the complete graph (Bonawitz et al. 2017). Larger ones use a
SecAgg+ sparse graph (Bell et al. 2020, k = O(log n)): a Harary graph H(k, n) laid
on a seeded random permutation of the sites. Each site is joined to the k/2 sites
on either side of it in the shuffled cycle, so the graph is symmetric, exactly
k-regular (k is rounded up to even) and k-connected. The seed must be one every
party agrees on (the server announces it); the same seed gives the same graph.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

COMPLETE_UP_TO = 20  # the default round size up to which the graph is complete


def default_degree(sites: int) -> int:
    """A SecAgg+ degree for ``sites`` sites: about 3 log2(n), even, at most n - 1.

    A starting point for measurement, not a security proof: Bell et al.'s constants
    depend on the tolerated corrupt and dropped fractions.
    """
    if sites < 2:
        return 0
    k = 2 * math.ceil(1.5 * math.log2(sites))
    return min(k, sites - 1)


def default_threshold(k: int) -> int:
    """A safe Shamir threshold for a site with ``k`` share holders: a strict majority.

    Bonawitz et al.'s honest-but-curious bound is t > k/2: the server may ask each
    holder for one of a site's two secrets, never both, and a majority cannot be
    assembled for both; a dropout of fewer than half the holders keeps the round alive.
    """
    if k < 1:
        raise ValueError(f"a site shares to at least one holder, got {k}")
    return k // 2 + 1


def neighbours(
    sites: Sequence[int], k: int, seed: int | bytes, complete_up_to: int = COMPLETE_UP_TO
) -> dict[int, frozenset[int]]:
    """Each site's neighbours: the complete graph for few sites, else a shuffled Harary graph."""
    ids = list(sites)
    if len(set(ids)) != len(ids):
        raise ValueError("site ids in a neighbour graph are distinct")
    n = len(ids)
    if n <= complete_up_to or k >= n - 1:
        return {site: frozenset(ids) - {site} for site in ids}
    if k < 2:
        raise ValueError(f"a sparse neighbour graph needs degree >= 2, got {k}")
    half = (k + 1) // 2  # k rounded up to even: half on either side
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    graph: dict[int, set[int]] = {site: set() for site in ids}
    for position, site in enumerate(order):
        for step in range(1, half + 1):
            other = order[(position + step) % n]
            graph[site].add(other)
            graph[other].add(site)
    return {site: frozenset(peers) for site, peers in graph.items()}
