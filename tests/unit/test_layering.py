"""Layering checks that import-linter (``make lint``) cannot make by itself."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Not core: the wire edge, the composition root, and ``python -m fedmae`` (the CLI's entry).
NOT_CORE = {"fedmae.transport", "fedmae.cli", "fedmae.__main__"}


def _contract(contract_id: str) -> dict:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return next(c for c in config["contracts"] if c["id"] == contract_id)


def _fedmae_children() -> set[str]:
    return {f"fedmae.{m.name}" for m in pkgutil.iter_modules([str(REPO / "fedmae")])}


def test_the_core_contracts_name_every_core_module():
    """The contracts list the core's modules one by one (import-linter cannot say "fedmae
    but not fedmae.cli"): a new module in fedmae/ must be added there, or it escapes them."""
    core = _fedmae_children() - NOT_CORE
    assert set(_contract("core-no-grpc")["source_modules"]) == core
    roles = set(_contract("only-cli-imports-roles")["source_modules"])
    assert roles == core | {"fedmae.transport"}
