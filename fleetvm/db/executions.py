"""Compare-and-set changes of execution state, shared by the API and workers.

An execution moves ``queued -> running -> completed``, or to ``failed`` from
queued or running. Every change runs ``UPDATE ... WHERE status IN (:expected)``,
so when a worker's result and a deadline enforced by another process race,
exactly one of them wins and the other changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from fleetvm.db.models import (
    UNFINISHED_EXECUTION_STATUSES,
    Execution,
    ExecutionStatus,
    utcnow,
)

MAX_ERROR_CHARS = 1000


def set_execution_status(
    db: Session,
    execution_id: str,
    expected: Iterable[ExecutionStatus],
    new: ExecutionStatus,
    **values: Any,
) -> bool:
    """Move an execution to ``new`` if its status is one of ``expected``.

    Returns whether this call changed the row.
    """
    statement = (
        update(Execution)
        .where(
            Execution.id == execution_id,
            Execution.status.in_([str(s) for s in expected]),
        )
        .values(status=str(new), **values)
        .execution_options(synchronize_session=False)
    )
    return db.execute(statement).rowcount == 1


def start_execution(db: Session, execution_id: str, now: datetime) -> bool:
    """Mark a queued execution running, unless its start deadline has passed."""
    statement = (
        update(Execution)
        .where(
            Execution.id == execution_id,
            Execution.status == ExecutionStatus.QUEUED,
            Execution.start_deadline_at > now,
        )
        .values(status=str(ExecutionStatus.RUNNING), started_at=now)
        .execution_options(synchronize_session=False)
    )
    return db.execute(statement).rowcount == 1


def complete_execution(db: Session, execution_id: str, result: dict[str, Any]) -> bool:
    """Store the result of a running execution and mark it completed."""
    return set_execution_status(
        db,
        execution_id,
        [ExecutionStatus.RUNNING],
        ExecutionStatus.COMPLETED,
        stdout=result["stdout"],
        stderr=result["stderr"],
        exit_code=result["exit_code"],
        timed_out=result["timed_out"],
        execution_time=result["execution_time"],
        cpu_time=result.get("cpu_time"),
        completed_at=utcnow(),
    )


def fail_execution(
    db: Session,
    execution_id: str,
    error: str,
    expected: Iterable[ExecutionStatus] = UNFINISHED_EXECUTION_STATUSES,
) -> bool:
    """Mark an unfinished execution failed with ``error``, cut to the column size."""
    if len(error) > MAX_ERROR_CHARS:
        error = error[: MAX_ERROR_CHARS - 3] + "..."
    return set_execution_status(
        db,
        execution_id,
        expected,
        ExecutionStatus.FAILED,
        error=error,
        completed_at=utcnow(),
    )


def overdue_error(execution: Execution, now: datetime) -> str | None:
    """Return why an unfinished execution can no longer finish, or None if it can.

    A queued execution past its start deadline is discarded by the worker, and
    one with no result by its deadline was lost by a worker that stopped.
    """
    waited = (now - execution.created_at).total_seconds()
    if (
        execution.status == ExecutionStatus.QUEUED
        and now >= execution.start_deadline_at
    ):
        return (
            f"Execution {execution.id} did not start within {waited:.0f} s: worker "
            f"{execution.worker_id} is down or busy, so its task was discarded. "
            "Submit the command again."
        )
    if (
        execution.status in UNFINISHED_EXECUTION_STATUSES
        and now >= execution.deadline_at
    ):
        return (
            f"Execution {execution.id} has no result {waited:.0f} s after it was "
            f"submitted: worker {execution.worker_id} stopped or lost it. The "
            "command may have run in part; check the VM before you submit it again."
        )
    return None


def fail_overdue_executions(
    db: Session, now: datetime, worker_id: str | None = None
) -> list[str]:
    """Mark every overdue execution failed, only ``worker_id``'s if given.

    Returns the ids of the executions this call marked failed.
    """
    query = select(Execution).where(
        Execution.status.in_([str(s) for s in UNFINISHED_EXECUTION_STATUSES]),
        or_(
            Execution.deadline_at <= now,
            and_(
                Execution.status == ExecutionStatus.QUEUED,
                Execution.start_deadline_at <= now,
            ),
        ),
    )
    if worker_id is not None:
        query = query.where(Execution.worker_id == worker_id)
    failed = []
    for execution in db.scalars(query).all():
        error = overdue_error(execution, now)
        if error is not None and fail_execution(
            db, execution.id, error, [ExecutionStatus(execution.status)]
        ):
            failed.append(execution.id)
    return failed
