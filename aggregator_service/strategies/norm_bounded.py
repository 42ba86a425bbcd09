"""Norm-bounded FedAvg (Sun et al. 2019, "Can You Really Backdoor Federated
Learning?"): FedAvg in which the server clips each delta to a fixed L2 norm M.

A folding rule: the norm of the delta at hand is all the clip needs, so each update is
folded in as it arrives and memory stays FedAvg's (the model and one accumulator).
The round engine already clips every update to the round's bound B
(``--max-update-norm``, ``update_bounds``); this rule adds the fixed M on top, the
tighter of the two wins: each update goes in as min(s, M / ‖Δ‖)·Δ, s being B's factor.

Weights are FedAvg's capped sample counts (at most ``weight_cap``): with every
delta bounded by M, a site's pull is at most w/Σw · M, which the cap bounds.

Default M = 10 (``--clip-norm``): the tiny MAE's honest round-1 deltas have L2 norms
4-9 (0.05-0.11 x ‖θ₀‖ = 85, docs/round-log.md), so 10 leaves them whole and cuts a
100x-scaled one down to an honest size. Set it from ``update_norm`` in rounds.jsonl
for another model. Not with secure aggregation: the server cannot measure a masked
delta; there each site clips its own values to ``--secagg-clip`` before masking.
"""

from __future__ import annotations

import torch

from aggregator_service.strategies.fedavg import FedAvg


class NormBoundedFedAvg(FedAvg):
    """θ ← θ + Σ wᵢ·min(sᵢ, M/‖Δᵢ‖)·Δᵢ / Σ wᵢ, folded in as updates arrive."""

    name = "norm-bounded"
    needs_clear_updates = True  # a masked input's norm is not the site's

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clipped = 0  # updates this rule clipped in the round (observable)

    def begin_round(self, numel: int) -> None:
        super().begin_round(numel)
        self.clipped = 0

    def accumulate(self, delta: torch.Tensor, weight: int, scale: float = 1.0) -> None:
        norm = float(torch.linalg.vector_norm(delta))  # one read of Δ, nothing allocated
        bound = self.options.clip_norm / norm if norm > 0 else scale
        if bound < scale:
            scale = bound
            self.clipped += 1
        super().accumulate(delta, weight, scale)
