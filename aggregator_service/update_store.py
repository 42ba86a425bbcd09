"""A round's accepted updates on disk, for rules that need them all (median, Krum).

A folding rule (FedAvg) keeps one accumulator; a needs-all rule must see every update
at once, and one in-memory copy per site would cost sites × model size of RAM. So the
round engine spills each accepted update (already clipped: ``scale * delta``) into one
memory-mapped file in the state directory, a row per update, and the rule reads it
back in coordinate blocks: ``iter_blocks`` hands out ``[sites, block]`` tensors, so peak
memory is one block times the sites.

Pages written or read are dropped from this process's resident set as it goes
(``MADV_DONTNEED`` on a shared file mapping keeps their data in the page cache and the
file): the kernel may write them out instead of holding them in RAM. The file is
scratch: it is not fsynced, and a crash loses the round anyway (it is retried).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import torch

_FLOAT = 4  # bytes per float32 coordinate
# The open round's store, in the state directory (one round is open at a time).
SPILL_FILE = "round-updates.f32"


class UpdateStore:
    """Up to ``capacity`` flat float32 updates of ``numel`` coordinates in ``path``.

    Rows start on page boundaries, so a row's pages can be dropped on their own. The
    file is sparse: disk holds only the rows appended. ``close`` unmaps and deletes it.
    Not thread-safe: the caller serialises ``append`` (the engine folds under a lock).
    """

    def __init__(self, path: Path, numel: int, capacity: int):
        if numel <= 0 or capacity <= 0:
            raise ValueError(f"numel and capacity must be > 0, got {numel} and {capacity}")
        self.path = Path(path)
        self.numel = numel
        self.capacity = capacity
        row_bytes = numel * _FLOAT
        self._stride = -(-row_bytes // mmap.PAGESIZE) * mmap.PAGESIZE  # bytes per row
        self._weights: list[float] = []
        # O_TRUNC: a file a crash left behind is scratch from a lost round.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, self._stride * capacity)
            self._mm: mmap.mmap | None = mmap.mmap(fd, self._stride * capacity)
        finally:
            os.close(fd)
        # One view of the whole file; a row's coordinates are [:numel] of its stride.
        self._rows: torch.Tensor | None = torch.frombuffer(self._mm, dtype=torch.float32).view(
            capacity, self._stride // _FLOAT
        )

    def __len__(self) -> int:
        return len(self._weights)

    @property
    def weights(self) -> list[float]:
        """The weight of each stored update, in row order."""
        return list(self._weights)

    def append(self, delta: torch.Tensor, weight: float, scale: float = 1.0) -> int:
        """Store ``scale * delta`` (flat float32, ``numel`` long) with ``weight``; its row.

        ``delta`` may be a receive buffer that is reused after the call: it is copied."""
        rows = self._live()
        if len(self._weights) >= self.capacity:
            raise ValueError(f"the update store is full ({self.capacity} updates)")
        if delta.numel() != self.numel:
            raise ValueError(f"update has {delta.numel()} coordinates, the store {self.numel}")
        row = len(self._weights)
        torch.mul(delta.reshape(-1), scale, out=rows[row, : self.numel])  # written once, scaled
        self._weights.append(float(weight))
        self._drop_pages(row * self._stride, self._stride)
        return row

    def iter_blocks(self, block_size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(start, updates, weights)`` per block of coordinates ``start:start+block``:
        ``updates`` is a ``[sites, block]`` float32 copy (the last block may be shorter),
        ``weights`` the ``[sites]`` float32 weights. Only one block is in memory."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self._live()
        n = len(self._weights)
        weights = torch.tensor(self._weights, dtype=torch.float32)
        for start in range(0, self.numel, block_size):
            end = min(start + block_size, self.numel)
            # No view of the mapping outlives this line (close() must be able to unmap).
            block = self._live()[:n, start:end].clone()  # [sites, block], contiguous
            self._drop_pages(0, n * self._stride)
            yield start, block, weights

    def close(self) -> None:
        """Unmap and delete the file (idempotent)."""
        self._rows = None  # the view exports the mapping's buffer: release it first
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> UpdateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> torch.Tensor:
        if self._rows is None:
            raise ValueError("the update store is closed")
        return self._rows

    def _drop_pages(self, offset: int, length: int) -> None:
        """Drop mapped pages from the resident set; their data stays in the file."""
        assert self._mm is not None
        self._mm.madvise(mmap.MADV_DONTNEED, offset, length)
