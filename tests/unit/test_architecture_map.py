"""docs/architecture.md's package tree names every module of the installed packages,
and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedmae", "aggregator_service", "client_agent")


def _named_in_map() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    tree = text.split("## The package tree", 1)[1].split("```", 2)[1]
    named: set[str] = set()
    folders: list[str] = []
    for line in tree.splitlines():
        entry = re.match(r"^( *)(\S+\.py|\S+/)(\s|$)", line)
        if not entry:
            continue
        depth, name = len(entry.group(1)) // 2, entry.group(2)
        folders = folders[:depth]
        named.add("/".join([*folders, name.rstrip("/")]))
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
    return named


def _listed(module: str, named: set[str]) -> bool:
    # A package named without its modules (registry/) covers them all.
    folder = str(Path(module).parent)
    return module in named or (
        folder in named and not any(n.startswith(folder + "/") for n in named)
    )


def test_every_module_in_the_map_exists():
    named = _named_in_map()
    assert sorted(n for n in named if n.endswith(".py") and not (ROOT / n).exists()) == []


def test_every_module_is_in_the_map():
    named = _named_in_map()
    modules = {
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py" and "_proto" not in path.parts
    }
    assert sorted(m for m in modules if not _listed(m, named)) == []
