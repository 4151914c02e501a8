"""Settings for every fleetvm process, in one class with sections.

Values come, highest priority first, from arguments passed in code, from
``FLEETVM_<SECTION>__<KEY>`` environment variables (``FLEETVM_API__PORT=9000``),
from the TOML file named by ``FLEETVM_CONFIG`` (sections as tables:
``[api]`` then ``port = 9000``), and from the defaults below.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

WORKER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Worker threads that never run user code, so spawns and kills always find one.
RESERVED_WORKER_THREADS = 4


class DatabaseSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the database, for example "
            "postgresql+psycopg://user@host/fleetvm. Empty means SQLite in the data "
            "directory, which suits one node only."
        ),
    )
    echo: bool = Field(default=False, description="Log every SQL statement.")
    pool_size: int = Field(
        default=10,
        gt=0,
        description=(
            "Connections each process keeps open to a server database, and as "
            "many again in bursts. Every API and worker process has its own pool, "
            "so keep their sum under the server's max_connections."
        ),
    )


class BrokerSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description=(
            "Celery broker URL (redis:// or amqp://). Empty means the embedded "
            "Redis server that `fleetvm serve` starts on a Unix socket in the data "
            "directory."
        ),
    )
    result_url: str | None = Field(
        default=None,
        description=(
            "Celery result backend URL. Empty means the broker URL when it is "
            "Redis, and rpc:// (answers as messages to the sender) otherwise."
        ),
    )
    visibility_timeout_seconds: int = Field(
        default=300,
        gt=0,
        description=(
            "Redis only: seconds after which a task that a worker took but never "
            "acknowledged (the worker died) is given out again. Longer than any "
            "spawn or kill takes; shorter means a lost worker's tasks return "
            "sooner. RabbitMQ returns them as soon as the connection drops."
        ),
    )


class ApiSettings(BaseModel):
    host: str = Field(default="127.0.0.1", description="Address the API binds.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port of the API.")
    max_upload_bytes: int = Field(
        default=32 * 1024 * 1024,
        gt=0,
        description=(
            "Largest file, in bytes, that /upload accepts and /download returns. "
            "Files travel inside broker messages, so keep this well under the "
            "broker's message limit."
        ),
    )


class AuthSettings(BaseModel):
    secret_key: str | None = Field(
        default=None,
        description=(
            "Key that signs bearer tokens. Every API node of a cluster needs the "
            "same one. Empty means a random key kept in <data dir>/secret-key."
        ),
    )
    token_ttl_seconds: int = Field(
        default=3600, gt=0, description="Lifetime of a bearer token, in seconds."
    )
    bootstrap_admin: str = Field(
        default="admin",
        description=(
            "Name of the administrator created on first start, whose API key is "
            "written to <data dir>/admin-api-key."
        ),
    )


class MultinodeSettings(BaseModel):
    worker_id: str = Field(
        default="local",
        description=(
            "Id of this worker node: letters, digits, '-' and '_'. The worker "
            "consumes the queue vm_queue_<worker_id>."
        ),
    )
    strict_kill_ownership: bool = Field(
        default=True,
        description=(
            "When a kill task runs on a worker that does not own the VM, send it "
            "once to the owner's queue instead of failing it."
        ),
    )
    heartbeat_seconds: float = Field(
        default=2.0, gt=0, description="Interval between worker heartbeats."
    )
    dead_after_seconds: float = Field(
        default=15.0,
        gt=0,
        description="Heartbeat silence after which a worker counts as dead.",
    )
    worker_concurrency: int = Field(
        default=32,
        ge=RESERVED_WORKER_THREADS + 1,
        description=(
            "Threads of a worker that run VM tasks. A long execute holds one "
            "thread for its whole timeout; a few threads are always kept free "
            "for spawns and kills."
        ),
    )
    max_commands_per_user: int = Field(
        default=4,
        gt=0,
        description=(
            "Most executes, uploads and downloads of one user that a worker runs "
            "at once; more get 429, so one user cannot hold every thread."
        ),
    )
    capacity: int = Field(
        default=100, gt=0, description="Most live VMs a worker accepts."
    )


class VmSettings(BaseModel):
    driver: Literal["process", "qemu"] = Field(
        default="process",
        description=(
            "VM driver: 'process' (sandboxed processes) or 'qemu' (a QEMU microvm "
            "guest with its own kernel; see the qemu section)."
        ),
    )
    sandbox: Literal["auto", "bubblewrap", "none"] = Field(
        default="auto",
        description=(
            "Isolation of the process driver. 'auto' uses bubblewrap when it "
            "works on this host and falls back to plain processes with a warning; "
            "'bubblewrap' fails instead of falling back; 'none' never sandboxes."
        ),
    )
    sandbox_user: str = Field(
        default="nobody",
        description="Host account that sandboxed VM processes run as, when root.",
    )
    guest_python: str = Field(
        default="/usr/bin/python3",
        description=(
            "Python interpreter that runs the guest agent and user code inside a "
            "VM. It must be readable by the sandbox user."
        ),
    )
    min_lifetime_seconds: int = Field(
        default=20,
        gt=0,
        description="Minimum vm_lifetime_seconds a session may request.",
    )
    max_lifetime_seconds: int = Field(
        default=86400,
        gt=0,
        description="Maximum vm_lifetime_seconds a session may request.",
    )
    default_lifetime_seconds: int = Field(
        default=300, gt=0, description="Lifetime of a VM when the session sets none."
    )
    default_memory_mb: int = Field(default=512, gt=0, description="Default VM memory.")
    max_memory_mb: int = Field(default=8192, gt=0, description="Largest memory_mb.")
    default_vcpu_count: int = Field(default=1, gt=0, description="Default vCPUs.")
    max_vcpu_count: int = Field(default=8, gt=0, description="Largest vcpu_count.")
    max_processes: int = Field(
        default=512,
        gt=0,
        description=(
            "Most processes and threads one VM may run at once, so a fork bomb "
            "stays inside its VM. Enforced with the pids cgroup where the host "
            "has one."
        ),
    )
    disk_mb: int = Field(
        default=256,
        gt=0,
        description=(
            "Size, in MiB, of each of a VM's writable home and /tmp, so one VM "
            "cannot fill the host's disk. Both are in-memory file systems, so "
            "their files also count against the VM's memory_mb."
        ),
    )
    spawn_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        description=(
            "Seconds a new VM has to respond to its first ping. A qemu guest "
            "under TCG boots in several seconds, more on a busy host, so raise "
            "this to 60 or more there."
        ),
    )
    reaper_interval_seconds: float = Field(
        default=0.25,
        gt=0,
        description=(
            "Maximum sleep of the expiry reaper between database checks, so a VM "
            "dies at most this long after its expires_at (plus the kill itself)."
        ),
    )


class QemuSettings(BaseModel):
    binary: str = Field(
        default="qemu-system-x86_64",
        description="QEMU program of the qemu driver (Debian package qemu-system-x86).",
    )
    image_dir: Path | None = Field(
        default=None,
        description=(
            "Directory of the guest image that `fleetvm image build` writes: "
            "vmlinuz, initramfs.cpio.gz and manifest.json. Empty means "
            "<data dir>/images/qemu."
        ),
    )
    accel: Literal["auto", "kvm", "tcg"] = Field(
        default="auto",
        description=(
            "QEMU accelerator. 'auto' boots one test guest with KVM when /dev/kvm "
            "is usable, and uses TCG (emulation, several times slower) when that "
            "fails or times out; 'kvm' fails instead of falling back."
        ),
    )
    kvm_probe_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Seconds the KVM test guest has to boot and power off. Some hosts "
            "have a /dev/kvm whose guests hang, so the probe must time out."
        ),
    )
    quit_timeout_seconds: float = Field(
        default=2.0,
        gt=0,
        description=(
            "Seconds QEMU has to exit after a QMP quit before the driver sends SIGKILL."
        ),
    )
    network: bool = Field(
        default=False,
        description=(
            "Give guests QEMU's user-mode network (outbound connections through "
            "the host). Off means guests have no network device."
        ),
    )


class KillSettings(BaseModel):
    wait_seconds: float = Field(
        default=15.0,
        gt=0,
        description=(
            "How long POST /kill waits for the owner worker's answer before it "
            "returns outcome kill_pending."
        ),
    )
    confirm_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How long a driver waits for a killed VM's processes to vanish.",
    )


class ExecutionSettings(BaseModel):
    start_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Maximum seconds an execution from POST /execute_async waits in its "
            "worker's queue. One that has not started by then is discarded and "
            "ends failed. Raise it if workers are often busy for longer."
        ),
    )
    result_margin_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Seconds allowed beyond the start timeout plus the command's own "
            "timeout before a started execution with no result ends failed, for "
            "the guest agent, the broker and the database write. Keep it above "
            "the 10 s that the process driver waits beyond a command's timeout."
        ),
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FLEETVM_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    data_dir: Path = Field(
        default=Path(".fleetvm"),
        description="Directory of the SQLite database, embedded broker and VMs.",
    )
    database: DatabaseSettings = DatabaseSettings()
    broker: BrokerSettings = BrokerSettings()
    api: ApiSettings = ApiSettings()
    auth: AuthSettings = AuthSettings()
    multinode: MultinodeSettings = MultinodeSettings()
    vm: VmSettings = VmSettings()
    qemu: QemuSettings = QemuSettings()
    kill: KillSettings = KillSettings()
    execution: ExecutionSettings = ExecutionSettings()

    @field_validator("multinode")
    @classmethod
    def _check_worker_id(cls, value: MultinodeSettings) -> MultinodeSettings:
        if not WORKER_ID_PATTERN.match(value.worker_id):
            raise ValueError(
                f"invalid worker_id {value.worker_id!r}: use 1 to 64 letters, "
                "digits, '-' or '_'"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("FLEETVM_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, Path(config_file)))
        return tuple(sources)

    @cached_property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.resolved_data_dir / 'fleetvm.sqlite3'}"

    @property
    def embedded_broker_socket(self) -> Path:
        return self.resolved_data_dir / "redis.sock"

    @property
    def broker_url(self) -> str:
        if self.broker.url:
            return self.broker.url
        return f"redis+socket://{self.embedded_broker_socket}"

    @property
    def result_url(self) -> str:
        if self.broker.result_url:
            return self.broker.result_url
        url = self.broker_url
        if url.startswith(("redis://", "rediss://", "redis+socket://")):
            return url
        return "rpc://"

    @property
    def vms_dir(self) -> Path:
        return self.resolved_data_dir / "vms"

    @property
    def worker_queue(self) -> str:
        return queue_name(self.multinode.worker_id)


def queue_name(worker_id: str) -> str:
    """Return the Celery queue that only worker ``worker_id`` consumes."""
    return f"vm_queue_{worker_id}"
