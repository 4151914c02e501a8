"""A worker killed with SIGKILL and started again: VMs are adopted, not lost,
and kills or expiries that came due while it was down are carried out once."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from fleetvm.embedded import start_embedded_redis
from fleetvm.settings import Settings
from tests.conftest import new_session, run, wait_for_status
from tests.harness import (
    base_env,
    fleetvm_command,
    free_port,
    kill_leftover_vms,
    processes_with_cmdline,
    short_data_dir,
    stop_process,
    vm_processes,
    wait_healthy,
)


class Pieces:
    """Embedded broker, one `fleetvm worker` and one `fleetvm api`, separately."""

    def __init__(self, **extra_env: str) -> None:
        self.data_dir = short_data_dir()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = base_env(
            self.data_dir, port, FLEETVM_KILL__WAIT_SECONDS="2", **extra_env
        )
        self.log = self.data_dir / "pieces.log"
        self.redis = start_embedded_redis(Settings(data_dir=self.data_dir))
        self.worker = self.start_worker()
        self.api = self.spawn(fleetvm_command("api"))
        wait_healthy(self.url, self.api, self.log)
        subprocess.run(
            fleetvm_command("users", "create", "carol", "--password", "pw-carol-1"),
            env=self.env,
            check=True,
            capture_output=True,
        )
        self.key = subprocess.run(
            fleetvm_command("keys", "create", "carol"),
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def spawn(self, command: list[str]) -> subprocess.Popen:
        with open(self.log, "ab") as log:
            return subprocess.Popen(command, env=self.env, stdout=log, stderr=log)

    def start_worker(self) -> subprocess.Popen:
        return self.spawn(fleetvm_command("worker", "--worker-id", "local"))

    def restart_worker(self) -> None:
        self.worker = self.start_worker()

    def crash_worker(self) -> None:
        self.worker.send_signal(signal.SIGKILL)
        self.worker.wait()

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"X-API-Key": self.key}, timeout=60
        )

    def close(self) -> None:
        stop_process(self.api)
        stop_process(self.worker)
        # A stopped worker leaves its VMs running for adoption; remove them.
        kill_leftover_vms(self.data_dir)
        stop_process(self.redis)
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def pieces() -> Iterator[Pieces]:
    instance = Pieces()
    yield instance
    instance.close()


def test_restart_adopts_running_vm(pieces: Pieces) -> None:
    with pieces.client() as client:
        session_id = new_session(client)
        vm_id = run(client, session_id, "x = 41")["vm_id"]
        run(client, session_id, "sleep 987655 &", language="bash")

        pieces.crash_worker()
        assert vm_processes(vm_id)
        pieces.restart_worker()

        result = run(client, session_id, "print(x + 1)")
        assert result["stdout"] == "42\n"
        assert result["vm_id"] == vm_id
        killed = client.post("/kill", json={"session_id": session_id}).json()

    assert killed["outcome"] == "killed"
    assert processes_with_cmdline("sleep 987655") == []
    assert vm_processes(vm_id) == []


def test_kill_while_worker_down_completes(pieces: Pieces) -> None:
    with pieces.client() as client:
        session_id = new_session(client)
        vm_id = run(client, session_id, "print(1)")["vm_id"]
        pieces.crash_worker()

        pending = client.post("/kill", json={"session_id": session_id})
        assert pending.status_code == 200
        assert pending.json()["outcome"] == "kill_pending"
        assert vm_processes(vm_id)

        pieces.restart_worker()
        status = wait_for_status(client, session_id, "killed")

    assert status["vm_status"] == "killed"
    assert vm_processes(vm_id) == []


def test_expiry_while_worker_down(pieces: Pieces) -> None:
    with pieces.client() as client:
        session_id = new_session(client, vm_lifetime_seconds=2)
        vm_id = run(client, session_id, "print(1)")["vm_id"]
        pieces.crash_worker()
        time.sleep(3)
        assert vm_processes(vm_id)

        pieces.restart_worker()
        status = wait_for_status(client, session_id, "expired")

    assert status["vm_status"] == "expired"
    assert vm_processes(vm_id) == []


def test_execute_sent_while_down_never_runs(pieces: Pieces) -> None:
    with pieces.client() as client:
        session_id = new_session(client)
        run(client, session_id, "print(1)")
        pieces.crash_worker()

        late = client.post(
            "/execute",
            json={
                "session_id": session_id,
                "command": "open('late-marker', 'w').write('ran')",
                "timeout": 1,
            },
        )
        pieces.restart_worker()
        time.sleep(2)
        check = run(
            client, session_id, "import os; print(os.path.exists('late-marker'))"
        )

    assert late.status_code == 503
    assert "did not respond" in late.json()["detail"]
    assert check["stdout"] == "False\n"
