"""Exclusive locks on a data directory, held for a process's whole life."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def hold_lock_file(path: Path, busy_message: str) -> int:
    """Lock ``path`` for this process and return its descriptor, or exit.

    The kernel releases the lock when the process exits, however it exits.
    With another process holding it, exit with ``busy_message``.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(busy_message) from None
    return fd
