"""Process-wide tuning for moving large payloads: glibc malloc settings.

Every payload chunk is a ~1 MiB ``bytes`` object (received from gRPC, read from a
checkpoint, framed for sending). With glibc's defaults such blocks are handed back to
the kernel when freed and faulted in again, zero-filled, when the next one is
allocated: measured here, framing a 100 MB checkpoint went from 8 ms to 48 ms with
24,000 page faults once that pattern set in. Keeping blocks under 8 MiB in the heap
and trimming it only above 32 MiB of free space stops that; buffers the size of a
model (hundreds of MB) are still mapped and unmapped on their own.

Capping malloc arenas keeps resident memory from growing with the number of gRPC
threads (one per connected client's event stream): 32 clients, 537 MB -> 393 MB peak
with 2 arenas (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 8 << 20
TRIM_THRESHOLD = 32 << 20


def _glibc_function(name: str):
    """A glibc function by name, or None (no libc found, or not glibc: musl has no
    mallopt or malloc_trim)."""
    path = ctypes.util.find_library("c")
    if not path:
        return None
    try:
        return getattr(ctypes.CDLL(path), name)
    except (OSError, AttributeError):
        return None


def tune_malloc(arenas: int | None = 2) -> bool:
    """Apply the settings above; False (and nothing changed) where libc is not glibc."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    ok &= bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if arenas:
        ok &= bool(mallopt(_M_ARENA_MAX, arenas))
    if not ok:
        log.debug("mallopt refused a setting; running with libc defaults")
    return ok


def release_free_memory() -> None:
    """Hand memory malloc holds free back to the system (glibc ``malloc_trim``).

    After a round with many clients the heap is full of holes left by their transfer
    buffers: measured with 256 clients, 857 MB resident of which 234 MB free. A trim
    takes milliseconds; the aggregator does it once a round.
    """
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)
