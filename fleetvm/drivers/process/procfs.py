"""Find, signal and confirm a VM's host processes through /proc and pidfds."""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from fleetvm.errors import DriverError

MAX_POLL_INTERVAL_SECONDS = 0.05


@dataclass(frozen=True)
class ProcessMatcher:
    """Tests whether a host process belongs to one VM.

    A process belongs to the VM if it is in the VM's PID namespace or one of its
    cgroups, is the recorded top process, or has FLEETVM_VM_ID=<vm_id> in its
    initial environment. Zombies never match, because they cannot run code.

    With ``members_complete``, every process of the VM is in its cgroups, so a
    search tests only those PIDs and the top process instead of every process
    of the host.
    """

    environment_entry: bytes
    pid_namespace: int | None
    cgroup_members: frozenset[int]
    top_pid: int | None
    top_start_time: int | None
    members_complete: bool = False

    def candidates(self) -> list[int]:
        """Return the PIDs that a search for the VM's processes must test."""
        if not self.members_complete:
            return _process_ids()
        pids = set(self.cgroup_members)
        if self.top_pid is not None:
            pids.add(self.top_pid)
        return sorted(pids)

    def matches(self, pid: int) -> bool:
        status = _process_status(pid)
        if status is None or status[0] == "Z":
            return False
        if pid in self.cgroup_members:
            return True
        if pid == self.top_pid and status[1] == self.top_start_time:
            return True
        if self.pid_namespace is not None and _pid_namespace(pid) == self.pid_namespace:
            return True
        return self.environment_entry in _environment_entries(pid)


def _process_ids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _process_status(pid: int) -> tuple[str, int] | None:
    """Return the state letter and start time of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except OSError:
        return None
    # The command name in parentheses may contain spaces and parentheses.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def _start_time(pid: int) -> int | None:
    status = _process_status(pid)
    return status[1] if status else None


def _pid_namespace(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _environment_entries(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            return file.read().split(b"\0")
    except OSError:
        return []


def _find_processes(matcher: ProcessMatcher) -> list[int]:
    own = os.getpid()
    return [pid for pid in matcher.candidates() if pid != own and matcher.matches(pid)]


def _kill_if_matching(pid: int, matcher: ProcessMatcher) -> int | None:
    """Send SIGKILL to pid if it still belongs to the VM; return its open pidfd.

    The pidfd pins the process, so a PID reused after the check cannot be hit,
    and it becomes readable when the process exits. The caller closes it.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        if matcher.matches(pid):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd


def _wait_for_exit(pidfds: list[int], timeout: float) -> None:
    """Wait until the process of every pidfd has exited, or until timeout."""
    poller = select.poll()
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    pending = len(pidfds)
    deadline = time.monotonic() + timeout
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for pidfd, _ in poller.poll(remaining * 1000):
            poller.unregister(pidfd)
            pending -= 1


def kill_until_gone(
    vm_id: str, next_matcher: Callable[[], ProcessMatcher], timeout: float
) -> set[int]:
    """SIGKILL the processes a fresh ``next_matcher()`` finds until none is left.

    Returns every PID that was found. Raises DriverError when some survive
    ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    found: set[int] = set()
    interval = 0.001
    while True:
        matcher = next_matcher()
        survivors = _find_processes(matcher)
        if not survivors:
            return found
        if time.monotonic() >= deadline:
            raise DriverError(
                f"processes {survivors} of VM {vm_id} were still running "
                f"{timeout:g} s after SIGKILL"
            )
        found.update(survivors)
        pidfds = [_kill_if_matching(pid, matcher) for pid in survivors]
        try:
            # A new search follows the exits at once, or the interval at the
            # latest, because new processes may have been forked meanwhile.
            _wait_for_exit([fd for fd in pidfds if fd is not None], interval)
        finally:
            for pidfd in pidfds:
                if pidfd is not None:
                    os.close(pidfd)
        interval = min(interval * 2, MAX_POLL_INTERVAL_SECONDS)
