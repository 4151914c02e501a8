"""Background loop of a worker: expiry reaper, stuck-kill sweep, liveness check.

Expiry is driven by the database, not by delayed broker messages: a delayed
message to a dead worker waits forever, and Redis redelivers unacknowledged
ones only after its visibility timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy import func, select

from fleetvm.db.models import KillReason, KillRecord, Vm, VmStatus, utcnow
from fleetvm.db.vms import record_kill_intent
from fleetvm.errors import FleetvmError
from fleetvm.worker.executions import fail_overdue
from fleetvm.worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

#: A VM left in killing this long without a kill running here is finished by
#: the sweep. Its kill task was lost, because the API crashed after recording
#: the intent or the broker was down, or the driver failed to kill it.
STUCK_KILL_SECONDS = 5.0
#: How often the reaper checks that this worker's active VMs still run.
LIVENESS_INTERVAL_SECONDS = 2.0
#: How often the reaper marks as failed this worker's executions past a deadline.
OVERDUE_EXECUTION_INTERVAL_SECONDS = 2.0


class Reaper:
    """Kills this worker's VMs at ``expires_at`` and finishes stuck kills."""

    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="fleetvm-reaper", daemon=True
        )
        self._last_retry: dict[str, float] = {}
        self._last_liveness_check = 0.0
        self._last_overdue_check = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        interval = self.rt.settings.vm.reaper_interval_seconds
        while not self._stop.is_set():
            try:
                self.reap_once()
            except Exception:
                logger.exception(
                    "expiry reaper pass failed; retrying in %.2f s",
                    interval,
                    extra={"worker_id": self.rt.worker_id},
                )
            self._stop.wait(self._sleep_seconds(interval))

    def _sleep_seconds(self, interval: float) -> float:
        with self.rt.database.session() as db:
            next_expiry = db.scalar(
                select(func.min(Vm.expires_at)).where(
                    Vm.worker_id == self.rt.worker_id,
                    Vm.status == VmStatus.ACTIVE,
                )
            )
        if next_expiry is None:
            return interval
        seconds = (next_expiry - utcnow()).total_seconds()
        return min(interval, max(seconds, 0.0))

    def reap_once(self) -> int:
        """Kill every expired VM of this worker; return how many were killed."""
        with self.rt.database.session() as db:
            expired = list(
                db.scalars(
                    select(Vm.id).where(
                        Vm.worker_id == self.rt.worker_id,
                        Vm.status == VmStatus.ACTIVE,
                        Vm.expires_at <= utcnow(),
                    )
                )
            )
        killed = 0
        for vm_id in expired:
            try:
                killed += self._expire(vm_id)
            except FleetvmError as exc:
                # The VM stays in killing with a pending record, so the
                # stuck-kill sweep retries it.
                logger.error(
                    "expiry kill of VM %s failed: %s",
                    vm_id,
                    exc.message,
                    extra={"vm_id": vm_id, "worker_id": self.rt.worker_id},
                )
        self._finish_stuck_kills()
        self._check_liveness()
        self._fail_overdue_executions()
        return killed

    def _fail_overdue_executions(self) -> None:
        now = time.monotonic()
        if now - self._last_overdue_check < OVERDUE_EXECUTION_INTERVAL_SECONDS:
            return
        self._last_overdue_check = now
        fail_overdue(self.rt)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        if now - self._last_liveness_check < LIVENESS_INTERVAL_SECONDS:
            return
        self._last_liveness_check = now
        for vm_id in self.rt.vms.owned_vm_ids((VmStatus.ACTIVE,)):
            try:
                self.rt.vms.mark_lost_if_dead(vm_id)
            except FleetvmError as exc:
                logger.error(
                    "liveness check of VM %s failed: %s",
                    vm_id,
                    exc.message,
                    extra={"vm_id": vm_id, "worker_id": self.rt.worker_id},
                )

    def _expire(self, vm_id: str) -> bool:
        with self.rt.database.session() as db:
            record_id = record_kill_intent(
                db, vm_id, [VmStatus.ACTIVE], KillReason.EXPIRY
            )
        if record_id is None:
            return False
        self.rt.vms.kill(vm_id, record_id)
        return True

    def _finish_stuck_kills(self) -> None:
        threshold = utcnow() - timedelta(seconds=STUCK_KILL_SECONDS)
        with self.rt.database.session() as db:
            stuck = list(
                db.scalars(
                    select(KillRecord.vm_id)
                    .join(Vm, Vm.id == KillRecord.vm_id)
                    .where(
                        Vm.worker_id == self.rt.worker_id,
                        Vm.status == VmStatus.KILLING,
                        KillRecord.outcome == "pending",
                        KillRecord.requested_at <= threshold,
                    )
                    .distinct()
                )
            )
        now = time.monotonic()
        for vm_id in stuck:
            if (
                now - self._last_retry.get(vm_id, -STUCK_KILL_SECONDS)
                < STUCK_KILL_SECONDS
            ):
                continue
            self._last_retry[vm_id] = now
            extra = {"vm_id": vm_id, "worker_id": self.rt.worker_id}
            with self.rt.vms.locked(vm_id, blocking=False) as acquired:
                if not acquired:
                    continue
                logger.warning(
                    "finishing kill of VM %s that was accepted but not carried out",
                    vm_id,
                    extra=extra,
                )
                try:
                    self.rt.vms.kill_locked(vm_id, None)
                except FleetvmError as exc:
                    logger.error(
                        "kill of VM %s failed again, retrying in %.0f s: %s",
                        vm_id,
                        STUCK_KILL_SECONDS,
                        exc.message,
                        extra=extra,
                    )
                    continue
            self.rt.vms.finish_pending_records(vm_id, "killed")
            self._last_retry.pop(vm_id, None)
