"""Every system test is ``slow``: real processes (``fedmae serve``, the demo, docker
compose), kill -9 and restarts. ``make test-fast`` leaves them out; ``make test`` runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)
