"""SecureSum refuses malformed, stale, late and repeated phase messages with the
documented errors, and finds (or fails clearly on) a wrong revealed share."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_cases import ATTEMPT, PARAMS, ROUND, InMemoryRound, Inputs, Pki, site_names

from fedmae.errors import (
    FailedPrecondition,
    InvalidRequest,
    InvalidUpdate,
    KeysRejected,
    SecAggFailed,
    StaleUpdate,
)
from fedmae.secagg.messages import RevealedShare, SealedShare, UnmaskShares
from fedmae.secagg.shamir import PRIME, Share

D = 300


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _round(pki, sites=4, **kwargs) -> InMemoryRound:
    names = site_names(sites)
    return InMemoryRound(pki, names, Inputs.random(names, D, seed=sites), **kwargs)


def test_advertisements_stale_repeated_late_or_unsigned_are_refused(pki):
    round_ = _round(pki)
    server, names = round_.server, round_.names
    keys = round_.sites[names[0]].advertise()
    with pytest.raises(StaleUpdate, match="round 6 attempt 0; this is round 7"):
        server.advertised(names[0], dataclasses.replace(keys, round=ROUND - 1))
    with pytest.raises(KeysRejected, match="certificate of 'site-00'"):
        server.advertised(names[1], keys)  # site-01 passing off site-00's keys
    server.advertised(names[0], keys)
    with pytest.raises(FailedPrecondition, match="already advertised"):
        server.advertised(names[0], keys)
    server.advertised(names[1], round_.sites[names[1]].advertise())
    server.close_advertising()
    with pytest.raises(FailedPrecondition, match="while round 7 is sharing keys"):
        server.advertised(names[2], round_.sites[names[2]].advertise())
    with pytest.raises(FailedPrecondition, match="site-02 advertised no keys"):
        server.roster(names[2])


def test_one_advertiser_is_no_round(pki):
    round_ = _round(pki)
    round_.server.advertised(round_.names[0], round_.sites[round_.names[0]].advertise())
    with pytest.raises(
        SecAggFailed, match="1 site\\(s\\) advertised keys; secure aggregation needs 2"
    ):
        round_.server.close_advertising()


def test_a_ring_that_could_overflow_fails_the_round(pki):
    round_ = _round(pki, params=dataclasses.replace(PARAMS, frac_bits=30))
    with pytest.raises(SecAggFailed, match="32-bit ring can overflow"):
        round_.advertise()


def _shared_by_site_0(pki):
    round_ = _round(pki, sites=5)
    round_.advertise()
    round_.rosters = {n: round_.server.roster(n) for n in round_.names}
    msg = round_.sites[round_.names[0]].share_keys(round_.rosters[round_.names[0]])
    return round_, msg


def _with_shares(msg, shares):
    return dataclasses.replace(msg, shares=tuple(shares))


def test_malformed_key_shares_are_refused(pki):
    round_, msg = _shared_by_site_0(pki)
    server, name = round_.server, round_.names[0]
    first = msg.shares[0]
    cases = [
        (_with_shares(msg, [dataclasses.replace(first, ciphertext=first.ciphertext[:-1])]
                      + list(msg.shares[1:])), "163 bytes, not 164"),
        (_with_shares(msg, [dataclasses.replace(first, receiver=1)] + list(msg.shares[1:])),
         "not once for each of its neighbours"),  # to itself: not a neighbour
        (_with_shares(msg, [dataclasses.replace(first, receiver=99)] + list(msg.shares[1:])),
         "not once for each of its neighbours"),
        (_with_shares(msg, [msg.shares[0], *msg.shares[:-1]]), "not once for each"),  # duplicate
        (_with_shares(msg, msg.shares[:-1]), "not once for each"),  # one missing
        (_with_shares(msg, [dataclasses.replace(first, sender=2)] + list(msg.shares[1:])),
         "names sender 2 \\(its index is 1\\)"),
        (dataclasses.replace(msg, seed_commitment=b"short"), "commitment is 32 bytes, got 5"),
    ]  # fmt: skip
    for bad, reason in cases:
        with pytest.raises(InvalidRequest, match=reason):
            server.shared(name, bad)
    with pytest.raises(StaleUpdate):
        server.shared(name, dataclasses.replace(msg, attempt=ATTEMPT + 1))
    server.shared(name, msg)
    with pytest.raises(FailedPrecondition, match="already shared its keys"):
        server.shared(name, msg)


def test_a_share_to_a_non_neighbour_is_refused_in_the_sparse_graph(pki):
    names = site_names(22)
    params = dataclasses.replace(PARAMS, neighbours=4)
    round_ = InMemoryRound(pki, names, Inputs.random(names, D, seed=1), params)
    round_.advertise()
    roster = round_.server.roster(names[0])
    msg = round_.sites[names[0]].share_keys(roster)
    stranger = min(set(range(2, 23)) - {p.index for p in roster.peers})
    first = msg.shares[0]
    redirected = SealedShare(first.sender, stranger, first.ciphertext)
    with pytest.raises(InvalidRequest, match=f"sealed shares for .*{stranger}"):
        round_.server.shared(names[0], _with_shares(msg, [redirected, *msg.shares[1:]]))


def test_masked_inputs_of_the_wrong_shape_or_site_are_refused(pki):
    round_ = _round(pki, silent_after={site_names(4)[3]: "advertise"})
    round_.advertise()
    round_.share()
    server, name = round_.server, round_.names[0]
    assert server.input_length == D + 1 and server.ring_dtype == np.uint32
    for bad, reason in [
        (np.zeros(D + 1, np.uint64), "uint32 in this round, got uint64"),
        (np.zeros(D + 1, np.int32), "got int32"),
        (np.zeros(D, np.uint32), "301 elements \\(d \\+ 1\\), got shape \\(300,\\)"),
        (np.zeros((1, D + 1), np.uint32), "got shape \\(1, 301\\)"),
        ([0] * (D + 1), "got list"),
    ]:
        with pytest.raises(InvalidUpdate, match=reason):
            server.add_masked(name, bad)
    with pytest.raises(FailedPrecondition, match="site-03 did not share keys"):
        server.add_masked(round_.names[3], np.zeros(D + 1, np.uint32))
    ring = round_.sites[name].masked_input(server.inbound(name), round_.inputs.deltas[name], 5)
    server.add_masked(name, ring)
    with pytest.raises(FailedPrecondition, match="already sent its masked input"):
        server.add_masked(name, ring)
    with pytest.raises(FailedPrecondition, match="while round 7 is collecting masked inputs"):
        server.shared(name, round_.sites[name].share_keys(round_.rosters[name]))


def test_unmask_answers_malformed_or_unasked_are_refused(pki):
    round_ = _round(pki, sites=6, silent_after={site_names(6)[5]: "share"})
    round_.advertise()
    round_.share()
    round_.mask()
    server, name = round_.server, round_.names[0]
    answer = round_.sites[name].unmask(server.unmask_request(name))
    seed, key = answer.seed_shares[0], answer.key_shares[0]
    other_x = Share(2, Share.from_bytes(seed.share).y).to_bytes()
    cases = [
        (dataclasses.replace(answer, seed_shares=answer.seed_shares + (seed,)), "each once"),
        (dataclasses.replace(answer, key_shares=(key, RevealedShare(seed.owner, key.share))),
         "revealed key shares of"),  # a survivor's key: never asked for
        (dataclasses.replace(answer, seed_shares=(RevealedShare(key.owner, seed.share),)),
         "revealed seed shares of \\[6\\]"),  # a dropped site's seed: never asked for
        (dataclasses.replace(answer, seed_shares=(RevealedShare(seed.owner, seed.share[:-1]),)),
         "share is 68 bytes, got 67"),
        (dataclasses.replace(answer, seed_shares=(RevealedShare(seed.owner, other_x),)),
         "at point 2, not at its index 1"),
    ]  # fmt: skip
    for bad, reason in cases:
        with pytest.raises(InvalidRequest, match=reason):
            server.unmasked(name, bad)
    with pytest.raises(StaleUpdate):
        server.unmasked(name, dataclasses.replace(answer, round=ROUND + 1))
    server.unmasked(name, answer)
    with pytest.raises(FailedPrecondition, match="already answered"):
        server.unmasked(name, answer)
    with pytest.raises(FailedPrecondition, match="site-05 sent no masked input"):
        server.unmask_request(round_.names[5])


def _corrupt(answer: UnmaskShares, owner: int, error: int) -> UnmaskShares:
    """``answer`` with its seed share of ``owner`` moved off the polynomial by ``error``
    (same x)."""
    shares = []
    for revealed in answer.seed_shares:
        if revealed.owner == owner:
            share = Share.from_bytes(revealed.share)
            revealed = RevealedShare(owner, Share(share.x, (share.y + error) % PRIME).to_bytes())
        shares.append(revealed)
    return dataclasses.replace(answer, seed_shares=tuple(shares))


def _run_with_corrupt_shares(pki, sites: int, liars: dict[str, tuple[int, int]], silent=None):
    round_ = _round(pki, sites=sites, silent_after=silent or {})
    round_.advertise()
    round_.share()
    round_.mask()
    for name in round_.server.survivors:
        if (silent or {}).get(name) == "mask":
            continue
        answer = round_.sites[name].unmask(round_.server.unmask_request(name))
        if name in liars:
            answer = _corrupt(answer, *liars[name])
        round_.server.unmasked(name, answer)
    return round_


def test_a_wrong_share_among_more_than_t_is_found_and_its_holder_excluded(pki):
    # 6 sites: t = 4, and every seed has 6 holders; site-01 lies about site 3's seed.
    round_ = _run_with_corrupt_shares(pki, 6, {"site-01": (3, 1)})
    total, weight = round_.server.result()
    expected, expected_weight = round_.inputs.expected(round_.names, round_.params)
    assert weight == expected_weight
    assert np.max(np.abs(total - expected)) < 6 * 2.0**-round_.params.frac_bits
    assert list(round_.server.excluded) == ["site-01"]
    assert "wrong share of site site-02's self-mask seed" in round_.server.excluded["site-01"]


def test_two_wrong_shares_fail_the_round_clearly(pki):
    round_ = _run_with_corrupt_shares(pki, 6, {"site-00": (3, 1), "site-01": (3, 2)})
    with pytest.raises(SecAggFailed, match="site site-02's self-mask seed: .*more than one holder"):
        round_.server.result()


def test_two_wrong_shares_that_cancel_give_the_right_sum_and_blame_nobody(pki):
    # Errors +1 at x = 1 and x = 2 cancel at 0 in the polynomial through x = 1, 2, 4, 5
    # (Lagrange weights 10/3 and -10/3): that subset rebuilds the right seed, but no
    # share outside it confirms its polynomial, so no holder is named.
    round_ = _run_with_corrupt_shares(pki, 6, {"site-00": (3, 1), "site-01": (3, 1)})
    total, weight = round_.server.result()
    expected, expected_weight = round_.inputs.expected(round_.names, round_.params)
    assert weight == expected_weight
    assert np.max(np.abs(total - expected)) < 6 * 2.0**-round_.params.frac_bits
    assert round_.server.excluded == {}


def test_a_wrong_share_among_exactly_t_fails_the_round_clearly(pki):
    # 6 sites, t = 4; two stay silent in UNMASK, so each seed has exactly 4 shares.
    silent = {"site-04": "mask", "site-05": "mask"}
    round_ = _run_with_corrupt_shares(pki, 6, {"site-00": (2, 1)}, silent)
    with pytest.raises(SecAggFailed, match="no spare share to find the wrong one"):
        round_.server.result()
    with pytest.raises(SecAggFailed):
        round_.server.result()  # stays failed


def test_a_site_abort_fails_the_round(pki):
    round_ = _round(pki)
    round_.advertise()
    round_.server.aborted("site-02", "the keys of site site-01 do not verify")
    round_.share()
    round_.mask()
    round_.unmask()
    with pytest.raises(SecAggFailed, match="site site-02 aborted the round: the keys of site"):
        round_.server.result()


def test_the_result_is_kept_and_the_masked_sum_freed(pki):
    round_ = _round(pki, sites=3)
    first = round_.run()
    assert round_.server._sum is None
    assert round_.server.result() is first


def test_too_few_masked_inputs_fail_before_any_share_is_revealed(pki):
    names = site_names(6)  # complete graph, t = 4
    silent = {name: "share" for name in names[3:]}
    round_ = InMemoryRound(pki, names, Inputs.random(names, D, seed=2), silent_after=silent)
    round_.advertise()
    round_.share()
    with pytest.raises(SecAggFailed, match="3 site\\(s\\) sent a masked input; at least 4"):
        round_.mask()
    with pytest.raises(FailedPrecondition, match="is done"):
        round_.server.unmask_request(names[0])


def test_a_minority_threshold_is_refused_by_the_server(pki):
    round_ = _round(pki, sites=6, params=dataclasses.replace(PARAMS, threshold=3))
    with pytest.raises(SecAggFailed, match="threshold 3 is not a strict majority of every site's"):
        round_.advertise()


def test_an_owned_first_input_becomes_the_sum_and_the_mean_is_the_weighted_mean(pki):
    # The engine hands its receive buffers over (own=True): the first becomes the sum,
    # the later ones are added into it, and mean() decodes it in place.
    round_ = _round(pki, sites=3)
    round_.advertise()
    round_.share()
    adopted = {}
    for name in round_.names:
        site, inputs = round_.sites[name], round_.inputs
        ring = site.masked_input(
            round_.server.inbound(name), inputs.deltas[name], inputs.counts[name]
        )
        adopted[name] = (round_.server.add_masked(name, ring, own=True), ring)
    round_.server.close_masking()
    round_.unmask()
    assert [kept for kept, _ in adopted.values()] == [True, False, False]
    mean, weight = round_.server.mean()
    expected, expected_weight = round_.inputs.expected(round_.names, round_.params)
    assert weight == expected_weight
    assert mean.dtype == np.float32 and np.shares_memory(mean, adopted["site-00"][1])
    assert (
        np.abs(mean - expected / weight).max() < 3 * 2.0**-round_.params.frac_bits / weight + 1e-6
    )
