"""Request and response bodies, in the shapes the instavm SDK sends and reads."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictStr, field_validator, model_validator

MAX_CODE_CHARS = 1_000_000
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"


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
        for name, value in (env or {}).items():
            if not ENV_NAME.fullmatch(name):
                raise ValueError(
                    f"invalid environment variable name {name[:80]!r}: use letters, "
                    "digits and '_', not starting with a digit"
                )
            if "\x00" in value:
                raise ValueError(f"environment variable {name} contains a NUL byte")
        return env


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
        return self

    @property
    def source(self) -> str:
        return self.command if self.command is not None else self.code or ""


class ExecuteResult(BaseModel):
    stdout: str
    stderr: str
    exit_code: int
    execution_time: float = Field(description="Seconds the command ran in the VM.")
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


class UserPublic(BaseModel):
    id: int
    username: str
    is_admin: bool
    created_at: datetime


class ApiKeyCreate(BaseModel):
    name: StrictStr = Field(default="default", min_length=1, max_length=100)


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
