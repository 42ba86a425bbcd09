"""The neighbour graph: complete for few sites, else a seeded Harary graph."""

from __future__ import annotations

import pytest

from fedmae.secagg import graph


def _connected(
    neighbours: dict[int, frozenset[int]], removed: frozenset[int] = frozenset()
) -> bool:
    alive = [site for site in neighbours if site not in removed]
    seen, frontier = {alive[0]}, [alive[0]]
    while frontier:
        for peer in neighbours[frontier.pop()] - removed:
            if peer not in seen:
                seen.add(peer)
                frontier.append(peer)
    return len(seen) == len(alive)


def test_few_sites_get_the_complete_graph():
    sites = list(range(10, 25))
    result = graph.neighbours(sites, k=4, seed=1)
    assert all(result[site] == frozenset(sites) - {site} for site in sites)


@pytest.mark.parametrize(("n", "k"), [(21, 4), (50, 6), (101, 10), (64, 2)])
def test_the_sparse_graph_is_symmetric_k_regular_and_connected(n, k):
    sites = list(range(1, n + 1))
    result = graph.neighbours(sites, k=k, seed=b"round-9")
    assert set(result) == set(sites)
    for site, peers in result.items():
        assert site not in peers
        assert len(peers) == k
        assert all(site in result[peer] for peer in peers)
    assert _connected(result)


def test_removing_fewer_than_k_sites_keeps_it_connected():
    # A Harary graph is k-connected: any k - 1 dropouts leave the rest connected.
    sites, k = list(range(40)), 4
    result = graph.neighbours(sites, k=k, seed=3)
    some_site = sites[0]
    assert _connected(result, frozenset(list(result[some_site])[: k - 1]))
    # Guard: removing all of a site's k neighbours does cut it off.
    assert not _connected(result, frozenset(result[some_site]))


def test_an_odd_degree_is_rounded_up_to_even():
    result = graph.neighbours(list(range(30)), k=5, seed=0)
    assert {len(peers) for peers in result.values()} == {6}


def test_the_same_seed_gives_the_same_graph_and_another_seed_another():
    sites = list(range(100, 160))
    first = graph.neighbours(sites, k=6, seed=42)
    assert graph.neighbours(list(reversed(sites)), k=6, seed=42) == first
    assert graph.neighbours(sites, k=6, seed=43) != first


def test_complete_up_to_and_large_degrees():
    sites = list(range(8))
    sparse = graph.neighbours(sites, k=2, seed=0, complete_up_to=4)
    assert {len(peers) for peers in sparse.values()} == {2}
    dense = graph.neighbours(sites, k=7, seed=0, complete_up_to=4)
    assert {len(peers) for peers in dense.values()} == {7}
    with pytest.raises(ValueError, match="degree >= 2"):
        graph.neighbours(sites, k=1, seed=0, complete_up_to=4)
    with pytest.raises(ValueError, match="distinct"):
        graph.neighbours([1, 1, 2], k=2, seed=0)


def test_default_degree_and_threshold():
    assert graph.default_degree(1) == 0
    assert graph.default_degree(5) == 4
    assert [graph.default_degree(n) for n in (100, 1000)] == [20, 30]
    assert all(graph.default_degree(n) % 2 == 0 for n in (30, 100, 1000, 10_000))
    assert [graph.default_threshold(k) for k in (1, 2, 3, 4, 19, 20)] == [1, 2, 2, 3, 10, 11]
    for k in range(1, 50):
        assert 2 * graph.default_threshold(k) > k  # a strict majority
    with pytest.raises(ValueError):
        graph.default_threshold(0)
