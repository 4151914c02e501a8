"""The contract every VM driver keeps.

A driver starts, reaches and kills VMs on the host it runs on. It never touches
the database: the worker decides what should happen and records the result.
A VM is a separate process tree with a directory of its own under the worker's
VM directory, so it outlives the worker, and a restarted worker finds it again
by its id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Language = Literal["python", "bash"]


@dataclass(frozen=True)
class VmSpec:
    """Request for a new VM: its id, resources and environment variables."""

    vm_id: str
    memory_mb: int
    vcpu_count: int
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SpawnResult:
    """A started VM and the isolation actually in force for it."""

    vm_id: str
    isolation: str
    pid: int


@dataclass(frozen=True)
class ExecResult:
    """Output of one command run in a VM."""

    stdout: str
    stderr: str
    exit_code: int
    execution_time: float
    timed_out: bool = False
    #: User plus system CPU seconds of the command, or None where the guest
    #: could not measure it, such as an agent older than this field.
    cpu_time: float | None = None


@dataclass(frozen=True)
class KillResult:
    """Outcome of a kill: whether anything was running, and what it took."""

    vm_id: str
    was_running: bool
    processes_killed: int


class VmDriver(Protocol):
    """Operations on the VMs of one host.

    Errors, all from ``fleetvm.errors``:

    - ``DriverError`` when the host or the guest machinery fails.
    - ``VmNotRunning`` for a VM that is gone.
    - ``VmFileNotFound`` for a missing file on download.
    - ``InvalidRequest`` or ``PayloadTooLarge`` for a bad path, code or size.
    - ``Conflict`` when the VM is too busy to take the request, for example at
      its process limit.
    """

    name: str

    def spawn(self, spec: VmSpec) -> SpawnResult:
        """Start a VM and return once its guest agent responds to a ping."""
        ...

    def is_alive(self, vm_id: str) -> bool:
        """Return whether any process of the VM runs and its agent responds."""
        ...

    def is_running(self, vm_id: str) -> bool:
        """Return whether the VM's processes run, without calling its agent.

        The liveness sweep calls this for every VM every few seconds, so it
        must be cheap. A driver without a cheaper test calls is_alive.
        """
        ...

    def execute(
        self, vm_id: str, language: Language, code: str, timeout: float
    ) -> ExecResult:
        """Run code in the VM's persistent interpreter or in bash."""
        ...

    def upload(self, vm_id: str, remote_path: str, content: bytes) -> str:
        """Write a file in the VM and return its absolute path there."""
        ...

    def download(self, vm_id: str, remote_path: str) -> bytes:
        """Read a file from the VM."""
        ...

    def kill(self, vm_id: str) -> KillResult:
        """End every process of the VM, confirm they are gone, remove its files.

        Killing a VM that is already gone is not an error.
        """
        ...

    def list_vms(self) -> list[str]:
        """Return the ids of the VMs that have a directory on this host."""
        ...
