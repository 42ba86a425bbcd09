"""The memory of a few processes, from ``/proc``: what ``fedmae simulate`` reports.

RSS counts a page shared by two processes (torch's libraries, mapped by each) in
both; PSS splits it between them, so the PSS sum is what the processes cost the
machine together. Both are sampled once a second and their peaks kept.
"""

from __future__ import annotations

import threading
from pathlib import Path

SAMPLE_S = 1.0


def _kib(pid: int, file: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass  # the process has ended
    return 0


def rss_mb(pid: int) -> float:
    return _kib(pid, "status", "VmRSS:") / 1024


def pss_mb(pid: int) -> float:
    return _kib(pid, "smaps_rollup", "Pss:") / 1024


class MemoryWatch:
    """Samples named processes' RSS and PSS on a thread; keeps the peaks of the sums."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.peak_rss = 0.0
        self.peak_pss = 0.0
        self.peak_parts: dict[str, float] = {}  # each process's RSS at the RSS peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sample(self) -> tuple[dict[str, float], float]:
        """Each process's RSS (MB), and the PSS sum (MB), now."""
        parts = {name: rss_mb(pid) for name, pid in self.pids.items()}
        pss = sum(pss_mb(pid) for pid in self.pids.values())
        total = sum(parts.values())
        if total > self.peak_rss:
            self.peak_rss, self.peak_parts = total, parts
        self.peak_pss = max(self.peak_pss, pss)
        return parts, pss

    def total_mb(self) -> float:
        return sum(self.sample()[0].values())

    def describe(self) -> str:
        parts, pss = self.sample()
        each = ", ".join(f"{n} {v:.0f}" for n, v in parts.items())
        return f"RSS {sum(parts.values()):.0f} MB in all ({each}); PSS {pss:.0f} MB"

    def describe_peak(self) -> str:
        self.sample()
        each = ", ".join(f"{n} {v:.0f}" for n, v in self.peak_parts.items())
        return f"RSS {self.peak_rss:.0f} MB in all ({each}); PSS {self.peak_pss:.0f} MB"

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()
