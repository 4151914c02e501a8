"""`fleetvm serve` as a whole: it restarts a crashed worker, and stopping it
leaves no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetvm.embedded import bind_api_socket
from fleetvm.settings import Settings
from tests.conftest import new_session, run
from tests.harness import (
    Server,
    fleetvm_command,
    free_port,
    processes_with_cmdline,
    vm_processes,
)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def worker_pid(server: Server) -> int:
    assert server.process is not None
    for pid in children_of(server.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"worker" in cmdline:
            return pid
    raise AssertionError("fleetvm serve has no worker child")


def processes_using(data_dir: Path) -> list[int]:
    marker = str(data_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in text:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def own_server() -> Iterator[Server]:
    instance = Server().start()
    yield instance
    instance.cleanup()


def test_serve_restarts_crashed_worker(own_server: Server) -> None:
    with own_server.client(own_server.admin_key) as client:
        session_id = new_session(client)
        vm_id = run(client, session_id, "x = 41")["vm_id"]
        first = worker_pid(own_server)

        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if worker_pid(own_server) != first:
                    break
            except AssertionError:
                pass
            time.sleep(0.1)

        result = run(client, session_id, "print(x + 1)")

    assert worker_pid(own_server) != first
    assert result["stdout"] == "42\n"
    assert result["vm_id"] == vm_id


def test_serve_stop_leaves_nothing(own_server: Server) -> None:
    with own_server.client(own_server.admin_key) as client:
        session_id = new_session(client)
        run(client, session_id, "setsid sleep 987656 &", language="bash")
        vm_id = run(client, session_id, "print(1)")["vm_id"]
    assert processes_with_cmdline("sleep 987656")
    assert own_server.process is not None
    serve_pid = own_server.process.pid

    own_server.stop()

    assert own_server.process.returncode == 0
    assert processes_with_cmdline("sleep 987656") == []
    assert vm_processes(vm_id) == []
    assert [
        pid for pid in processes_using(own_server.data_dir) if pid != serve_pid
    ] == []
    status = own_server.query("SELECT status, kill_reason FROM vms WHERE id = ?", vm_id)
    assert status == [("killed", "shutdown")]


def test_serve_second_instance_refused(own_server: Server) -> None:
    with own_server.client(own_server.admin_key) as client:
        session_id = new_session(client)
        vm_id = run(client, session_id, "x = 1")["vm_id"]
    other_port = dict(own_server.env, FLEETVM_API__PORT=str(free_port()))

    result = subprocess.run(
        fleetvm_command("serve"),
        env=other_port,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "another `fleetvm serve` is running" in result.stderr
    assert vm_processes(vm_id)
    with own_server.client(own_server.admin_key) as client:
        assert run(client, session_id, "print(x)")["stdout"] == "1\n"


def test_serve_busy_port_fails_fast(own_server: Server) -> None:
    env = dict(own_server.env, FLEETVM_DATA_DIR=str(own_server.data_dir) + "-other")

    result = subprocess.run(
        fleetvm_command("serve"), env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{own_server.port}" in result.stderr
    assert not Path(env["FLEETVM_DATA_DIR"], "redis.sock").exists()
    shutil.rmtree(env["FLEETVM_DATA_DIR"], ignore_errors=True)


def test_api_socket_is_tcp_protocol(tmp_path: Path) -> None:
    # asyncio enables TCP_NODELAY only on sockets whose protocol is TCP.
    settings = Settings(data_dir=tmp_path, api={"port": free_port()})

    listener = bind_api_socket(settings)

    try:
        assert listener.proto == socket.IPPROTO_TCP
        assert listener.getsockname()[1] == settings.api.port
    finally:
        listener.close()
