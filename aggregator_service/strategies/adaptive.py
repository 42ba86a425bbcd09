"""FedAdagrad, FedAdam and FedYogi: per-coordinate adaptive server steps (Reddi et al.
2021, Algorithm 2, without bias correction as there), θ ← θ + η·d/(√v + τ), where d is
Δ (Adagrad) or the first moment m (Adam, Yogi) and v a second moment of Δ. v starts at
τ² (the paper's v₋₁ ≥ τ²), m at 0.

Defaults: β1 = 0.9, β2 = 0.99, τ = 1e-3 as in the paper's experiments. The paper tunes
η per task (its grid spans 10^-3 to 10^1); η = 0.01 here, since a first Adam step moves
every coordinate by up to about η, and an MAE's weights are of order 0.02-0.1.
"""

from __future__ import annotations

import torch

from aggregator_service.strategies.server_opt import ServerOptimizer, blocks

ADAPTIVE_LR = 0.01


class FedAdagrad(ServerOptimizer):
    """v ← v + Δ²; θ ← θ + η·Δ/(√v + τ) (no first moment: β1 = 0 in Algorithm 2)."""

    name = "fedadagrad"
    default_lr = ADAPTIVE_LR
    moments = ("v",)

    def initial(self, name: str) -> float:
        return self.options.tau**2

    def step_into(self, delta: torch.Tensor) -> None:
        v = self.moment["v"]
        v.addcmul_(delta, delta)
        for b in blocks(delta.numel()):
            delta[b].div_(v[b].sqrt().add_(self.options.tau)).mul_(self.lr)


class FedAdam(FedAdagrad):
    """m ← β1·m + (1−β1)·Δ; v ← β2·v + (1−β2)·Δ²; θ ← θ + η·m/(√v + τ)."""

    name = "fedadam"
    moments = ("m", "v")

    def initial(self, name: str) -> float:
        return self.options.tau**2 if name == "v" else 0.0

    def step_into(self, delta: torch.Tensor) -> None:
        m = self.moment["m"]
        m.mul_(self.options.beta1).add_(delta, alpha=1.0 - self.options.beta1)
        self.second_moment(self.moment["v"], delta)
        delta.copy_(m)  # Δ is spent: its memory takes the step
        v = self.moment["v"]
        for b in blocks(delta.numel()):
            delta[b].div_(v[b].sqrt().add_(self.options.tau)).mul_(self.lr)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        """Adam's v ← β2·v + (1−β2)·Δ²."""
        v.mul_(self.options.beta2).addcmul_(delta, delta, value=1.0 - self.options.beta2)


class FedYogi(FedAdam):
    """As FedAdam, but v ← v − (1−β2)·Δ²·sign(v − Δ²): v moves towards Δ² by an amount
    that does not grow with v, so a rare large Δ² raises v less abruptly (Zaheer et
    al. 2018)."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        for b in blocks(delta.numel()):
            d2 = delta[b] * delta[b]  # [block]
            sign = torch.sign(v[b] - d2)
            v[b].sub_(d2.mul_(sign), alpha=1.0 - self.options.beta2)
