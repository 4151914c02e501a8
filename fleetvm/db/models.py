"""Tables of fleetvm: the source of truth for users, sessions and VM ownership."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    SQLite keeps no timezone, so values are normalised on the way in and out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class VmStatus(enum.StrEnum):
    SPAWNING = "spawning"
    ACTIVE = "active"
    KILLING = "killing"
    #: Ended by a kill request, an administrator or a shutdown.
    KILLED = "killed"
    #: Ended by the reaper at expires_at.
    EXPIRED = "expired"
    #: The driver could not start it.
    FAILED = "failed"
    #: Its processes vanished without a kill, found when the worker reconciled.
    LOST = "lost"


LIVE_STATUSES = (VmStatus.SPAWNING, VmStatus.ACTIVE, VmStatus.KILLING)
ENDED_STATUSES = (VmStatus.KILLED, VmStatus.EXPIRED, VmStatus.FAILED, VmStatus.LOST)


class KillReason(enum.StrEnum):
    USER = "user"
    EXPIRY = "expiry"
    ADMIN = "admin"
    WORKER_LOST = "worker_lost"
    SHUTDOWN = "shutdown"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Session(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    vm_lifetime_seconds: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    vcpu_count: Mapped[int] = mapped_column(Integer)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    env: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    current_vm_id: Mapped[str | None] = mapped_column(String(64))


class Vm(Base):
    __tablename__ = "vms"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    worker_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    killed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    kill_reason: Mapped[str | None] = mapped_column(String(16))
    isolation: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(String(1000))


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    queue: Mapped[str] = mapped_column(String(80))
    host: Mapped[str] = mapped_column(String(255))
    capacity: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class KillRecord(Base):
    __tablename__ = "kill_records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_id: Mapped[str] = mapped_column(String(64), index=True)
    session_id: Mapped[str] = mapped_column(String(36), index=True)
    requested_by: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(16))
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    worker_id: Mapped[str | None] = mapped_column(String(64))
    redispatches: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(String(32), default="pending")
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    latency_ms: Mapped[float | None] = mapped_column(Float)


class OutputText(TypeDecorator[str]):
    """Command output, stored as UTF-8 bytes.

    Output may contain NUL characters, which a PostgreSQL text column rejects.
    """

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> Any:
        return None if value is None else value.encode("utf-8")

    def process_result_value(self, value: bytes | None, dialect: Any) -> Any:
        return None if value is None else bytes(value).decode("utf-8")


class ExecutionStatus(enum.StrEnum):
    #: Recorded and sent to the worker, which has not started it yet.
    QUEUED = "queued"
    RUNNING = "running"
    #: The command ran and its result is stored, whatever its exit code.
    COMPLETED = "completed"
    #: No result: the VM was gone, the worker was lost, or the deadline passed.
    FAILED = "failed"


UNFINISHED_EXECUTION_STATUSES = (ExecutionStatus.QUEUED, ExecutionStatus.RUNNING)


class Execution(Base):
    """A command from POST /execute_async and, once the worker finishes, its result."""

    __tablename__ = "executions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id"), index=True)
    vm_id: Mapped[str] = mapped_column(String(64), index=True)
    worker_id: Mapped[str] = mapped_column(String(64), index=True)
    #: The session's owner, who may read the execution besides administrators.
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    language: Mapped[str] = mapped_column(String(16))
    timeout_seconds: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    stdout: Mapped[str | None] = mapped_column(OutputText)
    stderr: Mapped[str | None] = mapped_column(OutputText)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    timed_out: Mapped[bool | None] = mapped_column(Boolean)
    execution_time: Mapped[float | None] = mapped_column(Float)
    cpu_time: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: A queued execution not started by then is discarded and fails.
    start_deadline_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: An execution with no result by then fails.
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
