"""Nothing accepted is lost when a part of the cluster dies: a worker killed
with SIGKILL after taking kill tasks, Redis or RabbitMQ restarted, an API
node killed, all in the middle of kills. Every VM ends killed exactly once
and no VM process is left behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from tests.cluster.harness import Cluster
from tests.cluster.services import postgres_database, require
from tests.conftest import new_session, run
from tests.harness import free_port, short_data_dir, stop_process, vm_processes

ENDED = ("killed", "expired", "failed", "lost")


def start_sessions(cluster: Cluster, key: str, count: int) -> dict[str, str]:
    """Start ``count`` sessions with a VM each; return session id -> VM id."""
    with cluster.client(key) as client:
        sessions = [new_session(client) for _ in range(count)]
        return {s: run(client, s, "print('up')")["vm_id"] for s in sessions}


def kill_all(
    cluster: Cluster, key: str, session_ids: list[str], api: int = 0
) -> list[httpx.Response | Exception]:
    """Send one kill per session at once; return each response or error."""

    def kill(session_id: str) -> httpx.Response | Exception:
        try:
            with cluster.client(key, api) as client:
                return client.post("/kill", json={"session_id": session_id})
        except httpx.HTTPError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=len(session_ids)) as pool:
        return list(pool.map(kill, session_ids))


def assert_no_server_errors(answers: list[httpx.Response | Exception]) -> None:
    for answer in answers:
        if isinstance(answer, httpx.Response):
            assert answer.status_code == 200, answer.text
            assert answer.json()["outcome"] in (
                "killed",
                "already_dead",
                "kill_pending",
            )


def assert_each_killed_once(cluster: Cluster, vm_ids: list[str]) -> None:
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        statuses = [_status(cluster, vm_id) for vm_id in vm_ids]
        pending = cluster.query(
            "SELECT count(*) FROM kill_records WHERE outcome = 'pending' "
            "AND vm_id = ANY(:ids)",
            ids=vm_ids,
        )[0][0]
        if all(s in ENDED for s in statuses) and not pending:
            break
        time.sleep(0.2)
    for vm_id in vm_ids:
        assert _status(cluster, vm_id) == "killed"
        assert vm_processes(vm_id) == []
        owner = cluster.owner_of(vm_id)
        assert cluster.log(owner, whole=True).count(f"VM {vm_id} killed") == 1
    assert pending == 0


def _status(cluster: Cluster, vm_id: str) -> str:
    return cluster.query("SELECT status FROM vms WHERE id = :id", id=vm_id)[0][0]


def test_worker_sigkilled_holding_kills(cluster: Cluster, keys: dict[str, str]) -> None:
    vms = start_sessions(cluster, keys["alice"], 6)
    victim = cluster.owner_of(next(iter(vms.values())))
    held = [s for s, vm_id in vms.items() if cluster.owner_of(vm_id) == victim]
    process = cluster.workers[victim]

    os.kill(process.pid, signal.SIGSTOP)
    answers = kill_all(cluster, keys["alice"], held)
    cluster.crash_worker(victim)
    assert all(vm_processes(vms[s]) for s in held)
    cluster.restart_worker(victim)
    answers += kill_all(cluster, keys["alice"], [s for s in vms if s not in held])

    assert_no_server_errors(answers)
    assert [a.json()["outcome"] for a in answers[: len(held)]] == [
        "kill_pending"
    ] * len(held)
    assert_each_killed_once(cluster, list(vms.values()))


def test_api_killed_during_kills(cluster: Cluster, keys: dict[str, str]) -> None:
    vms = start_sessions(cluster, keys["alice"], 6)

    # Paused workers keep the API waiting on every kill when it dies.
    with paused_workers(cluster), ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(kill_all, cluster, keys["alice"], list(vms))
        time.sleep(1)
        cluster.crash_api(0)
        answers = future.result()
    cluster.restart_api(0)
    assert all(isinstance(a, httpx.TransportError) for a in answers)
    # A client whose request died with the API sends it again.
    answers = kill_all(cluster, keys["alice"], list(vms))

    assert_no_server_errors(answers)
    assert_each_killed_once(cluster, list(vms.values()))


@contextmanager
def paused_workers(cluster: Cluster) -> Iterator[None]:
    """Stop every worker process with SIGSTOP, and let them go on at the end."""
    pids = [process.pid for process in cluster.workers.values()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def kill_across_restart(
    cluster: Cluster, key: str, session_ids: list[str], restart: Callable[[], None]
) -> list[httpx.Response | Exception]:
    """Send kills while the workers are paused, so their tasks wait in the
    broker, restart the broker under them, then let the workers go on."""
    with paused_workers(cluster), ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(kill_all, cluster, key, session_ids)
        time.sleep(1)
        restart()
        return future.result()


class PrivateRedis:
    """A Redis server of this test alone, so it can be killed and restarted."""

    def __init__(self) -> None:
        require("Redis")
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("no redis-server on PATH")
        self.port = free_port()
        self.dir = short_data_dir()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.dir),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private Redis did not start")

    def crash(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[tuple[Cluster, PrivateRedis, str]]:
    redis = PrivateRedis()
    redis.start()
    with postgres_database() as database_url:
        instance = Cluster(database_url, redis.url, workers=2)
        try:
            instance.start()
            yield instance, redis, instance.create_user("alice")
        finally:
            instance.close()
            redis.close()


def test_redis_restarted_during_kills(redis_cluster) -> None:
    cluster, redis, key = redis_cluster
    vms = start_sessions(cluster, key, 4)

    def restart() -> None:
        # This Redis keeps nothing on disk: the queued kill tasks are lost,
        # and only the kill intents in the database remain.
        redis.crash()
        time.sleep(1)
        redis.start()

    answers = kill_across_restart(cluster, key, list(vms), restart)

    assert_no_server_errors(answers)
    assert [a.json()["outcome"] for a in answers] == ["kill_pending"] * len(vms)
    assert_each_killed_once(cluster, list(vms.values()))
    assert len(start_sessions(cluster, key, 2)) == 2


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def rabbitmq_cluster() -> Iterator[tuple[Cluster, str]]:
    require("RabbitMQ")
    if shutil.which("rabbitmqctl") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("rabbitmqctl is missing; CI=true, so this fails")
        pytest.skip("rabbitmqctl is missing, so RabbitMQ cannot be restarted")
    from tests.cluster.services import RABBITMQ_URL

    with postgres_database() as database_url:
        instance = Cluster(database_url, RABBITMQ_URL, workers=2)
        try:
            instance.start()
            yield instance, instance.create_user("alice")
        finally:
            instance.close()


def test_rabbitmq_restarted_during_kills(rabbitmq_cluster) -> None:
    cluster, key = rabbitmq_cluster
    vms = start_sessions(cluster, key, 4)

    def restart() -> None:
        # Stops the broker inside its Erlang node: every connection drops
        # and only durable queues with their persistent messages remain.
        try:
            rabbitmqctl("stop_app")
            time.sleep(1)
        finally:
            rabbitmqctl("start_app")

    answers = kill_across_restart(cluster, key, list(vms), restart)

    assert_no_server_errors(answers)
    assert [a.json()["outcome"] for a in answers] == ["kill_pending"] * len(vms)
    assert_each_killed_once(cluster, list(vms.values()))
    assert len(start_sessions(cluster, key, 2)) == 2


def test_redis_down_while_waiting_is_503(redis_cluster) -> None:
    cluster, redis, key = redis_cluster
    [session_id] = start_sessions(cluster, key, 1)

    def execute() -> httpx.Response:
        with cluster.client(key) as client:
            body = {"session_id": session_id, "command": "print(3)", "timeout": 60}
            return client.post("/execute", json=body)

    # The worker is paused, so the API is waiting for the result when Redis
    # goes away, and long enough for Celery's result consumer to give up.
    with paused_workers(cluster), ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(execute)
        time.sleep(1)
        redis.crash()
        answer = future.result(timeout=120)
        redis.start()

    assert answer.status_code == 503, answer.text
    with cluster.client(key) as client:
        assert run(client, session_id, "print(4)")["stdout"] == "4\n"
