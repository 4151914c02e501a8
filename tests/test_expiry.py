"""Lifetime expiry: the owner worker's reaper kills VMs at expires_at."""

from __future__ import annotations

from datetime import datetime

import httpx

from tests.conftest import new_session, run, wait_for_status
from tests.harness import Server, vm_processes


def test_expiry_kills_within_a_second(server: Server, alice: httpx.Client) -> None:
    session_id = new_session(alice, vm_lifetime_seconds=2)
    vm_id = run(alice, session_id, "print(1)")["vm_id"]
    run(alice, session_id, "setsid sleep 987653 &", language="bash")
    expires_at = datetime.fromisoformat(
        alice.get(f"/v1/sessions/status/{session_id}").json()["expires_at"]
    )

    assert wait_for_status(alice, session_id, "expired")["vm_status"] == "expired"

    killed_at = datetime.fromisoformat(
        server.query("SELECT killed_at FROM vms WHERE id = ?", vm_id)[0][0]
    )
    lateness = killed_at.replace(tzinfo=None) - expires_at.replace(tzinfo=None)
    assert lateness.total_seconds() < 1.0
    assert vm_processes(vm_id) == []
    rows = server.query(
        "SELECT reason, outcome FROM kill_records WHERE vm_id = ?", vm_id
    )
    assert rows == [("expiry", "killed")]


def test_expired_session_spawns_fresh_vm(alice: httpx.Client) -> None:
    session_id = new_session(alice, vm_lifetime_seconds=2)
    first = run(alice, session_id, "y = 5")["vm_id"]
    assert wait_for_status(alice, session_id, "expired")["vm_status"] == "expired"

    result = run(alice, session_id, "print('y' in globals())")

    assert result["vm_id"] != first
    assert result["stdout"] == "False\n"


def test_lifetime_below_minimum_is_400(alice: httpx.Client) -> None:
    response = alice.post("/v1/sessions/session", json={"vm_lifetime_seconds": 1})

    assert response.status_code == 400
    assert "vm_lifetime_seconds" in response.json()["detail"]
