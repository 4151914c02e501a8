"""Real fleetvm processes for tests: `fleetvm serve`, or broker, worker and API
started one by one, each on a free port of 127.0.0.1 and a private data dir."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from fleetvm.drivers import make_driver
from fleetvm.settings import Settings

STARTUP_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def short_data_dir() -> Path:
    # Unix socket paths are limited to 107 bytes, so stay near the root.
    return Path(tempfile.mkdtemp(prefix="fvm-", dir="/tmp"))


def base_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETVM_")}
    env.update(
        FLEETVM_DATA_DIR=str(data_dir),
        FLEETVM_API__PORT=str(port),
        FLEETVM_VM__MIN_LIFETIME_SECONDS="2",
        FLEETVM_MULTINODE__HEARTBEAT_SECONDS="0.5",
        FLEETVM_API__MAX_UPLOAD_BYTES=str(1024 * 1024),
    )
    env.update(extra)
    return env


def fleetvm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleetvm.cli", *args]


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def kill_leftover_vms(data_dir: Path) -> list[str]:
    """Kill VMs still on disk in ``data_dir`` and return their ids.

    A safety net for tests that stop fleetvm abnormally: the VMs outlive their
    worker by design, so nothing else would end them.
    """
    driver = make_driver(Settings(data_dir=data_dir))
    leftovers = driver.list_vms()
    for vm_id in leftovers:
        driver.kill(vm_id)
    return leftovers


def wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fleetvm exited early:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"fleetvm did not become healthy:\n{log.read_text()[-4000:]}")


class Server:
    """`fleetvm serve` in a subprocess, with helpers to inspect its state."""

    def __init__(self, **extra_env: str) -> None:
        self.data_dir = short_data_dir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = base_env(self.data_dir, self.port, **extra_env)
        self.log = self.data_dir / "serve.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        with open(self.log, "ab") as log:
            # A session of its own: Ctrl-C in a benchmark then reaches only the
            # benchmark, which stops this process itself.
            self.process = subprocess.Popen(
                fleetvm_command("serve"),
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_healthy(self.url, self.process, self.log)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def cleanup(self) -> None:
        self.stop()
        kill_leftover_vms(self.data_dir)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin-api-key").read_text().strip()

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            fleetvm_command(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"fleetvm {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout.strip()

    def create_user(self, name: str, password: str = "pw-secret-1") -> str:
        """Create a user with the CLI and return a new API key of theirs."""
        self.cli("users", "create", name, "--password", password)
        return self.cli("keys", "create", name)

    def query(self, sql: str, *params: object) -> list[tuple]:
        with sqlite3.connect(self.data_dir / "fleetvm.sqlite3", timeout=10) as db:
            return db.execute(sql, params).fetchall()

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def vm_processes(vm_id: str) -> list[int]:
    """Return host pids of processes that belong to the VM, found through /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        marker = vm_id.encode()
        if marker in cmdline or marker in environ:
            pids.append(int(entry.name))
    return pids


def processes_with_cmdline(fragment: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if fragment.encode() in cmdline:
            pids.append(int(entry.name))
    return pids
