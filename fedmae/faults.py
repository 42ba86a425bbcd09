"""Fault injection for the crash tests: ``FEDMAE_CRASH_AT=checkpoint`` makes the process
kill itself with SIGKILL at that point, exactly as ``kill -9`` would. Never set in
production; reading one environment variable is all it costs."""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if name in os.environ.get("FEDMAE_CRASH_AT", "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)
