"""`fleetvm serve` with vm.driver = "qemu": execute, kill, expiry and a worker
crash, end to end."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import new_session, run, wait_for_status
from tests.harness import Server, vm_processes
from tests.qemu_image import cached_image_dir, require_qemu
from tests.test_serve import worker_pid

pytestmark = [pytest.mark.slow, pytest.mark.qemu]


@pytest.fixture(scope="module")
def qemu_server() -> Iterator[Server]:
    require_qemu()
    image_dir = cached_image_dir()
    instance = Server(
        FLEETVM_VM__DRIVER="qemu",
        FLEETVM_QEMU__IMAGE_DIR=str(image_dir),
        FLEETVM_QEMU__ACCEL="tcg",
        FLEETVM_VM__SPAWN_TIMEOUT_SECONDS="120",
    ).start()
    yield instance
    instance.cleanup()


@pytest.fixture
def client(qemu_server: Server) -> Iterator[httpx.Client]:
    with qemu_server.client(qemu_server.admin_key) as instance:
        instance.timeout = httpx.Timeout(180)
        yield instance


def test_qemu_serve_execute_and_kill(qemu_server: Server, client: httpx.Client):
    session_id = new_session(client)
    first = run(client, session_id, "x = 20")
    second = run(client, session_id, "print(x * 2)")
    status = client.get(f"/v1/sessions/status/{session_id}").json()
    vm_id = first["vm_id"]
    running = vm_processes(vm_id)

    response = client.post("/kill", json={"session_id": session_id})

    assert second["vm_id"] == vm_id
    assert second["stdout"] == "40\n"
    assert status["isolation"] == "qemu-microvm+tcg"
    assert len(running) == 2
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "killed"
    assert vm_processes(vm_id) == []
    assert not (qemu_server.data_dir / "vms" / vm_id).exists()


def test_qemu_serve_expiry_kills_guest(qemu_server: Server, client: httpx.Client):
    session_id = new_session(client, vm_lifetime_seconds=3)
    vm_id = run(client, session_id, "print(1)")["vm_id"]

    status = wait_for_status(client, session_id, "expired", timeout=30)

    assert status["vm_status"] == "expired"
    assert vm_processes(vm_id) == []
    assert not (qemu_server.data_dir / "vms" / vm_id).exists()
    rows = qemu_server.query(
        "SELECT reason, outcome FROM kill_records WHERE vm_id = ?", vm_id
    )
    assert rows == [("expiry", "killed")]


def test_qemu_serve_worker_restart_adopts_guest(
    qemu_server: Server, client: httpx.Client
):
    session_id = new_session(client)
    vm_id = run(client, session_id, "kept = 'before the crash'")["vm_id"]
    guest_processes = vm_processes(vm_id)
    first = worker_pid(qemu_server)

    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if worker_pid(qemu_server) != first:
                break
        except AssertionError:
            pass
        time.sleep(0.1)
    result = run(client, session_id, "print(kept)")
    client.post("/kill", json={"session_id": session_id})

    assert worker_pid(qemu_server) != first
    assert result["vm_id"] == vm_id
    assert result["stdout"] == "before the crash\n"
    assert vm_processes(vm_id) == []
    assert len(guest_processes) == 2
