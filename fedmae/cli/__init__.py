"""The ``fedmae`` command, the composition root: the only code that imports both roles.

One module per command family (``main`` assembles the parser); each has a ``build(sub)``
that adds its subcommands and imports its heavy dependencies (torch, the roles) only
inside the command functions, so ``fedmae --help`` and the admin commands start fast.
"""

from __future__ import annotations

import argparse
import os

# The update encodings a flag may name (fedmae.tensor_codec maps them; it loads torch).
ENCODING_NAMES = ["fp32", "fp16", "bf16", "int8"]


def add_env_argument(
    parser: argparse.ArgumentParser, flag: str, env: str, help: str, default: str | None = None
) -> None:
    """``flag``, defaulting to the environment variable ``env``, else ``default``; its
    help names both."""
    said = "no default" if default is None else "default %(default)s"
    parser.add_argument(
        flag, default=os.environ.get(env, default), help=f"{help} (env {env}; {said})"
    )
