"""Robust needs-all rules: coordinate-wise trimmed mean and median (Yin et al. 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates").

Each coordinate of the step is taken over the sites' values of that coordinate alone,
so a site can move it only within the range the other sites span: a 100x-scaled,
sign-flipped or noisy delta lands at one end of every coordinate's sorted values and
is trimmed off there.

Weights: unweighted, one vote per site. A claimed sample count is capped
(``update_bounds``: at most W, 10,000 by default), but a capped liar still weighs up to
W / nᵢ honest sites (16 with the demo's 600 images): enough to own a weighted median.
One vote per site makes the claim irrelevant; the price is that a site with much more
data counts as much as a small one.

Memory: the round's updates are read from the ``UpdateStore`` (a memory-mapped file)
``block`` coordinates at a time. Peak memory beyond the model θ and the output (one
model each, float32, as FedAvg's θ and accumulator) is one block: its mapped pages
and copy ``[sites, block]`` float32, and the sort's values (float32), indices (int64)
and scratch: at most 32 bytes x sites x block, 2 MiB x sites at the default block of
2^16 coordinates, whatever the model size, plus a fixed 10-16 MB of sort and BLAS
workspace the first time a process aggregates (measured at 10 M x 8 sites: 13-20 MB
above FedAvg's peak on a first call, 3-5 MB on later ones; docs/BENCHMARKS.md). ``docs/privacy.md``,
"Robust aggregation", lists what these rules defend against and what they do not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch

from aggregator_service.strategies.base import Evaluator, Strategy, StrategyOptions

if TYPE_CHECKING:
    from aggregator_service.update_store import UpdateStore

# Coordinates per block read from the store: 256 KiB of float32 per site. Larger blocks
# were no faster (10 M x 8 sites: the sort costs the same per value) and cost 4x the
# memory.
BLOCK = 1 << 16


class BlockedRule(Strategy):
    """A needs-all rule that writes its step block by block: subclasses say how one
    block of updates ``[sites, block]`` becomes that block's step ``[block]``
    (``block_step``), after ``plan`` has looked at the round as a whole."""

    name = "blocked"
    needs_all_updates = True
    needs_clear_updates = True

    def __init__(
        self,
        evaluator: Evaluator | None = None,
        options: StrategyOptions | None = None,
        block_size: int = BLOCK,
    ) -> None:
        super().__init__(evaluator, options)
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        # Observable for tests and logs: blocks read in the last aggregate, and the
        # most values any one block held ([sites, block] elements).
        self.blocks_read = 0
        self.largest_block = 0

    def read_blocks(self, updates: UpdateStore) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, block)`` per block of the store, counted."""
        for start, block, _weights in updates.iter_blocks(self.block_size):  # [sites, block]
            self.blocks_read += 1
            self.largest_block = max(self.largest_block, block.numel())
            yield start, block

    def aggregate(
        self, global_flat: torch.Tensor, updates: UpdateStore | None = None
    ) -> torch.Tensor:
        if updates is None:
            raise TypeError(f"strategy {self.name!r} needs the round's UpdateStore")
        sites = len(updates)
        need, why = self.fewest_updates(self.options)
        if sites < need:
            raise ValueError(f"{self.name} got {sites} updates; it needs {need} ({why})")
        self.blocks_read = self.largest_block = 0
        self.plan(updates)
        step = torch.empty_like(global_flat)  # [P]: the output, written block by block
        for start, block in self.read_blocks(updates):
            step[start : start + block.shape[1]] = self.block_step(block)
        return step.add_(global_flat)

    def plan(self, updates: UpdateStore) -> None:  # noqa: B027 (only Krum needs a first pass)
        """A first pass over the round's updates before the steps are written."""

    def block_step(self, block: torch.Tensor) -> torch.Tensor:
        """One block's step from its updates ``[sites, block]``."""
        raise NotImplementedError


def trimmed(block: torch.Tensor, k: int) -> torch.Tensor:
    """Per column, the mean of the values left after dropping the ``k`` smallest and
    the ``k`` largest: ``[sites, block]`` → ``[block]``."""
    sites = block.shape[0]
    ordered = block.sort(dim=0).values  # [sites, block]; the sort also allocates int64 indices
    return ordered[k : sites - k].mean(dim=0)


class TrimmedMean(BlockedRule):
    """Coordinate-wise β-trimmed mean: per coordinate, drop the k = max(1, ⌊βn⌋)
    smallest and k largest of the n sites' values (k = 0 when β = 0) and average the
    rest. At least one from each end when β > 0, so the default β = 0.1 still trims
    one site of 5 (⌊0.5⌋ would trim none and be a plain mean)."""

    name = "trimmed-mean"

    @staticmethod
    def trim_count(beta: float, sites: int) -> int:
        """k for β and n sites (a hair of slack: 0.3 x 10 is 3.0000000000000004)."""
        return 0 if beta == 0 else max(1, math.floor(beta * sites + 1e-9))

    @classmethod
    def fewest_updates(cls, options: StrategyOptions) -> tuple[int, str]:
        if options.trim_beta == 0:
            return 1, "--trim-beta 0 trims nothing"
        return 3, (
            f"--trim-beta {options.trim_beta:g} trims at least 1 update at each end; with 2 "
            "sites nothing would be left"
        )

    def block_step(self, block: torch.Tensor) -> torch.Tensor:
        return trimmed(block, self.trim_count(self.options.trim_beta, block.shape[0]))


class CoordinateMedian(BlockedRule):
    """Coordinate-wise median: the middle value of n sites, the mean of the two middle
    ones for even n (the trimmed mean with k = ⌊(n−1)/2⌋). Breaks down only when half
    the sites or more are malicious."""

    name = "median"
    MIN_SITES: ClassVar[int] = 3

    @classmethod
    def fewest_updates(cls, options: StrategyOptions) -> tuple[int, str]:
        return cls.MIN_SITES, "the median of 2 is their mean, which either site steers"

    def block_step(self, block: torch.Tensor) -> torch.Tensor:
        return trimmed(block, (block.shape[0] - 1) // 2)
