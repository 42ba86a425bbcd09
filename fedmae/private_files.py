"""Files and directories only their owner may read: keys, identities, state.

A key written through ``open(path + ".tmp", "w")`` inherits whatever a stale or planted
``.tmp`` already was: its 0644 mode, or a symlink to somewhere else. Here every write
makes a fresh temp file (``O_EXCL | O_NOFOLLOW``), sets its mode on the descriptor,
fsyncs, and renames it into place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
PUBLIC_FILE = 0o644


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700; tighten it if it already exists."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    _tighten(path, PRIVATE_DIR)
    return path


def private_file(path: Path) -> Path:
    """Make ``path`` exist with mode 0600 (create it empty, or tighten it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE)
    except FileExistsError:
        _tighten(path, PRIVATE_FILE)
    else:
        os.fchmod(fd, PRIVATE_FILE)  # O_CREAT's mode is filtered by the umask
        os.close(fd)
    return path


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Write ``data`` to ``path`` with ``mode``: a fresh temp file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink()  # a crash's leftover or a planted file/symlink: never write through it
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _tighten(path: Path, mode: int) -> None:
    st = os.stat(path)
    if st.st_mode & 0o777 & ~mode == 0:
        return
    try:
        os.chmod(path, st.st_mode & 0o777 & mode)
        log.info("restricted %s to mode %o", path, st.st_mode & 0o777 & mode)
    except PermissionError as err:
        log.warning("%s is mode %o and cannot be restricted: %s", path, st.st_mode & 0o777, err)
