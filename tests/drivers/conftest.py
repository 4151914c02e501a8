"""Fixtures that start real VMs and kill whatever a test leaves running."""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetvm.drivers.base import VmSpec
from fleetvm.drivers.process import (
    MEMORY_CGROUP_ROOT,
    PIDS_CGROUP_ROOT,
    ProcessDriver,
    VmState,
)
from fleetvm.settings import Settings

VM_ID_ENV = "FLEETVM_VM_ID"


def processes_of_vm(vm_id: str, pid_namespace: int | None = None) -> list[int]:
    """Find a VM's live processes by scanning /proc, independently of the driver.

    A process counts if FLEETVM_VM_ID=<vm_id> is in its environment or, when
    pid_namespace is given, if it is in that PID namespace.
    """
    entry = f"{VM_ID_ENV}={vm_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or _is_zombie(name):
            continue
        if pid_namespace is not None and _pid_namespace(name) == pid_namespace:
            found.append(int(name))
        elif entry in _environment(name):
            found.append(int(name))
    return found


def processes_with_arguments(*arguments: str) -> list[int]:
    """Return the live processes whose command line is exactly ``arguments``."""
    expected = "\0".join(arguments).encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or _is_zombie(name):
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as file:
                if file.read() == expected:
                    found.append(int(name))
        except OSError:
            continue
    return found


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def unique_seconds() -> str:
    """Return a sleep duration that identifies one test's processes in /proc."""
    return str(100_000_000 + uuid.uuid4().int % 100_000_000)


def _is_zombie(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2 :].startswith(b"Z")


def _pid_namespace(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _cgroup_members(cgroup: Path) -> list[int]:
    try:
        return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _environment(pid: str) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            return file.read().split(b"\0")
    except OSError:
        return []


class VmFactory:
    """Creates drivers on one data directory and VMs with unique ids.

    It also carries the /proc helpers, because test modules cannot import
    conftest.
    """

    processes_of_vm = staticmethod(processes_of_vm)
    processes_with_arguments = staticmethod(processes_with_arguments)
    wait_for = staticmethod(wait_for)
    unique_seconds = staticmethod(unique_seconds)

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.drivers: list[ProcessDriver] = []
        self.vm_ids: list[str] = []

    def driver(self, api: dict | None = None, **vm_settings: object) -> ProcessDriver:
        settings = Settings(data_dir=self.data_dir, vm=vm_settings, api=api or {})
        driver = ProcessDriver(settings)
        self.drivers.append(driver)
        return driver

    def new_id(self) -> str:
        vm_id = f"t-{uuid.uuid4().hex[:12]}"
        self.vm_ids.append(vm_id)
        return vm_id

    def spawn(self, driver: ProcessDriver, memory_mb: int = 256, **kwargs) -> str:
        vm_id = self.new_id()
        driver.spawn(VmSpec(vm_id=vm_id, memory_mb=memory_mb, vcpu_count=1, **kwargs))
        return vm_id

    def state(self, vm_id: str) -> VmState:
        state = VmState.read(self.data_dir / "vms" / vm_id)
        assert state is not None, f"VM {vm_id} has no state.json"
        return state

    def cleanup(self) -> None:
        if self.drivers:
            for vm_id in set(self.vm_ids) | set(self.drivers[0].list_vms()):
                self.drivers[0].kill(vm_id)
        # A last resort if the driver's kill is broken, so that no test leaves
        # processes behind. Tests check the driver's kill on their own.
        for vm_id in self.vm_ids:
            pids = PIDS_CGROUP_ROOT / "fleetvm" / vm_id
            # Children first, because a cgroup with children cannot be removed.
            cgroups = [pids / "user", pids, MEMORY_CGROUP_ROOT / "fleetvm" / vm_id]
            members = [pid for cgroup in cgroups for pid in _cgroup_members(cgroup)]
            for pid in processes_of_vm(vm_id) + members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for cgroup in cgroups:
                if cgroup.exists():
                    wait_for(lambda path=cgroup: not _cgroup_members(path))
                    cgroup.rmdir()


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[VmFactory]:
    factory = VmFactory(tmp_path / "data")
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def driver(vms: VmFactory) -> ProcessDriver:
    """Driver that requires bubblewrap, skipped where bwrap is not installed."""
    if shutil.which("bwrap") is None:
        pytest.skip("bwrap is not installed")
    return vms.driver(sandbox="bubblewrap")


@pytest.fixture
def plain_driver(vms: VmFactory) -> ProcessDriver:
    return vms.driver(sandbox="none")
