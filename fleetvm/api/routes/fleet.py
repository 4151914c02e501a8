"""The fleet, for administrators: workers and kill records."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from fleetvm.api.deps import AdminUser, Db, State
from fleetvm.api.schemas import KillRecordPublic, WorkerPublic
from fleetvm.services.fleet import MAX_KILL_RECORDS, list_kill_records, list_workers
from fleetvm.services.sessions import parse_session_id

router = APIRouter(prefix="/v1", tags=["fleet"])


@router.get("/workers", response_model=list[WorkerPublic])
def read_workers(admin: AdminUser, db: Db, state: State) -> list[WorkerPublic]:
    """List the workers with their state, heartbeat age and VM counts."""
    return [WorkerPublic(**row) for row in list_workers(db, state.settings)]


@router.get("/kills", response_model=list[KillRecordPublic])
def read_kills(
    admin: AdminUser,
    db: Db,
    session_id: Annotated[str | None, Query(max_length=100)] = None,
    vm_id: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_KILL_RECORDS)] = 100,
) -> list[KillRecordPublic]:
    """List kill records, newest first: who asked, worker, hops, outcome, latency."""
    if session_id is not None:
        session_id = parse_session_id(session_id)
    rows = list_kill_records(db, session_id=session_id, vm_id=vm_id, limit=limit)
    return [KillRecordPublic(**row) for row in rows]
