"""Fleet views for administrators: workers, kill records, retiring a worker.

The API routes and the ``fleetvm workers`` command call the same functions.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session as DbSession

from fleetvm.db.models import (
    LIVE_STATUSES,
    KillReason,
    KillRecord,
    User,
    Vm,
    VmStatus,
    Worker,
    utcnow,
)
from fleetvm.errors import Conflict, NotFound
from fleetvm.services.vms import heartbeat_age, worker_is_live
from fleetvm.settings import Settings

#: Maximum number of kill records one listing returns.
MAX_KILL_RECORDS = 1000


def worker_state(worker: Worker, settings: Settings) -> str:
    """Return ``up``, ``dead`` (silent longer than dead_after_seconds),
    ``stopped`` or ``retired``."""
    if worker_is_live(worker, settings):
        return "up"
    return "dead" if worker.state == "up" else worker.state


def list_workers(db: DbSession, settings: Settings) -> list[dict[str, Any]]:
    """List every registered worker with its state, heartbeat age and VM counts."""
    counts: dict[str, dict[str, int]] = {}
    rows = db.execute(
        select(Vm.worker_id, Vm.status, func.count())
        .where(Vm.status.in_([str(s) for s in LIVE_STATUSES]))
        .group_by(Vm.worker_id, Vm.status)
    )
    for worker_id, status, count in rows:
        counts.setdefault(worker_id, {})[status] = count

    workers = []
    for worker in db.scalars(select(Worker).order_by(Worker.id)):
        by_status = counts.get(worker.id, {})
        workers.append(
            {
                "worker_id": worker.id,
                "queue": worker.queue,
                "host": worker.host,
                "state": worker_state(worker, settings),
                "started_at": worker.started_at,
                "last_heartbeat": worker.last_heartbeat,
                "heartbeat_age_seconds": round(heartbeat_age(worker) or 0.0, 3),
                "capacity": worker.capacity,
                "active_vms": by_status.get(VmStatus.ACTIVE, 0),
                "spawning_vms": by_status.get(VmStatus.SPAWNING, 0),
                "killing_vms": by_status.get(VmStatus.KILLING, 0),
            }
        )
    return workers


def list_kill_records(
    db: DbSession,
    session_id: str | None = None,
    vm_id: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """List kill records, newest first, optionally of one session or VM."""
    query = (
        select(KillRecord, User.username)
        .outerjoin(User, User.id == KillRecord.requested_by)
        .order_by(KillRecord.id.desc())
        .limit(min(limit, MAX_KILL_RECORDS))
    )
    if session_id is not None:
        query = query.where(KillRecord.session_id == session_id)
    if vm_id is not None:
        query = query.where(KillRecord.vm_id == vm_id)
    return [
        {
            "id": record.id,
            "vm_id": record.vm_id,
            "session_id": record.session_id,
            "requested_by": username,
            "reason": record.reason,
            "requested_at": record.requested_at,
            "worker_id": record.worker_id,
            "redispatches": record.redispatches,
            "outcome": record.outcome,
            "completed_at": record.completed_at,
            "latency_ms": record.latency_ms,
        }
        for record, username in db.execute(query)
    ]


def retire_worker(db: DbSession, settings: Settings, worker_id: str) -> int:
    """Give up on a dead worker's host: mark its live VMs lost; return how many.

    This is for a host that is not coming back. Its VMs died with it, or its
    worker removes them as orphans if it ever starts again with the same id.
    Their sessions get a new VM on another worker at their next execute, and
    their pending kills end with outcome ``worker_lost``.
    """
    worker = db.get(Worker, worker_id)
    if worker is None:
        raise NotFound(
            f"Worker {worker_id!r} not found; `fleetvm workers` lists the "
            "registered ones."
        )
    if worker_is_live(worker, settings):
        raise Conflict(
            f"Worker {worker_id!r} is up (heartbeat "
            f"{heartbeat_age(worker):.0f} s ago); stop it before retiring it."
        )
    now = utcnow()
    lost_vms = select(Vm.id).where(
        Vm.worker_id == worker_id, Vm.status.in_([str(s) for s in LIVE_STATUSES])
    )
    db.execute(
        update(KillRecord)
        .where(KillRecord.vm_id.in_(lost_vms), KillRecord.outcome == "pending")
        .values(outcome="worker_lost", worker_id=worker_id, completed_at=now)
        .execution_options(synchronize_session=False)
    )
    lost = db.execute(
        update(Vm)
        .where(
            Vm.worker_id == worker_id, Vm.status.in_([str(s) for s in LIVE_STATUSES])
        )
        .values(
            status=str(VmStatus.LOST),
            kill_reason=str(KillReason.WORKER_LOST),
            killed_at=now,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    worker.state = "retired"
    return lost
