"""Sessions: creation, lookup with ownership checks, status and listing."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from fleetvm.db.models import LIVE_STATUSES, Session, User, Vm, VmStatus, utcnow
from fleetvm.errors import (
    InvalidRequest,
    InvalidSessionId,
    PermissionDenied,
    SessionNotFound,
)
from fleetvm.settings import Settings

MAX_SESSION_ID_ECHO = 80


def parse_session_id(raw: str) -> str:
    """Return the canonical form of a session id, or raise InvalidSessionId."""
    try:
        return str(uuid.UUID(raw))
    except (ValueError, AttributeError, TypeError) as exc:
        excerpt = raw[:MAX_SESSION_ID_ECHO] + (
            "..." if len(raw) > MAX_SESSION_ID_ECHO else ""
        )
        raise InvalidSessionId(
            f"Invalid session_id {excerpt!r}: expected a UUID such as "
            "'0b6c7d7e-4a44-4f7e-9a55-3c1d2b7e9f10', as returned by "
            "POST /v1/sessions/session."
        ) from exc


def get_owned_session(db: DbSession, user: User, raw_session_id: str) -> Session:
    """Load a session the user may act on: their own, or any for an admin."""
    session_id = parse_session_id(raw_session_id)
    session = db.get(Session, session_id)
    if session is None:
        raise SessionNotFound(f"Session {session_id} not found.")
    if session.user_id != user.id and not user.is_admin:
        raise PermissionDenied(
            f"Session {session_id} belongs to another user; only its owner or an "
            "administrator may use it."
        )
    return session


def create_session(
    db: DbSession,
    settings: Settings,
    user: User,
    vm_lifetime_seconds: int | None,
    memory_mb: int | None,
    vcpu_count: int | None,
    metadata: dict[str, Any] | None,
    env: dict[str, str] | None,
) -> Session:
    vm = settings.vm
    lifetime = vm_lifetime_seconds or vm.default_lifetime_seconds
    _check_range(
        "vm_lifetime_seconds",
        lifetime,
        vm.min_lifetime_seconds,
        vm.max_lifetime_seconds,
    )
    memory = memory_mb or vm.default_memory_mb
    _check_range("memory_mb", memory, 64, vm.max_memory_mb)
    vcpus = vcpu_count or vm.default_vcpu_count
    _check_range("vcpu_count", vcpus, 1, vm.max_vcpu_count)

    session = Session(
        id=str(uuid.uuid4()),
        user_id=user.id,
        vm_lifetime_seconds=lifetime,
        memory_mb=memory,
        vcpu_count=vcpus,
        metadata_=metadata or {},
        env=env or {},
    )
    db.add(session)
    db.flush()
    return session


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidRequest(
            f"Invalid {name} {value}: it must be from {low} to {high}."
        )


def current_vm(db: DbSession, session: Session) -> Vm | None:
    return db.get(Vm, session.current_vm_id) if session.current_vm_id else None


def session_status(db: DbSession, session: Session) -> dict[str, Any]:
    vm = current_vm(db, session)
    now = utcnow()
    alive = vm is not None and vm.status in LIVE_STATUSES
    uptime = expires_in = None
    if vm is not None and vm.status == VmStatus.ACTIVE and vm.started_at:
        uptime = (now - vm.started_at).total_seconds()
        if vm.expires_at:
            expires_in = max((vm.expires_at - now).total_seconds(), 0.0)
    return {
        "session_id": session.id,
        "exists": True,
        "vm_assigned": vm is not None,
        "vm_alive": alive,
        "vm_status": vm.status if vm else None,
        "vm_id": vm.id if vm else None,
        "worker_id": vm.worker_id if vm else None,
        "isolation": vm.isolation if vm else None,
        "uptime_seconds": uptime,
        "expires_in_seconds": expires_in,
        "expires_at": _iso(vm.expires_at) if vm else None,
        "created_at": _iso(session.created_at),
    }


def describe_session(db: DbSession, session: Session) -> dict[str, Any]:
    status = session_status(db, session)
    return {
        "session_id": session.id,
        "user_id": session.user_id,
        "vm_lifetime_seconds": session.vm_lifetime_seconds,
        "memory_mb": session.memory_mb,
        "vcpu_count": session.vcpu_count,
        "metadata": session.metadata_,
        "env_keys": sorted(session.env or {}),
        "created_at": status["created_at"],
        "vm_id": status["vm_id"],
        "vm_status": status["vm_status"],
        "status": "active" if status["vm_alive"] else "idle",
    }


def list_sessions(
    db: DbSession, user: User, metadata: dict[str, Any] | None, limit: int
) -> list[dict[str, Any]]:
    """List the user's sessions, newest first, matching the metadata filter."""
    query = select(Session).where(Session.user_id == user.id)
    query = query.order_by(Session.created_at.desc())
    found: list[dict[str, Any]] = []
    # NOTE: the metadata filter runs in Python because JSON containment differs
    # between SQLite and PostgreSQL; it scans the user's sessions newest first.
    for session in db.scalars(query):
        stored = session.metadata_ or {}
        if metadata and any(stored.get(k) != v for k, v in metadata.items()):
            continue
        found.append(describe_session(db, session))
        if len(found) >= limit:
            break
    return found


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
