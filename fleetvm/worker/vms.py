"""Worker-side VM operations: the driver call plus its compare-and-set record.

Every state change takes the VM's lock in this process. It then changes the
database only if the VM is still in the expected state, so a kill that races a
spawn, a second kill, or a redelivered task cannot act twice.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from fleetvm.db.engine import Database
from fleetvm.db.models import (
    ENDED_STATUSES,
    KillReason,
    KillRecord,
    Session,
    Vm,
    VmStatus,
    utcnow,
)
from fleetvm.db.vms import transition
from fleetvm.drivers.base import Language, VmDriver, VmSpec
from fleetvm.errors import FleetvmError, NotFound, SpawnFailed, VmNotRunning
from fleetvm.worker.slots import CommandSlots

logger = logging.getLogger(__name__)


class _VmLock:
    """A VM's lock, in an object that a weak reference can point to."""

    __slots__ = ("lock", "__weakref__")

    def __init__(self) -> None:
        self.lock = threading.Lock()


class VmManager:
    """Carries out spawn, execute, files and kill for the VMs this worker owns."""

    def __init__(
        self,
        database: Database,
        driver: VmDriver,
        worker_id: str,
        slots: CommandSlots | None = None,
    ) -> None:
        self.database = database
        self.driver = driver
        self.worker_id = worker_id
        # Callers that only kill, such as the shutdown of `fleetvm serve`,
        # pass no limits.
        self.slots = slots or CommandSlots(worker_id, total=1000, per_user=1000)
        # An entry lives while a thread holds or waits for the lock, so the
        # map does not grow with every VM the worker ever had.
        self._locks: weakref.WeakValueDictionary[str, _VmLock] = (
            weakref.WeakValueDictionary()
        )
        self._locks_guard = threading.Lock()

    @contextmanager
    def locked(self, vm_id: str, blocking: bool = True) -> Iterator[bool]:
        """Hold the VM's lock; with ``blocking=False``, yield False if busy."""
        with self._locks_guard:
            entry = self._locks.get(vm_id)
            if entry is None:
                entry = _VmLock()
                self._locks[vm_id] = entry
        acquired = entry.lock.acquire(blocking=blocking)
        try:
            yield acquired
        finally:
            if acquired:
                entry.lock.release()

    def _log_extra(self, vm_id: str, session_id: str | None = None) -> dict[str, Any]:
        return {"vm_id": vm_id, "session_id": session_id, "worker_id": self.worker_id}

    def _load_vm(self, vm_id: str) -> Vm:
        with self.database.session() as db:
            vm = db.get(Vm, vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id} does not exist.")
        return vm

    def spawn(self, vm_id: str) -> dict[str, Any]:
        """Start the VM recorded as spawning, then mark it active.

        If a kill marked it killing meanwhile, kill what was started.
        """
        with self.locked(vm_id):
            vm = self._load_vm(vm_id)
            if vm.status == VmStatus.ACTIVE:
                return self._describe(vm)
            if vm.status != VmStatus.SPAWNING:
                raise VmNotRunning(f"VM {vm_id} is {vm.status}; it cannot be started.")
            return self._spawn_locked(vm)

    def _spawn_locked(self, vm: Vm) -> dict[str, Any]:
        extra = self._log_extra(vm.id, vm.session_id)
        with self.database.session() as db:
            session = db.get(Session, vm.session_id)
        if session is None:
            raise NotFound(f"Session {vm.session_id} of VM {vm.id} does not exist.")
        spec = VmSpec(
            vm_id=vm.id,
            memory_mb=session.memory_mb,
            vcpu_count=session.vcpu_count,
            env=dict(session.env or {}),
        )

        started = time.monotonic()
        try:
            spawned = self.driver.spawn(spec)
        except FleetvmError as exc:
            self._mark_spawn_failed(vm.id, exc.message)
            logger.warning("VM %s failed to start: %s", vm.id, exc, extra=extra)
            raise SpawnFailed(f"VM {vm.id} failed to start: {exc.message}") from exc

        now = utcnow()
        expires_at = now + timedelta(seconds=session.vm_lifetime_seconds)
        with self.database.session() as db:
            won = transition(
                db,
                vm.id,
                [VmStatus.SPAWNING],
                VmStatus.ACTIVE,
                started_at=now,
                expires_at=expires_at,
                isolation=spawned.isolation,
            )
        if not won:
            logger.info(
                "VM %s was killed while it started; killing it now", vm.id, extra=extra
            )
            self.kill_locked(vm.id, None)
            # The kill that came during the spawn is what ended the VM.
            self.finish_pending_records(vm.id, "killed")
            raise VmNotRunning(f"VM {vm.id} was killed while it was starting.")

        logger.info(
            "VM %s started in %.1f ms with isolation %s",
            vm.id,
            (time.monotonic() - started) * 1000,
            spawned.isolation,
            extra=extra,
        )
        return self._describe(self._load_vm(vm.id))

    def _mark_spawn_failed(self, vm_id: str, message: str) -> None:
        with self.database.session() as db:
            transition(
                db,
                vm_id,
                [VmStatus.SPAWNING],
                VmStatus.FAILED,
                error=message[:1000],
                killed_at=utcnow(),
            )

    def _require_active(self, vm_id: str) -> int:
        """Check that the VM is active and return the id of the user who owns it."""
        with self.database.session() as db:
            row = db.execute(
                select(Vm.status, Vm.session_id, Session.user_id)
                .join(Session, Session.id == Vm.session_id)
                .where(Vm.id == vm_id)
            ).first()
        if row is None:
            raise NotFound(f"VM {vm_id} does not exist.")
        status, session_id, user_id = row
        if status != VmStatus.ACTIVE:
            raise VmNotRunning(
                f"VM {vm_id} of session {session_id} is {status}, not active."
            )
        return user_id

    def execute(
        self, vm_id: str, language: Language, code: str, timeout: float
    ) -> dict[str, Any]:
        with self.slots.hold(self._require_active(vm_id)), self._noticing_death(vm_id):
            result = self.driver.execute(vm_id, language, code, timeout)
        return {
            "stdout": result.stdout,
            "stderr": result.stderr,
            "exit_code": result.exit_code,
            "execution_time": result.execution_time,
            "timed_out": result.timed_out,
            "cpu_time": result.cpu_time,
        }

    def upload(self, vm_id: str, remote_path: str, content: bytes) -> dict[str, Any]:
        with self.slots.hold(self._require_active(vm_id)), self._noticing_death(vm_id):
            path = self.driver.upload(vm_id, remote_path, content)
        return {"path": path, "size": len(content)}

    def download(self, vm_id: str, remote_path: str) -> bytes:
        with self.slots.hold(self._require_active(vm_id)), self._noticing_death(vm_id):
            return self.driver.download(vm_id, remote_path)

    @contextmanager
    def _noticing_death(self, vm_id: str) -> Iterator[None]:
        """Turn a driver's VmNotRunning into a lost VM, if its processes are gone."""
        try:
            yield
        except VmNotRunning as exc:
            if self.mark_lost_if_dead(vm_id):
                raise VmNotRunning(
                    f"VM {vm_id} stopped: its processes exited without a kill. "
                    "The next execute starts a new VM."
                ) from exc
            raise

    def mark_lost_if_dead(self, vm_id: str) -> bool:
        """Mark an active VM lost if none of its processes run; return if it did.

        Code inside a VM can end it, for example with ``kill -9 -1``; the
        database must then stop calling it alive.
        """
        with self.locked(vm_id, blocking=False) as acquired:
            if not acquired or self.driver.is_running(vm_id):
                return False
            with self.database.session() as db:
                lost = transition(
                    db, vm_id, [VmStatus.ACTIVE], VmStatus.LOST, killed_at=utcnow()
                )
            if lost:
                self.driver.kill(vm_id)
                logger.warning(
                    "VM %s exited by itself; marked lost",
                    vm_id,
                    extra=self._log_extra(vm_id),
                )
            return lost

    def kill(self, vm_id: str, kill_record_id: int | None) -> dict[str, Any]:
        """Kill the VM if it still runs and report whether this call killed it."""
        with self.locked(vm_id):
            return self.kill_locked(vm_id, kill_record_id)

    def kill_locked(self, vm_id: str, kill_record_id: int | None) -> dict[str, Any]:
        vm = self._load_vm(vm_id)
        extra = self._log_extra(vm_id, vm.session_id)
        if vm.status in ENDED_STATUSES:
            outcome = self.finish_record(kill_record_id, "already_dead")
            logger.info(
                "kill of VM %s: it is already %s, nothing to do (record %s: %s)",
                vm_id,
                vm.status,
                kill_record_id,
                outcome,
                extra=extra,
            )
            return self._kill_answer(vm, outcome)

        if vm.status in (VmStatus.SPAWNING, VmStatus.ACTIVE):
            with self.database.session() as db:
                transition(
                    db,
                    vm_id,
                    [VmStatus.SPAWNING, VmStatus.ACTIVE],
                    VmStatus.KILLING,
                    kill_reason=vm.kill_reason or KillReason.USER,
                )
            vm = self._load_vm(vm_id)

        started = time.monotonic()
        killed = self.driver.kill(vm_id)
        final = (
            VmStatus.EXPIRED if vm.kill_reason == KillReason.EXPIRY else VmStatus.KILLED
        )
        with self.database.session() as db:
            transition(db, vm_id, [VmStatus.KILLING], final, killed_at=utcnow())
        outcome = self.finish_record(kill_record_id, "killed")
        logger.info(
            "VM %s killed (reason %s, %d processes) in %.1f ms",
            vm_id,
            vm.kill_reason,
            killed.processes_killed,
            (time.monotonic() - started) * 1000,
            extra=extra,
        )
        return self._kill_answer(self._load_vm(vm_id), outcome)

    def finish_record(self, kill_record_id: int | None, outcome: str) -> str:
        """Complete a pending kill record and return its outcome.

        A record that another actor already completed keeps its outcome, so a
        redelivered task reports what really happened.
        """
        if kill_record_id is None:
            return outcome
        with self.database.session() as db:
            record = db.get(KillRecord, kill_record_id)
            if record is None:
                return outcome
            if record.outcome != "pending":
                return record.outcome
            now = utcnow()
            record.outcome = outcome
            record.worker_id = self.worker_id
            record.completed_at = now
            record.latency_ms = _milliseconds_between(record.requested_at, now)
        return outcome

    def cancel_kill(self, vm_id: str) -> bool:
        """Return a VM from killing to active when no kill of it is pending.

        A kill that a non-owner rejected never touched the VM, so the VM must
        not stay in killing while it keeps running.
        """
        pending = (
            select(KillRecord.id)
            .where(KillRecord.vm_id == vm_id, KillRecord.outcome == "pending")
            .exists()
        )
        with self.database.session() as db:
            return (
                db.execute(
                    update(Vm)
                    .where(Vm.id == vm_id, Vm.status == VmStatus.KILLING, ~pending)
                    .values(status=str(VmStatus.ACTIVE), kill_reason=None)
                    .execution_options(synchronize_session=False)
                ).rowcount
                == 1
            )

    def finish_pending_records(self, vm_id: str, outcome: str) -> None:
        """Complete every pending kill record of a VM whose kill another path did."""
        now = utcnow()
        with self.database.session() as db:
            records = db.scalars(
                select(KillRecord)
                .where(KillRecord.vm_id == vm_id, KillRecord.outcome == "pending")
                .with_for_update()
            )
            for record in records:
                record.outcome = outcome
                record.worker_id = self.worker_id
                record.completed_at = now
                record.latency_ms = _milliseconds_between(record.requested_at, now)

    def _kill_answer(self, vm: Vm, outcome: str) -> dict[str, Any]:
        answer = self._describe(vm)
        answer["outcome"] = outcome
        return answer

    def _describe(self, vm: Vm) -> dict[str, Any]:
        return {
            "vm_id": vm.id,
            "session_id": vm.session_id,
            "worker_id": self.worker_id,
            "status": vm.status,
            "isolation": vm.isolation,
            "started_at": _iso(vm.started_at),
            "expires_at": _iso(vm.expires_at),
            "killed_at": _iso(vm.killed_at),
        }

    def owned_vm_ids(self, statuses: tuple[VmStatus, ...]) -> list[str]:
        with self.database.session() as db:
            return list(
                db.scalars(
                    select(Vm.id).where(
                        Vm.worker_id == self.worker_id,
                        Vm.status.in_([str(s) for s in statuses]),
                    )
                )
            )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _milliseconds_between(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() * 1000
