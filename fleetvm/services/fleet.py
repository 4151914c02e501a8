"""What operators read about the fleet: its workers and the record of every kill.

Both are for administrators; the API and ``fleetvm workers`` call the same
functions.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from fleetvm.db.models import LIVE_STATUSES, KillRecord, User, Vm, VmStatus, Worker
from fleetvm.services.vms import heartbeat_age, worker_is_live
from fleetvm.settings import Settings

#: Most kill records one listing returns.
MAX_KILL_RECORDS = 1000


def worker_state(worker: Worker, settings: Settings) -> str:
    """``up``, ``dead`` (silent for longer than dead_after_seconds) or ``stopped``."""
    if worker_is_live(worker, settings):
        return "up"
    return "dead" if worker.state == "up" else worker.state


def list_workers(db: DbSession, settings: Settings) -> list[dict[str, Any]]:
    """Every registered worker with its state, heartbeat age and VM counts."""
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
    """The newest kill records first, optionally of one session or VM."""
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
