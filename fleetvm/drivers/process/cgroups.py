"""Create, lock, join and remove the memory and pids cgroups of VMs."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from fleetvm.drivers.process.procfs import MAX_POLL_INTERVAL_SECONDS

logger = logging.getLogger(__package__)

CGROUP_PARENT = "fleetvm"
# Child of a VM's pids cgroup that VM code runs in.
USER_CGROUP = "user"
# Tasks of bubblewrap and the agent: 2 bubblewrap processes, the agent's main,
# reader and drainer threads, and one thread per concurrent request.
AGENT_TASK_RESERVE = 64
# How long remove_stale_cgroups waits for spawns to finish creating cgroups.
STALE_CGROUP_LOCK_SECONDS = 5.0


@dataclass(frozen=True)
class VmCgroups:
    """The cgroups of one VM, each None where the host offers none."""

    memory: Path | None
    pids: Path | None

    @property
    def isolation_parts(self) -> list[str]:
        parts = ["memcg" if self.memory is not None else "rlimit"]
        if self.pids is not None:
            parts.append("pids")
        return parts


def _open_user_cgroup(pids_cgroup: Path | None, stack: ExitStack) -> int | None:
    """Open cgroup.procs of the cgroup for VM code, for the agent's children.

    The driver opens it, so the sandbox user can move its own processes in
    without any write permission on the cgroup file system.
    """
    if pids_cgroup is None:
        return None
    path = pids_cgroup / USER_CGROUP / "cgroup.procs"
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    return fd


def _join_cgroup(cgroup: Path, pids: list[int]) -> None:
    for pid in pids:
        (cgroup / "cgroup.procs").write_text(str(pid))


def _cgroup_members(cgroup: Path) -> set[int]:
    try:
        text = (cgroup / "cgroup.procs").read_text()
    except OSError:
        return set()
    return {int(line) for line in text.split()}


def _create_cgroup(path: Path) -> None:
    path.parent.mkdir(exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        # Left by a VM whose kill did not finish. rmdir fails with EBUSY while
        # the cgroup has processes.
        for child in _child_cgroups(path):
            child.rmdir()
        path.rmdir()
        path.mkdir()


def _child_cgroups(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return [
                Path(entry.path)
                for entry in entries
                if entry.is_dir(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return []


def _cgroup_tree_has_processes(path: Path) -> bool:
    try:
        text = (path / "cgroup.procs").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        # Unknown counts as busy, so the cgroup is kept.
        return True
    if text.strip():
        return True
    return any(_cgroup_tree_has_processes(child) for child in _child_cgroups(path))


def _remove_cgroup_tree(path: Path, timeout: float = 0.0) -> bool:
    """Remove a cgroup and its child cgroups, and return whether it is gone.

    rmdir fails with EBUSY until the last process of a cgroup has exited, so
    each rmdir is retried until timeout.
    """
    for child in _child_cgroups(path):
        _remove_cgroup_tree(child, timeout)
    deadline = time.monotonic() + timeout
    # Killed VM processes left their cgroup within about 5 ms in measurements
    # on this project's benchmark host, so the first retries come soon.
    interval = 0.001
    while True:
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if time.monotonic() >= deadline:
                logger.warning("cannot remove cgroup %s: %s", path, exc)
                return False
        time.sleep(interval)
        interval = min(interval * 2, MAX_POLL_INTERVAL_SECONDS)


@contextmanager
def _locked_cgroup_parent(parent: Path, timeout: float) -> Iterator[bool]:
    """Hold an exclusive flock on a cgroup parent, and yield whether it was taken.

    Yields False when the lock was not free within timeout, or the parent does
    not exist.
    """
    fd = _open_cgroup_parent(parent, create=False)
    if fd is None:
        yield False
        return
    try:
        yield _flock_exclusive(fd, timeout)
    finally:
        os.close(fd)


def _open_cgroup_parent(parent: Path, create: bool) -> int | None:
    """Open a cgroup parent, or return None where that hierarchy is unusable."""
    if not parent.parent.is_dir():
        return None
    try:
        if create:
            parent.mkdir(exist_ok=True)
        return os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def _flock_exclusive(fd: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        time.sleep(MAX_POLL_INTERVAL_SECONDS)
