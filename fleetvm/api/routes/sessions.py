"""Sessions: create, inspect and list."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from fleetvm.api.deps import (
    CurrentUser,
    Db,
    State,
    api_key_header,
    oauth2_scheme,
    resolve_user,
)
from fleetvm.api.schemas import (
    SessionCreate,
    SessionCreated,
    SessionInfo,
    SessionStatus,
)
from fleetvm.errors import InvalidRequest
from fleetvm.services import sessions as service

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

MAX_FILTER_CHARS = 4096


@router.post("/session", response_model=SessionCreated)
def create_session(
    body: SessionCreate,
    db: Db,
    state: State,
    token: Annotated[str | None, Depends(oauth2_scheme)],
    api_key: Annotated[str | None, Depends(api_key_header)],
) -> SessionCreated:
    """Create a session; its VM starts with the first execute."""
    user = resolve_user(db, state, token, api_key or body.api_key)
    session = service.create_session(
        db,
        state.settings,
        user,
        body.vm_lifetime_seconds,
        body.memory_mb,
        body.vcpu_count,
        body.metadata,
        body.env,
    )
    return SessionCreated(
        session_id=session.id,
        vm_lifetime_seconds=session.vm_lifetime_seconds,
        memory_mb=session.memory_mb,
        vcpu_count=session.vcpu_count,
        created_at=session.created_at,
    )


@router.get("/status/{session_id}", response_model=SessionStatus)
def read_session_status(session_id: str, user: CurrentUser, db: Db) -> SessionStatus:
    """Return whether the session's VM is alive, its uptime and time left."""
    session = service.get_owned_session(db, user, session_id)
    return SessionStatus(**service.session_status(db, session))


@router.get("/session/{session_id}", response_model=SessionInfo)
def read_session(session_id: str, user: CurrentUser, db: Db) -> SessionInfo:
    """Return the session's record: resources, metadata and current VM."""
    session = service.get_owned_session(db, user, session_id)
    return SessionInfo(**service.describe_session(db, session))


@router.get("/sandboxes", response_model=list[SessionInfo])
def list_sandboxes(
    user: CurrentUser,
    db: Db,
    metadata: Annotated[
        str | None, Query(description="JSON object that session metadata must contain.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[SessionInfo]:
    """List the caller's sessions, newest first, optionally filtered by metadata."""
    metadata_filter = _parse_metadata_filter(metadata)
    return [
        SessionInfo(**row)
        for row in service.list_sessions(db, user, metadata_filter, limit)
    ]


def _parse_metadata_filter(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    if len(raw) > MAX_FILTER_CHARS:
        raise InvalidRequest(
            f"Invalid metadata filter: longer than {MAX_FILTER_CHARS} characters."
        )
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(
            f"Invalid metadata filter {raw[:80]!r}: not JSON."
        ) from exc
    if not isinstance(value, dict):
        raise InvalidRequest("Invalid metadata filter: expected a JSON object.")
    return value
