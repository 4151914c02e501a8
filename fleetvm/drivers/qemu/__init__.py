"""VM driver that runs each VM as a QEMU microvm guest with its own kernel.

The guest boots the image that ``fleetvm image build`` makes (see
``fleetvm.image``) and runs the same guest agent as the process driver. Every
VM has a directory ``<vms_dir>/<vm_id>/``, mode 0700, that is QEMU's working
directory:

- ``state.json``: the PIDs and start times of QEMU and of the relay
  (``QemuState``), so a later driver finds them again.
- ``qmp.sock``: QEMU's QMP socket, used to quit the guest.
- ``serial.sock``: the host end of the guest's virtio-serial port.
- ``channels.py`` and ``agent.sock``: the relay, a host process that serves
  ``agent.sock`` as the process driver's agent does and carries each
  connection over the serial port (``fleetvm.guest.channels``). So the agent
  requests of ``AgentSocketDriver``, shared with the process driver, work
  unchanged.
- ``qemu.log`` and ``relay.log``: the output of QEMU and of the relay. The
  guest's serial console is a 64 KiB ring buffer inside QEMU, which a failed
  spawn reads through QMP for its error message.
- ``hello.json``: the guest's environment, read by the relay at start and
  removed once the guest responds.

Isolation: the guest has its own kernel, its memory is ``memory_mb`` and its
vCPUs are ``vcpu_count``. It has no network device unless ``qemu.network`` is
on. Code in the guest runs as root of the guest, and /root and /tmp are tmpfs
mounts of ``vm.disk_mb`` MiB each inside the guest's memory. The isolation
string names the accelerator: "qemu-microvm+kvm" or "qemu-microvm+tcg".

QEMU and the relay are started in new sessions with FLEETVM_VM_ID=<vm_id> in
their environment, and are not ended when the worker exits. Kill finds them
through state.json and that variable.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fleetvm.drivers.base import KillResult, SpawnResult, VmSpec
from fleetvm.drivers.process.agent_socket import AgentSocketDriver
from fleetvm.drivers.process.procfs import (
    ProcessMatcher,
    _find_processes,
    _process_status,
    _start_time,
    kill_until_gone,
)
from fleetvm.drivers.process.sandbox import VM_ID_ENV
from fleetvm.drivers.process.state import VmState
from fleetvm.drivers.process.validation import _check_env, _check_vm_id
from fleetvm.drivers.process.vm_dir import SOCKET_FILE, _read_tail, _remove_tree
from fleetvm.drivers.qemu.launch import (
    CONSOLE_BUFFER_BYTES,
    CONSOLE_DEVICE,
    SERIAL_SOCKET_FILE,
    probe_kvm,
    qemu_argv,
)
from fleetvm.drivers.qemu.qmp import QmpError, quit_vm, read_ring_buffer
from fleetvm.errors import DriverError, InvalidRequest
from fleetvm.guest import channels as guest_channels
from fleetvm.image import image_files
from fleetvm.image.command import image_dir
from fleetvm.settings import Settings

logger = logging.getLogger(__name__)

CHANNELS_FILE = "channels.py"
HELLO_FILE = "hello.json"
QEMU_LOG_FILE = "qemu.log"
RELAY_LOG_FILE = "relay.log"
GUEST_HOME = "/root"
GUEST_PATH = "/usr/local/bin:/usr/bin:/usr/sbin"
# A booted 192 MiB guest had about 50 MiB left for code, because the kernel and
# the 49 MiB root file system live in its memory.
MIN_MEMORY_MB = 192
BOOT_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class QemuState(VmState):
    """state.json of a QEMU VM: ``pid`` is QEMU's, and the relay is added."""

    relay_pid: int | None = None
    relay_start_time: int | None = None
    accel: str = ""


class QemuDriver(AgentSocketDriver):
    """Driver whose VMs are QEMU microvm guests, with KVM when it works here."""

    name = "qemu"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._kernel, self._initramfs = image_files(image_dir(settings))
        self._probe_lock = threading.Lock()
        self._accel: str | None = None

    @property
    def accel(self) -> str:
        """Accelerator of new VMs, "kvm" or "tcg". The first access may probe KVM."""
        with self._probe_lock:
            if self._accel is None:
                self._accel = self._choose_accel()
            return self._accel

    @property
    def sandbox(self) -> str:
        """Isolation of new VMs, such as "qemu-microvm+tcg".

        The worker reads this at start, so the KVM probe runs then and not in
        the first spawn. When the image is missing, or qemu.accel is "kvm" and
        KVM fails, it logs why and returns "unavailable", and spawns raise
        DriverError until that is fixed.
        """
        try:
            return f"qemu-microvm+{self.accel}"
        except DriverError as exc:
            logger.error("the qemu driver cannot start VMs yet: %s", exc.message)
            return "unavailable"

    def spawn(self, spec: VmSpec) -> SpawnResult:
        vm_id = _check_vm_id(spec.vm_id)
        _check_env(spec.env)
        self._check_resources(spec)
        self._check_image()
        accel = self.accel
        started = time.monotonic()
        vm_dir = self._create_vm_dir(vm_id)
        with self._vm_lock(vm_dir):
            try:
                state = self._start(vm_dir, spec, accel)
                self._wait_until_ready(vm_id, state, started)
            except Exception as exc:
                raise self._abort_spawn(vm_id, vm_dir, exc) from exc
            (vm_dir / HELLO_FILE).unlink(missing_ok=True)
        logger.info(
            "spawned VM %s with isolation %s in %.0f ms",
            vm_id,
            state.isolation,
            (time.monotonic() - started) * 1000,
            extra={"vm_id": vm_id},
        )
        return SpawnResult(vm_id=vm_id, isolation=state.isolation, pid=state.pid or 0)

    def kill(self, vm_id: str) -> KillResult:
        """Quit QEMU through QMP, SIGKILL what is left, and remove the VM directory."""
        _check_vm_id(vm_id)
        vm_dir = self._vms_dir / vm_id
        with self._vm_lock(vm_dir) as exists:
            state = QemuState.read(vm_dir) if exists else None
            killed = self._end_processes(vm_id, vm_dir, state)
            if exists:
                _remove_tree(vm_dir)
        if killed:
            logger.info(
                "killed VM %s: %d processes", vm_id, killed, extra={"vm_id": vm_id}
            )
        return KillResult(vm_id=vm_id, was_running=killed > 0, processes_killed=killed)

    def vm_processes(self, vm_id: str) -> list[int]:
        """Return the host PIDs of the VM's QEMU and relay that have not exited."""
        _check_vm_id(vm_id)
        state = QemuState.read(self._vms_dir / vm_id)
        return _find_processes(_matcher(vm_id, state))

    def _choose_accel(self) -> str:
        requested = self._settings.qemu.accel
        if requested == "tcg":
            return "tcg"
        self._check_image()
        failure = probe_kvm(self._settings.qemu, self._kernel, self._initramfs)
        if failure is None:
            logger.info("KVM works on this host, so QEMU guests use it")
            return "kvm"
        if requested == "kvm":
            raise DriverError(f"qemu.accel is 'kvm' but KVM does not work: {failure}")
        logger.warning(
            "KVM does not work on this host, so QEMU guests use TCG: %s", failure
        )
        return "tcg"

    def _check_resources(self, spec: VmSpec) -> None:
        if spec.memory_mb < MIN_MEMORY_MB:
            raise InvalidRequest(
                f"memory_mb of a QEMU VM must be at least {MIN_MEMORY_MB}, not "
                f"{spec.memory_mb}"
            )
        if spec.vcpu_count < 1:
            raise InvalidRequest(f"vcpu_count must be positive, not {spec.vcpu_count}")

    def _check_image(self) -> None:
        for path in (self._kernel, self._initramfs):
            if not path.is_file():
                raise DriverError(
                    f"the QEMU guest image file {path} is missing; build it with "
                    "`fleetvm image build`, or set qemu.image_dir"
                )

    def _create_vm_dir(self, vm_id: str) -> Path:
        self._vms_dir.mkdir(parents=True, exist_ok=True)
        vm_dir = self._vms_dir / vm_id
        try:
            vm_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise DriverError(
                f"VM {vm_id} already exists in {vm_dir}; kill it before spawning "
                "it again"
            ) from None
        return vm_dir

    def _start(self, vm_dir: Path, spec: VmSpec, accel: str) -> QemuState:
        state = QemuState(
            vm_id=spec.vm_id,
            isolation=f"qemu-microvm+{accel}",
            accel=accel,
            created_at=time.time(),
        )
        state.write(vm_dir)
        _write_private(vm_dir / HELLO_FILE, _hello(spec))
        shutil.copyfile(guest_channels.__file__, vm_dir / CHANNELS_FILE)

        argv = qemu_argv(
            self._settings.qemu,
            accel,
            self._kernel,
            self._initramfs,
            spec.memory_mb,
            spec.vcpu_count,
            self._settings.vm.disk_mb,
        )
        qemu = _start_detached(argv, vm_dir, QEMU_LOG_FILE, spec.vm_id)
        state = replace(state, pid=qemu.pid, start_time=_start_time(qemu.pid))
        state.write(vm_dir)

        relay_argv = [sys.executable, "-I", "-S", CHANNELS_FILE, "host"]
        relay_argv += ["--serial", SERIAL_SOCKET_FILE, "--listen", SOCKET_FILE]
        relay_argv += ["--hello", HELLO_FILE]
        relay = _start_detached(relay_argv, vm_dir, RELAY_LOG_FILE, spec.vm_id)
        state = replace(
            state, relay_pid=relay.pid, relay_start_time=_start_time(relay.pid)
        )
        state.write(vm_dir)
        return state

    def _wait_until_ready(self, vm_id: str, state: QemuState, started: float) -> None:
        timeout = self._settings.vm.spawn_timeout_seconds
        deadline = started + timeout
        while True:
            if self.is_alive(vm_id):
                return
            for pid, start_time, process_name in (
                (state.pid, state.start_time, "QEMU"),
                (state.relay_pid, state.relay_start_time, "the relay"),
            ):
                if not _is_running(pid, start_time):
                    raise DriverError(
                        f"{process_name} of VM {vm_id} exited during boot"
                    )
            if time.monotonic() >= deadline:
                raise DriverError(
                    f"the guest of VM {vm_id} did not respond to a ping within "
                    f"{timeout:g} s (vm.spawn_timeout_seconds)"
                )
            time.sleep(BOOT_POLL_SECONDS)

    def _abort_spawn(self, vm_id: str, vm_dir: Path, exc: Exception) -> DriverError:
        """Kill what a failed spawn started and return the error to raise."""
        logs = []
        for name in (QEMU_LOG_FILE, RELAY_LOG_FILE):
            tail = _read_tail(vm_dir / name, 1500)
            if tail:
                logs.append(f"{name}: {tail}")
        console = self._read_console(vm_dir)
        if console:
            logs.append(f"guest console: {console[-1500:]}")
        logger.error(
            "spawning VM %s failed: %s\n%s",
            vm_id,
            exc,
            "\n".join(logs),
            extra={"vm_id": vm_id},
        )
        try:
            self._end_processes(vm_id, vm_dir, QemuState.read(vm_dir))
            _remove_tree(vm_dir)
        except DriverError as cleanup_error:
            logger.error(
                "cleaning up the failed VM %s failed: %s",
                vm_id,
                cleanup_error,
                extra={"vm_id": vm_id},
            )
        message = exc.message if isinstance(exc, DriverError) else str(exc)
        if logs:
            message += "; " + logs[0]
        return DriverError(f"spawning VM {vm_id} failed: {message}")

    def _read_console(self, vm_dir: Path) -> str:
        try:
            text = read_ring_buffer(
                vm_dir,
                CONSOLE_DEVICE,
                CONSOLE_BUFFER_BYTES,
                self._settings.qemu.quit_timeout_seconds,
            )
        except QmpError:
            return ""
        return text.strip()

    def _end_processes(self, vm_id: str, vm_dir: Path, state: QemuState | None) -> int:
        """Quit QEMU, SIGKILL every process of the VM, and wait until none is left.

        Returns how many processes were running. Raises DriverError when some
        survive kill.confirm_timeout_seconds after SIGKILL.
        """
        matcher = _matcher(vm_id, state)
        running = set(_find_processes(matcher))
        if state is not None and state.pid in running:
            self._quit_qemu(vm_id, vm_dir, state)
        running |= kill_until_gone(
            vm_id, lambda: matcher, self._settings.kill.confirm_timeout_seconds
        )
        return len(running)

    def _quit_qemu(self, vm_id: str, vm_dir: Path, state: QemuState) -> None:
        timeout = self._settings.qemu.quit_timeout_seconds
        try:
            pidfd = os.pidfd_open(state.pid)
        except ProcessLookupError:
            return
        try:
            quit_vm(vm_dir, timeout)
            if select.select([pidfd], [], [], timeout)[0]:
                return
            reason = f"QEMU did not exit within {timeout:g} s"
        except QmpError as exc:
            reason = str(exc)
        finally:
            os.close(pidfd)
        logger.info(
            "QMP quit of VM %s failed, so it gets SIGKILL: %s",
            vm_id,
            reason,
            extra={"vm_id": vm_id},
        )


def _matcher(vm_id: str, state: QemuState | None) -> ProcessMatcher:
    """Match QEMU and the relay: the recorded QEMU PID or FLEETVM_VM_ID=<vm_id>."""
    return ProcessMatcher(
        environment_entry=f"{VM_ID_ENV}={vm_id}".encode(),
        pid_namespace=None,
        cgroup_members=frozenset(),
        top_pid=state.pid if state else None,
        top_start_time=state.start_time if state else None,
    )


def _is_running(pid: int | None, start_time: int | None) -> bool:
    """Return whether pid is the recorded process and has not exited."""
    status = _process_status(pid) if pid is not None else None
    return status is not None and status[0] != "Z" and status[1] == start_time


def _hello(spec: VmSpec) -> bytes:
    env = {
        "HOME": GUEST_HOME,
        "PATH": GUEST_PATH,
        "LANG": "C.UTF-8",
        "USER": "root",
        "LOGNAME": "root",
        "SHELL": "/bin/bash",
        "TMPDIR": "/tmp",
        **spec.env,
        VM_ID_ENV: spec.vm_id,
    }
    return json.dumps({"env": env, "home": GUEST_HOME}).encode()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _start_detached(
    argv: list[str], vm_dir: Path, log_name: str, vm_id: str
) -> subprocess.Popen:
    """Start a process of the VM in a new session, with a thread that reaps it.

    No parent-death signal or shared session ends it with the worker.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), VM_ID_ENV: vm_id}
    with open(vm_dir / log_name, "ab") as log:
        process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=vm_dir,
            start_new_session=True,
        )
    threading.Thread(
        target=process.wait, name=f"fleetvm-reap-{vm_id}", daemon=True
    ).start()
    return process
