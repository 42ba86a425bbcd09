"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2):
FedAvg's weighted mean delta Δ taken as a pseudo-gradient, stepped by an optimizer that
keeps its state on the server from round to round.

They are folding rules on top of FedAvg: updates fold into FedAvg's one accumulator as
they arrive (so secure aggregation, which hands the unmasked mean to ``accumulate``,
works unchanged), and ``aggregate`` turns the accumulator into Δ and then, in place,
into the step. Memory is the model, the accumulator and the optimizer's one or two
state vectors (float32, model-sized), never a copy per client; the element-wise
temporaries of a step are one block of ``BLOCK`` values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch

from aggregator_service.strategies.base import Evaluator, StrategyOptions, StrategyState
from aggregator_service.strategies.fedavg import FedAvg
from fedmae.errors import ConfigError

if TYPE_CHECKING:
    from aggregator_service.update_store import UpdateStore

# Values per block of a step's temporaries (√v + τ, Δ²): 1 MB of float32, so a
# 100M-parameter model's step needs 1 MB more, not 400 MB.
BLOCK = 1 << 18


def blocks(numel: int) -> Iterator[slice]:
    """Consecutive slices of at most ``BLOCK`` values covering ``numel``."""
    for start in range(0, numel, BLOCK):
        yield slice(start, min(start + BLOCK, numel))


class ServerOptimizer(FedAvg):
    """θ ← θ + step(Δ): subclasses name their state vectors (``moments``, with their
    initial values in ``initial``) and write the step into Δ's memory (``step_into``)."""

    name = "server-optimizer"
    keeps_state = True
    default_lr: ClassVar[float] = 1.0  # η when --server-lr is not given
    moments: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, evaluator: Evaluator | None = None, options: StrategyOptions | None = None
    ) -> None:
        super().__init__(evaluator, options)
        given = self.options.server_lr
        self.lr = self.default_lr if given is None else given
        self.steps = 0  # rounds aggregated since the state was fresh
        self.moment: dict[str, torch.Tensor] = {}

    def initial(self, name: str) -> float:
        """The value a fresh state vector is filled with."""
        return 0.0

    def begin_round(self, numel: int) -> None:
        super().begin_round(numel)
        if not self.moment:
            self.moment = {
                n: torch.full((numel,), self.initial(n), dtype=torch.float32) for n in self.moments
            }
        elif any(t.numel() != numel for t in self.moment.values()):
            raise ConfigError(
                f"{self.name}: the saved optimizer state does not match the model "
                f"({numel} parameters)"
            )

    def aggregate(
        self, global_flat: torch.Tensor, updates: UpdateStore | None = None
    ) -> torch.Tensor:
        delta = self.mean_delta()
        self.step_into(delta)  # Δ → η·direction, in the accumulator
        self.steps += 1
        return delta.add_(global_flat)

    def step_into(self, delta: torch.Tensor) -> None:
        """Update the state with Δ, then overwrite ``delta`` with the step to add to θ."""
        raise NotImplementedError

    def state(self) -> StrategyState | None:
        return StrategyState(self.name, self.steps, dict(self.moment)) if self.moment else None

    def load_state(self, state: StrategyState | None) -> None:
        if state is None:
            self.steps, self.moment = 0, {}
            return
        if sorted(state.tensors) != sorted(self.moments):
            raise ConfigError(
                f"{self.name} keeps {', '.join(self.moments)}; the saved state has "
                f"{', '.join(sorted(state.tensors)) or 'nothing'}"
            )
        self.steps = state.step
        self.moment = {n: t.to(torch.float32).contiguous() for n, t in state.tensors.items()}


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): m ← β·m + Δ; θ ← θ + η·m. With β = 0 and
    η = 1 it is FedAvg."""

    name = "fedavgm"
    default_lr = 1.0
    moments = ("m",)

    def step_into(self, delta: torch.Tensor) -> None:
        m = self.moment["m"]
        m.mul_(self.options.server_momentum).add_(delta)
        delta.copy_(m).mul_(self.lr)
