"""Tests of ProcessDriver with real sandboxes and processes."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fleetvm.drivers import process
from fleetvm.drivers.base import VmSpec
from fleetvm.drivers.process import (
    MEMORY_CGROUP_ROOT,
    SANDBOX_HOME,
    ProcessDriver,
    agent_socket,
)
from fleetvm.drivers.process.vm_dir import AGENT_SOURCE, compile_agent
from fleetvm.errors import (
    Conflict,
    DriverError,
    InvalidRequest,
    PayloadTooLarge,
    VmFileNotFound,
    VmNotRunning,
)
from fleetvm.guest.agent import TIMEOUT_EXIT_CODE
from fleetvm.settings import Settings

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching to the sandbox user needs root"
)


def _start_detached_sleeps(driver: ProcessDriver, vm_id: str, seconds: str) -> None:
    # Both sleeps outlive the bash command: setsid leaves its session and
    # process group, and nohup ignores SIGHUP.
    code = f"setsid sleep {seconds} &\nnohup sleep {seconds} > /dev/null 2>&1 &\n"
    result = driver.execute(vm_id, "bash", code, 10)
    assert result.exit_code == 0, result.stderr


def test_spawn_sandboxed_isolation(vms, driver):
    vm_id = vms.new_id()
    result = driver.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))

    assert result.vm_id == vm_id
    assert result.isolation.startswith("bubblewrap+")
    assert result.isolation == vms.state(vm_id).isolation
    assert result.pid == vms.state(vm_id).pid
    assert driver.is_alive(vm_id) is True


def test_spawn_creates_vm_directory(vms, driver):
    vm_id = vms.spawn(driver)
    vm_dir = vms.data_dir / "vms" / vm_id

    assert (vm_dir / "agent.sock").is_socket()
    assert (vm_dir / "state.json").is_file()
    assert not (vm_dir / "home").exists()
    assert vms.state(vm_id).pid_namespace is not None
    assert driver.list_vms() == [vm_id]


def test_spawn_home_private_tmpfs(vms, driver):
    vm_id = vms.spawn(driver)
    result = driver.execute(vm_id, "bash", "stat -f -c %T ~ /tmp; stat -c %a ~", 10)

    assert result.stdout == "tmpfs\ntmpfs\n700\n"


@requires_root
def test_state_file_private(vms, driver):
    vm_id = vms.spawn(driver)
    vm_dir = vms.data_dir / "vms" / vm_id
    state = (vm_dir / "state.json").stat()

    assert state.st_uid == 0
    assert oct(state.st_mode & 0o777) == "0o600"
    assert vm_dir.stat().st_uid == 0
    assert oct(vm_dir.stat().st_mode & 0o777) == "0o711"


def test_spawn_duplicate_id_rejected(vms, driver):
    vm_id = vms.spawn(driver)

    with pytest.raises(DriverError):
        driver.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))
    assert driver.is_alive(vm_id) is True


def test_spawn_passes_environment(vms, driver, monkeypatch):
    monkeypatch.setenv("FLEETVM_TEST_WORKER_SECRET", "leak")
    vm_id = vms.spawn(driver, env={"GREETING": "hello"})
    result = driver.execute(vm_id, "bash", "env", 10)

    assert "GREETING=hello\n" in result.stdout
    assert f"FLEETVM_VM_ID={vm_id}\n" in result.stdout
    assert f"HOME={SANDBOX_HOME}\n" in result.stdout
    assert "FLEETVM_TEST_WORKER_SECRET" not in result.stdout


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"BAD-NAME": "x"}, id="dash-in-name"),
        pytest.param({"A": "x\0y"}, id="nul-in-value"),
        pytest.param({"": "x"}, id="empty-name"),
    ],
)
def test_spawn_invalid_env_rejected(vms, driver, env):
    with pytest.raises(InvalidRequest):
        driver.spawn(VmSpec(vm_id=vms.new_id(), memory_mb=256, vcpu_count=1, env=env))
    assert driver.list_vms() == []


def test_python_namespace_persists(vms, driver):
    vm_id = vms.spawn(driver)
    first = driver.execute(vm_id, "python", "x = 41", 10)
    second = driver.execute(vm_id, "python", "print(x + 1)", 10)

    assert first.exit_code == 0
    assert second.stdout == "42\n"
    assert second.exit_code == 0
    assert second.timed_out is False
    assert second.execution_time >= 0


def test_python_traceback_nonzero(vms, driver):
    vm_id = vms.spawn(driver)
    result = driver.execute(vm_id, "python", "raise ValueError('bad value')", 10)

    assert result.exit_code == 1
    assert "ValueError: bad value" in result.stderr
    assert result.stdout == ""


def test_bash_exit_code_and_home(vms, driver):
    vm_id = vms.spawn(driver)
    result = driver.execute(vm_id, "bash", "pwd; echo err >&2; exit 4", 10)

    assert result.exit_code == 4
    assert result.stdout == f"{SANDBOX_HOME}\n"
    assert result.stderr == "err\n"


def test_timeout_keeps_vm_usable(vms, driver):
    vm_id = vms.spawn(driver)
    driver.execute(vm_id, "python", "x = 7", 10)
    result = driver.execute(vm_id, "python", "import time\ntime.sleep(60)", 0.5)
    after = driver.execute(vm_id, "python", "print(x)", 10)

    assert result.timed_out is True
    assert result.exit_code == TIMEOUT_EXIT_CODE
    assert after.stdout == "7\n"


def test_timeout_reports_namespace_reset(vms, driver):
    vm_id = vms.spawn(driver)
    driver.execute(vm_id, "python", "x = 7", 10)
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "time.sleep(60)\n"
    )
    result = driver.execute(vm_id, "python", code, 0.5)
    after = driver.execute(vm_id, "python", "print(x)", 10)

    assert result.timed_out is True
    assert "restarted" in result.stderr
    assert "NameError" in after.stderr
    assert driver.is_alive(vm_id) is True


def test_bash_timeout(vms, driver):
    vm_id = vms.spawn(driver)
    result = driver.execute(vm_id, "bash", "echo begun; sleep 60", 0.5)

    assert result.timed_out is True
    assert result.exit_code == TIMEOUT_EXIT_CODE
    assert result.stdout == "begun\n"


@pytest.mark.parametrize(
    ("language", "timeout"),
    [
        pytest.param("ruby", 10, id="unknown-language"),
        pytest.param("python", 0, id="zero-timeout"),
        pytest.param("python", float("nan"), id="nan-timeout"),
        pytest.param("python", -1, id="negative-timeout"),
    ],
)
def test_execute_invalid_arguments(vms, driver, language, timeout):
    vm_id = vms.spawn(driver)

    with pytest.raises(InvalidRequest):
        driver.execute(vm_id, language, "print(1)", timeout)


def test_upload_download_binary(vms, driver):
    vm_id = vms.spawn(driver)
    content = bytes(range(256)) * 100 + b"\x00\r\n\xff"
    path = driver.upload(vm_id, "data/blob.bin", content)
    downloaded = driver.download(vm_id, path)
    listing = driver.execute(vm_id, "bash", "wc -c < data/blob.bin", 10)

    assert path == f"{SANDBOX_HOME}/data/blob.bin"
    assert downloaded == content
    assert listing.stdout.strip() == str(len(content))


def test_upload_visible_to_python(vms, driver):
    vm_id = vms.spawn(driver)
    driver.upload(vm_id, "notes.txt", "héllo".encode())
    result = driver.execute(vm_id, "python", "print(open('notes.txt').read())", 10)

    assert result.stdout == "héllo\n"


def test_download_missing_file(vms, driver):
    vm_id = vms.spawn(driver)

    with pytest.raises(VmFileNotFound):
        driver.download(vm_id, "no/such/file.txt")


def test_download_directory_rejected(vms, driver):
    vm_id = vms.spawn(driver)

    with pytest.raises(InvalidRequest):
        driver.download(vm_id, SANDBOX_HOME)


def test_upload_read_only_path_rejected(vms, driver):
    vm_id = vms.spawn(driver)

    with pytest.raises(InvalidRequest):
        driver.upload(vm_id, "/usr/fleetvm-test.txt", b"x")


def test_upload_too_large_rejected(vms):
    small_driver = vms.driver(api={"max_upload_bytes": 10}, sandbox="none")
    vm_id = vms.spawn(small_driver)

    with pytest.raises(PayloadTooLarge):
        small_driver.upload(vm_id, "big.bin", b"x" * 11)


def test_download_too_large_rejected(vms):
    small_driver = vms.driver(api={"max_upload_bytes": 10}, sandbox="none")
    vm_id = vms.spawn(small_driver)
    small_driver.execute(vm_id, "bash", "head -c 11 /dev/zero > big.bin", 10)

    with pytest.raises(PayloadTooLarge):
        small_driver.download(vm_id, "big.bin")


@pytest.mark.parametrize(
    "path",
    [pytest.param("", id="empty"), pytest.param("a\0b", id="nul")],
)
def test_transfer_invalid_path_rejected(vms, driver, path):
    vm_id = vms.spawn(driver)

    with pytest.raises(InvalidRequest):
        driver.upload(vm_id, path, b"x")
    with pytest.raises(InvalidRequest):
        driver.download(vm_id, path)


def test_kill_ends_detached_processes(vms, driver):
    vm_id = vms.spawn(driver)
    state = vms.state(vm_id)
    seconds = vms.unique_seconds()
    _start_detached_sleeps(driver, vm_id, seconds)
    assert vms.wait_for(
        lambda: len(vms.processes_with_arguments("sleep", seconds)) == 2
    )

    result = driver.kill(vm_id)

    assert result.was_running is True
    assert result.processes_killed >= 6
    assert vms.processes_with_arguments("sleep", seconds) == []
    assert vms.processes_of_vm(vm_id, state.pid_namespace) == []
    assert not (vms.data_dir / "vms" / vm_id).exists()
    assert driver.list_vms() == []


def test_kill_with_cgroups_skips_host_walk(vms, driver, monkeypatch):
    # The VM's cgroups list all of its processes, so a kill needs no walk of
    # every process on the host, whose cost grows with the number of VMs.
    vm_id = vms.spawn(driver)
    state = vms.state(vm_id)
    if state.pids_cgroup is None:
        pytest.skip("this host gives VMs no pids cgroup")
    seconds = vms.unique_seconds()
    _start_detached_sleeps(driver, vm_id, seconds)
    assert vms.wait_for(
        lambda: len(vms.processes_with_arguments("sleep", seconds)) == 2
    )

    def walk_every_process() -> list[int]:
        raise AssertionError("the kill walked every process of the host")

    monkeypatch.setattr(process.procfs, "_process_ids", walk_every_process)
    result = driver.kill(vm_id)
    monkeypatch.undo()

    assert result.processes_killed >= 6
    assert vms.processes_with_arguments("sleep", seconds) == []
    assert vms.processes_of_vm(vm_id, state.pid_namespace) == []


def test_is_running_follows_processes(vms, driver):
    vm_id = vms.spawn(driver)
    other_id = vms.spawn(driver)
    state = vms.state(other_id)

    assert driver.is_running(vm_id) is True
    assert driver.is_running(other_id) is True

    driver.kill(vm_id)
    os.kill(state.pid, signal.SIGKILL)

    assert driver.is_running(vm_id) is False
    assert vms.wait_for(lambda: driver.is_running(other_id) is False)


def test_kill_removes_memory_cgroup(vms, driver):
    vm_id = vms.spawn(driver)
    cgroup = vms.state(vm_id).cgroup
    if cgroup is None:
        pytest.skip("this host gives VMs no memory cgroup")
    assert Path(cgroup).is_dir()

    driver.kill(vm_id)

    assert not Path(cgroup).exists()


def test_kill_twice(vms, driver):
    vm_id = vms.spawn(driver)
    first = driver.kill(vm_id)
    second = driver.kill(vm_id)

    assert first.was_running is True
    assert second.was_running is False
    assert second.processes_killed == 0


def test_kill_unknown_id(driver):
    result = driver.kill("never-spawned")

    assert result.vm_id == "never-spawned"
    assert result.was_running is False
    assert result.processes_killed == 0


def test_kill_concurrent(vms, driver):
    vm_id = vms.spawn(driver)
    state = vms.state(vm_id)
    results = []
    errors = []

    def kill() -> None:
        try:
            results.append(driver.kill(vm_id))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=kill) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(result.was_running for result in results) == [False] * 3 + [True]
    assert vms.processes_of_vm(vm_id, state.pid_namespace) == []


def test_killed_vm_not_running(vms, driver):
    vm_id = vms.spawn(driver)
    driver.kill(vm_id)

    assert driver.is_alive(vm_id) is False
    with pytest.raises(VmNotRunning):
        driver.execute(vm_id, "python", "print(1)", 10)
    with pytest.raises(VmNotRunning):
        driver.download(vm_id, "x")


def test_kill_during_execute(vms, driver):
    vm_id = vms.spawn(driver)
    errors = []

    def run_long() -> None:
        try:
            driver.execute(vm_id, "bash", "sleep 60", 30)
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=run_long)
    thread.start()
    assert vms.wait_for(lambda: len(driver.vm_processes(vm_id)) >= 5)
    driver.kill(vm_id)
    thread.join(10)

    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], VmNotRunning)


def test_second_driver_adopts_vm(vms, driver):
    vm_id = vms.spawn(driver)
    state = vms.state(vm_id)
    driver.execute(vm_id, "python", "x = 'kept'", 10)
    seconds = vms.unique_seconds()
    _start_detached_sleeps(driver, vm_id, seconds)
    assert vms.wait_for(
        lambda: len(vms.processes_with_arguments("sleep", seconds)) == 2
    )

    adopter = vms.driver(sandbox="bubblewrap")
    result = adopter.execute(vm_id, "python", "print(x)", 10)
    killed = adopter.kill(vm_id)

    assert adopter.list_vms() == []
    assert result.stdout == "kept\n"
    assert killed.was_running is True
    assert vms.processes_with_arguments("sleep", seconds) == []
    assert vms.processes_of_vm(vm_id, state.pid_namespace) == []


def test_kill_without_state_file(vms, driver):
    vm_id = vms.spawn(driver)
    seconds = vms.unique_seconds()
    _start_detached_sleeps(driver, vm_id, seconds)
    assert vms.wait_for(
        lambda: len(vms.processes_with_arguments("sleep", seconds)) == 2
    )
    (vms.data_dir / "vms" / vm_id / "state.json").unlink()

    result = driver.kill(vm_id)

    assert result.was_running is True
    assert vms.processes_with_arguments("sleep", seconds) == []
    assert vms.processes_of_vm(vm_id) == []


def test_kill_without_cgroups_or_state(vms, driver, monkeypatch):
    # Only FLEETVM_VM_ID, which bubblewrap carries too, finds the processes.
    monkeypatch.setattr(process, "MEMORY_CGROUP_ROOT", Path("/nonexistent/cgroup"))
    monkeypatch.setattr(process, "PIDS_CGROUP_ROOT", Path("/nonexistent/pids"))
    vm_id = vms.spawn(driver)
    state = vms.state(vm_id)
    (vms.data_dir / "vms" / vm_id / "state.json").unlink()

    result = driver.kill(vm_id)

    assert result.was_running is True
    assert result.processes_killed >= 1
    assert vms.processes_of_vm(vm_id, state.pid_namespace) == []
    assert process._process_status(state.pid) in (None, ("Z", state.start_time))


def test_vm_survives_worker_exit(vms, driver):
    # A separate Python process plays the worker: it spawns a VM and exits.
    vm_id = vms.new_id()
    script = (
        "import sys\n"
        "from fleetvm.drivers.base import VmSpec\n"
        "from fleetvm.drivers.process import ProcessDriver\n"
        "from fleetvm.settings import Settings\n"
        "settings = Settings(data_dir=sys.argv[1], vm={'sandbox': 'bubblewrap'})\n"
        "driver = ProcessDriver(settings)\n"
        "driver.spawn(VmSpec(vm_id=sys.argv[2], memory_mb=256, vcpu_count=1))\n"
        "driver.execute(sys.argv[2], 'python', 'x = 99', 10)\n"
    )
    worker = subprocess.run(
        [sys.executable, "-c", script, str(vms.data_dir), vm_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr
    state = vms.state(vm_id)

    result = driver.execute(vm_id, "python", "print(x)", 10)
    killed = driver.kill(vm_id)

    assert result.stdout == "99\n"
    assert killed.was_running is True
    assert vms.processes_of_vm(vm_id, state.pid_namespace) == []


def test_vms_cannot_see_each_other(vms, driver):
    first = vms.spawn(driver)
    second = vms.spawn(driver)
    seconds = vms.unique_seconds()
    driver.execute(
        second, "bash", f"echo secret > secret.txt; setsid sleep {seconds} &", 10
    )
    second_pid = vms.state(second).pid

    processes = driver.execute(first, "bash", "ps -eo args", 10)
    search = driver.execute(first, "bash", "grep -rs secret /home /tmp /mnt", 10)
    signal_sent = driver.execute(first, "bash", f"kill -0 {second_pid}", 10)
    homes = driver.execute(first, "bash", "ls -A /home", 10)
    kept = driver.execute(second, "bash", "cat secret.txt", 10)

    assert kept.stdout == "secret\n"
    assert list(vms.data_dir.rglob("secret.txt")) == []
    assert f"sleep {seconds}" not in processes.stdout
    assert "agent.pyc serve" in processes.stdout
    assert search.stdout == ""
    assert signal_sent.exit_code != 0
    assert homes.stdout == "sandbox\n"
    assert vms.state(first).pid_namespace != vms.state(second).pid_namespace


def test_no_network(vms, driver):
    vm_id = vms.spawn(driver)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
            "print('connected')\n"
        )
        result = driver.execute(vm_id, "python", code, 10)
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            host_connects = True
    interfaces = driver.execute(vm_id, "bash", "tail -n +3 /proc/net/dev", 10)

    assert host_connects is True
    assert "connected" not in result.stdout
    assert result.exit_code == 1
    assert "ConnectionRefusedError" in result.stderr
    assert [line.split(":")[0].strip() for line in interfaces.stdout.splitlines()] == [
        "lo"
    ]


@requires_root
def test_runs_as_sandbox_user(vms, driver):
    vm_id = vms.spawn(driver)
    inside = driver.execute(vm_id, "bash", "id -u; id -G", 10)
    host_uids = set()
    for pid in driver.vm_processes(vm_id):
        with open(f"/proc/{pid}/status") as file:
            uid_line = next(line for line in file if line.startswith("Uid:"))
        host_uids.update(int(uid) for uid in uid_line.split()[1:])

    assert inside.stdout == "65534\n65534\n"
    assert host_uids == {65534}


def test_system_directories_read_only(vms, driver):
    vm_id = vms.spawn(driver)
    usr = driver.execute(vm_id, "bash", "touch /usr/fleetvm-test", 10)
    etc = driver.execute(vm_id, "bash", "touch /etc/fleetvm-test", 10)
    tmp = driver.execute(vm_id, "bash", "touch /tmp/fleetvm-test && echo ok", 10)

    assert usr.exit_code != 0
    assert etc.exit_code != 0
    assert tmp.stdout == "ok\n"
    assert not Path("/usr/fleetvm-test").exists()


def test_memory_limit_enforced(vms, driver):
    vm_id = vms.spawn(driver, memory_mb=128)
    result = driver.execute(vm_id, "python", "data = b'x' * (400 * 1024 * 1024)", 30)
    after = driver.execute(vm_id, "python", "print('alive')", 10)

    assert result.exit_code != 0
    assert after.stdout == "alive\n"


@pytest.mark.parametrize(
    "vm_id",
    [
        pytest.param("", id="empty"),
        pytest.param("../x", id="dot-dot"),
        pytest.param("a/b", id="slash"),
        pytest.param("a\0b", id="nul"),
        pytest.param("a" * 10_240, id="10-kb"),
        pytest.param("a" * 65, id="65-chars"),
        pytest.param("ok\n", id="trailing-newline"),
    ],
)
def test_invalid_vm_id_rejected(vms, plain_driver, vm_id):
    with pytest.raises(InvalidRequest):
        plain_driver.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))
    with pytest.raises(InvalidRequest):
        plain_driver.execute(vm_id, "bash", "true", 10)
    with pytest.raises(InvalidRequest):
        plain_driver.upload(vm_id, "f", b"x")
    with pytest.raises(InvalidRequest):
        plain_driver.download(vm_id, "f")
    with pytest.raises(InvalidRequest):
        plain_driver.is_alive(vm_id)
    with pytest.raises(InvalidRequest):
        plain_driver.kill(vm_id)
    assert plain_driver.list_vms() == []
    assert not (vms.data_dir / "x").exists()


def test_plain_spawn_isolation(vms, plain_driver):
    vm_id = vms.new_id()
    result = plain_driver.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))
    inside = plain_driver.execute(vm_id, "bash", "pwd; echo $FLEETVM_VM_ID", 10)
    home = vms.data_dir / "vms" / vm_id / "home"

    assert result.isolation.startswith("none+")
    assert inside.stdout == f"{home}\n{vm_id}\n"


def test_plain_kill_ends_detached_processes(vms, plain_driver):
    vm_id = vms.spawn(plain_driver)
    seconds = vms.unique_seconds()
    _start_detached_sleeps(plain_driver, vm_id, seconds)
    assert vms.wait_for(
        lambda: len(vms.processes_with_arguments("sleep", seconds)) == 2
    )

    result = plain_driver.kill(vm_id)

    assert result.was_running is True
    assert vms.processes_with_arguments("sleep", seconds) == []
    assert vms.processes_of_vm(vm_id) == []
    assert not (vms.data_dir / "vms" / vm_id).exists()


def test_plain_kill_finds_cleared_environment(vms, plain_driver):
    vm_id = vms.spawn(plain_driver)
    if vms.state(vm_id).cgroup is None:
        pytest.skip("this host gives VMs no memory cgroup")
    seconds = vms.unique_seconds()
    code = f"env -i setsid sleep {seconds} > /dev/null 2>&1 &"
    plain_driver.execute(vm_id, "bash", code, 10)
    assert vms.wait_for(
        lambda: len(vms.processes_with_arguments("sleep", seconds)) == 1
    )

    plain_driver.kill(vm_id)

    assert vms.processes_with_arguments("sleep", seconds) == []


def test_rlimit_kill_uses_environment(vms, plain_driver, monkeypatch):
    # Without cgroups only FLEETVM_VM_ID finds the detached processes.
    monkeypatch.setattr(process, "MEMORY_CGROUP_ROOT", Path("/nonexistent/cgroup"))
    monkeypatch.setattr(process, "PIDS_CGROUP_ROOT", Path("/nonexistent/pids"))
    vm_id = vms.new_id()
    spawned = plain_driver.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))
    seconds = vms.unique_seconds()
    _start_detached_sleeps(plain_driver, vm_id, seconds)
    assert vms.wait_for(
        lambda: len(vms.processes_with_arguments("sleep", seconds)) == 2
    )

    result = plain_driver.kill(vm_id)

    assert spawned.isolation == "none+rlimit"
    assert result.was_running is True
    assert vms.processes_with_arguments("sleep", seconds) == []
    assert vms.processes_of_vm(vm_id) == []


def test_rlimit_memory_limit(vms, driver, monkeypatch):
    monkeypatch.setattr(process, "MEMORY_CGROUP_ROOT", Path("/nonexistent/cgroup"))
    vm_id = vms.new_id()
    spawned = driver.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))
    result = driver.execute(vm_id, "python", "data = b'x' * (400 * 1024 * 1024)", 30)
    after = driver.execute(vm_id, "python", "print('alive')", 10)

    assert spawned.isolation.startswith("bubblewrap+rlimit")
    assert result.exit_code == 1
    assert "MemoryError" in result.stderr
    assert after.stdout == "alive\n"


def test_plain_python_and_files(vms, plain_driver):
    vm_id = vms.spawn(plain_driver)
    plain_driver.execute(vm_id, "python", "x = 41", 10)
    result = plain_driver.execute(vm_id, "python", "print(x + 1)", 10)
    path = plain_driver.upload(vm_id, "a/b.bin", b"\x00\x01")

    assert result.stdout == "42\n"
    assert path == str(vms.data_dir / "vms" / vm_id / "home" / "a" / "b.bin")
    assert plain_driver.download(vm_id, "a/b.bin") == b"\x00\x01"


def test_spawn_failure_cleans_up(vms):
    broken = vms.driver(sandbox="none", guest_python="/nonexistent/python3")
    vm_id = vms.new_id()

    with pytest.raises(DriverError):
        broken.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))
    assert broken.list_vms() == []
    assert not (MEMORY_CGROUP_ROOT / "fleetvm" / vm_id).exists()


def test_spawn_agent_crash_reported(vms):
    # The agent process exits at once, so the ping gets no response.
    broken = vms.driver(sandbox="none", guest_python="/bin/false")
    vm_id = vms.new_id()

    with pytest.raises(DriverError, match="exited during startup"):
        broken.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))
    assert broken.list_vms() == []


def test_probe_failure_falls_back(vms, caplog):
    # The test sandbox cannot start a missing interpreter, so the probe fails.
    fallback = vms.driver(sandbox="auto", guest_python="/nonexistent/python3")

    with caplog.at_level(logging.WARNING, logger="fleetvm.drivers.process"):
        first = fallback.sandbox
        second = fallback.sandbox

    assert first == "none"
    assert second == "none"
    warnings = [r for r in caplog.records if "bubblewrap does not work" in r.message]
    assert len(warnings) == 1


def test_probe_failure_raises(vms):
    strict = vms.driver(sandbox="bubblewrap", guest_python="/nonexistent/python3")

    with pytest.raises(DriverError, match="bubblewrap does not work"):
        _ = strict.sandbox


def test_list_vms_ignores_other_entries(vms, plain_driver):
    vm_id = vms.spawn(plain_driver)
    (vms.data_dir / "vms" / "stray-file").write_text("x")
    (vms.data_dir / "vms" / "bad name").mkdir()

    assert plain_driver.list_vms() == [vm_id]


requires_cgroups = pytest.mark.skipif(
    not (process.PIDS_CGROUP_ROOT / "cgroup.procs").exists()
    or not (MEMORY_CGROUP_ROOT / "memory.limit_in_bytes").exists()
    or os.geteuid() != 0,
    reason="needs root and cgroup v1 memory and pids hierarchies",
)

# Code run in a VM that takes every descriptor of bubblewrap's init (PID 1) and
# the agent (PID 2) that pidfd_getfd allows, and prints the dangerous ones.
STEAL_DESCRIPTORS = r"""
import ctypes, json, os, socket, stat
libc = ctypes.CDLL(None, use_errno=True)
stolen = []
for pid in (1, 2):
    pidfd = os.pidfd_open(pid)
    for number in range(64):
        fd = libc.syscall(438, pidfd, number, 0)
        if fd < 0:
            continue
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            stolen.append([pid, number, "file"])
        elif stat.S_ISSOCK(mode):
            sock = socket.socket(fileno=fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                stolen.append([pid, number, "listener"])
            sock.detach()
        os.close(fd)
print(json.dumps(stolen))
"""


def test_vm_cannot_take_agent_descriptors(vms, driver):
    vm_id = vms.spawn(driver)
    result = driver.execute(vm_id, "python", STEAL_DESCRIPTORS, 10)
    stolen = json.loads(result.stdout)

    assert result.exit_code == 0, result.stderr
    assert [entry for entry in stolen if entry[2] == "listener"] == []
    assert [entry for entry in stolen if entry[2] == "file"] == []
    assert driver.is_alive(vm_id) is True


def test_env_not_given_to_bubblewrap(vms, driver):
    vm_id = vms.spawn(driver, env={"LD_PRELOAD": "/nonexistent/fleetvm.so"})
    with open(f"/proc/{vms.state(vm_id).pid}/environ", "rb") as file:
        bwrap_environment = file.read().split(b"\0")
    inside = driver.execute(vm_id, "bash", "echo $LD_PRELOAD", 10)

    assert b"LD_PRELOAD=/nonexistent/fleetvm.so" not in bwrap_environment
    assert f"FLEETVM_VM_ID={vm_id}".encode() in bwrap_environment
    assert inside.stdout == "/nonexistent/fleetvm.so\n"


FAKE_AGENT = r"""
import os, socket, sys, time
directory, reply_path, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(reply_path, "rb") as file:
    reply = file.read()
dir_fd = os.open(directory, os.O_PATH)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
# Bound under another name and renamed once listening, because the test
# connects as soon as agent.sock exists.
path = f"/proc/self/fd/{dir_fd}/agent.sock"
listener.bind(path + ".tmp")
listener.listen(8)
os.rename(path + ".tmp", path)
while True:
    conn, _ = listener.accept()
    try:
        size = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "big")
        conn.recv(size, socket.MSG_WAITALL)
        if delay:
            for index in range(len(reply)):
                conn.sendall(reply[index : index + 1])
                time.sleep(delay)
        else:
            conn.sendall(reply)
    except OSError:
        pass
    conn.close()
"""


@pytest.fixture
def fake_agent(vms, tmp_path):
    """Start a process that responds to every request for a VM id with fixed bytes."""
    started = []

    def serve(reply: bytes, delay: float = 0.0) -> str:
        vm_id = vms.new_id()
        vm_dir = vms.data_dir / "vms" / vm_id
        vm_dir.mkdir(parents=True)
        reply_path = tmp_path / f"{vm_id}.reply"
        reply_path.write_bytes(reply)
        argv = [sys.executable, "-c", FAKE_AGENT, str(vm_dir), str(reply_path)]
        started.append(subprocess.Popen([*argv, str(delay)]))
        assert vms.wait_for(lambda: (vm_dir / "agent.sock").exists())
        return vm_id

    yield serve
    for fake in started:
        fake.kill()
        fake.wait(10)


def _frame(message: dict | str | bytes) -> bytes:
    if isinstance(message, dict):
        message = json.dumps(message)
    if isinstance(message, str):
        message = message.encode()
    return struct.pack(">I", len(message)) + message


VALID_EXECUTE = {
    "ok": True,
    "stdout": "",
    "stderr": "",
    "exit_code": 0,
    "execution_time": 0.1,
    "timed_out": False,
}


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(struct.pack(">I", 200 * 1024 * 1024), id="200-mib-header"),
        pytest.param(_frame({**VALID_EXECUTE, "stdout": "a" * 2**24}), id="16-mib"),
        pytest.param(_frame({**VALID_EXECUTE, "stdout": "a" * 2**21}), id="long-out"),
        pytest.param(_frame({**VALID_EXECUTE, "exit_code": "0"}), id="str-exit"),
        pytest.param(_frame({**VALID_EXECUTE, "exit_code": 2**40}), id="big-exit"),
        pytest.param(_frame({**VALID_EXECUTE, "stderr": None}), id="null-err"),
        pytest.param(_frame({**VALID_EXECUTE, "timed_out": "no"}), id="str-flag"),
        pytest.param(_frame({**VALID_EXECUTE, "execution_time": -1}), id="neg-time"),
        pytest.param(_frame({**VALID_EXECUTE, "cpu_time": -1}), id="neg-cpu"),
        pytest.param(_frame({**VALID_EXECUTE, "cpu_time": "1"}), id="str-cpu"),
        pytest.param(_frame({**VALID_EXECUTE, "stdout": "\ud800"}), id="surrogate"),
        pytest.param(_frame({**VALID_EXECUTE, "ok": "yes"}), id="str-ok"),
        pytest.param(_frame({"ok": False, "error": 3, "message": "x"}), id="int-err"),
        pytest.param(_frame("{not json"), id="not-json"),
        pytest.param(_frame("[1]"), id="not-object"),
    ],
)
def test_forged_execute_response_rejected(vms, plain_driver, fake_agent, reply):
    vm_id = fake_agent(reply)

    with pytest.raises(DriverError):
        plain_driver.execute(vm_id, "python", "1", 10)


def test_execute_without_cpu_time_accepted(vms, plain_driver, fake_agent):
    # An agent that predates cpu_time, in a VM adopted after an upgrade.
    vm_id = fake_agent(_frame(VALID_EXECUTE))

    result = plain_driver.execute(vm_id, "python", "1", 10)

    assert result.exit_code == 0
    assert result.cpu_time is None


def test_execute_reports_cpu_time(vms, driver):
    vm_id = vms.spawn(driver)

    result = driver.execute(vm_id, "python", "sum(range(10**7))", 30)

    assert result.exit_code == 0
    assert result.cpu_time is not None
    assert result.cpu_time > 0


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("not base64!", id="not-base64"),
        pytest.param(base64.b64encode(b"x" * 11).decode(), id="over-limit"),
        pytest.param(7, id="not-text"),
    ],
)
def test_forged_download_rejected(vms, fake_agent, content):
    small_driver = vms.driver(api={"max_upload_bytes": 10}, sandbox="none")
    vm_id = fake_agent(_frame({"ok": True, "path": "/f", "content": content}))

    with pytest.raises(DriverError):
        small_driver.download(vm_id, "f")


def test_forged_upload_path_rejected(vms, plain_driver, fake_agent):
    vm_id = fake_agent(_frame({"ok": True, "path": ["/f"]}))

    with pytest.raises(DriverError):
        plain_driver.upload(vm_id, "f", b"x")


@pytest.mark.parametrize(
    ("code", "error"),
    [
        pytest.param("no_space", PayloadTooLarge, id="no-space"),
        pytest.param("process_limit", Conflict, id="process-limit"),
        pytest.param("not_found", VmFileNotFound, id="not-found"),
        pytest.param("internal_error", DriverError, id="internal"),
    ],
)
def test_agent_error_codes_mapped(vms, plain_driver, fake_agent, code, error):
    vm_id = fake_agent(_frame({"ok": False, "error": code, "message": "bad\ud800"}))

    with pytest.raises(error) as raised:
        plain_driver.download(vm_id, "f")
    assert "bad" in raised.value.message
    assert raised.value.message.encode()


def test_slow_response_times_out(vms, plain_driver, fake_agent):
    # One byte every 0.3 s keeps each recv under the timeout, but not the total.
    vm_id = fake_agent(_frame({"ok": True}), delay=0.3)
    started = time.monotonic()
    alive = plain_driver.is_alive(vm_id)
    elapsed = time.monotonic() - started

    assert alive is False
    assert elapsed < agent_socket.PING_TIMEOUT_SECONDS + 1


def test_oversized_response_not_read(vms, plain_driver, fake_agent):
    vm_id = fake_agent(struct.pack(">I", 200 * 1024 * 1024) + b"x" * 1024)
    started = time.monotonic()

    with pytest.raises(DriverError, match="exceeds the maximum"):
        plain_driver.execute(vm_id, "bash", "true", 10)
    assert time.monotonic() - started < 2


def test_upload_fifo_rejected(vms, driver, monkeypatch):
    # An upload that blocks then fails after 5 s instead of 120 s.
    monkeypatch.setattr(agent_socket, "FILE_TRANSFER_TIMEOUT_SECONDS", 5.0)
    vm_id = vms.spawn(driver)
    driver.execute(vm_id, "bash", "mkfifo fifo", 10)

    with pytest.raises(InvalidRequest, match="not a regular file"):
        driver.upload(vm_id, "fifo", b"x")
    with pytest.raises(InvalidRequest, match="not a regular file"):
        driver.download(vm_id, "fifo")
    assert driver.is_alive(vm_id) is True


def test_upload_deep_path(vms, driver):
    vm_id = vms.spawn(driver)
    relative = "d/" * 1000 + "f.txt"
    path = driver.upload(vm_id, relative, b"deep")

    assert path == f"{SANDBOX_HOME}/{relative}"
    assert driver.download(vm_id, relative) == b"deep"


@pytest.mark.parametrize(
    ("setup", "path"),
    [
        pytest.param("true", "/proc/self/mem", id="eio"),
        pytest.param("ln -s loop loop", "loop", id="eloop"),
        pytest.param("true", "x" * 300, id="enametoolong"),
        pytest.param("touch file", "file/child", id="enotdir"),
        pytest.param("true", "d/" * 2100, id="over-path-max"),
    ],
)
def test_download_path_errors_invalid(vms, driver, setup, path):
    vm_id = vms.spawn(driver)
    driver.execute(vm_id, "bash", setup, 10)

    with pytest.raises(InvalidRequest):
        driver.download(vm_id, path)


@pytest.mark.parametrize(
    ("setup", "path"),
    [
        pytest.param("true", "x" * 300, id="enametoolong"),
        pytest.param("touch file", "file/child", id="enotdir"),
        pytest.param("true", "/proc/1/fleetvm", id="proc"),
    ],
)
def test_upload_path_errors_invalid(vms, driver, setup, path):
    vm_id = vms.spawn(driver)
    driver.execute(vm_id, "bash", setup, 10)

    with pytest.raises(InvalidRequest):
        driver.upload(vm_id, path, b"x")


def test_spawn_surrogate_env_rejected(vms, driver):
    with pytest.raises(InvalidRequest):
        driver.spawn(
            VmSpec(vm_id=vms.new_id(), memory_mb=256, vcpu_count=1, env={"A": "\ud800"})
        )
    assert driver.list_vms() == []


def test_spawn_huge_env_rejected(vms, driver):
    env = {"BIG": "x" * 200_000}

    with pytest.raises(InvalidRequest):
        driver.spawn(VmSpec(vm_id=vms.new_id(), memory_mb=256, vcpu_count=1, env=env))
    assert driver.list_vms() == []


def test_surrogates_rejected(vms, driver):
    vm_id = vms.spawn(driver)

    with pytest.raises(InvalidRequest):
        driver.execute(vm_id, "bash", "echo \ud800", 10)
    with pytest.raises(InvalidRequest):
        driver.execute(vm_id, "python", "print('\ud800')", 10)
    with pytest.raises(InvalidRequest):
        driver.upload(vm_id, "\ud800.txt", b"x")
    with pytest.raises(InvalidRequest):
        driver.download(vm_id, "\ud800.txt")
    assert driver.execute(vm_id, "bash", "echo ok", 10).stdout == "ok\n"


def test_execute_huge_timeout_rejected(vms, plain_driver):
    vm_id = vms.spawn(plain_driver)

    with pytest.raises(InvalidRequest):
        plain_driver.execute(vm_id, "python", "1", 1e300)


def test_execute_code_too_large(vms, plain_driver):
    vm_id = vms.spawn(plain_driver)
    code = "#" * (process.MAX_CODE_BYTES + 1)

    with pytest.raises(PayloadTooLarge):
        plain_driver.execute(vm_id, "bash", code, 10)


def test_python_exit_code_in_range(vms, plain_driver):
    vm_id = vms.spawn(plain_driver)
    result = plain_driver.execute(vm_id, "python", "raise SystemExit(2**70 + 3)", 10)

    assert result.exit_code == 3


FORK_BOMB = """
import os, time
children = []
for attempt in range({attempts}):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(300)
        os._exit(0)
    children.append(pid)
print(len(children))
"""


@requires_cgroups
def test_fork_bomb_contained(vms):
    limited = vms.driver(sandbox="bubblewrap", max_processes=32)
    vm_id = vms.new_id()
    spawned = limited.spawn(VmSpec(vm_id=vm_id, memory_mb=256, vcpu_count=1))
    user_cgroup = process.PIDS_CGROUP_ROOT / "fleetvm" / vm_id / "user"

    bomb = limited.execute(vm_id, "python", FORK_BOMB.format(attempts=82), 30)
    current = int((user_cgroup / "pids.current").read_text())
    alive = limited.is_alive(vm_id)
    after = limited.execute(vm_id, "bash", "echo ok", 10)
    killed = limited.kill(vm_id)

    assert spawned.isolation == "bubblewrap+memcg+pids"
    assert bomb.exit_code == 0, bomb.stderr
    assert 0 < int(bomb.stdout) < 32
    assert current <= 32
    assert alive is True
    assert after.stdout == "ok\n"
    assert killed.processes_killed > int(bomb.stdout)
    assert vms.processes_of_vm(vm_id) == []
    assert not user_cgroup.parent.exists()


@requires_cgroups
def test_request_flood_degrades_cleanly(vms):
    # 80 concurrent commands need 160 tasks, more than the 8 + 64 allowed, so
    # some cannot start. They must fail as 126 or a Conflict (409), never as
    # 503. An agent that cannot start a thread for a connection closes it,
    # which the driver reports as VmNotRunning, a Conflict.
    limited = vms.driver(sandbox="bubblewrap", max_processes=8)
    vm_id = vms.spawn(limited)
    outcomes = []

    def run() -> None:
        try:
            outcomes.append(limited.execute(vm_id, "bash", "sleep 1", 20).exit_code)
        except Conflict:
            outcomes.append("Conflict")
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=run) for _ in range(80)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(outcomes) == 80
    assert set(outcomes) <= {0, 126, "Conflict"}
    assert set(outcomes) != {0}
    assert limited.is_alive(vm_id) is True
    assert limited.execute(vm_id, "bash", "echo ok", 10).stdout == "ok\n"


@requires_cgroups
def test_vm_code_in_user_cgroup(vms, driver):
    vm_id = vms.spawn(driver)
    bash = driver.execute(vm_id, "bash", "grep :pids: /proc/self/cgroup", 10)
    python = driver.execute(
        vm_id, "python", "print(open('/proc/self/cgroup').read())", 10
    )

    assert bash.stdout.strip().endswith(f"/{vm_id}/user")
    assert f"/{vm_id}/user\n" in python.stdout


@requires_cgroups
def test_kill_removes_pids_cgroup(vms, driver):
    vm_id = vms.spawn(driver)
    cgroup = Path(vms.state(vm_id).pids_cgroup)
    assert (cgroup / "user").is_dir()

    driver.kill(vm_id)

    assert not cgroup.exists()


def test_disk_limit_enforced(vms):
    limited = vms.driver(
        sandbox="bubblewrap", disk_mb=8, api={"max_upload_bytes": 16 * 1024 * 1024}
    )
    vm_id = vms.spawn(limited)
    write = limited.execute(vm_id, "bash", "head -c 20M /dev/zero > big", 10)
    sizes = limited.execute(vm_id, "bash", "df -k --output=size ~ /tmp", 10)
    data_size = sum(path.stat().st_size for path in vms.data_dir.rglob("*"))

    assert write.exit_code != 0
    assert "No space left on device" in write.stderr
    assert sizes.stdout.split()[1:] == ["8192", "8192"]
    assert data_size < 1024 * 1024


def test_upload_over_disk_limit(vms):
    limited = vms.driver(
        sandbox="bubblewrap", disk_mb=8, api={"max_upload_bytes": 16 * 1024 * 1024}
    )
    vm_id = vms.spawn(limited)
    limited.upload(vm_id, "keep.txt", b"original")

    with pytest.raises(PayloadTooLarge, match="vm.disk_mb"):
        limited.upload(vm_id, "keep.txt", b"x" * (10 * 1024 * 1024))
    with pytest.raises(PayloadTooLarge):
        limited.upload(vm_id, "new/dir/big.bin", b"x" * (10 * 1024 * 1024))
    listing = limited.execute(vm_id, "bash", "ls -A", 10)
    assert limited.download(vm_id, "keep.txt") == b"original"
    assert listing.stdout == "keep.txt\n"


@requires_cgroups
def test_remove_stale_cgroups(vms, driver):
    live = vms.spawn(driver)
    stale, busy, has_dir = vms.new_id(), vms.new_id(), vms.new_id()
    (vms.data_dir / "vms" / has_dir).mkdir()
    paths = {}
    for name in (stale, busy, has_dir):
        paths[name] = [
            MEMORY_CGROUP_ROOT / "fleetvm" / name,
            process.PIDS_CGROUP_ROOT / "fleetvm" / name,
        ]
        for path in paths[name]:
            path.mkdir()
    (paths[stale][1] / "user").mkdir()
    sleeper = subprocess.Popen(["sleep", vms.unique_seconds()])
    try:
        for path in paths[busy]:
            (path / "cgroup.procs").write_text(str(sleeper.pid))
        removed = driver.remove_stale_cgroups()
        live_cgroups = [Path(vms.state(live).cgroup), Path(vms.state(live).pids_cgroup)]

        assert all(path in removed for path in paths[stale])
        assert not any(path.exists() for path in paths[stale])
        assert all(path.exists() for path in paths[busy])
        assert all(path.exists() for path in paths[has_dir])
        assert all(path.exists() for path in live_cgroups)
        assert driver.is_alive(live) is True
    finally:
        sleeper.kill()
        sleeper.wait(10)
        (vms.data_dir / "vms" / has_dir).rmdir()


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("kill -9 -1", id="kill-all"),
        pytest.param("kill -9 $PPID", id="kill-agent"),
    ],
)
def test_vm_killed_from_inside(vms, driver, code):
    vm_id = vms.spawn(driver)
    pid_namespace = vms.state(vm_id).pid_namespace

    with pytest.raises(VmNotRunning):
        driver.execute(vm_id, "bash", code + "; sleep 5", 10)
    started = time.monotonic()
    alive = driver.is_alive(vm_id)
    alive_seconds = time.monotonic() - started
    started = time.monotonic()
    with pytest.raises(VmNotRunning):
        driver.execute(vm_id, "python", "print(1)", 10)
    with pytest.raises(VmNotRunning):
        driver.upload(vm_id, "f", b"x")
    with pytest.raises(VmNotRunning):
        driver.download(vm_id, "f")
    calls_seconds = time.monotonic() - started

    assert alive is False
    assert alive_seconds < 0.5
    assert calls_seconds < 0.5
    assert vms.wait_for(lambda: vms.processes_of_vm(vm_id, pid_namespace) == [])
    assert driver.kill(vm_id).vm_id == vm_id
    assert driver.list_vms() == []


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda path: os.chmod(path, 0o666), id="writable"),
        pytest.param(lambda path: os.chown(path, 65534, 65534), id="foreign"),
    ],
)
@requires_root
def test_untrusted_state_ignored(vms, plain_driver, change):
    vm_id = vms.spawn(plain_driver)
    state_path = vms.data_dir / "vms" / vm_id / "state.json"
    change(state_path)

    assert process.VmState.read(state_path.parent) is None


def test_agent_compiled_by_guest_python(tmp_path):
    compiled = compile_agent(Settings().vm.guest_python, tmp_path)

    assert compiled == tmp_path / "agent.pyc"
    assert compiled.read_bytes()[:16] != AGENT_SOURCE.read_bytes()[:16]


def test_agent_source_when_compile_fails(tmp_path, caplog):
    compiled = compile_agent(str(tmp_path / "no-python"), tmp_path)

    assert compiled == AGENT_SOURCE
    assert "cannot compile the guest agent" in caplog.text


def test_agent_bytecode_hides_host_path(tmp_path):
    compiled = compile_agent(Settings().vm.guest_python, tmp_path)

    assert str(AGENT_SOURCE.parent).encode() not in compiled.read_bytes()
    assert b"/opt/fleetvm/agent.py" in compiled.read_bytes()
