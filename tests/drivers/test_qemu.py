"""Tests of QemuDriver that boot real guests under TCG.

A boot takes about 6 s under TCG on two cores, so the tests that leave the
guest as it was share one, and only those that kill or reconfigure a guest
boot their own.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetvm.drivers import make_driver
from fleetvm.drivers.base import VmSpec
from fleetvm.drivers.qemu import QemuDriver, QemuState
from fleetvm.errors import DriverError, InvalidRequest, VmFileNotFound, VmNotRunning
from fleetvm.settings import Settings
from tests.drivers.conftest import processes_of_vm, wait_for
from tests.qemu_image import cached_image_dir, require_qemu

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

SPAWN_TIMEOUT_SECONDS = 120.0


@pytest.fixture(scope="module")
def image_dir() -> Path:
    require_qemu()
    return cached_image_dir()


def make_qemu_driver(
    data_dir: Path,
    image_dir: Path,
    spawn_timeout: float = SPAWN_TIMEOUT_SECONDS,
    **qemu: object,
) -> QemuDriver:
    settings = Settings(
        data_dir=data_dir,
        vm={"driver": "qemu", "spawn_timeout_seconds": spawn_timeout},
        qemu={"image_dir": image_dir, "accel": "tcg", **qemu},
    )
    driver = make_driver(settings)
    assert isinstance(driver, QemuDriver)
    return driver


def new_vm_id() -> str:
    return f"q-{uuid.uuid4().hex[:12]}"


def kill_leftovers(driver: QemuDriver, vm_ids: list[str]) -> None:
    for vm_id in set(vm_ids) | set(driver.list_vms()):
        driver.kill(vm_id)
    # A last resort if the driver's kill is broken.
    for vm_id in vm_ids:
        for pid in processes_of_vm(vm_id):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def driver(tmp_path_factory, image_dir: Path) -> Iterator[QemuDriver]:
    data_dir = Path(tmp_path_factory.mktemp("qemu")) / "data"
    instance = make_qemu_driver(data_dir, image_dir)
    yield instance
    kill_leftovers(instance, [])


@pytest.fixture(scope="module")
def shared_vm(tmp_path_factory, image_dir: Path) -> Iterator[tuple[QemuDriver, str]]:
    """One guest with 2 vCPUs and 320 MiB for the tests that leave it running."""
    data_dir = Path(tmp_path_factory.mktemp("qemu-shared")) / "data"
    driver = make_qemu_driver(data_dir, image_dir)
    vm_id = new_vm_id()
    spec = VmSpec(vm_id=vm_id, memory_mb=320, vcpu_count=2, env={"GREETING": "hi"})
    driver.spawn(spec)
    yield driver, vm_id
    kill_leftovers(driver, [vm_id])


def test_spawn_reports_tcg_isolation(shared_vm):
    driver, vm_id = shared_vm
    state = QemuState.read(driver._vms_dir / vm_id)

    assert state is not None
    assert state.isolation == "qemu-microvm+tcg"
    assert state.pid in driver.vm_processes(vm_id)
    assert state.relay_pid in driver.vm_processes(vm_id)
    assert driver.is_alive(vm_id) is True
    assert driver.list_vms() == [vm_id]


def test_spawn_removes_hello_file(shared_vm):
    driver, vm_id = shared_vm
    vm_dir = driver._vms_dir / vm_id

    assert not (vm_dir / "hello.json").exists()
    assert (vm_dir / "agent.sock").is_socket()


def test_execute_python_keeps_state(shared_vm):
    driver, vm_id = shared_vm
    first = driver.execute(vm_id, "python", "counter = 41", 30)
    second = driver.execute(vm_id, "python", "counter += 1\nprint(counter)", 30)

    assert first.exit_code == 0, first.stderr
    assert second.stdout == "42\n"
    assert second.exit_code == 0


def test_execute_python_error_exit_code(shared_vm):
    driver, vm_id = shared_vm
    result = driver.execute(vm_id, "python", "raise ValueError('bad')", 30)

    assert result.exit_code == 1
    assert "ValueError: bad" in result.stderr


def test_execute_bash_runs_in_guest_kernel(shared_vm):
    driver, vm_id = shared_vm
    result = driver.execute(vm_id, "bash", "uname -r; echo $GREETING; nproc", 30)

    lines = result.stdout.splitlines()
    assert result.exit_code == 0, result.stderr
    assert lines[0].endswith("-cloud-amd64")
    assert lines[0] != os.uname().release
    assert lines[1] == "hi"
    assert lines[2] == "2"


def test_guest_memory_from_spec(shared_vm):
    driver, vm_id = shared_vm
    code = "awk '/MemTotal/ {print $2}' /proc/meminfo"
    result = driver.execute(vm_id, "bash", code, 30)

    total_kib = int(result.stdout)
    assert 250 * 1024 < total_kib <= 320 * 1024


def test_guest_has_no_network_device(shared_vm):
    driver, vm_id = shared_vm
    result = driver.execute(vm_id, "bash", "ls /sys/class/net", 30)

    assert result.stdout.split() == ["lo"]


def test_execute_timeout_in_guest(shared_vm):
    driver, vm_id = shared_vm
    result = driver.execute(vm_id, "bash", "sleep 30", 1)

    assert result.timed_out is True
    assert result.exit_code == 124


def test_upload_download_roundtrip(shared_vm):
    driver, vm_id = shared_vm
    content = bytes(range(256)) * 1000

    path = driver.upload(vm_id, "data/blob.bin", content)
    check = driver.execute(vm_id, "bash", "stat -c %s ~/data/blob.bin", 30)

    assert path == "/root/data/blob.bin"
    assert check.stdout == f"{len(content)}\n"
    assert driver.download(vm_id, "data/blob.bin") == content


def test_download_missing_file(shared_vm):
    driver, vm_id = shared_vm

    with pytest.raises(VmFileNotFound):
        driver.download(vm_id, "no/such/file")


def test_kill_quits_qemu_and_removes_dir(driver):
    vm_id = new_vm_id()
    driver.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))
    processes = driver.vm_processes(vm_id)

    result = driver.kill(vm_id)

    assert result.was_running is True
    assert result.processes_killed == len(processes) == 2
    assert processes_of_vm(vm_id) == []
    assert not (driver._vms_dir / vm_id).exists()
    assert driver.list_vms() == []
    with pytest.raises(VmNotRunning):
        driver.execute(vm_id, "python", "print(1)", 10)
    again = driver.kill(vm_id)
    assert again.was_running is False
    assert again.processes_killed == 0


def test_new_driver_adopts_running_vm(tmp_path, image_dir):
    data_dir = tmp_path / "data"
    first = make_qemu_driver(data_dir, image_dir)
    vm_id = new_vm_id()
    first.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))
    first.execute(vm_id, "python", "kept = 'from before the restart'", 30)

    # A restarted worker builds a new driver on the same data directory. With a
    # QMP timeout of 0.5 s and QEMU stopped, the kill must fall back to SIGKILL.
    adopter = make_qemu_driver(data_dir, image_dir, quit_timeout_seconds=0.5)
    try:
        listed = adopter.list_vms()
        alive = adopter.is_alive(vm_id)
        result = adopter.execute(vm_id, "python", "print(kept)", 30)
        state = QemuState.read(data_dir / "vms" / vm_id)
        os.kill(state.pid, signal.SIGSTOP)
        killed = adopter.kill(vm_id)
    finally:
        kill_leftovers(adopter, [vm_id])

    assert listed == [vm_id]
    assert alive is True
    assert result.stdout == "from before the restart\n"
    assert killed.was_running is True
    assert wait_for(lambda: processes_of_vm(vm_id) == [], timeout=5)
    assert not (data_dir / "vms" / vm_id).exists()


def test_network_reaches_host_loopback(tmp_path, image_dir):
    """With qemu.network on, the guest reaches the host's 127.0.0.1 at 10.0.2.2."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    thread = threading.Thread(target=_greet_once, args=(server,), daemon=True)
    thread.start()
    driver = make_qemu_driver(tmp_path / "data", image_dir, network=True)
    vm_id = new_vm_id()
    code = (
        "import socket\n"
        f"with socket.create_connection(('10.0.2.2', {port}), timeout=10) as s:\n"
        "    print(s.recv(100).decode())"
    )
    try:
        driver.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))
        devices = driver.execute(vm_id, "bash", "ls /sys/class/net", 30)
        result = driver.execute(vm_id, "python", code, 30)
    finally:
        kill_leftovers(driver, [vm_id])
        server.close()

    assert devices.stdout.split() == ["eth0", "lo"]
    assert result.stdout == "hello from the host\n", result.stderr


def _greet_once(server: socket.socket) -> None:
    try:
        conn, _ = server.accept()
    except OSError:
        return
    with conn:
        conn.sendall(b"hello from the host")


def test_spawn_timeout_cleans_up(tmp_path, image_dir):
    driver = make_qemu_driver(tmp_path / "data", image_dir, spawn_timeout=0.5)
    vm_id = new_vm_id()

    with pytest.raises(DriverError, match="did not respond to a ping within 0.5 s"):
        driver.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))

    assert processes_of_vm(vm_id) == []
    assert not (driver._vms_dir / vm_id).exists()


def test_spawn_without_image_fails(tmp_path):
    driver = make_qemu_driver(tmp_path / "data", tmp_path / "no-image")

    with pytest.raises(DriverError, match="fleetvm image build"):
        driver.spawn(VmSpec(vm_id=new_vm_id(), memory_mb=256, vcpu_count=1))
    assert driver.list_vms() == []


def test_spawn_rejects_small_memory(driver):
    with pytest.raises(InvalidRequest, match="at least 192"):
        driver.spawn(VmSpec(vm_id=new_vm_id(), memory_mb=64, vcpu_count=1))


def test_auto_accel_falls_back_to_tcg(tmp_path, image_dir):
    driver = make_qemu_driver(
        tmp_path / "data", image_dir, accel="auto", binary="/nonexistent/qemu"
    )

    assert driver.accel == "tcg"
    assert driver.sandbox == "qemu-microvm+tcg"


def test_kvm_accel_without_kvm_fails(tmp_path, image_dir):
    driver = make_qemu_driver(
        tmp_path / "data", image_dir, accel="kvm", binary="/nonexistent/qemu"
    )

    with pytest.raises(DriverError, match="qemu.accel is 'kvm'"):
        driver.spawn(VmSpec(vm_id=new_vm_id(), memory_mb=256, vcpu_count=1))
    assert driver.sandbox == "unavailable"
