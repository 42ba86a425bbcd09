"""The ``fedmae`` parser: every command family is wired in, every flag states its default."""

from __future__ import annotations

import argparse

from fedmae.cli.main import build_parser


def _flags(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _flags(sub, (*path, name))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield " ".join((*path, action.option_strings[-1])), action


def test_every_optional_flag_states_its_default():
    bare = [
        name
        for name, action in _flags(build_parser())
        if not action.required and "default" not in (action.help or "").lower()
    ]
    assert bare == [], f"flags whose help does not state the default: {bare}"


def test_every_command_family_parses():
    parser = build_parser()
    for argv in (
        ["serve", "--state-dir", "s"],
        ["client", "--server", "h:1", "--insecure"],
        ["enroll", "--server", "h:1", "--ca", "c", "--token", "t", "--out", "o"],
        ["client-health", "--status-file", "f"],
        ["certs", "init", "--out", "o"],
        ["health"],
        ["report", "--state-dir", "s", "--out", "o"],
        ["report", "--state-dir", "s", "--out", "o", "--probe", "--probe-train-images", "0"],
        ["train-central", "--out", "o"],
        ["probe", "v000001.safetensors"],
        ["probe", "--random-init"],
        ["export", "--state-dir", "s", "--encoder-only", "--out", "e.safetensors"],
        ["demo"],
        ["watch"],
        ["status"],
        ["token", "list"],
        ["clients", "list"],
        ["admins", "list"],
        ["audit"],
    ):
        args = parser.parse_args(argv)
        assert callable(args.func), argv
