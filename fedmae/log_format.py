"""Logging set-up: readable lines on a terminal, JSON lines for machines (compose)."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str = ""):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": self.role,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO", role: str = "", fmt: str = "text") -> None:
    """Configure the root logger once: ``fmt`` is ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        prefix = f"{role} " if role else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {prefix}%(levelname)-7s %(message)s", "%H:%M:%S")
        )
    handler._fedmae = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    # Replace only our own handler (a second call, e.g. in tests), keep any others.
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_fedmae", False)]
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
