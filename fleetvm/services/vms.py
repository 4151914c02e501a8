"""VM work requested through the API: placement, spawn on demand, and kill.

Nothing here speaks HTTP; every operation on a VM goes to its owner worker
through ``fleetvm.dispatch``.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session as DbSession

from fleetvm.db.engine import Database
from fleetvm.db.models import (
    ENDED_STATUSES,
    LIVE_STATUSES,
    KillReason,
    KillRecord,
    Session,
    User,
    Vm,
    VmStatus,
    Worker,
    utcnow,
)
from fleetvm.db.vms import transition
from fleetvm.dispatch import Dispatcher
from fleetvm.errors import (
    NoVmAssigned,
    NoWorkerAvailable,
    Unavailable,
    VmNotRunning,
    WorkerDown,
)
from fleetvm.services.sessions import get_owned_session
from fleetvm.settings import Settings

logger = logging.getLogger(__name__)

#: Key of the PostgreSQL advisory lock that serialises VM placement.
PLACEMENT_LOCK_KEY = 0x666C6566


def new_vm_id() -> str:
    return "vm-" + secrets.token_hex(8)


def heartbeat_age(worker: Worker | None) -> float | None:
    """Seconds since the worker's last heartbeat, or None if it never registered."""
    if worker is None:
        return None
    return (utcnow() - worker.last_heartbeat).total_seconds()


def worker_is_live(worker: Worker | None, settings: Settings) -> bool:
    """Return whether the worker is up with a heartbeat in ``dead_after_seconds``."""
    age = heartbeat_age(worker)
    return (
        worker is not None
        and worker.state == "up"
        and age is not None
        and age <= settings.multinode.dead_after_seconds
    )


def pick_worker(db: DbSession, settings: Settings) -> str:
    """Return the live worker with spare capacity and the fewest live VMs.

    On PostgreSQL, placements take turns through a lock held until the
    caller's transaction ends, so concurrent placements count each other's
    new VMs and no worker goes over its capacity.
    """
    if db.get_bind().dialect.name == "postgresql":
        db.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": PLACEMENT_LOCK_KEY}
        )
    alive_since = utcnow() - timedelta(seconds=settings.multinode.dead_after_seconds)
    live_vms = (
        select(Vm.worker_id, func.count().label("count"))
        .where(Vm.status.in_([str(s) for s in LIVE_STATUSES]))
        .group_by(Vm.worker_id)
        .subquery()
    )
    load = func.coalesce(live_vms.c.count, 0)
    row = db.execute(
        select(Worker.id)
        .outerjoin(live_vms, live_vms.c.worker_id == Worker.id)
        .where(
            Worker.state == "up",
            Worker.last_heartbeat >= alive_since,
            load < Worker.capacity,
        )
        .order_by(load, Worker.id)
        .limit(1)
    ).first()
    if row is None:
        raise NoWorkerAvailable(
            "No live worker has room for a new VM: start a worker "
            "(`fleetvm worker --worker-id ID`) or wait for one to come back."
        )
    return row[0]


class VmService:
    """Operations on a session's VM for API requests."""

    def __init__(
        self, database: Database, dispatcher: Dispatcher, settings: Settings
    ) -> None:
        self.database = database
        self.dispatcher = dispatcher
        self.settings = settings

    def ensure_vm(self, user: User, raw_session_id: str) -> Vm:
        """Return the session's active VM, starting a new one if it has none."""
        with self.database.session() as db:
            session = get_owned_session(db, user, raw_session_id)
            vm = db.get(Vm, session.current_vm_id) if session.current_vm_id else None
            if vm is not None and vm.status == VmStatus.ACTIVE:
                self._require_live_owner(db, vm)
                return vm
            if vm is None or vm.status in ENDED_STATUSES:
                vm = self._assign_new_vm(db, session)
            if vm.status == VmStatus.KILLING:
                raise VmNotRunning(
                    f"VM {vm.id} of session {session.id} is being killed; retry once "
                    "the kill completes to get a new VM."
                )
            self._require_live_owner(db, vm)

        self.dispatcher.spawn(vm.worker_id, vm.id)
        return vm

    def _require_live_owner(self, db: DbSession, vm: Vm) -> None:
        """Fail at once, instead of after a timeout, if the VM's worker is down."""
        worker = db.get(Worker, vm.worker_id)
        if worker_is_live(worker, self.settings):
            return
        raise WorkerDown(
            f"Worker {vm.worker_id!r}, which owns VM {vm.id} of session "
            f"{vm.session_id}, is down ({_silence(worker)}). The VM and its state "
            "come back with the worker; kill the session to give up on them."
        )

    def _assign_new_vm(self, db: DbSession, session: Session) -> Vm:
        previous = session.current_vm_id
        vm = Vm(
            id=new_vm_id(),
            session_id=session.id,
            worker_id=pick_worker(db, self.settings),
            status=VmStatus.SPAWNING,
        )
        db.add(vm)
        db.flush()
        # Compare-and-set on the session, so two first executes that race
        # assign one VM; the loser uses the winner's.
        assigned = db.execute(
            update(Session)
            .where(Session.id == session.id, _is(Session.current_vm_id, previous))
            .values(current_vm_id=vm.id)
            .execution_options(synchronize_session=False)
        ).rowcount
        if assigned == 1:
            logger.info(
                "assigned VM %s to session %s on worker %s",
                vm.id,
                session.id,
                vm.worker_id,
                extra={
                    "vm_id": vm.id,
                    "session_id": session.id,
                    "worker_id": vm.worker_id,
                },
            )
            return vm
        db.delete(vm)
        db.refresh(session)
        winner = db.get(Vm, session.current_vm_id)
        if winner is None:
            raise NoVmAssigned(f"Session {session.id} has no VM assigned.")
        return winner

    def execute(
        self, user: User, session_id: str, language: str, code: str, timeout: float
    ) -> dict[str, Any]:
        vm = self.ensure_vm(user, session_id)
        answer = self.dispatcher.execute(vm.worker_id, vm.id, language, code, timeout)
        answer["vm_id"] = vm.id
        answer["session_id"] = vm.session_id
        return answer

    def upload(
        self, user: User, session_id: str, remote_path: str, content_b64: str
    ) -> dict[str, Any]:
        vm = self.ensure_vm(user, session_id)
        return self.dispatcher.upload(vm.worker_id, vm.id, remote_path, content_b64)

    def download(self, user: User, session_id: str, remote_path: str) -> dict[str, Any]:
        vm = self.ensure_vm(user, session_id)
        return self.dispatcher.download(vm.worker_id, vm.id, remote_path)

    def kill(self, user: User, raw_session_id: str) -> dict[str, Any]:
        """Record the kill intent, send it to the owner, and wait a bounded time."""
        with self.database.session() as db:
            session = get_owned_session(db, user, raw_session_id)
            if session.current_vm_id is None:
                raise NoVmAssigned(
                    f"Session {session.id} has no VM assigned: it never ran a "
                    "command, so there is nothing to kill."
                )
            vm = db.get(Vm, session.current_vm_id)
            if vm is None:
                raise NoVmAssigned(f"Session {session.id} has no VM assigned.")
            if vm.status in ENDED_STATUSES:
                return _kill_response(vm, "already_dead", vm.worker_id)

            reason = KillReason.ADMIN if session.user_id != user.id else KillReason.USER
            transition(
                db,
                vm.id,
                [VmStatus.SPAWNING, VmStatus.ACTIVE],
                VmStatus.KILLING,
                kill_reason=reason,
            )
            record = KillRecord(
                vm_id=vm.id, session_id=session.id, requested_by=user.id, reason=reason
            )
            db.add(record)
            db.flush()
            record_id = record.id
            worker = db.get(Worker, vm.worker_id)
            owner_live = worker_is_live(worker, self.settings)

        # No worker would respond while the owner is down, so queue the kill
        # for its return and respond now instead of after kill.wait_seconds.
        wait = self.settings.kill.wait_seconds if owner_live else None
        try:
            answer = self.dispatcher.kill(vm.worker_id, vm.id, record_id, wait)
        except Unavailable as exc:
            # The intent is recorded, and the owner's reaper finishes kills
            # whose task failed or never arrived, so the kill is pending.
            logger.warning(
                "kill of VM %s not confirmed yet: %s",
                vm.id,
                exc.message,
                extra={"vm_id": vm.id, "session_id": vm.session_id},
            )
            answer = None
        if answer is None:
            message = None if owner_live else WORKER_DOWN_MESSAGE
            return _kill_response(vm, "kill_pending", vm.worker_id, message)
        return _kill_response(vm, answer["outcome"], answer.get("worker_id"))


MESSAGES = {
    "killed": "VM {vm_id} of session {session_id} was killed.",
    "already_dead": "VM {vm_id} of session {session_id} was already dead.",
    "kill_pending": (
        "Kill of VM {vm_id} of session {session_id} is recorded, but worker "
        "{worker_id} has not confirmed it yet; it completes when the worker answers."
    ),
    "failed_not_owner": (
        "Kill of VM {vm_id} of session {session_id} did not happen: it reached "
        "worker {worker_id}, which does not own the VM, and "
        "multinode.strict_kill_ownership is off. The VM keeps running."
    ),
}
WORKER_DOWN_MESSAGE = (
    "Kill of VM {vm_id} of session {session_id} is recorded, but its worker "
    "{worker_id} is down; the kill is queued and completes when the worker comes "
    "back."
)


def _kill_response(
    vm: Vm, outcome: str, worker_id: str | None, template: str | None = None
) -> dict[str, Any]:
    if template is None:
        template = MESSAGES.get(
            outcome, "Kill of VM {vm_id} ended with outcome {outcome}."
        )
    message = template.format(
        vm_id=vm.id, session_id=vm.session_id, worker_id=worker_id, outcome=outcome
    )
    return {
        "message": message,
        "session_id": vm.session_id,
        "vm_id": vm.id,
        "outcome": outcome,
        "worker_id": worker_id,
    }


def _silence(worker: Worker | None) -> str:
    age = heartbeat_age(worker)
    if worker is None or age is None:
        return "it never registered"
    if worker.state != "up":
        return f"it is {worker.state}"
    return f"no heartbeat for {age:.0f} s"


def _is(column, value):
    return column.is_(None) if value is None else column == value
