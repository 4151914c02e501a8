"""Asynchronous execution: submit a command, then poll for its result."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from fleetvm.api.deps import CurrentUser, State
from fleetvm.api.schemas import ExecuteRequest, ExecutionResult, ExecutionSubmitted
from fleetvm.db.models import Execution, ExecutionStatus
from fleetvm.services.executions import ExecutionService

router = APIRouter(tags=["executions"])


def get_execution_service(state: State) -> ExecutionService:
    return ExecutionService(
        state.database, state.dispatcher, state.vm_service, state.settings
    )


Executions = Annotated[ExecutionService, Depends(get_execution_service)]


@router.post("/execute_async", response_model=ExecutionSubmitted)
def execute_async(
    body: ExecuteRequest, user: CurrentUser, executions: Executions
) -> ExecutionSubmitted:
    """Queue Python or bash for the session's VM and return its task id at once."""
    execution = executions.submit(
        user, body.session_id, body.language, body.source, body.timeout
    )
    return ExecutionSubmitted(
        task_id=execution.id,
        status=execution.status,
        session_id=execution.session_id,
        vm_id=execution.vm_id,
        worker_id=execution.worker_id,
        created_at=execution.created_at,
    )


@router.get("/v1/executions/{execution_id}", response_model=ExecutionResult)
def read_execution(
    execution_id: str, user: CurrentUser, executions: Executions
) -> ExecutionResult:
    """Return an execution's status and, once it is complete, its output."""
    return _execution_result(executions.read(user, execution_id))


def _execution_result(execution: Execution) -> ExecutionResult:
    status = ExecutionStatus(execution.status)
    stderr = execution.stderr or ""
    if status == ExecutionStatus.FAILED and execution.error:
        if stderr and not stderr.endswith("\n"):
            stderr += "\n"
        stderr += f"[fleetvm] {execution.error}\n"
    return ExecutionResult(
        task_id=execution.id,
        status=status,
        is_complete=status in (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED),
        success=status == ExecutionStatus.COMPLETED
        and execution.exit_code == 0
        and not execution.timed_out,
        serialized_stdout=execution.stdout or "",
        serialized_stderr=stderr,
        exit_code=execution.exit_code,
        timed_out=execution.timed_out,
        execution_time=execution.execution_time,
        cpu_time=execution.cpu_time,
        error=execution.error,
        language=execution.language,
        session_id=execution.session_id,
        vm_id=execution.vm_id,
        worker_id=execution.worker_id,
        created_at=execution.created_at,
        started_at=execution.started_at,
        completed_at=execution.completed_at,
    )
