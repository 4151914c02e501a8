"""fleetvm measured end to end over HTTP, on a cluster or on `fleetvm serve`.

Every figure is taken the way a user sees it: from the request leaving the
client until the response arrives, or the VM's death is confirmed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.floors import elapsed_ms
from fleetvm.drivers.process import ProcessDriver
from fleetvm.drivers.process.procfs import _process_status
from fleetvm.settings import Settings
from tests.cluster.harness import Cluster
from tests.cluster.services import new_postgres_database
from tests.harness import Server

REDIS_URL = "redis://127.0.0.1:6379/0"
#: Lifetime of the VMs that make up the fleet: longer than any run.
FLEET_LIFETIME_SECONDS = 4 * 3600
#: Memory the host keeps free while the fleet grows.
MIN_AVAILABLE_MIB = 2048
#: Settings of the benchmark cluster that differ from the test cluster's.
CLUSTER_SETTINGS = {
    # 1,000 idle VMs on three workers, with room for the ones being measured.
    "FLEETVM_MULTINODE__CAPACITY": "500",
    "FLEETVM_MULTINODE__WORKER_CONCURRENCY": "32",
    # One benchmark user runs every command, from many threads at once.
    "FLEETVM_MULTINODE__MAX_COMMANDS_PER_USER": "64",
    "FLEETVM_MULTINODE__HEARTBEAT_SECONDS": "2",
    "FLEETVM_MULTINODE__DEAD_AFTER_SECONDS": "15",
    "FLEETVM_DATABASE__POOL_SIZE": "10",
    "FLEETVM_KILL__WAIT_SECONDS": "15",
}


class Target:
    """A running fleetvm, embedded or cluster, driven through its HTTP API."""

    mode: str
    url: str
    key: str

    def __init__(self) -> None:
        self._local = threading.local()
        self.fleet: list[str] = []

    def client(self) -> httpx.Client:
        """Return this thread's kept-alive client."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(
                base_url=self.url, headers={"X-API-Key": self.key}, timeout=120
            )
            self._local.client = client
        return client

    def drivers(self) -> list[ProcessDriver]:
        raise NotImplementedError

    def worker_pids(self) -> dict[str, int]:
        raise NotImplementedError

    # Operations, each returning milliseconds.

    def create_session(self, lifetime: int = FLEET_LIFETIME_SECONDS) -> str:
        response = self.client().post(
            "/v1/sessions/session", json={"vm_lifetime_seconds": lifetime}
        )
        response.raise_for_status()
        return response.json()["session_id"]

    def execute(self, session_id: str, code: str = "print(1)") -> dict:
        response = self.client().post(
            "/execute", json={"session_id": session_id, "command": code}
        )
        response.raise_for_status()
        result = response.json()
        if code == "print(1)" and result["stdout"] != "1\n":
            raise RuntimeError(f"print(1) returned {result}")
        return result

    def cold_start(
        self, lifetime: int = FLEET_LIFETIME_SECONDS
    ) -> tuple[float, str, str]:
        """Create a session and run print(1) in it; return (ms, session, VM)."""
        started = time.perf_counter()
        session_id = self.create_session(lifetime)
        vm_id = self.execute(session_id)["vm_id"]
        return elapsed_ms(started), session_id, vm_id

    def warm_execute(self, session_id: str) -> float:
        started = time.perf_counter()
        self.execute(session_id)
        return elapsed_ms(started)

    def kill(self, session_id: str, vm_id: str) -> float:
        """POST /kill, then confirm that none of the VM's processes runs; ms.

        The VM's processes are looked up before the clock starts, because a
        look-up walks /proc; the check after the response only polls those PIDs.
        """
        pids = self.vm_pids(vm_id)
        if not pids:
            raise RuntimeError(f"VM {vm_id} has no processes before its kill")
        started = time.perf_counter()
        response = self.client().post("/kill", json={"session_id": session_id})
        response.raise_for_status()
        body = response.json()
        if body["outcome"] != "killed":
            raise RuntimeError(f"kill of {session_id} returned {body}")
        while any(_running(pid) for pid in pids):
            if elapsed_ms(started) > 30_000:
                raise RuntimeError(f"VM {vm_id} processes {pids} outlived their kill")
            time.sleep(0.0002)
        return elapsed_ms(started)

    def vm_pids(self, vm_id: str) -> list[int]:
        for driver in self.drivers():
            if (driver._vms_dir / vm_id).exists():
                return driver.vm_processes(vm_id)
        return []

    def live_vms(self) -> set[str]:
        """Return the ids of the VMs whose directories exist on the workers."""
        return {vm_id for driver in self.drivers() for vm_id in driver.list_vms()}

    def grow_fleet(self, size: int, progress: Callable[[int], None]) -> int:
        """Start idle VMs until ``size`` of them belong to the fleet.

        Stops early when the host has less than MIN_AVAILABLE_MIB of memory
        left, so that the OOM killer ends no server. Returns the fleet's size.
        """
        missing = size - len(self.fleet)
        if missing <= 0:
            return len(self.fleet)
        low_memory = threading.Event()

        def start_one(_: int) -> None:
            if low_memory.is_set() or available_mib() < MIN_AVAILABLE_MIB:
                low_memory.set()
                return
            _, session_id, vm_id = self.cold_start()
            self.fleet.append(session_id)
            progress(1)

        with ThreadPoolExecutor(6) as pool:
            for _ in pool.map(start_one, range(missing)):
                pass
        return len(self.fleet)

    def shrink_fleet(self, size: int, progress: Callable[[int], None]) -> None:
        """Kill fleet VMs until ``size`` are left."""
        doomed, self.fleet = self.fleet[size:], self.fleet[:size]

        def kill_one(session_id: str) -> None:
            self.client().post("/kill", json={"session_id": session_id})
            progress(1)

        with ThreadPoolExecutor(8) as pool:
            for _ in pool.map(kill_one, doomed):
                pass


def available_mib() -> int:
    """Return the host's MemAvailable in MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def _running(pid: int) -> bool:
    """Return whether pid runs and is not a zombie."""
    status = _process_status(pid)
    return status is not None and status[0] != "Z"


class ClusterTarget(Target):
    """Three workers and one API node on PostgreSQL and Redis."""

    mode = "cluster"

    def __init__(self, log_dir: Path, workers: int = 3) -> None:
        super().__init__()
        self._database = new_postgres_database("fleetvm_bench")
        self.database_url = self._database.__enter__()
        self.cluster = Cluster(self.database_url, REDIS_URL, workers=workers)
        self.cluster.env.update(CLUSTER_SETTINGS)
        self.log_dir = log_dir
        self._drivers: list[ProcessDriver] | None = None

    def __enter__(self) -> ClusterTarget:
        try:
            self.cluster.start(apis=1)
            self.url = self.cluster.urls[0]
            self.key = self.cluster.create_user("bench", admin=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.environ["CLUSTER_LOGS_DIR"] = str(self.log_dir)
        try:
            self.cluster.close()
        finally:
            self._database.__exit__(None, None, None)

    def drivers(self) -> list[ProcessDriver]:
        if self._drivers is None:
            self._drivers = [
                ProcessDriver(Settings(data_dir=self.cluster.data_dir(worker_id)))
                for worker_id in self.cluster.worker_ids
            ]
        return self._drivers

    def worker_pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.cluster.workers.items()}

    def api_pids(self) -> list[int]:
        return [process.pid for process in self.cluster.apis]

    def expiry_lateness(self, count: int, lifetime: int = 2) -> list[float]:
        """Start ``count`` VMs that expire soon; return ms from expires_at to death.

        Death is the VM's ``killed_at``, which its worker writes after the
        driver confirmed that none of its processes runs.
        """
        vms = []
        for _ in range(count):
            _, session_id, vm_id = self.cold_start(lifetime)
            vms.append(vm_id)
        deadline = time.monotonic() + lifetime + 60
        while time.monotonic() < deadline:
            rows = self.cluster.query(
                "SELECT extract(epoch FROM killed_at - expires_at) * 1000 FROM vms "
                "WHERE id = ANY(:ids) AND killed_at IS NOT NULL AND kill_reason = "
                "'expiry'",
                ids=vms,
            )
            if len(rows) == count:
                return [float(row[0]) for row in rows]
            time.sleep(0.2)
        raise RuntimeError(f"{count - len(rows)} of {count} VMs did not expire")

    def store_sessions(self, total: int) -> int:
        """Add ended sessions, each with one killed VM, until ``total`` are stored.

        Rows are written with SQL, as a long-running fleet would have left
        them; returns how many sessions the database then holds.
        """
        stored = self.cluster.query("SELECT count(*) FROM sessions")[0][0]
        missing = total - stored
        if missing > 0:
            user_id = self.cluster.query(
                "SELECT id FROM users WHERE username = 'bench'"
            )[0][0]
            workers = list(self.cluster.worker_ids)
            self.cluster.query_commit(
                "INSERT INTO sessions (id, user_id, vm_lifetime_seconds, memory_mb, "
                "vcpu_count, metadata, env, created_at, current_vm_id) "
                "SELECT gen_random_uuid()::text, :user_id, 300, 512, 1, '{}', '{}', "
                "now() - interval '1 day', NULL FROM generate_series(1, :missing)",
                user_id=user_id,
                missing=missing,
            )
            self.cluster.query_commit(
                "INSERT INTO vms (id, session_id, worker_id, status, created_at, "
                "started_at, expires_at, killed_at, kill_reason, isolation) "
                "SELECT 'vm-' || substr(md5(s.id), 1, 16), s.id, "
                "(CAST(:workers AS text[]))[1 + (row_number() OVER () % :count)], "
                "'killed', s.created_at, "
                "s.created_at, s.created_at + interval '300 s', "
                "s.created_at + interval '10 s', 'user', 'bubblewrap' "
                "FROM sessions s WHERE s.current_vm_id IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM vms v WHERE v.session_id = s.id)",
                workers=workers,
                count=len(workers),
            )
            self.cluster.query_commit("ANALYZE")
        return self.cluster.query("SELECT count(*) FROM sessions")[0][0]


class EmbeddedTarget(Target):
    """`fleetvm serve`: the API, one worker and the embedded broker and database."""

    mode = "embedded"

    def __init__(self) -> None:
        super().__init__()
        self.server = Server(FLEETVM_MULTINODE__MAX_COMMANDS_PER_USER="64")
        self._drivers: list[ProcessDriver] | None = None

    def __enter__(self) -> EmbeddedTarget:
        try:
            self.server.start()
        except BaseException:
            self.server.cleanup()
            raise
        self.url = self.server.url
        self.key = self.server.admin_key
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.cleanup()

    def drivers(self) -> list[ProcessDriver]:
        if self._drivers is None:
            self._drivers = [ProcessDriver(Settings(data_dir=self.server.data_dir))]
        return self._drivers


def memory_kib(pids: list[int]) -> dict[str, int]:
    """Sum the proportional (Pss) and private memory of processes, in KiB."""
    totals = {"pss": 0, "private": 0, "rss": 0}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            if name == "Pss":
                totals["pss"] += int(rest.split()[0])
            elif name in ("Private_Clean", "Private_Dirty"):
                totals["private"] += int(rest.split()[0])
            elif name == "Rss":
                totals["rss"] += int(rest.split()[0])
    return totals


def vm_process_pids(vm_ids: set[str]) -> list[int]:
    """Return the PIDs of the given VMs' processes, in one walk of /proc.

    A VM's processes have FLEETVM_VM_ID=<its id> in their environment.
    """
    entries = {f"FLEETVM_VM_ID={vm_id}".encode() for vm_id in vm_ids}
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as file:
                environment = file.read().split(b"\0")
        except OSError:
            continue
        if not entries.isdisjoint(environment):
            pids.append(int(name))
    return pids
