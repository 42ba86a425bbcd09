"""The secure-aggregation protocol end to end, in memory: SiteRound at each site and
SecureSum at the server give the weighted sum of the survivors' clipped deltas, survive
dropouts in every phase, never reveal both secrets of a site, and abort on tampering."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from secagg_cases import PARAMS, InMemoryRound, Inputs, Pki, site_names

from fedmae.errors import SecAggAborted, SecAggFailed
from fedmae.secagg import fixed_point, graph
from fedmae.secagg.keys import generate_site_keys
from fedmae.secagg.masks import BLOCK
from fedmae.secagg.messages import UnmaskRequest

D = 1000


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _assert_weighted_sum(round_: InMemoryRound, result: tuple[np.ndarray, int]) -> None:
    """The result is the survivors' weighted sum of clipped deltas, within the documented
    bound: under m x 2^-f per value (m survivors), i.e. m x 2^-f / sum(w) on the mean."""
    total, weight = result
    expected, expected_weight = round_.inputs.expected(round_.server.survivors, round_.params)
    assert weight == expected_weight  # exact
    assert total.dtype == np.float64 and total.shape == (D,)
    m = len(round_.server.survivors)
    bound = m * 2.0**-round_.params.frac_bits / weight
    assert np.max(np.abs(total / weight - expected / weight)) < bound


def test_the_test_parameters_are_the_planned_ring():
    assert fixed_point.plan_ring(25, PARAMS.weight_cap, PARAMS.clip) == (32, PARAMS.frac_bits)


@pytest.mark.parametrize(
    ("sites", "neighbours", "ring_bits"),
    [(3, 0, 32), (3, 0, 64), (10, 0, 32), (25, 6, 32)],
)
def test_the_sum_is_the_weighted_sum_of_the_clipped_deltas(pki, sites, neighbours, ring_bits):
    names = site_names(sites)
    params = dataclasses.replace(PARAMS, neighbours=neighbours, ring_bits=ring_bits)
    inputs = Inputs.random(names, D, seed=sites)
    assert any(count > params.weight_cap for count in inputs.counts.values())
    round_ = InMemoryRound(pki, names, inputs, params)
    _assert_weighted_sum(round_, round_.run())
    assert round_.server.survivors == tuple(names) and round_.server.dropped == ()
    if sites > graph.COMPLETE_UP_TO:  # the sparse graph: each site knows only its neighbours
        assert {len(roster.peers) for roster in round_.rosters.values()} == {6}
        assert round_.server.threshold == graph.default_threshold(7)


@pytest.mark.parametrize(("sites", "neighbours"), [(8, 0), (25, 6)])
def test_a_dropout_in_each_phase_leaves_the_sum_of_the_survivors(pki, sites, neighbours):
    names = site_names(sites)
    silent = {names[1]: "advertise", names[2]: "share", names[3]: "mask"}
    params = dataclasses.replace(PARAMS, neighbours=neighbours)
    round_ = InMemoryRound(pki, names, Inputs.random(names, D, seed=11), params, silent)
    result = round_.run()
    server = round_.server
    assert names[1] not in server.survivors + server.dropped  # not in U2
    assert server.dropped == (names[2],)  # in U2, no masked input
    assert names[3] in server.survivors  # its input is in the sum, its shares never came
    assert set(server.survivors) == set(names) - {names[1], names[2]}
    _assert_weighted_sum(round_, result)


@pytest.mark.parametrize("d", [BLOCK - 1, BLOCK + 3])
def test_masks_are_added_and_removed_block_by_block(pki, d):
    # d + 1 = BLOCK puts the weight at the end of the only block; BLOCK + 4 splits the
    # input; a dropout leaves pairwise masks to remove in every block.
    names = site_names(4)
    inputs = Inputs.random(names, d, seed=d)
    round_ = InMemoryRound(pki, names, inputs, silent_after={names[1]: "share"})
    total, weight = round_.run()
    expected, expected_weight = inputs.expected(round_.server.survivors, PARAMS)
    assert weight == expected_weight and total.shape == (d,)
    assert np.max(np.abs(total - expected)) < 3 * 2.0**-PARAMS.frac_bits


def test_too_many_dropouts_in_unmask_fail_the_round_with_the_counts(pki):
    names = site_names(8)  # complete graph: t = 5 of 8 holders
    silent = {names[0]: "mask", names[1]: "mask", names[2]: "mask", names[3]: "mask"}
    round_ = InMemoryRound(pki, names, Inputs.random(names, D, seed=3), silent_after=silent)
    with pytest.raises(SecAggFailed) as caught:
        round_.run()
    assert "only 4 of the 8 holders asked revealed their share" in str(caught.value)
    assert "5 are needed" in str(caught.value)
    assert round_.server.abort_reason is not None


def test_the_server_never_gets_both_secrets_of_a_site(pki):
    names = site_names(8)
    silent = {names[2]: "share", names[5]: "share", names[6]: "mask"}
    round_ = InMemoryRound(pki, names, Inputs.random(names, D, seed=5), silent_after=silent)
    round_.run()
    seed_owners = {s.owner for a in round_.revealed.values() for s in a.seed_shares}
    key_owners = {s.owner for a in round_.revealed.values() for s in a.key_shares}
    assert seed_owners and key_owners and not seed_owners & key_owners


def _stepped_to_unmask(pki, sites=6, silent=None) -> InMemoryRound:
    names = site_names(sites)
    round_ = InMemoryRound(pki, names, Inputs.random(names, D, seed=9), silent_after=silent or {})
    round_.advertise()
    round_.share()
    round_.mask()
    return round_


def test_a_site_refuses_to_reveal_both_secrets_of_one_site(pki):
    round_ = _stepped_to_unmask(pki, silent={site_names(6)[5]: "share"})
    name = round_.names[0]
    site, asked = round_.sites[name], round_.server.unmask_request(name)
    assert asked.dropped  # site 6 shared keys and sent no input
    both = UnmaskRequest(asked.survivors, asked.dropped + (asked.survivors[-1],))
    with pytest.raises(SecAggAborted, match="both secrets of site"):
        site.unmask(both)
    myself = UnmaskRequest(tuple(v for v in asked.survivors if v != 1), asked.dropped + (1,))
    with pytest.raises(SecAggAborted, match="calls this site dropped"):
        site.unmask(myself)
    # Having refused, it still answers the honest request once, and the same way again.
    answer = site.unmask(asked)
    assert site.unmask(asked) == answer
    with pytest.raises(SecAggAborted, match="a second time"):
        site.unmask(UnmaskRequest(asked.survivors, ()))


def test_a_site_checks_the_unmask_request_against_what_it_knows(pki):
    round_ = _stepped_to_unmask(pki)
    site, asked = round_.sites[round_.names[0]], round_.server.unmask_request(round_.names[0])
    for request, reason in [
        (UnmaskRequest(asked.survivors, (99,)), "shared no keys with this site"),
        (UnmaskRequest((1, 2, 3), ()), "under the threshold 4"),
        (UnmaskRequest(asked.survivors + (2,), ()), "twice in one list"),
    ]:
        with pytest.raises(SecAggAborted, match=reason):
            site.unmask(request)


def test_calls_out_of_order_abort(pki):
    names = site_names(3)
    round_ = InMemoryRound(pki, names, Inputs.random(names, D, seed=1))
    site = round_.sites[names[0]]
    with pytest.raises(SecAggAborted, match="before advertising"):
        site.share_keys(None)
    with pytest.raises(SecAggAborted, match="before sharing keys"):
        site.masked_input(None, np.zeros(D, np.float32), 1)
    with pytest.raises(SecAggAborted, match="asked to unmask before sending a masked input"):
        site.unmask(UnmaskRequest((1, 2), ()))


def test_a_tampered_roster_key_aborts_naming_the_peer(pki):
    names = site_names(4)
    round_ = InMemoryRound(pki, names, Inputs.random(names, D, seed=2))
    round_.advertise()
    roster = round_.server.roster(names[0])
    victim = roster.peers[1]
    forged_mask, _ = generate_site_keys().public_bytes()  # the server's own key, say
    forged = dataclasses.replace(
        victim, keys=dataclasses.replace(victim.keys, mask_public=forged_mask)
    )
    peers = tuple(forged if p is victim else p for p in roster.peers)
    with pytest.raises(SecAggAborted) as caught:
        round_.sites[names[0]].share_keys(dataclasses.replace(roster, peers=peers))
    message = str(caught.value)
    assert f"the keys of site {victim.client_id} do not verify against the federation CA" in message
    assert "altered them" in message and "aborting the round" in message


def test_a_roster_with_a_minority_threshold_or_no_neighbours_aborts(pki):
    names = site_names(5)
    round_ = InMemoryRound(pki, names, Inputs.random(names, D, seed=2))
    round_.advertise()
    roster = round_.server.roster(names[0])
    with pytest.raises(SecAggAborted, match="not a strict majority of this site's 5"):
        round_.sites[names[0]].share_keys(dataclasses.replace(roster, threshold=2))
    with pytest.raises(SecAggAborted, match="no neighbours"):
        round_.sites[names[0]].share_keys(dataclasses.replace(roster, threshold=1, peers=()))
    twice = (*roster.peers, roster.peers[0])
    with pytest.raises(SecAggAborted, match="names a neighbour twice"):
        round_.sites[names[0]].share_keys(dataclasses.replace(roster, peers=twice))


def test_a_tampered_sealed_share_aborts_naming_the_sender(pki):
    names = site_names(4)
    round_ = InMemoryRound(pki, names, Inputs.random(names, D, seed=4))
    round_.advertise()
    round_.share()
    inbound = round_.server.inbound(names[0])
    first = inbound.shares[0]
    flipped = bytes([first.ciphertext[-1] ^ 1])
    bad = dataclasses.replace(first, ciphertext=first.ciphertext[:-1] + flipped)
    tampered = dataclasses.replace(inbound, shares=(bad, *inbound.shares[1:]))
    site = round_.sites[names[0]]
    sender = round_.rosters[names[0]].peers[0].client_id
    with pytest.raises(SecAggAborted, match=f"the share site {sender} sealed for this site"):
        site.masked_input(tampered, round_.inputs.deltas[names[0]], 10)
    # A share relayed from a site that is not a neighbour, or twice, is refused too.
    twice = dataclasses.replace(inbound, shares=(first, *inbound.shares))
    with pytest.raises(SecAggAborted, match="not one share from a neighbour"):
        site.masked_input(twice, round_.inputs.deltas[names[0]], 10)


def test_a_masked_input_asked_again_is_the_same_bytes(pki):
    names = site_names(3)
    round_ = InMemoryRound(pki, names, Inputs.random(names, D, seed=6))
    round_.advertise()
    round_.share()
    site, delta = round_.sites[names[0]], round_.inputs.deltas[names[0]]
    first = site.masked_input(round_.server.inbound(names[0]), delta, 10)
    assert np.array_equal(site.masked_input(round_.server.inbound(names[0]), delta, 10), first)


# Chi-square critical value, 255 degrees of freedom, significance 1e-6 (Wilson-Hilferty:
# 255 * (1 - 2/(9*255) + 4.753 * sqrt(2/(9*255)))**3). The masks come from OS entropy by
# design, so a uniform input fails this with probability 1e-6 per run, not never.
CHI2_255_1E6 = 377.2


def _chi_square_of_bytes(array: np.ndarray) -> float:
    counts = np.bincount(array.view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_masked_input_looks_uniform_and_uncorrelated_with_the_delta(pki):
    d = 4000
    names = site_names(3)
    inputs = Inputs.random(names, d, seed=8)
    round_ = InMemoryRound(pki, names, inputs)
    round_.advertise()
    round_.share()
    name = names[0]
    masked = round_.sites[name].masked_input(round_.server.inbound(name), inputs.deltas[name], 50)
    assert masked.dtype == np.uint32 and masked.shape == (d + 1,)
    assert _chi_square_of_bytes(masked) < CHI2_255_1E6
    # The test has power: the unmasked encoding is far from uniform bytes.
    plain = fixed_point.encode(inputs.deltas[name], PARAMS.clip, PARAMS.frac_bits, 32, 50)
    assert _chi_square_of_bytes(plain) > 10 * CHI2_255_1E6
    # |r| of independent uniform data is about 1/sqrt(d); 5/sqrt(d) fails once in ~2e6.
    r = np.corrcoef(masked[:d].astype(np.float64), inputs.deltas[name])[0, 1]
    assert abs(r) < 5 / math.sqrt(d)
