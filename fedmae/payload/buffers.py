"""Receive buffers kept for reuse."""

from __future__ import annotations

import threading

import numpy as np
import torch


class BufferPool:
    """Receive buffers kept for reuse: at most ``keep`` of them, of one size.

    A fresh buffer the size of a model costs more than the transfer into it: every
    page is faulted in and zeroed on first touch (about 45 ms per 100 MB here), and
    when numpy asks for huge pages the kernel may stop to compact memory first
    (measured up to 240 ms). A reused buffer costs only the copy.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            while self._free:
                buf = self._free.pop()
                if buf.nbytes == nbytes:
                    return buf
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, buf: np.ndarray | torch.Tensor) -> None:
        """Offer memory for reuse: a buffer from ``take``, or a tensor decoded into one
        (its bytes are overwritten by the next ``take``: only when it is done with)."""
        if isinstance(buf, torch.Tensor):
            buf = buf.numpy().view(np.uint8)
        with self._lock:
            if self._free and self._free[0].nbytes != buf.nbytes:
                self._free.clear()  # the model changed size: keep the new kind only
            if len(self._free) < self.keep:
                self._free.append(buf)

    def trim(self, keep: int) -> None:
        """Keep at most ``keep`` free buffers; the rest go back to the system."""
        with self._lock:
            del self._free[keep:]

    def clear(self) -> None:
        self.trim(0)
