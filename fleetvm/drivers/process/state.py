"""The state.json record that lets a driver find a VM's processes again."""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__package__)

STATE_FILE = "state.json"


@dataclass(frozen=True)
class VmState:
    """Record in state.json that lets a later driver find the VM's processes."""

    vm_id: str
    isolation: str
    # Host PID of the VM's top process (bwrap, or the agent without sandbox) and
    # its start time in clock ticks after boot, which distinguishes a reused PID.
    pid: int | None = None
    start_time: int | None = None
    # Inode of the VM's PID namespace, with bubblewrap only.
    pid_namespace: int | None = None
    # The VM's memory and pids cgroups, or None where it has none. Kill derives
    # the paths from the VM id, so these only record what the VM got.
    cgroup: str | None = None
    pids_cgroup: str | None = None
    created_at: float = 0.0

    def write(self, vm_dir: Path) -> None:
        temporary = vm_dir / (STATE_FILE + ".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, vm_dir / STATE_FILE)

    @classmethod
    def read(cls, vm_dir: Path) -> VmState | None:
        """Return the VM's state, or None when state.json is missing or invalid.

        Kill signals the processes that the state points to, so a file that
        another user owns or could have written is ignored as invalid.
        """
        path = vm_dir / STATE_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("ignoring unreadable VM state %s: %s", path, exc)
            return None
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                logger.warning(
                    "ignoring VM state %s: it is owned by uid %d with mode %o, but "
                    "only the driver's user may write it",
                    path,
                    info.st_uid,
                    stat.S_IMODE(info.st_mode),
                )
                return None
            try:
                return cls(**json.loads(file.read()))
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("ignoring unreadable VM state %s: %s", path, exc)
                return None
