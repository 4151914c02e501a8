from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.harness import Server


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """One `fleetvm serve` shared by the API tests."""
    instance = Server().start()
    yield instance
    instance.cleanup()


@pytest.fixture(scope="session")
def alice_key(server: Server) -> str:
    return server.create_user("alice")


@pytest.fixture(scope="session")
def bob_key(server: Server) -> str:
    return server.create_user("bob")


@pytest.fixture
def alice(server: Server, alice_key: str) -> Iterator[httpx.Client]:
    with server.client(alice_key) as client:
        yield client


@pytest.fixture
def bob(server: Server, bob_key: str) -> Iterator[httpx.Client]:
    with server.client(bob_key) as client:
        yield client


@pytest.fixture
def admin(server: Server) -> Iterator[httpx.Client]:
    with server.client(server.admin_key) as client:
        yield client


def new_session(client: httpx.Client, **body: object) -> str:
    response = client.post("/v1/sessions/session", json=body)
    assert response.status_code == 200, response.text
    session_id = response.json()["session_id"]
    uuid.UUID(session_id)
    return session_id


def run(client: httpx.Client, session_id: str, code: str, **extra: object) -> dict:
    body = {"session_id": session_id, "command": code, **extra}
    response = client.post("/execute", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_status(
    client: httpx.Client, session_id: str, wanted: str, timeout: float = 30
) -> dict:
    """Poll the session's status until its VM is ``wanted``; return the last one."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = client.get(f"/v1/sessions/status/{session_id}").json()
        if status["vm_status"] == wanted:
            break
        time.sleep(0.05)
    return status
