"""Request and response bodies, in the shapes the instavm SDK sends and reads."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictStr, field_validator, model_validator

MAX_CODE_CHARS = 1_000_000
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 16
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def check_encodable(value: str, field: str) -> str:
    """Reject text that is not valid Unicode, such as a lone surrogate.

    JSON escapes such as "\\ud800" decode to such strings, which cannot be
    stored, passed to a VM or written back in a response.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{field} contains an invalid Unicode character at position {exc.start}"
            " (a lone surrogate)"
        ) from None
    return value


def check_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Bound metadata's size and depth, and require valid Unicode throughout."""
    try:
        encoded = json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("metadata contains a lone surrogate") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    pending: list[tuple[Any, int]] = [(metadata, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata is nested deeper than {MAX_METADATA_DEPTH}")
        if isinstance(value, dict):
            pending.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)
    return metadata


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"


#: Limits on a session's environment. Linux rejects one NAME=value string over
#: 128 KiB, and the whole environment shares the argument space of a new
#: process, so larger ones could never start a VM.
MAX_ENV_VARS = 256
MAX_ENV_BYTES = 64 * 1024


class SessionCreate(BaseModel):
    api_key: str | None = Field(
        default=None,
        description="API key, for clients such as the instavm SDK that send it "
        "in the body instead of the X-API-Key header.",
    )
    vm_lifetime_seconds: int | None = Field(default=None, ge=1, le=10_000_000)
    memory_mb: int | None = Field(default=None, ge=1, le=10_000_000)
    vcpu_count: int | None = Field(default=None, ge=1, le=1024)
    metadata: dict[str, Any] | None = None
    env: dict[str, str] | None = Field(
        default=None, description="Environment variables of the session's VMs."
    )

    @field_validator("env")
    @classmethod
    def _check_env(cls, env: dict[str, str] | None) -> dict[str, str] | None:
        if env is None:
            return None
        if len(env) > MAX_ENV_VARS:
            raise ValueError(
                f"{len(env)} environment variables; at most {MAX_ENV_VARS} are allowed"
            )
        total = sum(len(name) + len(value) + 2 for name, value in env.items())
        if total > MAX_ENV_BYTES:
            raise ValueError(
                f"environment of {total} characters; at most {MAX_ENV_BYTES} are "
                "allowed, since the kernel limits what a process can start with"
            )
        for name, value in env.items():
            if not ENV_NAME.fullmatch(name):
                raise ValueError(
                    f"invalid environment variable name {name[:80]!r}: use letters, "
                    "digits and '_', not starting with a digit"
                )
            if "\x00" in value:
                raise ValueError(f"environment variable {name} contains a NUL byte")
            check_encodable(value, f"environment variable {name}")
        return env

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, metadata: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_metadata(metadata) if metadata is not None else None


class SessionCreated(BaseModel):
    session_id: str
    vm_lifetime_seconds: int
    memory_mb: int
    vcpu_count: int
    created_at: datetime


class SessionStatus(BaseModel):
    session_id: str
    exists: bool
    vm_assigned: bool
    vm_alive: bool
    vm_status: str | None
    vm_id: str | None
    worker_id: str | None
    isolation: str | None
    uptime_seconds: float | None
    expires_in_seconds: float | None
    expires_at: str | None
    created_at: str | None


class SessionInfo(BaseModel):
    session_id: str
    user_id: int
    vm_lifetime_seconds: int
    memory_mb: int
    vcpu_count: int
    metadata: dict[str, Any]
    env_keys: list[str]
    created_at: str | None
    vm_id: str | None
    vm_status: str | None
    status: str


class ExecuteRequest(BaseModel):
    command: StrictStr | None = Field(default=None, max_length=MAX_CODE_CHARS)
    code: StrictStr | None = Field(default=None, max_length=MAX_CODE_CHARS)
    session_id: StrictStr
    language: Literal["python", "bash"] = "python"
    timeout: int = Field(default=60, ge=1, le=600, description="Seconds.")

    @model_validator(mode="after")
    def _require_code(self) -> ExecuteRequest:
        if self.command is None and self.code is None:
            raise ValueError("either 'command' or 'code' is required")
        check_encodable(self.source, "command")
        return self

    @property
    def source(self) -> str:
        return self.command if self.command is not None else self.code or ""


class ExecuteResult(BaseModel):
    stdout: str
    stderr: str
    exit_code: int
    execution_time: float = Field(description="Seconds the command ran in the VM.")
    cpu_time: float | None = Field(
        default=None,
        description="User plus system CPU seconds the command and the child "
        "processes it waited for used; null where the VM could not measure it.",
    )
    timed_out: bool
    success: bool
    session_id: str
    vm_id: str


class FileUploaded(BaseModel):
    success: bool = True
    path: str
    size: int
    session_id: str


class FileDownloaded(BaseModel):
    success: bool = True
    filename: str
    content: str = Field(description="File content, base64-encoded.")
    size: int
    session_id: str


class KillRequest(BaseModel):
    session_id: StrictStr = Field(description="Id of the session whose VM to kill.")


class KillResponse(BaseModel):
    message: str
    session_id: str
    vm_id: str
    outcome: Literal["killed", "already_dead", "kill_pending", "failed_not_owner"]
    worker_id: str | None


class WorkerPublic(BaseModel):
    worker_id: str
    queue: str
    host: str
    state: Literal["up", "dead", "stopped", "retired"] = Field(
        description="'dead' means up but silent for longer than "
        "multinode.dead_after_seconds; 'retired' means an operator gave up on it "
        "with `fleetvm workers retire`."
    )
    started_at: datetime
    last_heartbeat: datetime
    heartbeat_age_seconds: float
    capacity: int
    active_vms: int
    spawning_vms: int
    killing_vms: int


class KillRecordPublic(BaseModel):
    id: int
    vm_id: str
    session_id: str
    requested_by: str | None = Field(
        description="User who asked; none for expiry and shutdown."
    )
    reason: str = Field(description="user, admin, expiry, worker_lost or shutdown.")
    requested_at: datetime
    worker_id: str | None = Field(description="Worker that carried the kill out.")
    redispatches: int = Field(
        description="Times the kill task was sent on to the VM's owner."
    )
    outcome: str = Field(
        description="pending, killed, already_dead, failed_not_owner, or "
        "worker_lost when its worker was retired."
    )
    completed_at: datetime | None
    latency_ms: float | None = Field(description="From the request to the outcome.")


class UserPublic(BaseModel):
    id: int
    username: str
    is_admin: bool
    created_at: datetime


class ApiKeyCreate(BaseModel):
    name: StrictStr = Field(
        default="default", min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$"
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        return check_encodable(name, "name")


class ApiKeyPublic(BaseModel):
    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="The new key. It is shown only this once.")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: bool
    live_workers: int


class ExecutionSubmitted(BaseModel):
    task_id: str = Field(description="Id to read the result from GET /v1/executions.")
    status: Literal["queued", "running", "completed", "failed"]
    session_id: str
    vm_id: str
    worker_id: str
    created_at: datetime


class ExecutionResult(BaseModel):
    task_id: str
    status: Literal["queued", "running", "completed", "failed"] = Field(
        description="completed when the command ran, whatever its exit code. "
        "failed when no result can come, and error then says why."
    )
    is_complete: bool = Field(description="True once the status is final.")
    success: bool = Field(
        description="True if the command completed with exit code 0 in time."
    )
    serialized_stdout: str = Field(
        description="Standard output as plain text, empty until complete."
    )
    serialized_stderr: str = Field(
        description="Standard error as plain text, empty until complete. For a "
        "failed execution it ends with a '[fleetvm]' line that repeats error."
    )
    exit_code: int | None
    timed_out: bool | None
    execution_time: float | None = Field(
        description="Seconds the command ran in the VM."
    )
    cpu_time: float | None = Field(
        description="User plus system CPU seconds the command and the child "
        "processes it waited for used; null where the VM could not measure it."
    )
    error: str | None = Field(description="Why a failed execution has no result.")
    language: str
    session_id: str
    vm_id: str
    worker_id: str
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
