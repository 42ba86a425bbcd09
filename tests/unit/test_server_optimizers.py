"""Server optimizers against two rounds worked by hand (Reddi et al. 2021, Alg. 2).

Every round folds two updates, [4Δ] with weight 1 and [0] with weight 3, so the
weighted mean is Δ: the rules start from FedAvg's mean. Expected values are written
out below from the update rules, never by running the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from aggregator_service.checkpoint_store import CheckpointStore
from aggregator_service.config import ServerConfig
from aggregator_service.published_model import resume_state
from aggregator_service.strategies import (
    STRATEGIES,
    FedAvg,
    StrategyOptions,
    make_strategy,
)
from aggregator_service.strategies.server_opt import BLOCK
from fedmae.cli.main import build_parser
from fedmae.config import TrainingConfig
from fedmae.errors import ConfigError
from fedmae.payload.layout import ModelLayout

THETA0 = [1.0, -1.0]
DELTA1 = [0.4, -0.4]
DELTA2 = [0.2, 0.8]


def _round(strategy, theta: list[float], delta: list[float]) -> list[float]:
    strategy.begin_round(len(delta))
    strategy.accumulate(torch.tensor([4 * d for d in delta]), 1)
    strategy.accumulate(torch.zeros(len(delta)), 3)
    return strategy.aggregate(torch.tensor(theta)).tolist()


def _two_rounds(name: str, **options) -> tuple[list[float], list[float]]:
    strategy = make_strategy(name, options=StrategyOptions(**options))
    theta1 = _round(strategy, THETA0, DELTA1)
    return theta1, _round(strategy, theta1, DELTA2)


def _close(got: list[float], want: list[float]) -> None:
    assert got == pytest.approx(want, abs=1e-6)


def test_fedavgm_adds_eta_times_the_momentum():
    theta1, theta2 = _two_rounds("fedavgm", server_lr=0.5, server_momentum=0.9)
    # m1 = Δ1 = [0.4, -0.4]; θ1 = θ0 + 0.5·m1
    _close(theta1, [1.2, -1.2])
    # m2 = 0.9·[0.4, -0.4] + [0.2, 0.8] = [0.56, 0.44]; θ2 = θ1 + 0.5·m2
    _close(theta2, [1.48, -0.98])


def test_fedavgm_without_momentum_at_rate_one_is_fedavg():
    _, theta2 = _two_rounds("fedavgm", server_lr=1.0, server_momentum=0.0)
    fedavg = FedAvg()
    assert theta2 == _round(fedavg, _round(fedavg, THETA0, DELTA1), DELTA2)


def test_fedadagrad_divides_by_the_root_of_the_summed_squares():
    theta1, theta2 = _two_rounds("fedadagrad", server_lr=0.1, tau=0.3)
    # v0 = τ² = 0.09; v1 = 0.09 + 0.16 = 0.25 (√ = 0.5); step = 0.1·0.4/(0.5 + 0.3) = 0.05
    _close(theta1, [1.05, -1.05])
    # v2 = [0.25 + 0.04, 0.25 + 0.64] = [0.29, 0.89]
    _close(
        theta2,
        [1.05 + 0.1 * 0.2 / (math.sqrt(0.29) + 0.3), -1.05 + 0.1 * 0.8 / (math.sqrt(0.89) + 0.3)],
    )


def test_fedadam_steps_by_the_first_moment_over_the_root_of_the_second():
    theta1, theta2 = _two_rounds("fedadam", server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.3)
    # m1 = 0.5·Δ1 = [0.2, -0.2]; v1 = 0.75·0.09 + 0.25·0.16 = 0.1075 (both)
    step1 = 0.1 * 0.2 / (math.sqrt(0.1075) + 0.3)  # 0.031854
    _close(theta1, [1.0 + step1, -1.0 - step1])
    # m2 = 0.5·m1 + 0.5·Δ2 = [0.2, 0.3]
    # v2 = 0.75·0.1075 + 0.25·[0.04, 0.64] = [0.090625, 0.240625]
    _close(
        theta2,
        [
            theta1[0] + 0.1 * 0.2 / (math.sqrt(0.090625) + 0.3),
            theta1[1] + 0.1 * 0.3 / (math.sqrt(0.240625) + 0.3),
        ],
    )


def test_fedyogi_moves_v_towards_delta_squared_by_the_sign_rule():
    theta1, theta2 = _two_rounds("fedyogi", server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.3)
    # Round 1: Δ² = 0.16 > v0 = 0.09, sign(v − Δ²) = −1: v1 = 0.09 + 0.25·0.16 = 0.13
    # (Adam's would be 0.1075); m1 = [0.2, -0.2].
    step1 = 0.1 * 0.2 / (math.sqrt(0.13) + 0.3)
    _close(theta1, [1.0 + step1, -1.0 - step1])
    # Round 2, m2 = [0.2, 0.3]. Coordinate 0: Δ² = 0.04 < 0.13, sign +1: v = 0.13 − 0.01
    # = 0.12 (v shrinks). Coordinate 1: Δ² = 0.64 > 0.13, sign −1: v = 0.13 + 0.16 = 0.29.
    _close(
        theta2,
        [
            theta1[0] + 0.1 * 0.2 / (math.sqrt(0.12) + 0.3),
            theta1[1] + 0.1 * 0.3 / (math.sqrt(0.29) + 0.3),
        ],
    )


def test_a_model_larger_than_one_block_steps_every_coordinate_alike():
    numel = BLOCK * 2 + 3  # three blocks, the last one short
    strategy = make_strategy("fedyogi", options=StrategyOptions(server_lr=0.1, tau=0.3))
    strategy.begin_round(numel)
    strategy.accumulate(torch.full((numel,), 0.4), 1)
    out = strategy.aggregate(torch.zeros(numel))
    # v1 = 0.09 + 0.01·0.16 = 0.0916 (β2 = 0.99), m1 = 0.1·0.4 = 0.04
    assert torch.allclose(out, torch.full((numel,), 0.1 * 0.04 / (math.sqrt(0.0916) + 0.3)))


def test_defaults_are_reddi_et_al_s():
    options = StrategyOptions()
    assert (options.beta1, options.beta2, options.tau) == (0.9, 0.99, 1e-3)
    assert make_strategy("fedavgm").lr == 1.0 and options.server_momentum == 0.9
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        strategy = make_strategy(name)
        assert strategy.lr == 0.01
        strategy.begin_round(3)  # v starts at τ², m at 0
        assert strategy.moment["v"].tolist() == pytest.approx([1e-6] * 3)
        assert strategy.moment.get("m", torch.zeros(3)).tolist() == [0.0] * 3


def test_the_state_resumes_from_the_checkpoint_of_its_version(tmp_path, caplog):
    """Round 2 after a save and a fresh object equals round 2 of one object."""
    layout = ModelLayout.from_state({"w": torch.zeros(2)})
    store = CheckpointStore(tmp_path, keep=1)
    options = StrategyOptions(server_lr=0.1, beta1=0.5, beta2=0.75, tau=0.3)
    first = make_strategy("fedadam", options=options)
    theta1 = _round(first, THETA0, DELTA1)
    store.save(1, 1, "tiny", layout, torch.tensor(theta1), first.state())
    _, uninterrupted = _two_rounds("fedadam", **vars(options))

    resumed = make_strategy("fedadam", options=options)
    resume_state(store, resumed, 1)
    assert resumed.steps == 1
    assert _round(resumed, theta1, DELTA2) == uninterrupted
    # Pruning drops a version's state with its model.
    store.save(2, 2, "tiny", layout, torch.tensor(uninterrupted), resumed.state())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "v000002.opt.safetensors",
        "v000002.safetensors",
    ]
    # Another rule's state, or none, is not resumed: a fresh start, and a log line.
    other = make_strategy("fedyogi", options=options)
    resume_state(store, other, 2)
    assert other.steps == 0 and "fedadam's, not fedyogi's" in caplog.text
    store.save(3, 3, "tiny", layout, torch.tensor(uninterrupted))  # written by fedavg
    resume_state(store, other, 3)
    assert other.steps == 0 and "version 3 has no saved fedyogi state" in caplog.text


def test_fedprox_aggregates_as_fedavg_and_sends_mu():
    fedprox = make_strategy("fedprox", options=StrategyOptions(mu=0.25))
    fedavg = FedAvg()
    assert _round(fedprox, THETA0, DELTA1) == _round(fedavg, THETA0, DELTA1)
    assert fedprox.training_config(TrainingConfig()).proximal_mu == 0.25
    assert fedavg.training_config(TrainingConfig()).proximal_mu == 0.0


@pytest.mark.parametrize(
    "field, value",
    [("server_lr", 0.0), ("server_momentum", 1.0), ("beta1", -0.1), ("beta2", 1.0),
     ("tau", 0.0), ("mu", -1.0), ("tau", math.nan)],
)  # fmt: skip
def test_out_of_range_options_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')}"):
        StrategyOptions(**{field: value})


def test_serve_flags_reach_the_server_config(tmp_path):
    args = build_parser().parse_args(
        ["serve", "--state-dir", str(tmp_path), "--strategy", "fedadam", "--server-lr",
         "0.05", "--beta2", "0.999", "--tau", "1e-4", "--mu", "0.5"]
    )  # fmt: skip
    from fedmae.cli.serve import _from_flags

    options = _from_flags(StrategyOptions, args)
    assert options == StrategyOptions(server_lr=0.05, beta2=0.999, tau=1e-4, mu=0.5)
    config = ServerConfig(state_dir=tmp_path, strategy=args.strategy, strategy_options=options)
    assert config.strategy_options.server_lr == 0.05
    assert set(STRATEGIES) == {"fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedprox",
                               "median", "trimmed-mean", "multi-krum", "norm-bounded"}  # fmt: skip
