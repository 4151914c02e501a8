"""Asynchronous executions: record, send to the owner worker, and read back.

The execution's state and result live in the ``executions`` table, not in the
Celery result backend, so any API process can read what any worker wrote.
An execution that can no longer finish, because its task waited too long in
the queue or its worker stopped, is marked failed when it is read, and by its
worker's reaper.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session as DbSession

from fleetvm.db.engine import Database
from fleetvm.db.executions import fail_execution, overdue_error
from fleetvm.db.models import (
    Execution,
    ExecutionStatus,
    Session,
    User,
    Vm,
    utcnow,
)
from fleetvm.dispatch import Dispatcher
from fleetvm.errors import (
    ExecutionNotFound,
    InvalidExecutionId,
    PermissionDenied,
    Unavailable,
)
from fleetvm.services.vms import VmService
from fleetvm.settings import Settings

logger = logging.getLogger(__name__)

MAX_EXECUTION_ID_ECHO = 80


def parse_execution_id(raw: str) -> str:
    """Return the canonical form of an execution id, or raise InvalidExecutionId."""
    try:
        return str(uuid.UUID(raw))
    except (ValueError, AttributeError, TypeError) as exc:
        excerpt = raw[:MAX_EXECUTION_ID_ECHO] + (
            "..." if len(raw) > MAX_EXECUTION_ID_ECHO else ""
        )
        raise InvalidExecutionId(
            f"Invalid execution id {excerpt!r}: expected a UUID, the task_id that "
            "POST /execute_async returned."
        ) from exc


def get_owned_execution(db: DbSession, user: User, raw_execution_id: str) -> Execution:
    """Load an execution the user may read: their session's, or any for an admin."""
    execution_id = parse_execution_id(raw_execution_id)
    execution = db.get(Execution, execution_id)
    if execution is None:
        raise ExecutionNotFound(f"Execution {execution_id} not found.")
    if execution.user_id != user.id and not user.is_admin:
        raise PermissionDenied(
            f"Execution {execution_id} belongs to another user's session; only its "
            "owner or an administrator may read it."
        )
    return execution


class ExecutionService:
    """Submits commands to run in the background and reports their results."""

    def __init__(
        self,
        database: Database,
        dispatcher: Dispatcher,
        vms: VmService,
        settings: Settings,
    ) -> None:
        self.database = database
        self.dispatcher = dispatcher
        self.vms = vms
        self.settings = settings

    def submit(
        self, user: User, session_id: str, language: str, code: str, timeout: int
    ) -> Execution:
        """Start the session's VM if needed, record the execution, and send it.

        Returns the queued execution without waiting for the command.
        """
        vm = self.vms.ensure_vm(user, session_id)
        execution = self._record(vm, language, timeout)
        start_timeout = self.settings.execution.start_timeout_seconds
        try:
            self.dispatcher.execute_async(
                vm.worker_id,
                execution.id,
                vm.id,
                language,
                code,
                timeout,
                start_timeout,
            )
        except Unavailable as exc:
            with self.database.session() as db:
                fail_execution(db, execution.id, exc.message)
            raise
        logger.info(
            "queued execution %s on VM %s",
            execution.id,
            vm.id,
            extra=_log_extra(execution),
        )
        return execution

    def _record(self, vm: Vm, language: str, timeout: int) -> Execution:
        execution = self.settings.execution
        created_at = utcnow()
        start_deadline_at = created_at + timedelta(
            seconds=execution.start_timeout_seconds
        )
        deadline_at = start_deadline_at + timedelta(
            seconds=timeout + execution.result_margin_seconds
        )
        with self.database.session() as db:
            session = db.get(Session, vm.session_id)
            if session is None:
                raise ExecutionNotFound(f"Session {vm.session_id} not found.")
            row = Execution(
                id=str(uuid.uuid4()),
                session_id=vm.session_id,
                vm_id=vm.id,
                worker_id=vm.worker_id,
                user_id=session.user_id,
                language=language,
                timeout_seconds=timeout,
                status=ExecutionStatus.QUEUED,
                created_at=created_at,
                start_deadline_at=start_deadline_at,
                deadline_at=deadline_at,
            )
            db.add(row)
        return row

    def read(self, user: User, raw_execution_id: str) -> Execution:
        """Return the user's execution, first marking it failed if it is overdue."""
        with self.database.session() as db:
            execution = get_owned_execution(db, user, raw_execution_id)
            error = overdue_error(execution, utcnow())
            if error is not None and fail_execution(
                db, execution.id, error, [ExecutionStatus(execution.status)]
            ):
                logger.warning(
                    "execution %s failed: %s",
                    execution.id,
                    error,
                    extra=_log_extra(execution),
                )
            if error is not None:
                db.refresh(execution)
        return execution


def _log_extra(execution: Execution) -> dict[str, Any]:
    return {
        "vm_id": execution.vm_id,
        "session_id": execution.session_id,
        "worker_id": execution.worker_id,
    }
