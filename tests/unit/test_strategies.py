"""Strategies by name, FedAvg's arithmetic, the close policy and the evaluation hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from strategy_rules import CoordinateMedian

from aggregator_service.config import ServerConfig
from aggregator_service.strategies import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    FedAvg,
    Strategy,
    make_strategy,
)
from aggregator_service.update_store import UpdateStore
from fedmae.cli.main import build_parser
from fedmae.errors import ConfigError
from fedmae.payload.layout import ModelLayout


def test_registry_builds_each_strategy_by_its_name():
    assert DEFAULT_STRATEGY == "fedavg" and STRATEGIES["fedavg"] is FedAvg
    for name, cls in STRATEGIES.items():
        strategy = make_strategy(name)
        assert type(strategy) is cls and strategy.name == name
        assert strategy.evaluator is None


def test_an_unknown_name_is_a_config_error_listing_the_choices(tmp_path):
    with pytest.raises(ConfigError) as err:
        make_strategy("nope")
    assert "unknown strategy 'nope'" in str(err.value)
    assert f"choose one of {', '.join(sorted(STRATEGIES))}" in str(err.value)
    # The server's settings refuse it too, before anything is served.
    with pytest.raises(ConfigError, match="unknown strategy 'krum'.*fedavg"):
        ServerConfig(state_dir=tmp_path, strategy="krum")
    assert ServerConfig(state_dir=tmp_path).strategy == "fedavg"


def test_serve_help_names_the_default_and_every_choice(capsys):
    parser = build_parser()
    assert parser.parse_args(["serve", "--state-dir", "s"]).strategy == DEFAULT_STRATEGY
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    line = help_text[help_text.rindex("--strategy STRATEGY") :]  # the option, not the usage
    line = line[: line.index(" --", 2)]
    assert f"default {DEFAULT_STRATEGY}" in line
    for name in STRATEGIES:  # the help lists the registry's names (it must not import torch)
        assert name in line


def test_fedavg_is_the_weighted_mean_of_the_clipped_updates():
    rng = np.random.default_rng(0)
    theta = torch.from_numpy(rng.standard_normal(5000).astype(np.float32))
    deltas = [torch.from_numpy(rng.standard_normal(5000).astype(np.float32)) for _ in range(3)]
    weights, scales = [10, 50, 200], [1.0, 0.5, 0.125]
    strategy = FedAvg()
    assert not strategy.needs_all_updates
    for _ in range(2):  # a second round starts from a clean accumulator
        strategy.begin_round(theta.numel())
        for d, w, s in zip(deltas, weights, scales, strict=True):
            strategy.accumulate(d, w, s)
        result = strategy.aggregate(theta.clone()).clone()
    acc = sum(w * s * d.numpy().astype(np.float64) for d, w, s in
              zip(deltas, weights, scales, strict=True))  # fmt: skip
    expected = theta.numpy().astype(np.float64) + acc / sum(weights)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_close_policy_every_available_client_or_the_target():
    strategy = FedAvg()
    assert strategy.updates_to_close(available=5, target=0) == 5  # every selected client
    assert strategy.updates_to_close(available=5, target=3) == 3  # over-selection
    assert strategy.updates_to_close(available=2, target=3) == 2  # revoked: fewer left
    assert strategy.updates_to_publish(required=3) == 3
    assert strategy.updates_to_publish(required=0) == 1  # never publish nothing


def test_evaluation_is_the_strategys_hook_and_off_by_default():
    layout = ModelLayout.from_state({"w": torch.zeros(2, 3)})
    flat = torch.arange(6.0)
    assert FedAvg().evaluate(layout, flat) is None
    seen = []

    def evaluator(layout_, flat_):
        seen.append((layout_, flat_))
        return 0.25

    assert make_strategy("fedavg", evaluator=evaluator).evaluate(layout, flat) == 0.25
    assert seen == [(layout, flat)]


def test_a_needs_all_rule_reads_every_update_from_the_store_in_blocks(tmp_path):
    numel, sites = 10_000, 5
    theta = torch.randn(numel)
    deltas = [torch.randn(numel) for _ in range(sites)]
    scales = [1.0, 1.0, 0.5, 1.0, 0.1]
    rule = CoordinateMedian(block_size=3000)
    assert isinstance(rule, Strategy) and rule.needs_all_updates
    with pytest.raises(TypeError, match="needs all updates"):
        rule.accumulate(deltas[0], 1)
    rule.begin_round(numel)
    with UpdateStore(tmp_path / "u.f32", numel, capacity=sites) as store:
        for i, (d, s) in enumerate(zip(deltas, scales, strict=True)):
            store.append(d, weight=i + 1, scale=s)
        result = rule.aggregate(theta, store)
    clipped = torch.stack([d * s for d, s in zip(deltas, scales, strict=True)])
    assert torch.equal(result, theta + clipped.median(dim=0).values)
    assert rule.blocks_read == 4  # 3000 + 3000 + 3000 + 1000 coordinates
