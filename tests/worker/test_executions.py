"""Asynchronous executions whose worker dies or never starts them end failed.

A separate broker, worker and API, so the worker can be killed with SIGKILL
while the API keeps serving reads.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

from fleetvm.db.engine import Database
from fleetvm.db.models import Execution, ExecutionStatus, Session, utcnow
from fleetvm.settings import Settings
from tests.api.test_execute_async import submit, wait_complete, wait_running
from tests.conftest import new_session, run
from tests.worker.test_restart import Pieces

# Short deadlines, so that a lost execution fails within seconds.
START_TIMEOUT_SECONDS = 2
RESULT_MARGIN_SECONDS = 1


@pytest.fixture
def pieces() -> Iterator[Pieces]:
    instance = Pieces(
        FLEETVM_EXECUTION__START_TIMEOUT_SECONDS=str(START_TIMEOUT_SECONDS),
        FLEETVM_EXECUTION__RESULT_MARGIN_SECONDS=str(RESULT_MARGIN_SECONDS),
    )
    yield instance
    instance.close()


def test_worker_killed_mid_execution_fails(pieces: Pieces) -> None:
    with pieces.client() as client:
        session_id = new_session(client)
        vm_id = run(client, session_id, "print(1)")["vm_id"]
        submitted = submit(client, session_id, "sleep 5", language="bash", timeout=60)
        assert wait_running(client, submitted["task_id"])["status"] == "running"

        pieces.crash_worker()
        while_down = client.get(f"/v1/executions/{submitted['task_id']}").json()
        pieces.restart_worker()
        execution = wait_complete(client, submitted["task_id"], timeout=30)
        after = run(client, session_id, "echo still here", language="bash")

    assert while_down["status"] == "running"
    assert while_down["is_complete"] is False
    assert execution["status"] == "failed"
    assert "stopped while execution" in execution["error"]
    assert after["stdout"] == "still here\n"
    assert after["vm_id"] == vm_id


def test_lost_execution_fails_at_deadline(pieces: Pieces) -> None:
    with pieces.client() as client:
        session_id = new_session(client)
        run(client, session_id, "print(1)")
        submitted = submit(client, session_id, "sleep 30", language="bash", timeout=1)
        assert wait_running(client, submitted["task_id"])["status"] == "running"

        pieces.crash_worker()
        deadline = START_TIMEOUT_SECONDS + 1 + RESULT_MARGIN_SECONDS
        execution = wait_complete(client, submitted["task_id"], timeout=deadline + 10)
        pieces.restart_worker()

    assert execution["status"] == "failed"
    assert "has no result" in execution["error"]
    assert execution["is_complete"] is True


def test_execution_queued_while_down_expires(pieces: Pieces) -> None:
    with pieces.client() as client:
        session_id = new_session(client)
        run(client, session_id, "print(1)")
        pieces.crash_worker()

        submitted = submit(client, session_id, "touch late-marker", language="bash")
        queued = client.get(f"/v1/executions/{submitted['task_id']}").json()
        execution = wait_complete(
            client, submitted["task_id"], timeout=START_TIMEOUT_SECONDS + 10
        )
        pieces.restart_worker()
        time.sleep(2)
        check = run(
            client,
            session_id,
            "test -e late-marker && echo ran || echo never",
            language="bash",
        )

    assert queued["status"] == "queued"
    assert execution["status"] == "failed"
    assert "did not start" in execution["error"]
    assert check["stdout"] == "never\n"


def test_reaper_fails_overdue_execution(pieces: Pieces) -> None:
    with pieces.client() as client:
        session_id = new_session(client)
        vm_id = run(client, session_id, "print(1)")["vm_id"]
    # A row whose task never reached the worker, as after a broker failure.
    database = Database(Settings(data_dir=pieces.data_dir))
    created_at = utcnow() - timedelta(seconds=10)
    execution_id = str(uuid.uuid4())
    with database.session() as db:
        db.add(
            Execution(
                id=execution_id,
                session_id=session_id,
                vm_id=vm_id,
                worker_id="local",
                user_id=db.get(Session, session_id).user_id,
                language="python",
                timeout_seconds=1,
                status=ExecutionStatus.QUEUED,
                created_at=created_at,
                start_deadline_at=created_at + timedelta(seconds=1),
                deadline_at=created_at + timedelta(seconds=3),
            )
        )

    deadline = time.monotonic() + 15
    status = ExecutionStatus.QUEUED
    while status == ExecutionStatus.QUEUED and time.monotonic() < deadline:
        time.sleep(0.2)
        with database.session() as db:
            execution = db.get(Execution, execution_id)
            status, error = execution.status, execution.error
    database.dispose()

    assert status == ExecutionStatus.FAILED
    assert "did not start" in error
