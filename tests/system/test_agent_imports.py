"""What importing the client agent loads, in a fresh interpreter (a process of its own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_client_agent_loads_nothing_of_the_aggregator():
    """Issue 12: importing the agent loads neither the aggregator, nor SQLite (its
    registry), nor prometheus_client (its metrics)."""
    probe = (
        "import client_agent.agent, sys; print(sorted(m for m in sys.modules if "
        "m.startswith(('aggregator_service','sqlite3','prometheus'))))"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
