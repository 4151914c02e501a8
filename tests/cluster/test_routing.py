"""Every VM operation reaches the VM's owner worker through its queue, and
operators can see the workers and every kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.cluster.harness import Cluster
from tests.conftest import new_session, run, wait_for_status
from tests.harness import fleetvm_command, vm_processes


def live_session(client: httpx.Client) -> tuple[str, str]:
    session_id = new_session(client)
    return session_id, run(client, session_id, "print('up')")["vm_id"]


def test_sessions_spread_over_workers_and_owner_kills(
    cluster: Cluster, alice: httpx.Client
) -> None:
    vms = dict(live_session(alice) for _ in range(6))
    owners = {cluster.owner_of(vm_id) for vm_id in vms.values()}
    assert owners == set(cluster.worker_ids)

    for session_id, vm_id in vms.items():
        owner = cluster.owner_of(vm_id)
        assert vm_processes(vm_id)
        assert (cluster.data_dir(owner) / "vms" / vm_id).exists()
        answer = alice.post("/kill", json={"session_id": session_id})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outcome"] == "killed"
        assert answer.json()["worker_id"] == owner
        assert vm_processes(vm_id) == []
        assert not (cluster.data_dir(owner) / "vms" / vm_id).exists()


def test_state_files_and_kill_through_either_api(
    cluster: Cluster, keys: dict[str, str]
) -> None:
    with (
        cluster.client(keys["alice"], 0) as one,
        cluster.client(keys["alice"], 1) as two,
    ):
        session_id = new_session(one)
        run(one, session_id, "x = 41")
        assert run(two, session_id, "print(x + 1)")["stdout"] == "42\n"
        uploaded = two.post(
            "/upload",
            data={"session_id": session_id, "remote_path": "/tmp/a.txt"},
            files={"file": ("a.txt", b"across nodes")},
        )
        assert uploaded.status_code == 200, uploaded.text
        printed = run(one, session_id, "print(open('/tmp/a.txt').read())")
        assert printed["stdout"] == "across nodes\n"
        # Only the first execute starts the VM; later ones go straight to it.
        owner_log = cluster.log(cluster.owner_of(printed["vm_id"]), whole=True)
        assert owner_log.count(f"VM {printed['vm_id']} started") == 1
        spawns = [
            line
            for line in owner_log.splitlines()
            if "fleetvm.spawn_vm[" in line and "received" in line
        ]
        assert len(spawns) == owner_log.count(" started in "), spawns
        assert two.post("/kill", json={"session_id": session_id}).json()["outcome"] == (
            "killed"
        )


def test_ten_concurrent_kills_end_the_session_once(
    cluster: Cluster, keys: dict[str, str]
) -> None:
    with cluster.client(keys["alice"]) as client:
        session_id, vm_id = live_session(client)

    def kill(index: int) -> httpx.Response:
        with cluster.client(keys["alice"], api=index % 2) as client:
            return client.post("/kill", json={"session_id": session_id})

    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(kill, range(10)))

    assert [r.status_code for r in responses] == [200] * 10
    outcomes = [r.json()["outcome"] for r in responses]
    assert outcomes.count("killed") == 1, outcomes
    assert outcomes.count("already_dead") == 9, outcomes
    assert vm_processes(vm_id) == []
    owner_log = cluster.log(cluster.owner_of(vm_id), whole=True)
    assert owner_log.count(f"VM {vm_id} killed") == 1
    rows = cluster.query(
        "SELECT outcome, count(*) FROM kill_records WHERE vm_id = :id GROUP BY 1",
        id=vm_id,
    )
    assert dict(rows).get("killed") == 1
    assert "pending" not in dict(rows)


def test_other_user_cannot_kill(
    cluster: Cluster, alice: httpx.Client, bob: httpx.Client
) -> None:
    session_id, vm_id = live_session(alice)

    refused = bob.post("/kill", json={"session_id": session_id})

    assert refused.status_code == 403
    assert "detail" in refused.json()
    assert vm_processes(vm_id)
    assert run(alice, session_id, "print('still here')")["stdout"] == "still here\n"
    assert (
        cluster.query("SELECT count(*) FROM kill_records WHERE vm_id = :id", id=vm_id)[
            0
        ][0]
        == 0
    )
    alice.post("/kill", json={"session_id": session_id})


def test_admin_reads_kill_records(
    cluster: Cluster, alice: httpx.Client, admin: httpx.Client
) -> None:
    session_id, vm_id = live_session(alice)
    alice.post("/kill", json={"session_id": session_id})

    refused = alice.get("/v1/kills", params={"session_id": session_id})
    records = admin.get("/v1/kills", params={"session_id": session_id})

    assert refused.status_code == 403
    assert records.status_code == 200, records.text
    [record] = records.json()
    assert record["vm_id"] == vm_id
    assert record["requested_by"] == "alice"
    assert record["reason"] == "user"
    assert record["worker_id"] == cluster.owner_of(vm_id)
    assert record["redispatches"] == 0
    assert record["outcome"] == "killed"
    assert record["latency_ms"] > 0
    assert admin.get("/v1/kills", params={"session_id": "nope"}).status_code == 400


def test_workers_listed_with_state_and_counts(
    cluster: Cluster, alice: httpx.Client, admin: httpx.Client
) -> None:
    session_id, vm_id = live_session(alice)
    owner = cluster.owner_of(vm_id)

    assert alice.get("/v1/workers").status_code == 403
    workers = {w["worker_id"]: w for w in admin.get("/v1/workers").json()}
    listed = {w["worker_id"]: w for w in json.loads(cluster.cli("workers", "--json"))}

    alice.post("/kill", json={"session_id": session_id})
    assert set(cluster.worker_ids) <= set(workers)
    for worker_id in cluster.worker_ids:
        assert workers[worker_id]["state"] == "up"
        assert workers[worker_id]["queue"] == f"vm_queue_{worker_id}"
        assert workers[worker_id]["heartbeat_age_seconds"] < 3
        assert listed[worker_id]["state"] == "up"
    assert workers[owner]["active_vms"] >= 1
    table = cluster.cli("workers")
    assert table.splitlines()[0].split()[:2] == ["WORKER", "STATE"]
    assert all(worker_id in table for worker_id in cluster.worker_ids)


def test_dead_worker_kill_pending_at_once_then_done(
    cluster: Cluster, alice: httpx.Client, admin: httpx.Client
) -> None:
    session_id, vm_id = live_session(alice)
    owner = cluster.owner_of(vm_id)
    cluster.crash_worker(owner)
    try:
        _wait_for_state(admin, owner, "dead")
        refused = alice.post(
            "/execute", json={"session_id": session_id, "command": "print(1)"}
        )
        assert refused.status_code == 503
        assert refused.json()["code"] == "worker_down"

        started = time.monotonic()
        pending = alice.post("/kill", json={"session_id": session_id})
        waited = time.monotonic() - started
        assert pending.status_code == 200
        assert pending.json()["outcome"] == "kill_pending"
        assert "down" in pending.json()["message"]
        assert waited < 2, "a kill for a dead worker should not wait for an answer"
        assert vm_processes(vm_id)
        other = new_session(alice)
        assert cluster.owner_of(run(alice, other, "print(1)")["vm_id"]) != owner
    finally:
        cluster.restart_worker(owner)

    # The worker marks the VM killed just after its processes are gone.
    status = wait_for_status(alice, session_id, "killed")
    assert status["vm_status"] == "killed"
    assert vm_processes(vm_id) == []
    alice.post("/kill", json={"session_id": other})


def test_execute_async_result_read_from_another_api(
    cluster: Cluster, keys: dict[str, str]
) -> None:
    with (
        cluster.client(keys["alice"], 0) as one,
        cluster.client(keys["alice"], 1) as two,
    ):
        session_id = new_session(one)
        sent = one.post(
            "/execute_async",
            json={"session_id": session_id, "command": "print(sum(range(10)))"},
        )
        assert sent.status_code == 200, sent.text
        task_id = sent.json()["task_id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            result = two.get(f"/v1/executions/{task_id}").json()
            if result["is_complete"]:
                break
            time.sleep(0.05)
        with cluster.client(keys["bob"]) as bob:
            bob_reads = bob.get(f"/v1/executions/{task_id}")
        two.post("/kill", json={"session_id": session_id})

    assert result["status"] == "completed"
    assert result["serialized_stdout"] == "45\n"
    assert result["cpu_time"] is not None
    assert result["worker_id"] == cluster.owner_of(result["vm_id"])
    assert bob_reads.status_code == 403


def test_retired_worker_vms_move_on(
    cluster: Cluster, alice: httpx.Client, admin: httpx.Client
) -> None:
    session_id, vm_id = live_session(alice)
    owner = cluster.owner_of(vm_id)
    with pytest.raises(RuntimeError, match="is up"):
        cluster.cli("workers", "retire", owner)
    cluster.crash_worker(owner)
    try:
        _wait_for_state(admin, owner, "dead")
        pending = alice.post("/kill", json={"session_id": session_id}).json()
        assert pending["outcome"] == "kill_pending"

        printed = cluster.cli("workers", "retire", owner)

        assert "1 VMs marked lost" in printed
        [(status, reason)] = cluster.query(
            "SELECT status, kill_reason FROM vms WHERE id = :id", id=vm_id
        )
        assert (status, reason) == ("lost", "worker_lost")
        [record] = admin.get("/v1/kills", params={"vm_id": vm_id}).json()
        assert record["outcome"] == "worker_lost"
        _wait_for_state(admin, owner, "retired")
        moved = run(alice, session_id, "print('elsewhere')")
        assert moved["vm_id"] != vm_id
        assert cluster.owner_of(moved["vm_id"]) != owner
    finally:
        cluster.restart_worker(owner)

    # The old host's VM is an orphan now: its worker removes it while it
    # reconciles, just after registering.
    deadline = time.monotonic() + 30
    while vm_processes(vm_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vm_processes(vm_id) == []
    alice.post("/kill", json={"session_id": session_id})


def _wait_for_state(admin: httpx.Client, worker_id: str, state: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = {w["worker_id"]: w["state"] for w in admin.get("/v1/workers").json()}
        if states[worker_id] == state:
            return
        time.sleep(0.2)
    raise AssertionError(f"worker {worker_id} never became {state}: {states}")


def test_concurrent_requests_all_get_answers(
    cluster: Cluster, keys: dict[str, str]
) -> None:
    def call(path: str, body: dict) -> httpx.Response:
        with cluster.client(keys["alice"]) as client:
            return client.post(path, json=body)

    with cluster.client(keys["alice"]) as client:
        sessions = [new_session(client) for _ in range(16)]
    for _ in range(2):
        with ThreadPoolExecutor(max_workers=16) as pool:
            executes = list(
                pool.map(
                    lambda s: call("/execute", {"session_id": s, "command": "1"}),
                    sessions,
                )
            )
            kills = list(pool.map(lambda s: call("/kill", {"session_id": s}), sessions))

        assert [r.status_code for r in executes] == [200] * 16
        assert [r.json()["outcome"] for r in kills] == ["killed"] * 16


def test_second_worker_with_live_id_rejected(
    cluster: Cluster, alice: httpx.Client
) -> None:
    session_id, vm_id = live_session(alice)
    owner = cluster.owner_of(vm_id)
    other_dir = cluster.root / f"{owner}-copy"

    result = subprocess.run(
        fleetvm_command("worker", "--worker-id", owner),
        env={**cluster.env, "FLEETVM_DATA_DIR": str(other_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert f"worker id {owner!r} is in use by a live worker" in result.stderr
    assert vm_processes(vm_id)
    assert run(alice, session_id, "print('unharmed')")["stdout"] == "unharmed\n"
    alice.post("/kill", json={"session_id": session_id})


def test_retired_paused_worker_stops_itself(
    cluster: Cluster, alice: httpx.Client, admin: httpx.Client
) -> None:
    session_id, vm_id = live_session(alice)
    owner = cluster.owner_of(vm_id)
    process = cluster.workers[owner]

    os.kill(process.pid, signal.SIGSTOP)
    try:
        _wait_for_state(admin, owner, "dead")
        cluster.cli("workers", "retire", owner)
    finally:
        os.kill(process.pid, signal.SIGCONT)
    try:
        process.wait(timeout=30)
        _wait_for_state(admin, owner, "retired")
        assert vm_processes(vm_id) == []
    finally:
        cluster.restart_worker(owner)
    alice.post("/kill", json={"session_id": session_id})


def test_kill_during_first_spawn_reports_killed(
    cluster: Cluster, keys: dict[str, str]
) -> None:
    with cluster.client(keys["alice"]) as client:
        session_id = new_session(client)

    def first_execute() -> httpx.Response:
        with cluster.client(keys["alice"]) as client:
            body = {"session_id": session_id, "command": "print(1)"}
            return client.post("/execute", json=body)

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(first_execute)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not cluster.query(
            "SELECT id FROM vms WHERE session_id = :id", id=session_id
        ):
            time.sleep(0.005)
        with cluster.client(keys["alice"]) as client:
            killed = client.post("/kill", json={"session_id": session_id})
        executed = future.result()

    assert killed.status_code == 200, killed.text
    assert killed.json()["outcome"] == "killed"
    assert executed.status_code in (200, 409), executed.text
    assert vm_processes(killed.json()["vm_id"]) == []


@pytest.mark.parametrize(
    "path, body",
    [
        pytest.param("/kill", {"session_id": "0000\x00"}, id="kill-nul-id"),
        pytest.param(
            "/v1/sessions/session", {"metadata": {"k": "a\x00b"}}, id="nul-metadata"
        ),
        pytest.param("/v1/api-keys/", {"name": "n" * 100 + "\x00"}, id="nul-key-name"),
    ],
)
def test_nul_characters_never_5xx(alice: httpx.Client, path: str, body: dict) -> None:
    response = alice.post(path, json=body)

    assert response.status_code < 500, response.text


def test_token_nul_username_is_401(cluster: Cluster) -> None:
    response = httpx.post(
        f"{cluster.urls[0]}/token", data={"username": "al\x00ice", "password": "x" * 9}
    )

    assert response.status_code == 401
