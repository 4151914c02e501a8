"""The QEMU command line of a guest, and the probe that chooses KVM or TCG."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from fleetvm.drivers.qemu.qmp import QMP_SOCKET_FILE
from fleetvm.settings import QemuSettings

logger = logging.getLogger(__package__)

SERIAL_SOCKET_FILE = "serial.sock"
# The guest's serial console goes to an in-memory ring buffer of QEMU, not to
# a file, because code in the guest can write to the console without end.
CONSOLE_DEVICE = "console"
CONSOLE_BUFFER_BYTES = 65536
PORT_NAME = "fleetvm.agent"
# The PIT, PIC and RTC are left on because the Debian kernel calibrates its
# clocks against them, and hangs at boot without them.
MACHINE = "microvm,x-option-roms=off,pit=on,pic=on,rtc=on,isa-serial=on"
KERNEL_ARGUMENTS = "console=ttyS0 panic=-1 quiet pci=off"
# Under TCG the kernel's timer calibration against the PIT failed and then hung
# in more than half of the boots tried on a test machine, so TCG guests are
# given the TSC rate and the local APIC timer period instead. QEMU's APIC
# timer counts nanoseconds, so one jiffy at the kernel's CONFIG_HZ=250 is
# 4,000,000 ticks. With these values a guest's 2 s sleep took 2.0 s.
TCG_KERNEL_ARGUMENTS = "no_timer_check lapic_timer_period=4000000"
DEFAULT_TSC_KHZ = 2_000_000


def qemu_argv(
    settings: QemuSettings,
    accel: str,
    kernel: Path,
    initramfs: Path,
    memory_mb: int,
    vcpu_count: int,
    disk_mb: int,
) -> list[str]:
    """Return the command that boots a guest in the current directory.

    Sockets and files are relative to the VM directory, QEMU's working
    directory, because Unix socket paths are limited to 107 bytes.
    """
    append = f"{KERNEL_ARGUMENTS} fleetvm_disk_mb={disk_mb}"
    if settings.network:
        append += " fleetvm_network=1"
    argv = [settings.binary, *_machine_arguments(accel, memory_mb, vcpu_count)]
    argv += ["-kernel", str(kernel), "-initrd", str(initramfs)]
    argv += ["-append", _with_accel_arguments(append, accel)]
    argv += ["-chardev", f"ringbuf,id={CONSOLE_DEVICE},size={CONSOLE_BUFFER_BYTES}"]
    argv += ["-serial", f"chardev:{CONSOLE_DEVICE}"]
    # Entropy from the host fills the guest's random pool at once. Without it
    # the pool was ready 1.2 s later under TCG, and boots took 2 s longer.
    argv += ["-device", "virtio-rng-device"]
    argv += ["-device", "virtio-serial-device"]
    argv += [
        "-chardev",
        f"socket,id=agent,path={SERIAL_SOCKET_FILE},server=on,wait=off",
    ]
    argv += ["-device", f"virtserialport,chardev=agent,name={PORT_NAME}"]
    argv += ["-qmp", f"unix:{QMP_SOCKET_FILE},server=on,wait=off"]
    if settings.network:
        argv += ["-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0"]
    return argv


def _machine_arguments(accel: str, memory_mb: int, vcpu_count: int) -> list[str]:
    argv = ["-M", MACHINE, "-m", str(memory_mb), "-smp", str(vcpu_count)]
    if accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", "tcg,thread=multi" if vcpu_count > 1 else "tcg"]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    return argv


def _with_accel_arguments(append: str, accel: str) -> str:
    if accel == "kvm":
        return append
    return f"{append} {TCG_KERNEL_ARGUMENTS} tsc_early_khz={host_tsc_khz()}"


def host_tsc_khz() -> int:
    """Return the host CPU's clock rate in kHz, which TCG guests see as TSC rate.

    NOTE: this reads "cpu MHz" of /proc/cpuinfo, which is the TSC rate on hosts
    with a constant TSC. Elsewhere the guest's clock runs somewhat fast or slow.
    """
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                name, _, value = line.partition(":")
                if name.strip() == "cpu MHz":
                    return int(float(value) * 1000)
    except (OSError, ValueError):
        pass
    return DEFAULT_TSC_KHZ


def probe_kvm(settings: QemuSettings, kernel: Path, initramfs: Path) -> str | None:
    """Boot a KVM guest that powers off at once, and return why it failed, or None."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    argv = [settings.binary, *_machine_arguments("kvm", 256, 1)]
    argv += ["-kernel", str(kernel), "-initrd", str(initramfs)]
    argv += ["-append", f"{KERNEL_ARGUMENTS} fleetvm_probe=1", "-serial", "none"]
    timeout = settings.kvm_probe_timeout_seconds
    try:
        completed = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            cwd="/",
        )
    except subprocess.TimeoutExpired:
        return f"a KVM test guest did not power off within {timeout:g} s"
    except OSError as exc:
        return f"running {settings.binary} failed: {exc}"
    if completed.returncode != 0:
        output = completed.stderr.decode(errors="replace").strip()[-500:]
        return f"a KVM test guest exited with code {completed.returncode}: {output}"
    return None
