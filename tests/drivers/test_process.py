"""Tests of ProcessDriver with real sandboxes and processes."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fleetvm.drivers import process
from fleetvm.drivers.base import VmSpec
from fleetvm.drivers.process import MEMORY_CGROUP_ROOT, SANDBOX_HOME, ProcessDriver
from fleetvm.errors import (
    DriverError,
    InvalidRequest,
    PayloadTooLarge,
    VmFileNotFound,
    VmNotRunning,
)
from fleetvm.guest.agent import TIMEOUT_EXIT_CODE

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
    assert (vm_dir / "home").is_dir()
    assert vms.state(vm_id).pid_namespace is not None
    assert driver.list_vms() == [vm_id]


@requires_root
def test_spawn_home_owned_by_sandbox_user(vms, driver):
    vm_id = vms.spawn(driver)
    home = vms.data_dir / "vms" / vm_id / "home"

    assert home.stat().st_uid == 65534
    assert oct(home.stat().st_mode & 0o777) == "0o700"


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
    second_home = vms.data_dir / "vms" / second / "home"
    second_pid = vms.state(second).pid

    processes = driver.execute(first, "bash", "ps -eo args", 10)
    read = driver.execute(first, "bash", f"cat {second_home}/secret.txt", 10)
    signal_sent = driver.execute(first, "bash", f"kill -0 {second_pid}", 10)
    homes = driver.execute(first, "bash", "ls -A /home", 10)

    assert (second_home / "secret.txt").read_text() == "secret\n"
    assert f"sleep {seconds}" not in processes.stdout
    assert "agent.py serve" in processes.stdout
    assert read.exit_code != 0
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
    # Without a memory cgroup only FLEETVM_VM_ID finds the detached processes.
    monkeypatch.setattr(process, "MEMORY_CGROUP_ROOT", Path("/nonexistent/cgroup"))
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

    assert spawned.isolation == "bubblewrap+rlimit"
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
