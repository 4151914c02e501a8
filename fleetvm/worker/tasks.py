"""Celery tasks of a worker, each returning ``{"ok": ...}`` instead of raising.

Errors the caller should see travel back as ``{"ok": false, "error": code,
"message": ...}``, which ``fleetvm.dispatch`` raises again on the API side. An
unexpected error is logged here, once, with its traceback.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from typing import Any

from celery import shared_task

from fleetvm.celery_app import (
    TASK_DOWNLOAD,
    TASK_EXECUTE,
    TASK_EXECUTE_ASYNC,
    TASK_KILL,
    TASK_SPAWN,
    TASK_UPLOAD,
)
from fleetvm.db.models import KillRecord, Vm
from fleetvm.errors import FleetvmError, InvalidRequest
from fleetvm.worker.executions import run_execution
from fleetvm.worker.runtime import runtime

logger = logging.getLogger(__name__)


def _answer(task_name: str, vm_id: str, work: Callable[[], dict[str, Any]]) -> dict:
    extra = {"vm_id": vm_id, "worker_id": runtime().worker_id}
    try:
        return {"ok": True, **work()}
    except FleetvmError as exc:
        logger.info("%s for VM %s rejected: %s", task_name, vm_id, exc, extra=extra)
        return {"ok": False, "error": exc.code, "message": exc.message}
    except Exception:
        logger.exception(
            "%s for VM %s failed unexpectedly", task_name, vm_id, extra=extra
        )
        return {
            "ok": False,
            "error": "internal_error",
            "message": f"{task_name} for VM {vm_id} failed on worker "
            f"{runtime().worker_id}; its log has the details.",
        }


@shared_task(name=TASK_SPAWN)
def spawn_vm(vm_id: str) -> dict:
    return _answer(TASK_SPAWN, vm_id, lambda: runtime().vms.spawn(vm_id))


# Running user code twice is not safe, unlike spawn and kill: an execute,
# upload or download is acknowledged on receipt, so one that a crashing worker
# was running is lost (its caller gets an error) instead of run again later.
@shared_task(name=TASK_EXECUTE, acks_late=False)
def execute(vm_id: str, language: str, code: str, timeout: float) -> dict:
    return _answer(
        TASK_EXECUTE,
        vm_id,
        lambda: runtime().vms.execute(vm_id, language, code, timeout),  # type: ignore[arg-type]
    )


@shared_task(name=TASK_UPLOAD, acks_late=False)
def upload(vm_id: str, remote_path: str, content_b64: str) -> dict:
    def work() -> dict[str, Any]:
        try:
            content = base64.b64decode(content_b64, validate=True)
        except binascii.Error as exc:
            raise InvalidRequest(f"Upload for VM {vm_id} is not base64.") from exc
        return runtime().vms.upload(vm_id, remote_path, content)

    return _answer(TASK_UPLOAD, vm_id, work)


@shared_task(name=TASK_DOWNLOAD, acks_late=False)
def download(vm_id: str, remote_path: str) -> dict:
    def work() -> dict[str, Any]:
        content = runtime().vms.download(vm_id, remote_path)
        return {"content": base64.b64encode(content).decode(), "size": len(content)}

    return _answer(TASK_DOWNLOAD, vm_id, work)


@shared_task(name=TASK_KILL)
def kill_vm(vm_id: str, kill_record_id: int, redispatched: bool = False) -> dict:
    return _answer(
        TASK_KILL, vm_id, lambda: _kill_on_owner(vm_id, kill_record_id, redispatched)
    )


def _kill_on_owner(vm_id: str, kill_record_id: int, redispatched: bool) -> dict:
    """Kill the VM here if this worker owns it, else follow the ownership setting.

    With ``multinode.strict_kill_ownership`` on, a kill that reached a worker
    that does not own the VM is sent once to the owner's queue. A task that was
    already sent on finds its record failed instead of bouncing again.
    """
    rt = runtime()
    with rt.database.session() as db:
        vm = db.get(Vm, vm_id)
        owner = vm.worker_id if vm else None
    if owner is None or owner == rt.worker_id:
        return rt.vms.kill(vm_id, kill_record_id)

    extra = {"vm_id": vm_id, "worker_id": rt.worker_id}
    if rt.settings.multinode.strict_kill_ownership and not redispatched:
        with rt.database.session() as db:
            record = db.get(KillRecord, kill_record_id)
            if record is not None:
                record.redispatches += 1
        logger.warning(
            "kill of VM %s reached worker %s but its owner is %s; re-dispatching",
            vm_id,
            rt.worker_id,
            owner,
            extra=extra,
        )
        answer = rt.dispatcher.kill(
            owner,
            vm_id,
            kill_record_id,
            rt.settings.kill.wait_seconds,
            redispatched=True,
        )
        if answer is None:
            return {"vm_id": vm_id, "worker_id": owner, "outcome": "kill_pending"}
        return {key: value for key, value in answer.items() if key != "ok"}

    outcome = rt.vms.finish_record(kill_record_id, "failed_not_owner")
    if outcome == "failed_not_owner":
        rt.vms.cancel_kill(vm_id)
    logger.error(
        "kill of VM %s reached worker %s but its owner is %s; not killing it "
        "(outcome %s)",
        vm_id,
        rt.worker_id,
        owner,
        outcome,
        extra=extra,
    )
    return {"vm_id": vm_id, "worker_id": rt.worker_id, "outcome": outcome}


# The task is acknowledged on receipt, like execute, so a dying worker loses it
# instead of running the code twice. The result goes to the executions table,
# which the API reads, so nothing is stored in the result backend.
@shared_task(name=TASK_EXECUTE_ASYNC, acks_late=False, ignore_result=True)
def execute_async(
    execution_id: str, vm_id: str, language: str, code: str, timeout: float
) -> dict:
    return _answer(
        TASK_EXECUTE_ASYNC,
        vm_id,
        lambda: run_execution(runtime(), execution_id, vm_id, language, code, timeout),
    )
