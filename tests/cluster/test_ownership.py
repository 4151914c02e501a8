"""multinode.strict_kill_ownership: a kill task that reaches a worker other
than the VM's owner, on both settings, with the hops counted.

The wrong-worker case is produced for real: the test sends the kill task to
another worker's queue, or moves the VM's owner in the database while its
worker is paused with the task on its way.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import kombu.pools
import pytest

from fleetvm.celery_app import make_celery
from fleetvm.db.engine import Database
from fleetvm.db.models import KillReason, VmStatus
from fleetvm.db.vms import record_kill_intent
from fleetvm.dispatch import Dispatcher
from tests.cluster.harness import Cluster
from tests.conftest import new_session, run
from tests.harness import vm_processes


@pytest.fixture(scope="module")
def sender(cluster: Cluster) -> Iterator[tuple[Database, Dispatcher]]:
    yield from _sender(cluster)


@pytest.fixture(scope="module")
def lenient_sender(lenient_cluster: Cluster) -> Iterator[tuple[Database, Dispatcher]]:
    yield from _sender(lenient_cluster)


def _sender(cluster: Cluster) -> Iterator[tuple[Database, Dispatcher]]:
    settings = cluster.settings()
    database = Database(settings)
    app = make_celery(settings)
    dispatcher = Dispatcher(app, spawn_timeout=20)
    yield database, dispatcher
    dispatcher.close()
    # Celery's close() drops its connection pool without closing it.
    consumer = getattr(app.backend, "result_consumer", None)
    try:
        consumer.stop()
    except AttributeError:
        pass  # no backend consumer, or one that never started
    app.pool.force_close_all()
    # kombu keeps producer pools per connection URL for the whole process;
    # drop them so the next app on this broker opens new connections.
    kombu.pools.reset()
    app.close()
    database.dispose()


def send_kill(
    sender: tuple[Database, Dispatcher],
    vm_id: str,
    worker_id: str,
    redispatched: bool = False,
) -> tuple[int, dict]:
    """Record a kill intent as the API does, then send the task to ``worker_id``."""
    database, dispatcher = sender
    with database.session() as db:
        record_id = record_kill_intent(db, vm_id, [VmStatus.ACTIVE], KillReason.ADMIN)
    assert record_id is not None
    answer = dispatcher.kill(worker_id, vm_id, record_id, 20, redispatched)
    assert answer is not None, "the kill task got no answer"
    return record_id, answer


def record(cluster: Cluster, record_id: int) -> dict:
    [row] = cluster.query(
        "SELECT outcome, worker_id, redispatches FROM kill_records WHERE id = :id",
        id=record_id,
    )
    return dict(zip(("outcome", "worker_id", "redispatches"), row, strict=True))


def vm_status(cluster: Cluster, vm_id: str) -> str:
    return cluster.query("SELECT status FROM vms WHERE id = :id", id=vm_id)[0][0]


def other_worker(cluster: Cluster, owner: str) -> str:
    return next(w for w in cluster.worker_ids if w != owner)


def live_vm(cluster: Cluster, key: str) -> tuple[str, str, str]:
    with cluster.client(key) as client:
        session_id = new_session(client)
        vm_id = run(client, session_id, "print('up')")["vm_id"]
    return session_id, vm_id, cluster.owner_of(vm_id)


def test_strict_wrong_worker_redispatches_once(
    cluster: Cluster, keys: dict[str, str], sender
) -> None:
    _, vm_id, owner = live_vm(cluster, keys["alice"])
    wrong = other_worker(cluster, owner)

    record_id, answer = send_kill(sender, vm_id, wrong)

    assert answer["outcome"] == "killed"
    assert answer["worker_id"] == owner
    assert record(cluster, record_id) == {
        "outcome": "killed",
        "worker_id": owner,
        "redispatches": 1,
    }
    assert vm_processes(vm_id) == []
    assert vm_status(cluster, vm_id) == "killed"
    assert f"kill of VM {vm_id} reached worker {wrong}" in cluster.log(
        wrong, whole=True
    )
    assert cluster.log(owner, whole=True).count(f"VM {vm_id} killed") == 1


def test_strict_redispatched_kill_on_wrong_worker_stops(
    cluster: Cluster, keys: dict[str, str], sender
) -> None:
    session_id, vm_id, owner = live_vm(cluster, keys["alice"])
    wrong = other_worker(cluster, owner)

    record_id, answer = send_kill(sender, vm_id, wrong, redispatched=True)

    assert answer["outcome"] == "failed_not_owner"
    assert answer["worker_id"] == wrong
    assert record(cluster, record_id) == {
        "outcome": "failed_not_owner",
        "worker_id": wrong,
        "redispatches": 0,
    }
    assert vm_processes(vm_id)
    assert vm_status(cluster, vm_id) == "active"
    with cluster.client(keys["alice"]) as client:
        killed = client.post("/kill", json={"session_id": session_id}).json()
    assert killed["outcome"] == "killed"
    assert killed["worker_id"] == owner


def test_lenient_kill_on_wrong_worker_leaves_vm(
    lenient_cluster: Cluster, keys_lenient: dict[str, str], lenient_sender
) -> None:
    session_id, vm_id, owner = live_vm(lenient_cluster, keys_lenient["alice"])
    wrong = other_worker(lenient_cluster, owner)

    record_id, answer = send_kill(lenient_sender, vm_id, wrong)

    assert answer["outcome"] == "failed_not_owner"
    assert record(lenient_cluster, record_id) == {
        "outcome": "failed_not_owner",
        "worker_id": wrong,
        "redispatches": 0,
    }
    assert vm_processes(vm_id)
    assert vm_status(lenient_cluster, vm_id) == "active"
    assert f"VM {vm_id} killed" not in lenient_cluster.log(wrong, whole=True)
    with lenient_cluster.client(keys_lenient["alice"]) as client:
        assert run(client, session_id, "print(2)")["stdout"] == "2\n"
        assert (
            client.post("/kill", json={"session_id": session_id}).json()["outcome"]
            == "killed"
        )


def test_lenient_api_reports_kill_that_did_not_happen(
    lenient_cluster: Cluster, keys_lenient: dict[str, str]
) -> None:
    cluster = lenient_cluster
    session_id, vm_id, owner = live_vm(cluster, keys_lenient["alice"])
    other = other_worker(cluster, owner)
    process = cluster.workers[owner]

    os.kill(process.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            with cluster.client(keys_lenient["alice"]) as client:
                future = pool.submit(
                    client.post, "/kill", json={"session_id": session_id}
                )
                _wait_for_kill_record(cluster, vm_id)
                cluster.query_commit(
                    "UPDATE vms SET worker_id = :w WHERE id = :id", w=other, id=vm_id
                )
                os.kill(process.pid, signal.SIGCONT)
                answer = future.result(timeout=30)
    finally:
        os.kill(process.pid, signal.SIGCONT)

    assert answer.status_code == 200
    body = answer.json()
    assert body["outcome"] == "failed_not_owner"
    assert body["worker_id"] == owner
    assert "did not happen" in body["message"]
    assert vm_processes(vm_id)
    cluster.query_commit(
        "UPDATE vms SET worker_id = :w WHERE id = :id", w=owner, id=vm_id
    )
    with cluster.client(keys_lenient["alice"]) as client:
        assert (
            client.post("/kill", json={"session_id": session_id}).json()["outcome"]
            == "killed"
        )
    assert vm_processes(vm_id) == []


def _wait_for_kill_record(cluster: Cluster, vm_id: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if cluster.query(
            "SELECT count(*) FROM kill_records WHERE vm_id = :id", id=vm_id
        )[0][0]:
            return
        time.sleep(0.02)
    raise AssertionError(f"no kill record for VM {vm_id}")


@pytest.fixture(scope="module")
def keys_lenient(lenient_cluster: Cluster) -> dict[str, str]:
    return {"alice": lenient_cluster.create_user("alice")}


def test_kill_task_run_twice_acts_once(
    cluster: Cluster, keys: dict[str, str], sender
) -> None:
    _, vm_id, owner = live_vm(cluster, keys["alice"])
    record_id, first = send_kill(sender, vm_id, owner)
    _, dispatcher = sender

    # The same task again, as a broker delivers it after a lost acknowledgement.
    second = dispatcher.kill(owner, vm_id, record_id, 20)

    assert first["outcome"] == "killed"
    assert second is not None
    assert second["outcome"] == "killed"
    assert record(cluster, record_id)["outcome"] == "killed"
    owner_log = cluster.log(owner, whole=True)
    assert owner_log.count(f"VM {vm_id} killed") == 1
    assert f"kill of VM {vm_id}: it is already killed, nothing to do" in owner_log
