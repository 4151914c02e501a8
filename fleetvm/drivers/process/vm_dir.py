"""Files of a VM directory: populating, logging, reading and removing them."""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

from fleetvm.errors import DriverError
from fleetvm.guest import agent as guest_agent

logger = logging.getLogger(__package__)

AGENT_SOURCE = Path(guest_agent.__file__)
AGENT_FILE = "agent.py"
SOCKET_FILE = "agent.sock"
LOG_FILE = "agent.log"
HOME_DIR = "home"


def _populate_vm_dir(
    vm_dir: Path, credentials: tuple[int, int] | None, host_home: bool
) -> None:
    if host_home:
        home = vm_dir / HOME_DIR
        home.mkdir()
        os.chmod(home, 0o700)
        if credentials is not None:
            os.chown(home, *credentials)
    shutil.copyfile(AGENT_SOURCE, vm_dir / AGENT_FILE)
    os.chmod(vm_dir / AGENT_FILE, 0o644)


def _open_log(vm_dir: Path, stack: ExitStack) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    fd = os.open(vm_dir / LOG_FILE, flags, 0o600)
    stack.callback(os.close, fd)
    return fd


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        # VM code may have removed permissions from its own directories.
        logger.info("retrying removal of %s after restoring permissions: %s", path, exc)
    try:
        _make_tree_removable(path)
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DriverError(f"cannot remove VM directory {path}: {exc}") from exc


def _make_tree_removable(path: Path) -> None:
    os.chmod(path, 0o700, follow_symlinks=False)
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _make_tree_removable(Path(entry.path))


def _append_output(fd: int, path: Path) -> None:
    """Append to path what bubblewrap and the agent wrote to the startup pipe."""
    os.set_blocking(fd, False)
    try:
        # A pipe buffers 64 KiB by default, so one read takes everything in it.
        data = os.read(fd, 65536)
    except BlockingIOError:
        return
    with open(path, "ab") as file:
        file.write(data)


def _read_tail(path: Path, size: int = 2000) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(file.tell() - size, 0))
            return file.read().decode(errors="replace").strip()
    except OSError:
        return ""
