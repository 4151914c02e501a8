"""Start-up reconciliation: make this host's VMs agree with the database.

Runs before the worker consumes its queue, so kills that were accepted while it
was down, and expiries that came due meanwhile, are carried out first. The
executions it was running when it stopped are marked failed.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from fleetvm.db.models import LIVE_STATUSES, KillReason, Vm, VmStatus, utcnow
from fleetvm.db.vms import record_kill_intent, transition
from fleetvm.worker.executions import fail_lost_executions
from fleetvm.worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)


def reconcile(rt: WorkerRuntime) -> dict[str, int]:
    """Finish pending kills and expiries, adopt live VMs, remove unknown ones."""
    counts = {"adopted": 0, "killed": 0, "expired": 0, "lost": 0, "orphans": 0}
    vms = rt.vms

    for vm_id in vms.owned_vm_ids((VmStatus.KILLING,)):
        vms.kill(vm_id, None)
        vms.finish_pending_records(vm_id, "killed")
        counts["killed"] += 1

    for vm_id in _expired_vm_ids(rt):
        with rt.database.session() as db:
            record_id = record_kill_intent(
                db, vm_id, [VmStatus.ACTIVE], KillReason.EXPIRY
            )
        if record_id is not None:
            vms.kill(vm_id, record_id)
            counts["expired"] += 1

    for vm_id in vms.owned_vm_ids((VmStatus.SPAWNING,)):
        # The spawn task is redelivered or sent again by the next execute;
        # whatever half-started VM is on disk goes first.
        rt.vms.driver.kill(vm_id)

    for vm_id in vms.owned_vm_ids((VmStatus.ACTIVE,)):
        if rt.vms.driver.is_alive(vm_id):
            counts["adopted"] += 1
            logger.info("adopted running VM %s", vm_id, extra=_extra(rt, vm_id))
            continue
        with rt.database.session() as db:
            transition(db, vm_id, [VmStatus.ACTIVE], VmStatus.LOST, killed_at=utcnow())
        rt.vms.driver.kill(vm_id)
        counts["lost"] += 1
        logger.warning(
            "VM %s was not running when worker %s started; marked lost",
            vm_id,
            rt.worker_id,
            extra=_extra(rt, vm_id),
        )

    live = set(vms.owned_vm_ids(LIVE_STATUSES))
    for vm_id in rt.vms.driver.list_vms():
        if vm_id not in live:
            rt.vms.driver.kill(vm_id)
            counts["orphans"] += 1
            logger.warning(
                "removed VM %s found on disk with no live record",
                vm_id,
                extra=_extra(rt, vm_id),
            )

    counts["lost_executions"] = len(fail_lost_executions(rt))

    logger.info(
        "worker %s reconciled: %s",
        rt.worker_id,
        counts,
        extra={"worker_id": rt.worker_id},
    )
    return counts


def _expired_vm_ids(rt: WorkerRuntime) -> list[str]:
    with rt.database.session() as db:
        return list(
            db.scalars(
                select(Vm.id).where(
                    Vm.worker_id == rt.worker_id,
                    Vm.status == VmStatus.ACTIVE,
                    Vm.expires_at <= utcnow(),
                )
            )
        )


def _extra(rt: WorkerRuntime, vm_id: str) -> dict[str, str]:
    return {"vm_id": vm_id, "worker_id": rt.worker_id}
