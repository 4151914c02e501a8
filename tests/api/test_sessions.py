"""Sessions: creation in the SDK's shape, status, records and listing."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.conftest import new_session, run
from tests.harness import Server


def test_session_key_in_body(server: Server, alice_key: str) -> None:
    response = httpx.post(
        f"{server.url}/v1/sessions/session",
        json={"api_key": alice_key, "vm_lifetime_seconds": 300},
    )

    assert response.status_code == 200
    assert uuid.UUID(response.json()["session_id"])
    assert response.json()["vm_lifetime_seconds"] == 300


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="no-key"),
        pytest.param({"api_key": "fvm_wrong"}, id="wrong-key"),
    ],
)
def test_session_without_valid_key_is_401(server: Server, body: dict) -> None:
    response = httpx.post(f"{server.url}/v1/sessions/session", json=body)

    assert response.status_code == 401


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param({"vm_lifetime_seconds": 86401}, 400, id="lifetime-too-long"),
        pytest.param({"vm_lifetime_seconds": 0}, 422, id="lifetime-zero"),
        pytest.param({"vm_lifetime_seconds": "long"}, 422, id="lifetime-text"),
        pytest.param({"memory_mb": 10**6}, 400, id="memory-too-large"),
        pytest.param({"vcpu_count": 0}, 422, id="no-vcpus"),
        pytest.param({"env": {"1BAD": "x"}}, 422, id="env-bad-name"),
        pytest.param({"env": {"A": "x\x00y"}}, 422, id="env-nul"),
        pytest.param({"env": {"A": "x" * 200_000}}, 422, id="env-value-too-long"),
        pytest.param(
            {"env": {f"A{i}": "x" for i in range(20_000)}}, 422, id="env-too-many"
        ),
        pytest.param({"metadata": [1, 2]}, 422, id="metadata-list"),
    ],
)
def test_session_bad_fields_rejected(
    alice: httpx.Client, body: dict, status: int
) -> None:
    response = alice.post("/v1/sessions/session", json=body)

    assert response.status_code == status


def test_session_status_fields(alice: httpx.Client) -> None:
    session_id = new_session(alice)
    before = alice.get(f"/v1/sessions/status/{session_id}").json()
    vm_id = run(alice, session_id, "print(1)")["vm_id"]

    after = alice.get(f"/v1/sessions/status/{session_id}").json()

    assert before["vm_assigned"] is False
    assert before["vm_alive"] is False
    assert after["vm_id"] == vm_id
    assert after["vm_status"] == "active"
    assert after["vm_alive"] is True
    assert after["isolation"]
    assert 0 <= after["uptime_seconds"] < 60
    assert 200 < after["expires_in_seconds"] <= 300
    alice.post("/kill", json={"session_id": session_id})


def test_session_of_other_user_is_403(alice: httpx.Client, bob: httpx.Client) -> None:
    session_id = new_session(alice)

    assert bob.get(f"/v1/sessions/status/{session_id}").status_code == 403
    assert bob.get(f"/v1/sessions/session/{session_id}").status_code == 403
    denied = bob.post("/execute", json={"session_id": session_id, "command": "1"})
    assert denied.status_code == 403


@pytest.mark.parametrize("raw", ["not-a-uuid", "..x", "a" * 500])
def test_session_status_bad_id_is_400(alice: httpx.Client, raw: str) -> None:
    response = alice.get(f"/v1/sessions/status/{raw}")

    assert response.status_code == 400


def test_sandboxes_filter_by_metadata(alice: httpx.Client) -> None:
    tag = uuid.uuid4().hex
    expected = new_session(alice, metadata={"tag": tag, "team": "a"})
    new_session(alice, metadata={"tag": "other"})

    response = alice.get(
        "/v1/sessions/sandboxes", params={"metadata": json.dumps({"tag": tag})}
    )

    assert response.status_code == 200
    assert [row["session_id"] for row in response.json()] == [expected]
    assert response.json()[0]["metadata"] == {"tag": tag, "team": "a"}


def test_sandboxes_bad_filter_is_400(alice: httpx.Client) -> None:
    response = alice.get("/v1/sessions/sandboxes", params={"metadata": "{oops"})

    assert response.status_code == 400


def test_sandboxes_only_own(alice: httpx.Client, bob: httpx.Client) -> None:
    session_id = new_session(alice)

    listed = bob.get("/v1/sessions/sandboxes", params={"limit": 1000}).json()

    assert session_id not in [row["session_id"] for row in listed]


@pytest.mark.parametrize(
    ("path", "raw_body"),
    [
        pytest.param(
            "/v1/sessions/session", '{"metadata": {"a": "\\ud800"}}', id="metadata"
        ),
        pytest.param("/v1/sessions/session", '{"env": {"A": "\\ud800"}}', id="env"),
        pytest.param("/v1/api-keys/", '{"name": "\\udfff"}', id="key-name"),
        pytest.param("/v1/api-keys/", '{"name": "a\\u0000b"}', id="key-name-nul"),
        pytest.param(
            "/execute",
            '{"session_id": "00000000-0000-4000-8000-000000000000", '
            '"command": "print(1) # \\ud800"}',
            id="command",
        ),
    ],
)
def test_lone_surrogate_is_422(alice: httpx.Client, path: str, raw_body: str) -> None:
    response = alice.post(
        path, content=raw_body.encode(), headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert isinstance(response.json()["detail"], list)


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"a": "x" * 20000}, id="too-large"),
        pytest.param(
            {"a": [[[[[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]]]]}, id="too-deep"
        ),
    ],
)
def test_session_metadata_bounds(alice: httpx.Client, metadata: dict) -> None:
    response = alice.post("/v1/sessions/session", json={"metadata": metadata})

    assert response.status_code == 422


def test_sandboxes_deep_filter_is_400(alice: httpx.Client) -> None:
    response = alice.get(
        "/v1/sessions/sandboxes", params={"metadata": "[" * 2000 + "]" * 2000}
    )

    assert response.status_code == 400
