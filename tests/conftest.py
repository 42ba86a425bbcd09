"""Shared pytest setup."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """A test that runs ``fedmae.cli.main`` in-process gets the CLI's stderr handler on
    the root logger, bound to that test's captured stream. Drop it when the test ends:
    later log lines (a stopped server's threads finish a moment after their test) would
    otherwise go to a closed stream ("Logging error: I/O operation on closed file")."""
    yield
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_fedmae", False)]
