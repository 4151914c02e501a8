"""Credentials: bearer tokens, API keys and the caller's own keys."""

from __future__ import annotations

import httpx
import pytest

from tests.harness import Server


def token_for(server: Server, username: str, password: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/token", data={"username": username, "password": password}
    )


def test_token_grants_access(server: Server, alice_key: str) -> None:
    response = token_for(server, "alice", "pw-secret-1")

    assert response.status_code == 200
    assert response.json()["token_type"] == "bearer"
    me = httpx.get(
        f"{server.url}/v1/users/me",
        headers={"Authorization": f"Bearer {response.json()['access_token']}"},
    )
    assert me.status_code == 200
    assert me.json()["username"] == "alice"
    assert me.json()["is_admin"] is False


@pytest.mark.parametrize(
    ("username", "password"),
    [
        pytest.param("alice", "wrong", id="wrong-password"),
        pytest.param("nobody-here", "pw-secret-1", id="unknown-user"),
        pytest.param("admin", "", id="admin-without-password"),
    ],
)
def test_token_bad_password_is_401(
    server: Server, alice_key: str, username: str, password: str
) -> None:
    response = token_for(server, username, password)

    assert response.status_code in (401, 422)
    assert "access_token" not in response.text


def test_me_without_credentials_is_401(server: Server) -> None:
    response = httpx.get(f"{server.url}/v1/users/me")

    assert response.status_code == 401
    assert "X-API-Key" in response.json()["detail"]


def test_api_key_create_list_revoke(server: Server, alice: httpx.Client) -> None:
    created = alice.post("/v1/api-keys/", json={"name": "laptop"})
    assert created.status_code == 201
    key = created.json()["key"]
    key_id = created.json()["id"]
    assert key.startswith(created.json()["prefix"])

    listed = alice.get("/v1/api-keys/").json()
    assert key_id in [row["id"] for row in listed]
    assert all("key" not in row for row in listed)
    assert httpx.get(f"{server.url}/v1/users/me", headers={"X-API-Key": key}).is_success

    revoked = alice.delete(f"/v1/api-keys/{key_id}")
    assert revoked.status_code == 200
    assert revoked.json()["revoked"] is True
    after = httpx.get(f"{server.url}/v1/users/me", headers={"X-API-Key": key})
    assert after.status_code == 401


def test_api_key_of_other_user_is_404(alice: httpx.Client, bob: httpx.Client) -> None:
    key_id = alice.post("/v1/api-keys/", json={"name": "mine"}).json()["id"]

    response = bob.delete(f"/v1/api-keys/{key_id}")

    assert response.status_code == 404
    assert alice.get("/v1/api-keys/").json()[-1]["revoked"] is False


@pytest.mark.parametrize("key_id", ["0", "-1", "99999999999999999999", "abc"])
def test_api_key_bad_id_is_4xx(alice: httpx.Client, key_id: str) -> None:
    response = alice.delete(f"/v1/api-keys/{key_id}")

    assert response.status_code in (404, 422)


def test_admin_key_file_is_private(server: Server) -> None:
    path = server.data_dir / "admin-api-key"

    assert path.stat().st_mode & 0o777 == 0o600
    assert server.admin_key not in server.log.read_text()
    assert str(path) in server.log.read_text()


@pytest.mark.parametrize(
    "username",
    [
        pytest.param("al\x00ice", id="nul"),
        pytest.param("a" * 10_000, id="long"),
    ],
)
def test_token_impossible_username_is_401(server, username: str) -> None:
    response = httpx.post(
        f"{server.url}/token", data={"username": username, "password": "whatever1"}
    )

    assert response.status_code == 401
    assert response.json()["detail"] == "Incorrect username or password."
