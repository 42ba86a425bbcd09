"""Shared pytest setup."""

from __future__ import annotations

import logging
import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker is one process of several on the same cores: give
    each worker's torch its share of the cores, not all of them. (Every worker's torch on
    every core oversubscribes them, and its threads spin-wait for each other: the MAE
    tests took twice the CPU time.) Workers are the processes xdist gives a count."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """A test that runs ``fedmae.cli.main`` in-process gets the CLI's stderr handler on
    the root logger, bound to that test's captured stream. Drop it when the test ends:
    later log lines (a stopped server's threads finish a moment after their test) would
    otherwise go to a closed stream ("Logging error: I/O operation on closed file")."""
    yield
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_fedmae", False)]
