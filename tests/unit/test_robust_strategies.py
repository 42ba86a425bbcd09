"""The robust rules (median, trimmed-mean, multi-krum, norm-bounded): hand-computed
small rounds, an outlier each defeats and FedAvg does not, blocked reading against an
all-in-memory reference, the memory a block takes, and the configurations refused."""

from __future__ import annotations

import math

import pytest
import torch

from aggregator_service.config import RoundPolicy, SecureAggregation, ServerConfig
from aggregator_service.strategies import (
    STRATEGIES,
    CoordinateMedian,
    FedAvg,
    MultiKrum,
    NormBoundedFedAvg,
    StrategyOptions,
    TrimmedMean,
    make_strategy,
)
from aggregator_service.strategies.krum import krum_scores, pairwise_sq_distances
from aggregator_service.update_store import UpdateStore
from fedmae.cli.main import main
from fedmae.errors import ConfigError

ROBUST = ("median", "trimmed-mean", "multi-krum")


def _aggregate(rule, theta: torch.Tensor, rows, path, weights=None) -> torch.Tensor:
    """``rule`` over ``rows`` (each a flat delta) stored as the engine stores them."""
    rows = [torch.as_tensor(r, dtype=torch.float32) for r in rows]
    weights = weights or [1] * len(rows)
    with UpdateStore(path, theta.numel(), capacity=len(rows)) as store:
        for r, w in zip(rows, weights, strict=True):
            store.append(r, weight=w)
        return rule.aggregate(theta.clone(), store).clone()


def test_the_robust_rules_are_registered_need_clear_updates_and_read_the_store():
    for name, cls in [("median", CoordinateMedian), ("trimmed-mean", TrimmedMean),
                      ("multi-krum", MultiKrum)]:  # fmt: skip
        assert STRATEGIES[name] is cls and cls.needs_all_updates and cls.needs_clear_updates
    assert STRATEGIES["norm-bounded"] is NormBoundedFedAvg
    assert not NormBoundedFedAvg.needs_all_updates and NormBoundedFedAvg.needs_clear_updates


def test_median_by_hand(tmp_path):
    theta = torch.tensor([10.0, 0.0, -1.0])
    rows = [[1, -2, 0], [3, 5, 0], [2, 1, 100]]  # middle values: 2, 1, 0
    got = _aggregate(CoordinateMedian(), theta, rows, tmp_path / "u")
    assert torch.equal(got, torch.tensor([12.0, 1.0, -1.0]))
    rows4 = [[1, 0], [4, 0], [2, 8], [3, 2]]  # even n: mean of the two middle, 2.5 and 1
    got = _aggregate(CoordinateMedian(), torch.zeros(2), rows4, tmp_path / "v")
    assert torch.equal(got, torch.tensor([2.5, 1.0]))


def test_trimmed_mean_by_hand(tmp_path):
    rows = [[0.0], [1.0], [2.0], [6.0], [100.0]]
    zero = torch.zeros(1)
    beta = {b: TrimmedMean(options=StrategyOptions(trim_beta=b)) for b in (0.0, 0.1, 0.4)}
    assert _aggregate(beta[0.0], zero, rows, tmp_path / "a").item() == pytest.approx(21.8)
    # β = 0.1 of 5 is 0.5: still one from each end (k = max(1, ⌊βn⌋)) → mean(1, 2, 6)
    assert _aggregate(beta[0.1], zero, rows, tmp_path / "b").item() == pytest.approx(3.0)
    assert _aggregate(beta[0.4], zero, rows, tmp_path / "c").item() == 2.0  # k = 2
    assert [TrimmedMean.trim_count(0.3, n) for n in (3, 9, 10, 20)] == [1, 2, 3, 6]
    assert TrimmedMean.trim_count(0.0, 10) == 0


def test_krum_scores_and_choice_by_hand(tmp_path):
    rows = [[0.0], [1.0], [2.0], [4.0], [100.0]]  # n = 5, f = 1: 2 nearest neighbours
    dist = torch.tensor([[(a[0] - b[0]) ** 2 for b in rows] for a in rows], dtype=torch.float64)
    assert krum_scores(dist, f=1).tolist() == [5.0, 2.0, 5.0, 13.0, 96.0**2 + 98.0**2]
    blocks = [(0, torch.tensor(rows))]  # one block [sites, 1]
    assert torch.allclose(pairwise_sq_distances(blocks), dist, rtol=1e-6, atol=1e-4)
    zero = torch.zeros(1)
    for m, want, chosen in [(0, 1.75, [0, 1, 2, 3]), (1, 1.0, [1]), (3, 1.0, [0, 1, 2])]:
        rule = MultiKrum(options=StrategyOptions(krum_f=1, krum_m=m))
        assert _aggregate(rule, zero, rows, tmp_path / f"m{m}").item() == want
        assert rule.chosen == chosen  # m = 0: n − f = 4; m = 1 is Krum


def test_norm_bounded_clips_each_delta_to_M_and_keeps_the_tighter_bound():
    rule = NormBoundedFedAvg(options=StrategyOptions(clip_norm=10.0))
    rule.begin_round(2)
    rule.accumulate(torch.tensor([3.0, 4.0]), 1)  # norm 5: whole
    rule.accumulate(torch.tensor([30.0, 40.0]), 1)  # norm 50: → [6, 8]
    rule.accumulate(torch.tensor([3.0, 4.0]), 2, scale=0.5)  # the round's B was tighter
    assert rule.clipped == 1
    got = rule.aggregate(torch.zeros(2))
    want = (torch.tensor([3.0, 4.0]) + torch.tensor([6.0, 8.0]) + 2 * torch.tensor([1.5, 2.0])) / 4
    assert torch.allclose(got, want)


def _honest_and_outlier(numel: int = 64, sites: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    honest = [base + 0.05 * torch.randn(numel, generator=g) for _ in range(sites - 1)]
    return honest, torch.stack(honest).mean(dim=0)


@pytest.mark.parametrize(
    "attack", ["scaled", "sign-flipped", "noise", "claimed-weight"]
)  # fmt: skip
def test_one_malicious_site_is_defeated_by_each_robust_rule_not_by_fedavg(tmp_path, attack):
    honest, mean = _honest_and_outlier()
    bad = {"scaled": 100 * honest[0], "sign-flipped": -10 * honest[0],
           "noise": 30 * torch.randn(64, generator=torch.Generator().manual_seed(9)),
           "claimed-weight": -honest[0]}[attack]  # fmt: skip
    weights = [600] * 4 + [2**40 if attack == "claimed-weight" else 600]
    theta = torch.zeros(64)
    scale = float(mean.norm())
    fedavg = FedAvg()
    fedavg.begin_round(64)
    for row, w in zip([*honest, bad], weights, strict=True):
        fedavg.accumulate(row, w)
    assert float((fedavg.aggregate(theta.clone()) - mean).norm()) > scale  # steered
    for name in ROBUST:
        got = _aggregate(make_strategy(name), theta, [*honest, bad], tmp_path / name, weights)
        assert float((got - mean).norm()) < 0.1 * scale, (name, attack)


def test_robust_rules_ignore_the_claimed_weights(tmp_path):
    honest, _ = _honest_and_outlier()
    rows = [*honest, 100 * honest[0]]
    for name in ROBUST:
        plain = _aggregate(make_strategy(name), torch.zeros(64), rows, tmp_path / "a")
        claimed = [1, 50, 600, 10_000, 2**40]
        weighed = _aggregate(make_strategy(name), torch.zeros(64), rows, tmp_path / "b", claimed)
        assert torch.equal(plain, weighed), name


def _reference(name: str, stacked: torch.Tensor, options: StrategyOptions) -> torch.Tensor:
    """Each rule all in memory, on the whole ``[sites, numel]`` stack at once."""
    n = stacked.shape[0]
    if name == "median":
        return stacked.sort(dim=0).values[(n - 1) // 2 : n - (n - 1) // 2].mean(dim=0)
    if name == "trimmed-mean":
        k = max(1, math.floor(options.trim_beta * n))
        return stacked.sort(dim=0).values[k : n - k].mean(dim=0)
    diffs = stacked[:, None, :].double() - stacked[None, :, :].double()  # [n, n, numel]
    dist = diffs.square().sum(dim=2)
    scores = krum_scores(dist, options.krum_f)
    chosen = sorted(sorted(range(n), key=lambda i: (float(scores[i]), i))[: options.krum_m])
    return stacked[chosen].mean(dim=0)


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("sites", [5, 8])
def test_blocked_reading_equals_the_all_in_memory_rule(tmp_path, name, sites):
    numel = 10_007  # prime: no block size but 1 and itself divides it
    g = torch.Generator().manual_seed(sites)
    stacked = torch.randn(sites, numel, generator=g) * torch.rand(sites, 1, generator=g)
    theta = torch.randn(numel, generator=g)
    options = StrategyOptions(trim_beta=0.25, krum_f=1, krum_m=3)
    want = theta + _reference(name, stacked, options)
    for block in (1000, 4096, 10_007, 1 << 18):
        rule = STRATEGIES[name](options=options, block_size=block)
        got = _aggregate(rule, theta, list(stacked), tmp_path / f"{block}")
        assert torch.equal(got, want), (name, block)


@pytest.mark.parametrize("name", ROBUST)
def test_a_block_holds_block_times_sites_values_whatever_the_model(tmp_path, name):
    sites, block = 6, 512
    for numel in (3000, 30_000):  # 10x the model: the same largest block
        rows = list(torch.randn(sites, numel))
        rule = STRATEGIES[name](block_size=block)
        _aggregate(rule, torch.zeros(numel), rows, tmp_path / f"{numel}")
        passes = 2 if name == "multi-krum" else 1  # Krum: distances, then the average
        assert rule.blocks_read == passes * math.ceil(numel / block)
        assert rule.largest_block == sites * block


def test_the_rules_never_publish_below_their_fewest_updates():
    assert MultiKrum(options=StrategyOptions(krum_f=2)).updates_to_publish(3) == 7
    assert CoordinateMedian().updates_to_publish(1) == 3
    assert TrimmedMean(options=StrategyOptions(trim_beta=0)).updates_to_publish(1) == 1
    assert NormBoundedFedAvg().updates_to_publish(2) == 2


def _config(tmp_path, strategy: str, secure: bool = False, **knobs) -> ServerConfig:
    policy = {k: knobs.pop(k) for k in list(knobs) if k in ("min_clients", "min_participants")}
    return ServerConfig(
        state_dir=tmp_path, strategy=strategy, strategy_options=StrategyOptions(**knobs),
        policy=RoundPolicy(**policy), secure=SecureAggregation() if secure else None,
    )  # fmt: skip


@pytest.mark.parametrize("name", [*ROBUST, "norm-bounded"])
def test_rules_that_must_see_each_update_refuse_secure_aggregation(tmp_path, name):
    with pytest.raises(ConfigError, match=f"--strategy {name} needs every update in the clear"):
        _config(tmp_path, name, secure=True, min_clients=5)
    _config(tmp_path, name, min_clients=5)  # without it: fine


def test_too_few_sites_for_the_rule_is_refused_naming_the_numbers(tmp_path):
    with pytest.raises(ConfigError, match=r"median needs at least 3 updates.*publish with 2"):
        _config(tmp_path, "median", min_clients=2, min_participants=2)
    with pytest.raises(ConfigError, match=r"n > 2f \+ 2 = 4 with --krum-f 1.*publish with 4"):
        _config(tmp_path, "multi-krum", min_clients=4)
    _config(tmp_path, "multi-krum", min_clients=5)
    with pytest.raises(ConfigError, match=r"--krum-m 5 at most n − f"):
        _config(tmp_path, "multi-krum", min_clients=5, krum_m=5)
    with pytest.raises(ConfigError, match="with 2 sites nothing would be left"):
        _config(tmp_path, "trimmed-mean", min_clients=2, min_participants=2)
    _config(tmp_path, "trimmed-mean", min_clients=2, min_participants=2, trim_beta=0.0)
    for beta in (0.5, -0.1, float("nan")):
        with pytest.raises(ConfigError, match=r"--trim-beta .* in \[0, 0.5\)"):
            StrategyOptions(trim_beta=beta)
    with pytest.raises(ConfigError, match="--clip-norm"):
        StrategyOptions(clip_norm=0)


def test_serve_flags_reach_the_rules_options(tmp_path):
    from fedmae.cli.main import build_parser
    from fedmae.cli.serve import _from_flags

    args = build_parser().parse_args(
        ["serve", "--state-dir", str(tmp_path), "--strategy", "multi-krum", "--trim-beta",
         "0.2", "--krum-f", "2", "--krum-m", "3", "--clip-norm", "5"]
    )  # fmt: skip
    options = _from_flags(StrategyOptions, args)
    assert (options.trim_beta, options.krum_f, options.krum_m, options.clip_norm) == (
        0.2,
        2,
        3,
        5.0,
    )
    defaults = _from_flags(
        StrategyOptions, build_parser().parse_args(["serve", "--state-dir", "s"])
    )
    assert defaults == StrategyOptions()  # the flags' defaults are the options' own


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strategy", "median", "--secure-aggregation"], "needs every update in the clear"),
        (["--strategy", "median", "--min-clients", "2", "--min-participants", "2"],
         "median needs at least 3 updates per round"),
        (["--strategy", "multi-krum", "--min-clients", "4"], "n > 2f + 2 = 4"),
        (["--strategy", "trimmed-mean", "--trim-beta", "0.5"], "--trim-beta 0.5"),
    ],
)  # fmt: skip
def test_serve_exits_2_with_the_reason(tmp_path, caplog, flags, message):
    state_dir = tmp_path / "state"
    assert main(["serve", "--state-dir", str(state_dir), *flags]) == 2
    assert message in caplog.text
    assert not state_dir.exists()  # refused before anything was made
