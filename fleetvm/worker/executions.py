"""Worker side of asynchronous executions: run one and store its result.

The task that carries an execution is acknowledged when it starts, like every
task that runs user code, so a worker that dies loses it. The row is then left
running, and this worker's next start marks it failed (``fail_lost_executions``).
A task that never arrives leaves the row queued until its deadline, which the
reaper of its worker and every read of it enforce.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from sqlalchemy import select

from fleetvm.db.executions import (
    complete_execution,
    fail_execution,
    fail_overdue_executions,
    start_execution,
)
from fleetvm.db.models import Execution, ExecutionStatus, KillReason, Vm, utcnow
from fleetvm.drivers.base import Language
from fleetvm.errors import FleetvmError
from fleetvm.worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)


def run_execution(
    rt: WorkerRuntime,
    execution_id: str,
    vm_id: str,
    language: str,
    code: str,
    timeout: float,
) -> dict[str, Any]:
    """Run a queued execution in its VM and store the result or the failure."""
    extra = {"vm_id": vm_id, "worker_id": rt.worker_id}
    with rt.database.session() as db:
        started = start_execution(db, execution_id, utcnow())
    if not started:
        # Its start deadline passed, or a deadline check already marked it failed.
        logger.info(
            "execution %s is no longer queued; not running it",
            execution_id,
            extra=extra,
        )
        return {"execution_id": execution_id, "status": "skipped"}

    try:
        result = rt.vms.execute(vm_id, cast(Language, language), code, timeout)
    except FleetvmError as exc:
        error = _failure_message(rt, vm_id, exc)
        with rt.database.session() as db:
            fail_execution(db, execution_id, error, [ExecutionStatus.RUNNING])
        logger.info("execution %s failed: %s", execution_id, error, extra=extra)
        return {"execution_id": execution_id, "status": "failed"}
    except Exception:
        with rt.database.session() as db:
            fail_execution(
                db,
                execution_id,
                f"Execution {execution_id} failed unexpectedly on worker "
                f"{rt.worker_id}; its log has the details.",
                [ExecutionStatus.RUNNING],
            )
        raise

    with rt.database.session() as db:
        stored = complete_execution(db, execution_id, result)
    if not stored:
        logger.warning(
            "result of execution %s came after its deadline and was discarded",
            execution_id,
            extra=extra,
        )
    return {"execution_id": execution_id, "status": "completed"}


def _failure_message(rt: WorkerRuntime, vm_id: str, exc: FleetvmError) -> str:
    """Explain a failed command, naming the kill or expiry that ended its VM."""
    with rt.database.session() as db:
        vm = db.get(Vm, vm_id)
    if vm is None or vm.kill_reason is None:
        return exc.message
    if vm.kill_reason == KillReason.EXPIRY:
        return (
            f"VM {vm_id} reached the end of its lifetime and was killed before "
            f"the command finished: {exc.message}"
        )
    return (
        f"VM {vm_id} was killed (reason {vm.kill_reason}) before the command "
        f"finished: {exc.message}"
    )


def fail_lost_executions(rt: WorkerRuntime) -> list[str]:
    """Mark as failed the executions this worker was running when it stopped.

    Call it only before the worker consumes its queue. No execution of this
    worker can be running then, so every one that the database lists as running
    was lost.
    """
    with rt.database.session() as db:
        lost = list(
            db.scalars(
                select(Execution.id).where(
                    Execution.worker_id == rt.worker_id,
                    Execution.status == ExecutionStatus.RUNNING,
                )
            )
        )
        for execution_id in lost:
            fail_execution(
                db,
                execution_id,
                f"Worker {rt.worker_id} stopped while execution {execution_id} "
                "ran, so its result is lost. The command may have run in part; "
                "check the VM before you submit it again.",
                [ExecutionStatus.RUNNING],
            )
    for execution_id in lost:
        logger.warning(
            "execution %s was running when worker %s stopped; marked failed",
            execution_id,
            rt.worker_id,
            extra={"worker_id": rt.worker_id},
        )
    return lost


def fail_overdue(rt: WorkerRuntime) -> list[str]:
    """Mark as failed this worker's executions that passed a deadline."""
    with rt.database.session() as db:
        failed = fail_overdue_executions(db, utcnow(), rt.worker_id)
    for execution_id in failed:
        logger.warning(
            "execution %s passed its deadline; marked failed",
            execution_id,
            extra={"worker_id": rt.worker_id},
        )
    return failed
