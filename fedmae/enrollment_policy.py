"""What a client may be called and labelled, and how stored names and labels are shown.

Enrollment requests and tokens come from outside (a device, an operator's script), and
what they carry ends up in the registry, in every ``fedmae clients list`` response and
on the operator's terminal. So both are bounded here, in one place, for the server
(``Enroll``, ``CreateToken``) and for the device (checked before it sends):

- a client name is a client id (``tls.CLIENT_ID_RE``) that does not claim a role the
  federation uses (``admin``, ``health``, ``monitor``, ...) and, unless a token bound to
  it says so, does not look like an id the server generates (``client-3f9c2a``);
- at most ``MAX_LABELS`` labels; a key is 1-64 characters of ``a-z 0-9 . _ - /``
  starting with a letter or digit; a value is at most ``MAX_LABEL_VALUE_BYTES`` bytes
  of UTF-8, printable characters only (no control characters, no terminal escapes, no
  bidirectional overrides).

Rows written before these limits existed are shown through ``printable`` and
``clamp_labels``, so an old enrollment with 15,000 labels or an escape sequence cannot
break or hijack the operator's view.
"""

from __future__ import annotations

import re
import secrets

from fedmae.errors import InvalidRequest
from fedmae.pki.files import CLIENT_ID_RE

MAX_LABELS = 16
MAX_LABEL_KEY_BYTES = 64
MAX_LABEL_VALUE_BYTES = 256
LABEL_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,63}$")

# Names of roles and services: an enrolled client called like one would read as that
# role in logs, audit entries and dashboards. Compared case-insensitively, also with a
# suffix ("admin-2", "health.probe").
RESERVED_NAMES = frozenset(
    {
        "admin", "administrator", "root", "operator", "aggregator", "server",
        "health", "healthcheck", "monitor", "monitoring", "metrics", "prometheus",
        "grafana", "localhost", "fedmae", "anonymous",
    }
)  # fmt: skip
RESERVED_PREFIXES = ("admin", "health", "monitor")

# The ids the server makes up when neither the token nor the device names the client.
GENERATED_ID_RE = re.compile(r"^client-[0-9a-f]{6}$")


def new_generated_id() -> str:
    return f"client-{secrets.token_hex(3)}"


def is_generated_id(name: str) -> bool:
    return GENERATED_ID_RE.match(name) is not None


def check_client_name(name: str) -> str:
    """``name`` if a client may be called so; else ``InvalidRequest`` saying why."""
    if not CLIENT_ID_RE.match(name):
        raise InvalidRequest(
            f"invalid client name '{printable(name, 80)}': use 1-64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    lower = name.lower()
    if lower in RESERVED_NAMES or any(
        lower.startswith(prefix) and lower[len(prefix)] in "-._"
        for prefix in RESERVED_PREFIXES
        if len(lower) > len(prefix)
    ):
        raise InvalidRequest(
            f"the client name {name!r} is reserved (it names a role of the federation): "
            "choose another"
        )
    return name


def check_labels(labels: dict[str, str], whose: str = "labels") -> dict[str, str]:
    """``labels`` if within the limits above; else ``InvalidRequest`` naming the problem."""
    if len(labels) > MAX_LABELS:
        raise InvalidRequest(f"too many {whose}: {len(labels)} (at most {MAX_LABELS})")
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            raise InvalidRequest(
                f"invalid label key '{printable(key, 80)}': use 1-{MAX_LABEL_KEY_BYTES} "
                "characters of a-z, 0-9, '.', '_', '-', '/', starting with a letter or digit"
            )
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_LABEL_VALUE_BYTES:
            raise InvalidRequest(
                f"the value of label {key!r} is {size} bytes (at most {MAX_LABEL_VALUE_BYTES})"
            )
        bad = next((c for c in value if not c.isprintable()), None)
        if bad is not None:
            raise InvalidRequest(
                f"the value of label {key!r} has a non-printable character "
                f"({printable(bad)} at position {value.index(bad)}): printable text only"
            )
    return labels


def printable(text: str, limit: int | None = None) -> str:
    """``text`` safe for a terminal: non-printable characters escaped (``\\x1b``,
    ``\\u202e``, ``\\n``), cut to ``limit`` characters with a trailing ``…``."""
    if limit is not None and len(text) > limit:
        text = text[:limit]
        cut = "…"
    else:
        cut = ""
    if not text.isprintable():
        text = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
        )
    return text + cut


def clamp_labels(labels: dict[str, str]) -> tuple[dict[str, str], int]:
    """At most ``MAX_LABELS`` labels (by key), each cut to the size limits; and how many
    were left out. For showing rows stored before the limits, whatever they hold."""
    shown: dict[str, str] = {}
    for key in sorted(labels)[:MAX_LABELS]:
        shown[_cut(key, MAX_LABEL_KEY_BYTES)] = _cut(str(labels[key]), MAX_LABEL_VALUE_BYTES)
    return shown, len(labels) - len(shown)


def _cut(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return text
    return data[: max_bytes - 3].decode("utf-8", "ignore") + "…"
