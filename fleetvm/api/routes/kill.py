"""POST /kill: end a session's VM before its lifetime runs out."""

from __future__ import annotations

from fastapi import APIRouter

from fleetvm.api.deps import CurrentUser, Vms
from fleetvm.api.schemas import KillRequest, KillResponse

router = APIRouter(tags=["vms"])


@router.post(
    "/kill",
    response_model=KillResponse,
    responses={
        400: {"description": "session_id is not a UUID"},
        401: {"description": "Missing or invalid credentials"},
        403: {"description": "The session belongs to another user"},
        404: {"description": "No such session, or it has no VM assigned"},
    },
)
def kill_vm(body: KillRequest, user: CurrentUser, vms: Vms) -> KillResponse:
    """Kill the session's VM through its owner worker and report the outcome."""
    return KillResponse(**vms.kill(user, body.session_id))
