"""The worker's sweep finishes kills that were recorded but never sent."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta

import httpx

from tests.conftest import new_session, run
from tests.harness import Server, vm_processes


def record_intent_without_task(server: Server, vm_id: str, session_id: str) -> None:
    """Leave the database as an API that crashed right after recording a kill."""
    requested_at = datetime.now(UTC) - timedelta(seconds=10)
    stamp = requested_at.strftime("%Y-%m-%d %H:%M:%S.%f")
    with sqlite3.connect(server.data_dir / "fleetvm.sqlite3", timeout=10) as db:
        db.execute(
            "UPDATE vms SET status = 'killing', kill_reason = 'user' WHERE id = ?",
            (vm_id,),
        )
        db.execute(
            "INSERT INTO kill_records (vm_id, session_id, reason, requested_at, "
            "redispatches, outcome) VALUES (?, ?, 'user', ?, 0, 'pending')",
            (vm_id, session_id, stamp),
        )


def test_sweep_finishes_unsent_kill(server: Server, alice: httpx.Client) -> None:
    session_id = new_session(alice)
    vm_id = run(alice, session_id, "print(1)")["vm_id"]

    record_intent_without_task(server, vm_id, session_id)

    deadline = time.monotonic() + 20
    rows: list[tuple] = []
    while time.monotonic() < deadline:
        rows = server.query(
            "SELECT outcome, worker_id FROM kill_records WHERE vm_id = ?", vm_id
        )
        if rows != [("pending", None)]:
            break
        time.sleep(0.1)
    assert rows == [("killed", "local")]
    assert server.query("SELECT status FROM vms WHERE id = ?", vm_id) == [("killed",)]
    assert vm_processes(vm_id) == []
