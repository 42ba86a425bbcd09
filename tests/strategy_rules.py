"""A small needs-all aggregation rule for tests: the coordinate-wise median.

It proves the needs-all path (the engine spills updates to an ``UpdateStore``, the rule
reads them back in blocks); robust rules proper live in ``aggregator_service/strategies``.
"""

from __future__ import annotations

import torch

from aggregator_service.strategies import Strategy
from aggregator_service.update_store import UpdateStore


class CoordinateMedian(Strategy):
    """θ ← θ + median over sites of each coordinate of the clipped updates (unweighted;
    torch's median: the lower middle value for an even count)."""

    name = "median"
    needs_all_updates = True

    def __init__(self, block_size: int = 100_000, evaluator=None) -> None:
        super().__init__(evaluator)
        self.block_size = block_size
        self.blocks_read = 0

    def aggregate(
        self, global_flat: torch.Tensor, updates: UpdateStore | None = None
    ) -> torch.Tensor:
        assert updates is not None and len(updates) > 0, "no updates to aggregate"
        step = torch.empty_like(global_flat)
        for start, block, _weights in updates.iter_blocks(self.block_size):  # [sites, block]
            step[start : start + block.shape[1]] = block.median(dim=0).values
            self.blocks_read += 1
        return step.add_(global_flat)
