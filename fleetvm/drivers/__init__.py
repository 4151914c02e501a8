"""VM drivers: start, reach and kill VMs on one host, never touching the database."""

from __future__ import annotations

from fleetvm.drivers.base import VmDriver
from fleetvm.settings import Settings


def make_driver(settings: Settings) -> VmDriver:
    """Return the driver named by ``vm.driver``."""
    if settings.vm.driver == "process":
        from fleetvm.drivers.process import ProcessDriver

        return ProcessDriver(settings)
    if settings.vm.driver == "qemu":
        from fleetvm.drivers.qemu import QemuDriver

        return QemuDriver(settings)
    raise ValueError(
        f"unknown vm.driver {settings.vm.driver!r}; use 'process' or 'qemu'"
    )
