"""A fleetvm cluster of real processes on 127.0.0.1: API nodes and workers on
a shared PostgreSQL database and a Redis or RabbitMQ broker.

Each worker has its own data directory, as it would have its own host, and an
id unique to the run, so runs sharing a broker never read each other's queues.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError

from fleetvm.settings import Settings
from tests.harness import (
    STARTUP_TIMEOUT_SECONDS,
    base_env,
    fleetvm_command,
    free_port,
    kill_leftover_vms,
    short_data_dir,
    stop_process,
    wait_healthy,
)


class Cluster:
    """``fleetvm api`` nodes and ``fleetvm worker`` processes, started and stopped
    one by one so tests can crash and restart any of them."""

    def __init__(
        self, database_url: str, broker_url: str, workers: int = 3, **extra_env: str
    ) -> None:
        self.run_id = secrets.token_hex(3)
        self.root = short_data_dir()
        self.database_url = database_url
        self.broker_url = broker_url
        self.engine = create_engine(database_url, pool_size=2, max_overflow=2)
        self.env = base_env(
            self.root / "api",
            0,
            FLEETVM_DATABASE__URL=database_url,
            FLEETVM_DATABASE__POOL_SIZE="4",
            FLEETVM_BROKER__URL=broker_url,
            FLEETVM_AUTH__SECRET_KEY=secrets.token_hex(32),
            FLEETVM_MULTINODE__DEAD_AFTER_SECONDS="3",
            FLEETVM_MULTINODE__WORKER_CONCURRENCY="12",
            FLEETVM_KILL__WAIT_SECONDS="5",
            **extra_env,
        )
        self.worker_ids = [f"w{i}-{self.run_id}" for i in range(1, workers + 1)]
        self.workers: dict[str, subprocess.Popen] = {}
        self.apis: list[subprocess.Popen] = []
        self.urls: list[str] = []

    def start(self, apis: int = 1) -> Cluster:
        for worker_id in self.worker_ids:
            self.start_worker(worker_id)
        for worker_id in self.worker_ids:
            self.wait_registered(worker_id)
        for _ in range(apis):
            self.start_api()
        return self

    def _spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                fleetvm_command(*args),
                env={**self.env, **env},
                stdout=log,
                stderr=log,
                # Ctrl-C reaches only the test or benchmark, which stops this.
                start_new_session=True,
            )

    def data_dir(self, worker_id: str) -> Path:
        return self.root / worker_id

    def start_worker(self, worker_id: str) -> None:
        self.workers[worker_id] = self._spawn(
            worker_id,
            ["worker", "--worker-id", worker_id],
            FLEETVM_DATA_DIR=str(self.data_dir(worker_id)),
        )

    def wait_registered(self, worker_id: str, since: float | None = None) -> None:
        """Wait until the worker has registered (after ``since``, a time.time())."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            process = self.workers[worker_id]
            if process.poll() is not None:
                raise RuntimeError(f"worker {worker_id} exited:\n{self.log(worker_id)}")
            try:
                row = self.query(
                    "SELECT state, extract(epoch FROM started_at) FROM workers "
                    "WHERE id = :id",
                    id=worker_id,
                )
            except ProgrammingError:  # no tables yet: the workers create them
                row = []
            if row and row[0][0] == "up" and float(row[0][1]) >= (since or 0):
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"worker {worker_id} did not register:\n{self.log(worker_id)}"
        )

    def crash_worker(self, worker_id: str) -> None:
        process = self.workers[worker_id]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def restart_worker(self, worker_id: str) -> None:
        since = time.time()
        self.start_worker(worker_id)
        self.wait_registered(worker_id, since)

    def start_api(self) -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        name = f"api-{len(self.apis) + 1}"
        process = self._spawn(name, ["api"], FLEETVM_API__PORT=str(port))
        wait_healthy(url, process, self.root / f"{name}.log")
        self.apis.append(process)
        self.urls.append(url)
        return url

    def crash_api(self, index: int = 0) -> None:
        self.apis[index].send_signal(signal.SIGKILL)
        self.apis[index].wait()

    def restart_api(self, index: int = 0) -> None:
        port = self.urls[index].rsplit(":", 1)[1]
        process = self._spawn(f"api-{index + 1}", ["api"], FLEETVM_API__PORT=port)
        wait_healthy(self.urls[index], process, self.root / f"api-{index + 1}.log")
        self.apis[index] = process

    def log(self, name: str, whole: bool = False) -> str:
        """The log of a worker or API node; its last 4,000 characters by default."""
        path = self.root / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text if whole else text[-4000:]

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

    def create_user(self, name: str, admin: bool = False) -> str:
        """Create a user and return a new API key of theirs."""
        extra = ["--admin"] if admin else []
        self.cli("users", "create", name, "--password", "pw-secret-1", *extra)
        return self.cli("keys", "create", name)

    def client(self, key: str, api: int = 0) -> httpx.Client:
        return httpx.Client(
            base_url=self.urls[api], headers={"X-API-Key": key}, timeout=60
        )

    def query(self, sql: str, **params: object) -> list[tuple]:
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params)]

    def query_commit(self, sql: str, **params: object) -> None:
        with self.engine.begin() as connection:
            connection.execute(text(sql), params)

    def settings(self) -> Settings:
        """Settings that reach this cluster's database and broker from a test."""
        return Settings(
            database={"url": self.database_url, "pool_size": 2},
            broker={"url": self.broker_url},
        )

    def owner_of(self, vm_id: str) -> str:
        return self.query("SELECT worker_id FROM vms WHERE id = :id", id=vm_id)[0][0]

    def close(self) -> None:
        for process in self.apis:
            stop_process(process)
        for process in self.workers.values():
            stop_process(process)
        # Stopped workers leave their VMs running for adoption; remove them.
        for worker_id in self.worker_ids:
            if self.data_dir(worker_id).exists():
                kill_leftover_vms(self.data_dir(worker_id))
        self.engine.dispose()
        keep = os.environ.get("CLUSTER_LOGS_DIR")
        if keep:
            for log in self.root.glob("*.log"):
                shutil.copy(log, Path(keep) / f"{self.run_id}-{log.name}")
        shutil.rmtree(self.root, ignore_errors=True)
