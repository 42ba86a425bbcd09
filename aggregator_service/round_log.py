"""The round log: one JSON object per round, appended to ``rounds.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

from fedmae.private_files import PRIVATE_FILE, private_file


def record_json(record: dict[str, Any]) -> str:
    """A round record as one line of strict JSON: a NaN or Infinity in it is a
    ``ValueError`` here, never a ``NaN`` token that strict parsers reject."""
    return json.dumps(record, separators=(",", ":"), allow_nan=False)


class RoundLog:
    def __init__(self, path: Path, echo: TextIO | None = None):
        self.path = path
        self.echo = echo
        if path.exists():
            private_file(path)  # one written by an older fedmae was 0644

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably: flushed and fsynced when this returns."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
        with open(fd, "a", encoding="utf-8") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())

    def echo_record(self, record: dict[str, Any]) -> None:
        """Show the record on the echo stream (the server's stdout), if there is one."""
        if self.echo is not None:
            self.echo.write(_line(record))
            self.echo.flush()

    def repair(self) -> bool:
        """Drop a torn last line left by a crash mid-write; True if something was cut."""
        if not self.path.exists():
            return False
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return False
        keep = data[: data.rfind(b"\n") + 1]
        with open(self.path, "r+b") as f:
            f.truncate(len(keep))
            f.flush()
            os.fsync(f.fileno())
        return True

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def _line(record: dict[str, Any]) -> str:
    return record_json(record) + "\n"
