"""POST /execute_async and GET /v1/executions/{id} against a real `fleetvm serve`."""

from __future__ import annotations

import time
import uuid
from datetime import datetime

import httpx
import pytest
from instavm import InstaVM

from tests.conftest import new_session, run
from tests.harness import Server

PYTHON_BUSY_HALF_SECOND = (
    "import time\n"
    "start = time.process_time()\n"
    "while time.process_time() - start < 0.5:\n"
    "    pass\n"
)
# A fixed amount of work: 0.59 s of CPU time, measured with `time bash -c` on
# the host these tests were written on. Unlike a loop that watches the clock,
# it uses that much CPU time even when the host is busy.
BASH_BUSY_LOOP = "for ((i = 0; i < 500000; i++)); do :; done"


def submit(client: httpx.Client, session_id: str, code: str, **extra: object) -> dict:
    body = {"session_id": session_id, "command": code, **extra}
    response = client.post("/execute_async", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def wait_complete(client: httpx.Client, task_id: str, timeout: float = 60) -> dict:
    """Poll the execution until it is complete and return its last state."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/executions/{task_id}")
        assert response.status_code == 200, response.text
        execution = response.json()
        if execution["is_complete"] or time.monotonic() > deadline:
            return execution
        time.sleep(0.05)


def wait_running(client: httpx.Client, task_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        execution = client.get(f"/v1/executions/{task_id}").json()
        if execution["status"] != "queued" or time.monotonic() > deadline:
            return execution
        time.sleep(0.05)


@pytest.fixture
def session(alice: httpx.Client):
    session_id = new_session(alice)
    yield session_id
    alice.post("/kill", json={"session_id": session_id})


def test_execute_async_shares_namespace(alice: httpx.Client, session: str) -> None:
    run(alice, session, "x = 41")

    submitted = submit(alice, session, "print(x + 1)\ny = 'from async'")
    execution = wait_complete(alice, submitted["task_id"])
    after = run(alice, session, "print(y)")

    assert submitted["status"] == "queued"
    assert submitted["session_id"] == session
    assert execution["status"] == "completed"
    assert execution["is_complete"] is True
    assert execution["success"] is True
    assert execution["serialized_stdout"] == "42\n"
    assert execution["serialized_stderr"] == ""
    assert execution["exit_code"] == 0
    assert execution["error"] is None
    assert execution["vm_id"] == submitted["vm_id"] == after["vm_id"]
    assert after["stdout"] == "from async\n"


def test_execute_async_returns_before_command(
    alice: httpx.Client, session: str
) -> None:
    run(alice, session, "print('VM started')")

    started = time.monotonic()
    submitted = submit(alice, session, "sleep 2; echo done", language="bash")
    elapsed = time.monotonic() - started
    pending = alice.get(f"/v1/executions/{submitted['task_id']}").json()
    execution = wait_complete(alice, submitted["task_id"])

    assert elapsed < 1.5
    assert pending["is_complete"] is False
    assert pending["status"] in ("queued", "running")
    assert pending["serialized_stdout"] == ""
    assert execution["serialized_stdout"] == "done\n"
    assert execution["execution_time"] >= 2


def test_execute_async_first_use_spawns_vm(alice: httpx.Client, session: str) -> None:
    submitted = submit(alice, session, "print('fresh')")
    execution = wait_complete(alice, submitted["task_id"])
    status = alice.get(f"/v1/sessions/status/{session}").json()

    assert execution["serialized_stdout"] == "fresh\n"
    assert status["vm_id"] == submitted["vm_id"]
    assert status["vm_status"] == "active"


def test_execute_async_result_fields(alice: httpx.Client, session: str) -> None:
    submitted = submit(
        alice, session, "echo out; echo err >&2; exit 3", language="bash"
    )
    execution = wait_complete(alice, submitted["task_id"])

    assert execution["status"] == "completed"
    assert execution["success"] is False
    assert execution["exit_code"] == 3
    assert execution["timed_out"] is False
    assert execution["serialized_stdout"] == "out\n"
    assert execution["serialized_stderr"] == "err\n"
    assert execution["language"] == "bash"
    assert execution["cpu_time"] is not None
    created = datetime.fromisoformat(execution["created_at"])
    started = datetime.fromisoformat(execution["started_at"])
    completed = datetime.fromisoformat(execution["completed_at"])
    assert created <= started <= completed


def test_execute_async_timeout(alice: httpx.Client, session: str) -> None:
    submitted = submit(alice, session, "import time; time.sleep(30)", timeout=1)
    execution = wait_complete(alice, submitted["task_id"])

    assert execution["status"] == "completed"
    assert execution["timed_out"] is True
    assert execution["success"] is False
    assert execution["execution_time"] < 10


def test_execute_async_output_with_nul(alice: httpx.Client, session: str) -> None:
    submitted = submit(alice, session, "printf 'a\\0b'", language="bash")
    execution = wait_complete(alice, submitted["task_id"])

    assert execution["serialized_stdout"] == "a\x00b"


@pytest.mark.parametrize(
    ("language", "code"),
    [
        pytest.param("python", PYTHON_BUSY_HALF_SECOND, id="python"),
        pytest.param("bash", BASH_BUSY_LOOP, id="bash"),
    ],
)
def test_cpu_time_busy_loop(
    alice: httpx.Client, session: str, language: str, code: str
) -> None:
    sync = run(alice, session, code, language=language)
    submitted = submit(alice, session, code, language=language)
    execution = wait_complete(alice, submitted["task_id"])

    assert sync["cpu_time"] >= 0.2
    assert execution["cpu_time"] >= 0.2
    assert execution["cpu_time"] <= execution["execution_time"] + 0.1


@pytest.mark.parametrize(
    ("language", "code"),
    [
        pytest.param("python", "import time; time.sleep(0.5)", id="python"),
        pytest.param("bash", "sleep 0.5", id="bash"),
    ],
)
def test_cpu_time_sleep_near_zero(
    alice: httpx.Client, session: str, language: str, code: str
) -> None:
    sync = run(alice, session, code, language=language)
    submitted = submit(alice, session, code, language=language)
    execution = wait_complete(alice, submitted["task_id"])

    assert 0 <= sync["cpu_time"] < 0.15
    assert 0 <= execution["cpu_time"] < 0.15
    assert execution["execution_time"] >= 0.5


@pytest.mark.parametrize(
    ("execution_id", "status", "code"),
    [
        pytest.param("not-a-uuid", 400, "invalid_execution_id", id="not-uuid"),
        pytest.param("x" * 5000, 400, "invalid_execution_id", id="long"),
        pytest.param("%00", 400, "invalid_execution_id", id="nul"),
        pytest.param("%F0%9F%92%A5", 400, "invalid_execution_id", id="emoji"),
        pytest.param(str(uuid.uuid4()), 404, "execution_not_found", id="unknown"),
    ],
)
def test_read_execution_bad_id(
    alice: httpx.Client, execution_id: str, status: int, code: str
) -> None:
    response = alice.get(f"/v1/executions/{execution_id}")

    assert response.status_code == status
    assert response.json()["code"] == code


def test_read_execution_other_user_403(
    alice: httpx.Client, bob: httpx.Client, admin: httpx.Client, session: str
) -> None:
    submitted = submit(alice, session, "print('private')")
    wait_complete(alice, submitted["task_id"])

    as_bob = bob.get(f"/v1/executions/{submitted['task_id']}")
    as_admin = admin.get(f"/v1/executions/{submitted['task_id']}")

    assert as_bob.status_code == 403
    assert "private" not in as_bob.text
    assert as_admin.status_code == 200
    assert as_admin.json()["serialized_stdout"] == "private\n"


def test_admin_execution_readable_by_owner(
    alice: httpx.Client, admin: httpx.Client, session: str
) -> None:
    submitted = submit(admin, session, "print('by admin')")

    execution = wait_complete(alice, submitted["task_id"])

    assert execution["serialized_stdout"] == "by admin\n"


def test_execute_async_needs_credentials(server: Server, session: str) -> None:
    with server.client() as anonymous:
        submitted = anonymous.post(
            "/execute_async", json={"session_id": session, "command": "print(1)"}
        )
        read = anonymous.get(f"/v1/executions/{uuid.uuid4()}")

    assert submitted.status_code == 401
    assert read.status_code == 401


def test_execute_async_bearer_token(
    server: Server, alice: httpx.Client, session: str
) -> None:
    token = httpx.post(
        f"{server.url}/token", data={"username": "alice", "password": "pw-secret-1"}
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}

    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        submitted = submit(client, session, "print('token')")
        execution = wait_complete(client, submitted["task_id"])

    assert execution["serialized_stdout"] == "token\n"


# Placeholder for the test's own session id in the request bodies below.
OWN_SESSION = "own-session"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param({"command": "print(1)"}, 422, id="no-session"),
        pytest.param({"session_id": OWN_SESSION}, 422, id="no-command"),
        pytest.param({"session_id": 5, "command": "1"}, 422, id="int-session"),
        pytest.param(
            {"session_id": OWN_SESSION, "command": "1", "timeout": 0},
            422,
            id="zero-timeout",
        ),
        pytest.param(
            {"session_id": OWN_SESSION, "command": "1", "language": "ruby"},
            422,
            id="bad-language",
        ),
        pytest.param([1], 422, id="not-object"),
        pytest.param({"session_id": "nope", "command": "1"}, 400, id="bad-session"),
        pytest.param(
            {"session_id": str(uuid.uuid4()), "command": "1"}, 404, id="no-such-session"
        ),
    ],
)
def test_execute_async_bad_body(
    alice: httpx.Client, session: str, body: dict | list, status: int
) -> None:
    if isinstance(body, dict) and body.get("session_id") == OWN_SESSION:
        body = {**body, "session_id": session}

    response = alice.post("/execute_async", json=body)

    assert response.status_code == status


def test_execute_async_other_users_session(bob: httpx.Client, session: str) -> None:
    response = bob.post(
        "/execute_async", json={"session_id": session, "command": "print(1)"}
    )

    assert response.status_code == 403


def test_execution_on_killed_vm_fails(alice: httpx.Client, session: str) -> None:
    submitted = submit(alice, session, "import time; time.sleep(30)", timeout=60)
    assert wait_running(alice, submitted["task_id"])["status"] == "running"

    killed = alice.post("/kill", json={"session_id": session}).json()
    execution = wait_complete(alice, submitted["task_id"], timeout=20)

    assert killed["outcome"] == "killed"
    assert execution["status"] == "failed"
    assert execution["is_complete"] is True
    assert execution["success"] is False
    assert "killed" in execution["error"]
    assert execution["serialized_stderr"].endswith(f"[fleetvm] {execution['error']}\n")


def test_execution_queued_behind_kill_fails(alice: httpx.Client, session: str) -> None:
    first = submit(alice, session, "import time; time.sleep(30)", timeout=60)
    second = submit(alice, session, "print('never')")
    wait_running(alice, first["task_id"])

    alice.post("/kill", json={"session_id": session})
    results = [wait_complete(alice, item["task_id"], 20) for item in (first, second)]

    assert [result["status"] for result in results] == ["failed", "failed"]
    assert results[1]["serialized_stdout"] == ""


def test_execute_async_limit_per_user(server: Server) -> None:
    busy_key = server.create_user("busy")
    with server.client(busy_key) as busy:
        sessions = [new_session(busy) for _ in range(5)]
        for session_id in sessions:
            run(busy, session_id, "print(1)")

        submitted = [
            submit(busy, session_id, "import time; time.sleep(3)")
            for session_id in sessions
        ]
        results = [wait_complete(busy, item["task_id"]) for item in submitted]
        for session_id in sessions:
            busy.post("/kill", json={"session_id": session_id})

    statuses = sorted(result["status"] for result in results)
    assert statuses == ["completed"] * 4 + ["failed"]
    failed = next(result for result in results if result["status"] == "failed")
    assert "max_commands_per_user" in failed["error"]


def test_sdk_execute_async(server: Server, alice_key: str) -> None:
    client = InstaVM(api_key=alice_key, base_url=server.url, timeout=120)
    client.execute("x = 41")

    submitted = client.execute_async("print(x + 1)")
    result = client.get_task_result(submitted["task_id"], poll_interval=1, timeout=30)
    failing = client.execute_async("echo oops >&2; exit 2", language="bash")
    failed = client.get_task_result(failing["task_id"], poll_interval=1, timeout=30)
    client.kill()

    assert result["stdout"] == "42\n"
    assert result["stderr"] == ""
    assert result["cpu_time"] is not None
    assert result["execution_time"] is not None
    assert result["created_at"]
    assert failed["stderr"] == "oops\n"
