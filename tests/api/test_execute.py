"""POST /execute, /upload and /download through the worker and a real VM."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import new_session, run, wait_for_status
from tests.harness import vm_processes


@pytest.fixture
def session(alice: httpx.Client):
    session_id = new_session(alice)
    yield session_id
    alice.post("/kill", json={"session_id": session_id})


def test_execute_bash_exit_code(alice: httpx.Client, session: str) -> None:
    result = run(alice, session, "echo out; echo err >&2; exit 3", language="bash")

    assert result["stdout"] == "out\n"
    assert result["stderr"] == "err\n"
    assert result["exit_code"] == 3
    assert result["success"] is False


def test_execute_python_error(alice: httpx.Client, session: str) -> None:
    result = run(alice, session, "1 / 0")

    assert result["exit_code"] != 0
    assert "ZeroDivisionError" in result["stderr"]


def test_execute_timeout_keeps_vm(alice: httpx.Client, session: str) -> None:
    run(alice, session, "kept = 'yes'")

    slow = run(alice, session, "import time; time.sleep(30)", timeout=1)
    after = run(alice, session, "print(kept)")

    assert slow["timed_out"] is True
    assert slow["execution_time"] < 10
    assert after["stdout"] == "yes\n"
    assert after["vm_id"] == slow["vm_id"]


def test_execute_code_field(alice: httpx.Client, session: str) -> None:
    response = alice.post("/execute", json={"session_id": session, "code": "print(2)"})

    assert response.status_code == 200
    assert response.json()["stdout"] == "2\n"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"command": "print(1)"}, id="no-session"),
        pytest.param({"session_id": "SESSION"}, id="no-code"),
        pytest.param(
            {"session_id": "SESSION", "command": "1", "timeout": 0}, id="timeout-zero"
        ),
        pytest.param(
            {"session_id": "SESSION", "command": "1", "timeout": 601},
            id="timeout-too-long",
        ),
        pytest.param(
            {"session_id": "SESSION", "command": "1", "language": "ruby"},
            id="bad-language",
        ),
        pytest.param({"session_id": "SESSION", "command": 5}, id="command-not-string"),
    ],
)
def test_execute_bad_body_is_422(alice: httpx.Client, session: str, body: dict) -> None:
    body = {k: session if v == "SESSION" else v for k, v in body.items()}

    response = alice.post("/execute", json=body)

    assert response.status_code == 422


def test_execute_nul_in_code(alice: httpx.Client, session: str) -> None:
    python = run(alice, session, "print(1)\x00")
    bash = alice.post(
        "/execute",
        json={"session_id": session, "command": "echo a\x00b", "language": "bash"},
    )

    assert python["exit_code"] != 0
    assert bash.status_code == 400
    assert "NUL" in bash.json()["detail"]
    assert run(alice, session, "print('alive')")["stdout"] == "alive\n"


def test_upload_download_round_trip(alice: httpx.Client, session: str) -> None:
    payload = bytes(range(256))

    uploaded = alice.post(
        "/upload",
        data={"remote_path": "dir/blob.bin", "session_id": session},
        files={"file": ("blob.bin", payload)},
    )
    downloaded = alice.post(
        "/download", data={"filename": "dir/blob.bin", "session_id": session}
    )

    assert uploaded.status_code == 200
    assert uploaded.json()["size"] == 256
    assert downloaded.status_code == 200
    assert base64.b64decode(downloaded.json()["content"]) == payload


def test_upload_too_large_is_413(alice: httpx.Client, session: str) -> None:
    response = alice.post(
        "/upload",
        data={"remote_path": "big.bin", "session_id": session},
        files={"file": ("big.bin", b"x" * (1024 * 1024 + 1))},
    )

    assert response.status_code == 413
    assert "limit" in response.json()["detail"]


def test_download_missing_file_is_404(alice: httpx.Client, session: str) -> None:
    response = alice.post(
        "/download", data={"filename": "no/such/file", "session_id": session}
    )

    assert response.status_code == 404


@pytest.mark.parametrize(
    ("form", "status"),
    [
        pytest.param({"filename": "a\x00b"}, 400, id="nul-path"),
        pytest.param({"filename": ""}, 422, id="empty-path"),
        pytest.param({"session_id": "nope", "filename": "a"}, 400, id="bad-session"),
    ],
)
def test_download_bad_form(
    alice: httpx.Client, session: str, form: dict, status: int
) -> None:
    response = alice.post("/download", data={"session_id": session, **form})

    assert response.status_code == status


def test_execute_limit_per_user(server, alice: httpx.Client) -> None:
    greedy_key = server.create_user("greedy")
    sessions = []
    with server.client(greedy_key) as greedy:
        for _ in range(5):
            session_id = new_session(greedy)
            run(greedy, session_id, "print(1)")
            sessions.append(session_id)

        def slow(session_id: str) -> httpx.Response:
            with server.client(greedy_key) as client:
                body = {
                    "session_id": session_id,
                    "command": "import time; time.sleep(4)",
                }
                return client.post("/execute", json=body)

        with ThreadPoolExecutor(max_workers=5) as pool:
            futures = [pool.submit(slow, session_id) for session_id in sessions]
            time.sleep(1.5)
            other = new_session(alice)
            other_result = run(alice, other, "print('not blocked')")
            other_kill = alice.post("/kill", json={"session_id": other})
            codes = sorted(future.result().status_code for future in futures)

    assert codes == [200, 200, 200, 200, 429]
    assert other_result["stdout"] == "not blocked\n"
    assert other_kill.json()["outcome"] == "killed"


def test_upload_too_deep_path_is_400(alice: httpx.Client, session: str) -> None:
    response = alice.post(
        "/upload",
        data={"remote_path": "d/" * 100 + "f", "session_id": session},
        files={"file": ("f", b"x")},
    )

    assert response.status_code == 400
    assert "directory levels" in response.json()["detail"]


def test_vm_that_kills_itself_is_lost(alice: httpx.Client) -> None:
    session_id = new_session(alice)
    first = run(alice, session_id, "print(1)")["vm_id"]

    suicide = alice.post(
        "/execute",
        json={"session_id": session_id, "command": "kill -9 -1", "language": "bash"},
    )
    status = wait_for_status(alice, session_id, "lost", timeout=10)
    again = run(alice, session_id, "print(2)")

    assert suicide.status_code in (200, 409)
    assert status["vm_status"] == "lost"
    assert status["vm_alive"] is False
    assert vm_processes(first) == []
    assert again["stdout"] == "2\n"
    assert again["vm_id"] != first
    alice.post("/kill", json={"session_id": session_id})
