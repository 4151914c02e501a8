"""POST /kill: every status code of its contract, against a real `fleetvm serve`."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import new_session, run
from tests.harness import Server, processes_with_cmdline, vm_processes


def kill_records(server: Server) -> int:
    return server.query("SELECT count(*) FROM kill_records")[0][0]


def live_session(client: httpx.Client) -> tuple[str, str]:
    session_id = new_session(client)
    vm_id = run(client, session_id, "print('up')")["vm_id"]
    return session_id, vm_id


def test_kill_without_credentials_is_401(server: Server, alice: httpx.Client) -> None:
    session_id, vm_id = live_session(alice)

    response = httpx.post(f"{server.url}/kill", json={"session_id": session_id})

    assert response.status_code == 401
    assert "detail" in response.json()
    assert response.headers["www-authenticate"] == "Bearer"
    assert vm_processes(vm_id)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-API-Key": "fvm_not-a-real-key"}, id="unknown-api-key"),
        pytest.param({"X-API-Key": ""}, id="empty-api-key"),
        pytest.param({"Authorization": "Bearer not.a.jwt"}, id="bad-bearer"),
        pytest.param({"Authorization": "Basic YTpi"}, id="basic-auth"),
    ],
)
def test_kill_bad_credentials_is_401(server: Server, headers: dict) -> None:
    before = kill_records(server)

    response = httpx.post(
        f"{server.url}/kill", json={"session_id": str(uuid.uuid4())}, headers=headers
    )

    assert response.status_code == 401
    assert kill_records(server) == before


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="missing-field"),
        pytest.param({"session": "x"}, id="wrong-field-name"),
        pytest.param({"session_id": None}, id="null"),
        pytest.param({"session_id": 12345}, id="integer"),
        pytest.param({"session_id": ["a"]}, id="list"),
        pytest.param({"session_id": {"id": "a"}}, id="object"),
        pytest.param([], id="body-is-list"),
        pytest.param("session", id="body-is-string"),
    ],
)
def test_kill_schema_violation_is_422(
    server: Server, alice: httpx.Client, body: object
) -> None:
    before = kill_records(server)

    response = alice.post("/kill", json=body)

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, list)
    assert {"loc", "msg", "type"} <= set(detail[0])
    assert kill_records(server) == before


def test_kill_malformed_json_is_422(server: Server, alice: httpx.Client) -> None:
    response = alice.post(
        "/kill", content=b"{not json", headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert isinstance(response.json()["detail"], list)


@pytest.mark.parametrize(
    "session_id",
    [
        pytest.param("", id="empty"),
        pytest.param("../x", id="dot-dot"),
        pytest.param("%2F", id="encoded-slash"),
        pytest.param("\x00", id="nul"),
        pytest.param("a" * 10240, id="10kb"),
        pytest.param("not-a-uuid", id="word"),
        pytest.param("1234", id="digits"),
    ],
)
def test_kill_invalid_session_id_is_400(
    server: Server, alice: httpx.Client, session_id: str
) -> None:
    before = kill_records(server)

    response = alice.post("/kill", json={"session_id": session_id})

    assert response.status_code == 400
    assert "Invalid session_id" in response.json()["detail"]
    assert len(response.text) < 1000
    assert kill_records(server) == before


def test_kill_unknown_session_is_404(server: Server, alice: httpx.Client) -> None:
    missing = str(uuid.uuid4())

    response = alice.post("/kill", json={"session_id": missing})

    assert response.status_code == 404
    assert missing in response.json()["detail"]
    assert "not found" in response.json()["detail"]


def test_kill_session_without_vm_is_404(server: Server, alice: httpx.Client) -> None:
    session_id = new_session(alice)

    response = alice.post("/kill", json={"session_id": session_id})

    assert response.status_code == 404
    assert "no VM assigned" in response.json()["detail"]


def test_kill_other_users_session_is_403(
    server: Server, alice: httpx.Client, bob: httpx.Client
) -> None:
    session_id, vm_id = live_session(alice)
    before = kill_records(server)

    response = bob.post("/kill", json={"session_id": session_id})

    assert response.status_code == 403
    assert "another user" in response.json()["detail"]
    assert kill_records(server) == before
    assert run(alice, session_id, "print(6 * 7)")["stdout"] == "42\n"
    assert vm_processes(vm_id)


def test_kill_ends_vm_processes(server: Server, alice: httpx.Client) -> None:
    session_id = new_session(alice)
    run(
        alice, session_id, "setsid sleep 987651 & nohup sleep 987652 &", language="bash"
    )
    vm_id = run(alice, session_id, "print(1)")["vm_id"]
    assert processes_with_cmdline("sleep 987651")

    response = alice.post("/kill", json={"session_id": session_id})

    assert response.status_code == 200
    body = response.json()
    assert body["outcome"] == "killed"
    assert body["vm_id"] == vm_id
    assert body["session_id"] == session_id
    assert body["worker_id"] == "local"
    assert vm_id in body["message"]
    assert processes_with_cmdline("sleep 987651") == []
    assert processes_with_cmdline("sleep 987652") == []
    assert vm_processes(vm_id) == []
    status = alice.get(f"/v1/sessions/status/{session_id}").json()
    assert status["vm_status"] == "killed"
    assert status["vm_alive"] is False


def test_kill_twice_reports_already_dead(server: Server, alice: httpx.Client) -> None:
    session_id, vm_id = live_session(alice)

    first = alice.post("/kill", json={"session_id": session_id})
    second = alice.post("/kill", json={"session_id": session_id})

    assert first.status_code == 200
    assert first.json()["outcome"] == "killed"
    assert second.status_code == 200
    assert second.json()["outcome"] == "already_dead"
    assert second.json()["vm_id"] == vm_id
    assert "already dead" in second.json()["message"]


def test_kill_concurrent_kills_act_once(server: Server, alice_key: str) -> None:
    with server.client(alice_key) as client:
        session_id, vm_id = live_session(client)

    def kill(_: int) -> httpx.Response:
        with server.client(alice_key) as client:
            return client.post("/kill", json={"session_id": session_id})

    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(kill, range(10)))

    assert [r.status_code for r in responses] == [200] * 10
    outcomes = sorted(r.json()["outcome"] for r in responses)
    assert outcomes.count("killed") == 1
    assert outcomes.count("already_dead") == 9
    assert {r.json()["vm_id"] for r in responses} == {vm_id}
    killed_rows = server.query(
        "SELECT count(*) FROM kill_records WHERE vm_id = ? AND outcome = 'killed'",
        vm_id,
    )
    assert killed_rows[0][0] == 1
    assert vm_processes(vm_id) == []


def test_kill_with_bearer_token(server: Server, alice: httpx.Client) -> None:
    session_id, _ = live_session(alice)
    token = httpx.post(
        f"{server.url}/token", data={"username": "alice", "password": "pw-secret-1"}
    ).json()["access_token"]

    response = httpx.post(
        f"{server.url}/kill",
        json={"session_id": session_id},
        headers={"Authorization": f"Bearer {token}"},
    )

    assert response.status_code == 200
    assert response.json()["outcome"] == "killed"


def test_kill_by_admin_of_any_session(
    server: Server, alice: httpx.Client, admin: httpx.Client
) -> None:
    session_id, vm_id = live_session(alice)

    response = admin.post("/kill", json={"session_id": session_id})

    assert response.status_code == 200
    assert response.json()["outcome"] == "killed"
    reason = server.query("SELECT kill_reason FROM vms WHERE id = ?", vm_id)
    assert reason == [("admin",)]


def test_execute_after_kill_spawns_fresh_vm(alice: httpx.Client) -> None:
    session_id, first_vm = live_session(alice)
    run(alice, session_id, "x = 1")
    alice.post("/kill", json={"session_id": session_id})

    result = run(alice, session_id, "print('x' in globals())")

    assert result["vm_id"] != first_vm
    assert result["stdout"] == "False\n"


def test_kill_record_keeps_latency(server: Server, alice: httpx.Client) -> None:
    session_id, vm_id = live_session(alice)
    started = time.monotonic()

    alice.post("/kill", json={"session_id": session_id})

    elapsed_ms = (time.monotonic() - started) * 1000
    rows = server.query(
        "SELECT reason, worker_id, outcome, latency_ms FROM kill_records "
        "WHERE vm_id = ?",
        vm_id,
    )
    assert len(rows) == 1
    reason, worker_id, outcome, latency_ms = rows[0]
    assert (reason, worker_id, outcome) == ("user", "local", "killed")
    assert 0 < latency_ms <= elapsed_ms + 50
