"""What a malicious simulated site sends (client_agent.attacks), and simulate's own
additions to the aggregator's flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from client_agent.attacks import CLAIMED_SAMPLES, Attack
from client_agent.trainer import Trained
from fedmae.config import TrainingConfig
from fedmae.ml.training import TrainResult


def _trained() -> Trained:
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    return Trained(TrainingConfig(), TrainResult(0.5, 540, 1.0, 540.0), 0.6, delta, None)


def test_each_attack_changes_what_it_says_and_nothing_else():
    honest = _trained()
    scaled = Attack("scale", 100.0).poison(honest, "site-1", 1)
    assert torch.equal(scaled.delta, honest.delta * 100) and scaled.result.num_samples == 540
    flipped = Attack("signflip").poison(honest, "site-1", 1)
    assert torch.equal(flipped.delta, -honest.delta)
    claim = Attack("claim").poison(honest, "site-1", 1)
    assert torch.equal(claim.delta, honest.delta) and claim.result.num_samples == CLAIMED_SAMPLES
    assert dataclasses.replace(claim.result, num_samples=540) == honest.result
    noise = Attack("noise").poison(honest, "site-1", 1)
    assert float(noise.delta.norm()) == pytest.approx(float(honest.delta.norm()), rel=1e-6)
    assert abs(float(torch.nn.functional.cosine_similarity(noise.delta, honest.delta, 0))) < 0.15
    assert torch.equal(noise.delta, Attack("noise").poison(honest, "site-1", 1).delta)  # seeded
    assert not torch.equal(noise.delta, Attack("noise").poison(honest, "site-1", 2).delta)
    with pytest.raises(ValueError, match="unknown attack"):
        Attack("nice")


def test_simulate_gives_central_dp_its_population():
    from fedmae.cli.simulate import SimulationConfig, _serve_command

    def serve(args: list[str]) -> list[str]:
        cfg = SimulationConfig(sites=7, serve_args=args)
        return _serve_command(cfg, Path("s"), "a:1", "a:2")

    cmd = serve(["--dp", "central", "--dp-target-epsilon", "8"])
    assert cmd[-2:] == ["--dp-sites", "7"]
    assert serve(["--dp=central"])[-2:] == ["--dp-sites", "7"]
    assert "--dp-sites" not in serve([]) and "--dp-sites" not in serve(["--dp", "off"])
    given = serve(["--dp", "central", "--dp-sites", "9"])
    assert given.count("--dp-sites") == 1 and given[-1] == "9"
