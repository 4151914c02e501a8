"""VM driver that runs each VM as a sandboxed process tree on this host.

Every VM has a directory ``<vms_dir>/<vm_id>/`` that the driver's user owns, with
mode 0711, and that the VM cannot write:

- ``state.json``: how to find the VM's processes again (``VmState``). It is
  written before the VM runs any code of its own, with mode 0600, and a driver
  ignores one that another user owns or others can write.
- ``agent.py``: the copy of ``fleetvm/guest/agent.py`` that the VM runs.
- ``agent.sock``: the guest agent's listening socket. The driver creates it and
  passes it to the agent as an inherited descriptor.
- ``agent.log``: the agent's log, and what bubblewrap and the agent wrote while
  the VM started. Only the agent has it open, so VM code cannot write to it.
- ``home/``: the VM's home directory, only without bubblewrap, or with
  bubblewrap before 0.8, which has no --size option for tmpfs mounts.

Isolation, chosen by ``vm.sandbox``: with bubblewrap the agent runs as
``vm.sandbox_user`` (when the driver is root) in new user, PID, network, IPC, UTS
and cgroup namespaces. Its file system contains read-only /usr and /etc, and its
home at /home/sandbox and /tmp are tmpfs mounts of ``vm.disk_mb`` MiB each that
disappear with the VM. No other host files are visible. Without a sandbox the
agent runs as the driver's user with FLEETVM_VM_ID in its environment and its
home on the host's disk.

Limits, where the host has cgroup v1: a memory cgroup limits memory, including
the VM's tmpfs files, and a pids cgroup limits processes and threads. VM code
runs in a child pids cgroup with pids.max = ``vm.max_processes``, and the agent
and bubblewrap above it get AGENT_TASK_RESERVE more, so a fork bomb cannot stop
the agent from serving requests. Without a memory cgroup the agent gets
RLIMIT_AS, and without a pids cgroup there is no process limit. The isolation
string records which apply, for example "bubblewrap+memcg+pids".

VM code runs as the same user as the agent, so it can stop or kill the agent,
but it cannot take the agent's listening socket, because the agent makes itself
non-dumpable. The driver still treats every response as untrusted: it limits
the size by operation and checks the type and length of every field it uses.

TODO: vcpu_count is not enforced. A cgroup v1 cpu quota would cover it.

A VM is started in a new session and is not killed when the worker exits, so a
driver started later finds it again through ``state.json`` and /proc.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import logging
import math
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fleetvm.drivers.base import ExecResult, KillResult, Language, SpawnResult, VmSpec
from fleetvm.errors import (
    Conflict,
    DriverError,
    InvalidRequest,
    PayloadTooLarge,
    VmFileNotFound,
    VmNotRunning,
)
from fleetvm.guest import agent as guest_agent
from fleetvm.settings import Settings

logger = logging.getLogger(__name__)

VM_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
AGENT_SOURCE = Path(guest_agent.__file__)
STATE_FILE = "state.json"
AGENT_FILE = "agent.py"
SOCKET_FILE = "agent.sock"
LOG_FILE = "agent.log"
HOME_DIR = "home"
SANDBOX_HOME = "/home/sandbox"
SANDBOX_AGENT = "/opt/fleetvm/agent.py"
VM_ID_ENV = "FLEETVM_VM_ID"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MEMORY_CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
PIDS_CGROUP_ROOT = Path("/sys/fs/cgroup/pids")
CGROUP_PARENT = "fleetvm"
# Child of a VM's pids cgroup that VM code runs in.
USER_CGROUP = "user"
# Tasks of bubblewrap and the agent: 2 bubblewrap processes, the agent's main,
# reader and drainer threads, and one thread per concurrent request.
AGENT_TASK_RESERVE = 64
# How long remove_stale_cgroups waits for spawns to finish creating cgroups.
STALE_CGROUP_LOCK_SECONDS = 5.0
PING_TIMEOUT_SECONDS = 2.0
PROBE_TIMEOUT_SECONDS = 10.0
FILE_TRANSFER_TIMEOUT_SECONDS = 120.0
# The agent responds to an execute at most about 7.5 s after its timeout: 2 s for
# SIGINT to take effect, up to 5 s for a killed kernel to exit and 0.4 s for the
# rest of its output.
EXECUTE_MARGIN_SECONDS = 10.0
MAX_TIMEOUT_SECONDS = guest_agent.MAX_TIMEOUT_SECONDS
MAX_POLL_INTERVAL_SECONDS = 0.05
MAX_PATH_BYTES = guest_agent.MAX_PATH_BYTES
# Largest code of one execute, in UTF-8 bytes. The request travels through the
# broker, and the agent keeps it in the VM's memory.
MAX_CODE_BYTES = 16 * 1024 * 1024
# Linux rejects an argument or environment entry longer than 128 KiB
# (MAX_ARG_STRLEN), and all of them together must fit in a quarter of the stack
# limit, 2 MiB by default. The VM's variables get a share of that.
MAX_ENV_ENTRY_BYTES = 128 * 1024 - 1
MAX_ENV_BYTES = 256 * 1024
# Bytes of output the agent keeps per stream of one command.
OUTPUT_LIMIT_BYTES = guest_agent.DEFAULT_OUTPUT_LIMIT
# Room for the agent's notes on a stream, such as dropped bytes or a restart.
OUTPUT_NOTE_CHARS = 4096
# JSON escapes a control character as \u00XX, six bytes for one byte of output.
JSON_ESCAPE_FACTOR = 6
# Largest response to ping and upload, and to any failed request: a path of
# MAX_PATH_BYTES and a message, even with every character escaped.
SMALL_RESPONSE_BYTES = 256 * 1024
# Largest valid execute response: two full output streams with notes.
EXECUTE_RESPONSE_BYTES = (
    2 * (OUTPUT_LIMIT_BYTES + OUTPUT_NOTE_CHARS) * JSON_ESCAPE_FACTOR
    + SMALL_RESPONSE_BYTES
)
# The agent reports exit codes from 0 to 255. The wider range accepts VMs whose
# older agent passed a SystemExit code through unchanged.
MIN_EXIT_CODE = -(2**31)
MAX_EXIT_CODE = 2**31 - 1


@dataclass(frozen=True)
class VmState:
    """Record in state.json that lets a later driver find the VM's processes."""

    vm_id: str
    isolation: str
    # Host PID of the VM's top process (bwrap, or the agent without sandbox) and
    # its start time in clock ticks after boot, which distinguishes a reused PID.
    pid: int | None = None
    start_time: int | None = None
    # Inode of the VM's PID namespace, with bubblewrap only.
    pid_namespace: int | None = None
    # The VM's memory and pids cgroups, or None where it has none. Kill derives
    # the paths from the VM id, so these only record what the VM got.
    cgroup: str | None = None
    pids_cgroup: str | None = None
    created_at: float = 0.0

    def write(self, vm_dir: Path) -> None:
        temporary = vm_dir / (STATE_FILE + ".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, vm_dir / STATE_FILE)

    @classmethod
    def read(cls, vm_dir: Path) -> VmState | None:
        """Return the VM's state, or None when state.json is missing or invalid.

        Kill signals the processes that the state points to, so a file that
        another user owns or could have written is ignored as invalid.
        """
        path = vm_dir / STATE_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("ignoring unreadable VM state %s: %s", path, exc)
            return None
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if info.st_uid != os.geteuid() or info.st_mode & 0o022:
                logger.warning(
                    "ignoring VM state %s: it is owned by uid %d with mode %o, but "
                    "only the driver's user may write it",
                    path,
                    info.st_uid,
                    stat.S_IMODE(info.st_mode),
                )
                return None
            try:
                return cls(**json.loads(file.read()))
            except (OSError, ValueError, TypeError) as exc:
                logger.warning("ignoring unreadable VM state %s: %s", path, exc)
                return None


@dataclass(frozen=True)
class VmCgroups:
    """The cgroups of one VM, each None where the host offers none."""

    memory: Path | None
    pids: Path | None

    @property
    def isolation_parts(self) -> list[str]:
        parts = ["memcg" if self.memory is not None else "rlimit"]
        if self.pids is not None:
            parts.append("pids")
        return parts


@dataclass(frozen=True)
class AgentDescriptors:
    """Descriptors that a new VM's top process inherits."""

    listener: int
    log: int
    # Write end of the pipe that receives stdout and stderr during startup.
    output: int
    # cgroup.procs of the pids cgroup that VM code runs in.
    user_cgroup: int | None


class ProcessDriver:
    """Driver whose VMs are process trees, sandboxed by bubblewrap when possible."""

    name = "process"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._vms_dir = settings.vms_dir
        self._probe_lock = threading.Lock()
        self._sandbox: str | None = None
        self._bwrap = "bwrap"
        self._disable_userns = False
        self._tmpfs_size = False
        self._cgroup_warnings: set[str] = set()

    @property
    def sandbox(self) -> str:
        """Sandbox of new VMs, "bubblewrap" or "none".

        The first access runs the probe, which raises DriverError when
        vm.sandbox is "bubblewrap" and bubblewrap does not work on this host.
        """
        with self._probe_lock:
            if self._sandbox is None:
                self._sandbox = self._choose_sandbox()
            return self._sandbox

    def spawn(self, spec: VmSpec) -> SpawnResult:
        vm_id = _check_vm_id(spec.vm_id)
        _check_env(spec.env)
        if spec.memory_mb <= 0:
            raise InvalidRequest(f"memory_mb must be positive, not {spec.memory_mb}")
        sandbox = self.sandbox
        started = time.monotonic()
        credentials = self._sandbox_credentials() if sandbox == "bubblewrap" else None
        vm_dir = self._create_vm_dir(vm_id, credentials)

        # stdout and stderr of bubblewrap and of the agent, until the agent turns
        # to its log. The driver reads the pipe only if the spawn fails.
        output_read, output_write = os.pipe2(os.O_CLOEXEC)
        try:
            with self._vm_lock(vm_dir):
                try:
                    state = self._start_and_wait(
                        vm_dir, spec, sandbox, credentials, output_write, started
                    )
                except Exception as exc:
                    raise self._abort_spawn(vm_id, vm_dir, exc, output_read) from exc
        finally:
            os.close(output_read)
            os.close(output_write)

        logger.info(
            "spawned VM %s with isolation %s in %.0f ms",
            vm_id,
            state.isolation,
            (time.monotonic() - started) * 1000,
            extra={"vm_id": vm_id},
        )
        return SpawnResult(vm_id=vm_id, isolation=state.isolation, pid=state.pid)

    def is_alive(self, vm_id: str) -> bool:
        """Return whether the VM's agent responds to a ping.

        A VM without processes refuses the connection, so this returns False
        at once. An agent that VM code stopped costs PING_TIMEOUT_SECONDS.
        """
        _check_vm_id(vm_id)
        try:
            self._call(vm_id, {"op": "ping"}, PING_TIMEOUT_SECONDS)
        except (VmNotRunning, DriverError):
            return False
        return True

    def execute(
        self, vm_id: str, language: Language, code: str, timeout: float
    ) -> ExecResult:
        _check_vm_id(vm_id)
        if language not in ("python", "bash"):
            raise InvalidRequest(
                f"unknown language {language!r}; expected 'python' or 'bash'"
            )
        _check_code(code)
        if not _is_positive_number(timeout) or timeout > MAX_TIMEOUT_SECONDS:
            raise InvalidRequest(
                f"timeout must be a number of seconds above 0 and at most "
                f"{MAX_TIMEOUT_SECONDS:g}, not {timeout!r}"
            )
        request = {
            "op": "execute",
            "language": language,
            "code": code,
            "timeout": timeout,
        }
        response = self._call(
            vm_id, request, timeout + EXECUTE_MARGIN_SECONDS, EXECUTE_RESPONSE_BYTES
        )
        return _exec_result(vm_id, response)

    def upload(self, vm_id: str, remote_path: str, content: bytes) -> str:
        _check_vm_id(vm_id)
        _check_remote_path(remote_path)
        limit = self._settings.api.max_upload_bytes
        if len(content) > limit:
            raise PayloadTooLarge(
                f"file of {len(content)} bytes exceeds the maximum of {limit} bytes "
                "(api.max_upload_bytes)"
            )
        request = {
            "op": "upload",
            "path": remote_path,
            "content": base64.b64encode(content).decode("ascii"),
        }
        response = self._call(vm_id, request, FILE_TRANSFER_TIMEOUT_SECONDS)
        return _path_field(vm_id, "upload", response)

    def download(self, vm_id: str, remote_path: str) -> bytes:
        _check_vm_id(vm_id)
        _check_remote_path(remote_path)
        limit = self._settings.api.max_upload_bytes
        request = {"op": "download", "path": remote_path, "max_bytes": limit}
        response = self._call(
            vm_id,
            request,
            FILE_TRANSFER_TIMEOUT_SECONDS,
            _base64_length(limit) + SMALL_RESPONSE_BYTES,
        )
        return _content_field(vm_id, response, limit)

    def kill(self, vm_id: str) -> KillResult:
        _check_vm_id(vm_id)
        vm_dir = self._vms_dir / vm_id
        with self._vm_lock(vm_dir) as exists:
            state = VmState.read(vm_dir) if exists else None
            killed = self._end_processes(vm_id, state)
            self._remove_cgroups(vm_id)
            if exists:
                _remove_tree(vm_dir)
        if killed:
            logger.info(
                "killed VM %s: %d processes",
                vm_id,
                killed,
                extra={"vm_id": vm_id},
            )
        return KillResult(vm_id=vm_id, was_running=killed > 0, processes_killed=killed)

    def list_vms(self) -> list[str]:
        try:
            entries = list(os.scandir(self._vms_dir))
        except FileNotFoundError:
            return []
        names = (
            entry.name
            for entry in entries
            if entry.is_dir(follow_symlinks=False)
            and VM_ID_PATTERN.fullmatch(entry.name)
        )
        return sorted(names)

    def remove_stale_cgroups(self) -> list[Path]:
        """Remove the cgroups of VMs that were deleted without a kill.

        Drivers with other data directories share the cgroup parents, so a
        per-VM cgroup is removed only when it and its children have no
        processes and its VM has no directory in this driver's vms_dir. Spawns
        hold a shared lock on the parents until their VM has joined its
        cgroups, so the empty cgroup of a VM that is starting is kept. Returns
        the removed cgroup directories.
        """
        removed: list[Path] = []
        for root in (MEMORY_CGROUP_ROOT, PIDS_CGROUP_ROOT):
            parent = root / CGROUP_PARENT
            with _locked_cgroup_parent(parent, STALE_CGROUP_LOCK_SECONDS) as locked:
                if locked:
                    removed += self._remove_stale_children(parent)
                elif parent.is_dir():
                    logger.warning(
                        "skipped stale cgroups in %s: spawns held its lock for %g s",
                        parent,
                        STALE_CGROUP_LOCK_SECONDS,
                    )
        if removed:
            logger.info("removed %d stale VM cgroups", len(removed))
        return removed

    def vm_processes(self, vm_id: str) -> list[int]:
        """Return the host PIDs of the VM's processes that have not exited."""
        _check_vm_id(vm_id)
        state = VmState.read(self._vms_dir / vm_id)
        matcher = self._matcher(vm_id, state)
        return _find_processes(matcher)

    def _choose_sandbox(self) -> str:
        requested = self._settings.vm.sandbox
        if requested == "none":
            return "none"
        failure = self._probe_bubblewrap()
        if failure is None:
            return "bubblewrap"
        if requested == "bubblewrap":
            raise DriverError(
                f"vm.sandbox is 'bubblewrap' but bubblewrap does not work on this "
                f"host: {failure}"
            )
        logger.warning(
            "bubblewrap does not work on this host, so VMs run as plain processes "
            "without isolation: %s",
            failure,
        )
        return "none"

    def _probe_bubblewrap(self) -> str | None:
        """Start a trivial sandbox and return why it failed, or None if it worked."""
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            return "bwrap was not found on PATH (Debian package bubblewrap)"
        credentials = self._sandbox_credentials()
        try:
            self._prepare_vms_dir(credentials)
        except DriverError as exc:
            return exc.message
        self._bwrap = bwrap
        self._disable_userns = _bwrap_supports(bwrap, "--disable-userns")
        self._tmpfs_size = _bwrap_supports(bwrap, "--size")
        if not self._tmpfs_size:
            logger.warning(
                "%s has no --size option (bubblewrap before 0.8), so VM homes stay "
                "on the host's disk without the vm.disk_mb limit",
                bwrap,
            )
        binds = ["--tmpfs", "/tmp", "--ro-bind", str(self._vms_dir), "/mnt"]
        argv = self._bubblewrap_argv(binds)
        argv += ["--", self._settings.vm.guest_python, "-I", "-S", "-c", "pass"]
        try:
            completed = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=PROBE_TIMEOUT_SECONDS,
                cwd="/",
                **_credential_arguments(credentials),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"running {bwrap} failed: {exc}"
        if completed.returncode != 0:
            output = completed.stderr.decode(errors="replace").strip()
            return f"a test sandbox exited with code {completed.returncode}: {output}"
        return None

    def _sandbox_credentials(self) -> tuple[int, int] | None:
        """Return the uid and gid sandboxed VMs run as, or None for the driver's."""
        if os.geteuid() != 0:
            return None
        name = self._settings.vm.sandbox_user
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise DriverError(
                f"vm.sandbox_user {name!r} does not exist on this host; set it to an "
                "existing unprivileged account"
            ) from None
        if entry.pw_uid == 0:
            raise DriverError(f"vm.sandbox_user {name!r} is root; choose another user")
        return entry.pw_uid, entry.pw_gid

    def _prepare_vms_dir(self, credentials: tuple[int, int] | None) -> None:
        self._vms_dir.mkdir(parents=True, exist_ok=True)
        # Others may enter but not list the directory, so VM ids stay private
        # while the sandbox user reaches the files bound into its sandbox.
        os.chmod(self._vms_dir, 0o711)
        if credentials is not None:
            _grant_search_permission(self._vms_dir, *credentials)

    def _bubblewrap_argv(self, mounts: list[str]) -> list[str]:
        # NOTE: VM code runs as the same user as the agent, so it can signal the
        # agent. An unprivileged user namespace maps one user only, and
        # bubblewrap offers no second one without a setuid helper.
        argv = [self._bwrap, "--unshare-all", "--unshare-user"]
        if self._disable_userns:
            argv.append("--disable-userns")
        argv += ["--new-session", "--hostname", "fleetvm"]
        argv += ["--ro-bind", "/usr", "/usr", *_system_link_arguments()]
        argv += ["--ro-bind", "/etc", "/etc", "--proc", "/proc", "--dev", "/dev"]
        argv += mounts
        return argv

    @property
    def _host_home(self) -> bool:
        """Whether VM homes are directories on the host's disk."""
        return self.sandbox == "none" or not self._tmpfs_size

    def _home_mounts(self, vm_dir: Path) -> list[str]:
        if self._host_home:
            return ["--bind", str(vm_dir / HOME_DIR), SANDBOX_HOME, "--tmpfs", "/tmp"]
        # NOTE: tmpfs pages count against the memory cgroup of their writer,
        # and the OOM killer cannot free them. Files beyond the free part of
        # memory_mb get the writer OOM-killed instead of ENOSPC, and can leave
        # too little memory for the agent, which ends the VM.
        size = str(self._settings.vm.disk_mb * 1024 * 1024)
        home = ["--perms", "0700", "--size", size, "--tmpfs", SANDBOX_HOME]
        return [*home, "--size", size, "--tmpfs", "/tmp"]

    def _create_vm_dir(self, vm_id: str, credentials: tuple[int, int] | None) -> Path:
        self._prepare_vms_dir(credentials)
        vm_dir = self._vms_dir / vm_id
        try:
            vm_dir.mkdir()
        except FileExistsError:
            raise DriverError(
                f"VM {vm_id} already exists in {vm_dir}; kill it before spawning "
                "it again"
            ) from None
        os.chmod(vm_dir, 0o711)
        return vm_dir

    def _start_and_wait(
        self,
        vm_dir: Path,
        spec: VmSpec,
        sandbox: str,
        credentials: tuple[int, int] | None,
        output_fd: int,
        started: float,
    ) -> VmState:
        # The shared lock keeps remove_stale_cgroups from taking the new cgroups
        # before the VM's processes have joined them.
        with _cgroup_parents_locked():
            _populate_vm_dir(vm_dir, credentials, self._host_home)
            state = self._start(vm_dir, spec, sandbox, output_fd)
            deadline = started + self._settings.vm.spawn_timeout_seconds
            self._wait_until_ready(spec.vm_id, deadline)
        return state

    def _start(
        self, vm_dir: Path, spec: VmSpec, sandbox: str, output_fd: int
    ) -> VmState:
        cgroups = VmCgroups(
            memory=self._create_memory_cgroup(spec.vm_id, spec.memory_mb),
            pids=self._create_pids_cgroup(spec.vm_id),
        )
        initial = VmState(
            vm_id=spec.vm_id,
            isolation="+".join([sandbox, *cgroups.isolation_parts]),
            cgroup=str(cgroups.memory) if cgroups.memory is not None else None,
            pids_cgroup=str(cgroups.pids) if cgroups.pids is not None else None,
            created_at=time.time(),
        )
        # Written before any process starts, so that a kill from another worker
        # finds the cgroups even if this one dies during the spawn.
        initial.write(vm_dir)
        limit_arguments = _limit_arguments(cgroups, spec.memory_mb, sandbox)
        with ExitStack() as stack:
            listener = stack.enter_context(_listen(vm_dir))
            fds = AgentDescriptors(
                listener=listener.fileno(),
                log=_open_log(vm_dir, stack),
                output=output_fd,
                user_cgroup=_open_user_cgroup(cgroups.pids, stack),
            )
            if sandbox == "bubblewrap":
                return self._start_bubblewrap(
                    vm_dir, spec, initial, fds, limit_arguments
                )
            return self._start_plain(vm_dir, spec, initial, fds, limit_arguments)

    def _start_bubblewrap(
        self,
        vm_dir: Path,
        spec: VmSpec,
        initial: VmState,
        fds: AgentDescriptors,
        limit_arguments: list[str],
    ) -> VmState:
        credentials = self._sandbox_credentials()
        user = pwd.getpwuid(credentials[0]).pw_name if credentials else _own_user()
        env = _vm_environment(spec, SANDBOX_HOME, user, limit_arguments)
        info_read, info_write = os.pipe()
        block_read, block_write = os.pipe()
        try:
            argv = self._bubblewrap_vm_argv(
                vm_dir, env, fds, info_write, block_read, limit_arguments
            )
            pass_fds = (info_write, block_read, *_inherited(fds))
            try:
                process = _start_detached(
                    argv,
                    _bubblewrap_environment(spec.vm_id),
                    fds.output,
                    pass_fds,
                    credentials,
                    spec.vm_id,
                )
            finally:
                os.close(info_write)
                os.close(block_read)

            info = _read_bwrap_info(info_read, self._settings.vm.spawn_timeout_seconds)
            state = replace(
                initial,
                pid=process.pid,
                start_time=_start_time(process.pid),
                pid_namespace=int(info["pid-namespace"]),
            )
            state.write(vm_dir)
            members = [process.pid, int(info["child-pid"])]
            for cgroup in (state.cgroup, state.pids_cgroup):
                if cgroup is not None:
                    _join_cgroup(Path(cgroup), members)
            os.write(block_write, b"1")
        finally:
            os.close(info_read)
            os.close(block_write)
        return state

    def _bubblewrap_vm_argv(
        self,
        vm_dir: Path,
        env: dict[str, str],
        fds: AgentDescriptors,
        info_fd: int,
        block_fd: int,
        limit_arguments: list[str],
    ) -> list[str]:
        mounts = self._home_mounts(vm_dir)
        mounts += ["--ro-bind", str(vm_dir / AGENT_FILE), SANDBOX_AGENT]
        mounts += ["--chdir", SANDBOX_HOME]
        # The VM's variables reach the agent through --setenv, so that none of
        # them, LD_PRELOAD for example, affects bubblewrap itself on the host.
        for name, value in env.items():
            mounts += ["--setenv", name, value]
        # bwrap reports the sandbox's PID and namespaces on the info descriptor,
        # then waits for a byte on the block descriptor before it sets up the
        # sandbox. The VM joins its cgroups during that wait.
        mounts += ["--info-fd", str(info_fd), "--block-fd", str(block_fd)]
        argv = self._bubblewrap_argv(mounts)
        argv += ["--", self._settings.vm.guest_python, "-I", "-S", SANDBOX_AGENT]
        argv += _agent_arguments(fds, SANDBOX_HOME, limit_arguments)
        return argv

    def _start_plain(
        self,
        vm_dir: Path,
        spec: VmSpec,
        initial: VmState,
        fds: AgentDescriptors,
        limit_arguments: list[str],
    ) -> VmState:
        home = str(vm_dir / HOME_DIR)
        argv = [self._settings.vm.guest_python, "-I", "-S", str(vm_dir / AGENT_FILE)]
        argv += _agent_arguments(fds, home, limit_arguments)
        env = _vm_environment(spec, home, _own_user(), limit_arguments)
        process = _start_detached(
            argv, env, fds.output, _inherited(fds), None, spec.vm_id
        )
        state = replace(initial, pid=process.pid, start_time=_start_time(process.pid))
        state.write(vm_dir)
        return state

    def _create_memory_cgroup(self, vm_id: str, memory_mb: int) -> Path | None:
        """Create the VM's memory cgroup, or return None where the host has none.

        NOTE: only the cgroup v1 memory controller is supported. On a cgroup v2
        host VMs fall back to RLIMIT_AS.
        """
        if not (MEMORY_CGROUP_ROOT / "memory.limit_in_bytes").exists():
            return None
        path = MEMORY_CGROUP_ROOT / CGROUP_PARENT / vm_id
        limit = memory_mb * 1024 * 1024
        try:
            _create_cgroup(path)
            (path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as exc:
            self._warn_cgroup_failure("memory", path, "RLIMIT_AS", exc, vm_id)
            _remove_cgroup_tree(path)
            return None
        return path

    def _create_pids_cgroup(self, vm_id: str) -> Path | None:
        """Create the VM's pids cgroup and its child for VM code, or return None.

        NOTE: only the cgroup v1 pids controller is supported. On a cgroup v2
        host VMs have no process limit.
        """
        if not (PIDS_CGROUP_ROOT / "cgroup.procs").exists():
            return None
        path = PIDS_CGROUP_ROOT / CGROUP_PARENT / vm_id
        user_limit = self._settings.vm.max_processes
        try:
            _create_cgroup(path)
            (path / "pids.max").write_text(str(user_limit + AGENT_TASK_RESERVE))
            (path / USER_CGROUP).mkdir()
            (path / USER_CGROUP / "pids.max").write_text(str(user_limit))
        except OSError as exc:
            self._warn_cgroup_failure("pids", path, "no process limit", exc, vm_id)
            _remove_cgroup_tree(path)
            return None
        return path

    def _warn_cgroup_failure(
        self, kind: str, path: Path, fallback: str, exc: OSError, vm_id: str
    ) -> None:
        # Once per kind, because it fails the same way for every VM.
        if kind in self._cgroup_warnings:
            return
        self._cgroup_warnings.add(kind)
        logger.warning(
            "cannot create %s cgroup %s, so VMs get %s instead: %s",
            kind,
            path,
            fallback,
            exc,
            extra={"vm_id": vm_id},
        )

    def _wait_until_ready(self, vm_id: str, deadline: float) -> None:
        # The listening socket exists before the agent starts, so the ping
        # connects at once and its reply shows the agent is serving.
        remaining = deadline - time.monotonic()
        try:
            self._call(vm_id, {"op": "ping"}, max(remaining, 0.001))
        except VmNotRunning as exc:
            raise DriverError(f"the agent of VM {vm_id} exited during startup") from exc

    def _abort_spawn(
        self, vm_id: str, vm_dir: Path, exc: Exception, output_fd: int
    ) -> DriverError:
        """Kill what a failed spawn started and return the error to raise."""
        _append_output(output_fd, vm_dir / LOG_FILE)
        log_tail = _read_tail(vm_dir / LOG_FILE)
        logger.error(
            "spawning VM %s failed: %s\n%s",
            vm_id,
            exc,
            log_tail,
            extra={"vm_id": vm_id},
        )
        try:
            self._end_processes(vm_id, VmState.read(vm_dir))
            self._remove_cgroups(vm_id)
            _remove_tree(vm_dir)
        except DriverError as cleanup_error:
            logger.error(
                "cleaning up the failed VM %s failed: %s",
                vm_id,
                cleanup_error,
                extra={"vm_id": vm_id},
            )
        if isinstance(exc, DriverError):
            message = exc.message
        else:
            message = f"spawning VM {vm_id} failed: {exc}"
        if log_tail:
            message += f"; agent log: {log_tail}"
        return DriverError(message)

    @contextmanager
    def _vm_lock(self, vm_dir: Path) -> Iterator[bool]:
        """Hold an exclusive flock on the VM directory and yield whether it exists.

        The lock serializes spawn and kill across threads and processes. A
        directory removed by the previous holder reports False.
        """
        try:
            fd = os.open(vm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield os.fstat(fd).st_nlink > 0
        finally:
            os.close(fd)

    def _matcher(self, vm_id: str, state: VmState | None) -> ProcessMatcher:
        members: set[int] = set()
        for cgroup in _vm_cgroups(vm_id):
            members |= _cgroup_members(cgroup)
        pid_namespace = state.pid_namespace if state else None
        if pid_namespace == _pid_namespace(os.getpid()):
            # A state that names the driver's own namespace would match every
            # process of the host.
            pid_namespace = None
        return ProcessMatcher(
            environment_entry=f"{VM_ID_ENV}={vm_id}".encode(),
            pid_namespace=pid_namespace,
            cgroup_members=frozenset(members),
            top_pid=state.pid if state else None,
            top_start_time=state.start_time if state else None,
        )

    def _end_processes(self, vm_id: str, state: VmState | None) -> int:
        """SIGKILL every process of the VM and wait until none is left.

        Returns how many processes were found running. Raises DriverError when
        some survive vm.kill.confirm_timeout_seconds.
        """
        timeout = self._settings.kill.confirm_timeout_seconds
        deadline = time.monotonic() + timeout
        found: set[int] = set()
        interval = 0.001
        while True:
            matcher = self._matcher(vm_id, state)
            survivors = _find_processes(matcher)
            if not survivors:
                return len(found)
            if time.monotonic() >= deadline:
                raise DriverError(
                    f"processes {survivors} of VM {vm_id} were still running "
                    f"{timeout:g} s after SIGKILL"
                )
            found.update(survivors)
            for pid in survivors:
                _kill_if_matching(pid, matcher)
            time.sleep(interval)
            interval = min(interval * 2, MAX_POLL_INTERVAL_SECONDS)

    def _remove_cgroups(self, vm_id: str) -> None:
        for root in (MEMORY_CGROUP_ROOT, PIDS_CGROUP_ROOT):
            path = root / CGROUP_PARENT / vm_id
            _remove_cgroup_tree(path, self._settings.kill.confirm_timeout_seconds)

    def _remove_stale_children(self, parent: Path) -> list[Path]:
        removed = []
        for path in _child_cgroups(parent):
            if not VM_ID_PATTERN.fullmatch(path.name):
                continue
            if os.path.lexists(self._vms_dir / path.name):
                continue
            if _cgroup_tree_has_processes(path):
                continue
            if _remove_cgroup_tree(path):
                removed.append(path)
        return removed

    def _call(
        self,
        vm_id: str,
        request: dict,
        timeout: float,
        max_response_bytes: int = SMALL_RESPONSE_BYTES,
    ) -> dict:
        """Send a request to the VM's agent and return its successful response.

        The response comes from inside the VM, so only its "ok" field is checked
        here. Callers check every other field they use.
        """
        response = self._request(vm_id, request, timeout, max_response_bytes)
        ok = response.get("ok")
        if ok is True:
            return response
        if ok is False:
            raise _agent_error(vm_id, response, self._settings.vm.disk_mb)
        raise _invalid_response(vm_id, request["op"], "field ok is not a boolean")

    def _request(
        self, vm_id: str, request: dict, timeout: float, max_response_bytes: int
    ) -> dict:
        op = request["op"]
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            _connect(sock, self._vms_dir / vm_id, vm_id, deadline)
            try:
                _send_request(sock, request, vm_id)
                response = guest_agent.recv_message(sock, max_response_bytes, deadline)
            except TimeoutError as exc:
                raise DriverError(
                    f"the agent of VM {vm_id} did not respond to {op} within "
                    f"{timeout:g} s"
                ) from exc
            except ConnectionError as exc:
                raise VmNotRunning(f"VM {vm_id} stopped during {op}: {exc}") from exc
            except guest_agent.ProtocolError as exc:
                raise _invalid_response(vm_id, op, str(exc)) from exc
        if response is None:
            raise VmNotRunning(f"VM {vm_id} stopped during {op}")
        return response


@dataclass(frozen=True)
class ProcessMatcher:
    """Tests whether a host process belongs to one VM.

    A process belongs to the VM if it is in the VM's PID namespace or one of its
    cgroups, is the recorded top process, or has FLEETVM_VM_ID=<vm_id> in its
    initial environment. Zombies never match, because they cannot run code.
    """

    environment_entry: bytes
    pid_namespace: int | None
    cgroup_members: frozenset[int]
    top_pid: int | None
    top_start_time: int | None

    def matches(self, pid: int) -> bool:
        status = _process_status(pid)
        if status is None or status[0] == "Z":
            return False
        if pid in self.cgroup_members:
            return True
        if pid == self.top_pid and status[1] == self.top_start_time:
            return True
        if self.pid_namespace is not None and _pid_namespace(pid) == self.pid_namespace:
            return True
        return self.environment_entry in _environment_entries(pid)


def _populate_vm_dir(
    vm_dir: Path, credentials: tuple[int, int] | None, host_home: bool
) -> None:
    if host_home:
        home = vm_dir / HOME_DIR
        home.mkdir()
        os.chmod(home, 0o700)
        if credentials is not None:
            os.chown(home, *credentials)
    shutil.copyfile(AGENT_SOURCE, vm_dir / AGENT_FILE)
    os.chmod(vm_dir / AGENT_FILE, 0o644)


def _check_vm_id(vm_id: object) -> str:
    if not isinstance(vm_id, str) or not VM_ID_PATTERN.fullmatch(vm_id):
        printable = repr(vm_id)
        if len(printable) > 80:
            printable = printable[:77] + "..."
        raise InvalidRequest(
            f"invalid vm_id {printable}: use 1 to 64 letters, digits, '-' or '_'"
        )
    return vm_id


def _check_env(env: dict[str, str]) -> None:
    total = 0
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME_PATTERN.fullmatch(name):
            raise InvalidRequest(
                f"invalid environment variable name {name!r}: use letters, digits "
                "and '_', not starting with a digit"
            )
        if not isinstance(value, str) or "\0" in value or not _is_unicode(value):
            raise InvalidRequest(
                f"invalid value of environment variable {name}: it must be a string "
                "of valid Unicode without NUL characters"
            )
        size = len(name) + 1 + len(value.encode("utf-8"))
        if size > MAX_ENV_ENTRY_BYTES:
            raise InvalidRequest(
                f"environment variable {name} is {size} bytes long with its name, "
                f"more than the maximum of {MAX_ENV_ENTRY_BYTES} bytes"
            )
        total += size
    if total > MAX_ENV_BYTES:
        raise InvalidRequest(
            f"the environment variables take {total} bytes, more than the maximum "
            f"of {MAX_ENV_BYTES} bytes"
        )


def _check_remote_path(path: object) -> None:
    if not isinstance(path, str) or not path:
        raise InvalidRequest("path must be a non-empty string")
    if "\0" in path:
        raise InvalidRequest("path must not contain a NUL character")
    if not _is_unicode(path):
        raise InvalidRequest("path is not valid Unicode: it contains a lone surrogate")
    size = len(path.encode("utf-8"))
    if size > MAX_PATH_BYTES:
        raise InvalidRequest(
            f"path is {size} bytes long, more than the maximum of {MAX_PATH_BYTES} "
            "bytes"
        )


def _check_code(code: object) -> None:
    if not isinstance(code, str):
        raise InvalidRequest("code must be a string")
    try:
        size = len(code.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"code is not valid Unicode: it contains a lone surrogate at "
            f"character {exc.start}"
        ) from None
    if size > MAX_CODE_BYTES:
        raise PayloadTooLarge(
            f"code of {size} bytes exceeds the maximum of {MAX_CODE_BYTES} bytes"
        )


def _is_unicode(text: str) -> bool:
    """Return whether text encodes as UTF-8, which a lone surrogate does not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_positive_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0


def _agent_error(vm_id: str, response: dict, disk_mb: int) -> Exception:
    """Return the exception for a failed request, from the agent's error code."""
    code = response.get("error")
    message = response.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        return _invalid_response(vm_id, "a request", "error or message is not text")
    text = f"VM {vm_id}: {_printable(message)}"
    if code == "not_found":
        return VmFileNotFound(text)
    if code in ("invalid_request", "is_a_directory", "permission_denied"):
        return InvalidRequest(text)
    if code == "too_large":
        return PayloadTooLarge(text)
    if code == "no_space":
        return PayloadTooLarge(
            f"{text}. The VM's home and /tmp hold at most {disk_mb} MiB each "
            "(vm.disk_mb), and its files count against its memory limit."
        )
    if code == "process_limit":
        return Conflict(f"{text}. End some of its processes, or kill the VM.")
    return DriverError(text)


def _invalid_response(vm_id: str, op: str, problem: str) -> DriverError:
    return DriverError(
        f"invalid response to {op} from the agent of VM {vm_id}: {problem}. VM code "
        "may have stopped the agent"
    )


def _printable(message: str) -> str:
    """Cut an agent's message to MAX_MESSAGE_CHARS and replace lone surrogates."""
    limit = guest_agent.MAX_MESSAGE_CHARS
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return message.encode("utf-8", errors="replace").decode("utf-8")


def _exec_result(vm_id: str, response: dict) -> ExecResult:
    limit = OUTPUT_LIMIT_BYTES + OUTPUT_NOTE_CHARS
    exit_code = response.get("exit_code")
    if (
        isinstance(exit_code, bool)
        or not isinstance(exit_code, int)
        or not MIN_EXIT_CODE <= exit_code <= MAX_EXIT_CODE
    ):
        raise _invalid_response(vm_id, "execute", "exit_code is not a 32-bit integer")
    execution_time = response.get("execution_time")
    if isinstance(execution_time, bool) or not isinstance(execution_time, int | float):
        raise _invalid_response(vm_id, "execute", "execution_time is not a number")
    if not math.isfinite(execution_time) or execution_time < 0:
        raise _invalid_response(vm_id, "execute", "execution_time is out of range")
    timed_out = response.get("timed_out")
    if not isinstance(timed_out, bool):
        raise _invalid_response(vm_id, "execute", "timed_out is not a boolean")
    return ExecResult(
        stdout=_text_field(vm_id, "execute", response, "stdout", limit),
        stderr=_text_field(vm_id, "execute", response, "stderr", limit),
        exit_code=exit_code,
        execution_time=float(execution_time),
        timed_out=timed_out,
    )


def _text_field(vm_id: str, op: str, response: dict, name: str, limit: int) -> str:
    value = response.get(name)
    if not isinstance(value, str):
        raise _invalid_response(vm_id, op, f"{name} is not text")
    if len(value) > limit:
        raise _invalid_response(
            vm_id, op, f"{name} has {len(value)} characters, more than {limit}"
        )
    if not _is_unicode(value):
        raise _invalid_response(vm_id, op, f"{name} contains a lone surrogate")
    return value


def _path_field(vm_id: str, op: str, response: dict) -> str:
    return _text_field(vm_id, op, response, "path", MAX_PATH_BYTES)


def _content_field(vm_id: str, response: dict, limit: int) -> bytes:
    encoded = _text_field(vm_id, "download", response, "content", _base64_length(limit))
    try:
        content = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        problem = f"content is not base64: {exc}"
        raise _invalid_response(vm_id, "download", problem) from exc
    if len(content) > limit:
        raise _invalid_response(
            vm_id, "download", f"content of {len(content)} bytes exceeds {limit}"
        )
    return content


def _base64_length(size: int) -> int:
    return 4 * math.ceil(size / 3)


def _send_request(sock: socket.socket, request: dict, vm_id: str) -> None:
    try:
        guest_agent.send_message(sock, request)
    except guest_agent.ProtocolError as exc:
        raise PayloadTooLarge(
            f"the {request['op']} request for VM {vm_id} is too large: {exc}"
        ) from exc


def _connect(sock: socket.socket, vm_dir: Path, vm_id: str, deadline: float) -> None:
    # A socket path is limited to 107 bytes, so the socket is reached through a
    # descriptor of its directory.
    try:
        dir_fd = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VmNotRunning(f"VM {vm_id} not found on this host") from None
    try:
        _connect_before(sock, f"/proc/self/fd/{dir_fd}/{SOCKET_FILE}", deadline)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise VmNotRunning(f"VM {vm_id} is not running: {exc.strerror}") from exc
    except TimeoutError as exc:
        raise DriverError(
            f"the agent of VM {vm_id} accepted no connection in time; its listen "
            "queue is full or VM code stopped it"
        ) from exc
    finally:
        os.close(dir_fd)


def _connect_before(sock: socket.socket, address: str, deadline: float) -> None:
    # A socket with a timeout is non-blocking inside, and connect on such an
    # AF_UNIX socket fails with EAGAIN while the listen queue is full, where a
    # blocking one would wait. So it is retried until the deadline.
    while True:
        try:
            sock.connect(address)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"connecting to {address} timed out") from None
        time.sleep(MAX_POLL_INTERVAL_SECONDS / 5)


@contextmanager
def _listen(vm_dir: Path) -> Iterator[socket.socket]:
    """Yield the agent's listening socket, closed on exit in the driver only."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        listener.bind(f"/proc/self/fd/{dir_fd}/{SOCKET_FILE}")
        os.chmod(vm_dir / SOCKET_FILE, 0o600)
        listener.listen(64)
    except OSError:
        listener.close()
        raise
    finally:
        os.close(dir_fd)
    with listener:
        yield listener


def _open_log(vm_dir: Path, stack: ExitStack) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    fd = os.open(vm_dir / LOG_FILE, flags, 0o600)
    stack.callback(os.close, fd)
    return fd


def _open_user_cgroup(pids_cgroup: Path | None, stack: ExitStack) -> int | None:
    """Open cgroup.procs of the cgroup for VM code, for the agent's children.

    The driver opens it, so the sandbox user can move its own processes in
    without any write permission on the cgroup file system.
    """
    if pids_cgroup is None:
        return None
    path = pids_cgroup / USER_CGROUP / "cgroup.procs"
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    return fd


def _inherited(fds: AgentDescriptors) -> tuple[int, ...]:
    inherited = (fds.listener, fds.log)
    if fds.user_cgroup is not None:
        inherited += (fds.user_cgroup,)
    return inherited


def _agent_arguments(
    fds: AgentDescriptors, home: str, limit_arguments: list[str]
) -> list[str]:
    arguments = ["serve", "--listen-fd", str(fds.listener), "--home", home]
    arguments += ["--log-fd", str(fds.log)]
    arguments += ["--output-limit", str(OUTPUT_LIMIT_BYTES)]
    if fds.user_cgroup is not None:
        arguments += ["--user-cgroup-fd", str(fds.user_cgroup)]
    return arguments + limit_arguments


def _bubblewrap_environment(vm_id: str) -> dict[str, str]:
    """Build the environment of bubblewrap itself, which runs on the host.

    FLEETVM_VM_ID lets kill find bubblewrap's processes when the VM has neither
    cgroups nor state.json.
    """
    return {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", VM_ID_ENV: vm_id}


def _start_detached(
    argv: list[str],
    env: dict[str, str],
    output_fd: int,
    pass_fds: tuple[int, ...],
    credentials: tuple[int, int] | None,
    vm_id: str,
) -> subprocess.Popen:
    """Start a VM's top process in a new session, with a thread that reaps it.

    Its stdout and stderr are output_fd, a pipe that the driver reads only if
    the spawn fails, and that has no reader later. A host file there would let
    VM code fill the host's disk through bubblewrap's init process.
    No parent-death signal or shared session ends the process with the worker.
    NOTE: a service manager that kills the worker's whole cgroup, as systemd does
    with its default KillMode=control-group, still ends the VMs with it.
    """
    process = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=output_fd,
        stderr=output_fd,
        pass_fds=pass_fds,
        cwd="/",
        start_new_session=True,
        **_credential_arguments(credentials),
    )
    threading.Thread(
        target=process.wait, name=f"fleetvm-reap-{vm_id}", daemon=True
    ).start()
    return process


def _credential_arguments(credentials: tuple[int, int] | None) -> dict:
    if credentials is None:
        return {}
    uid, gid = credentials
    return {"user": uid, "group": gid, "extra_groups": []}


def _vm_environment(
    spec: VmSpec, home: str, user: str, limit_arguments: list[str]
) -> dict[str, str]:
    """Build the VM's environment. None of the worker's variables are passed on."""
    env = {
        "HOME": home,
        "PATH": DEFAULT_PATH,
        "LANG": "C.UTF-8",
        "USER": user,
        "LOGNAME": user,
        "SHELL": "/bin/bash",
        "TMPDIR": "/tmp",
    }
    if "--memory-limit" in limit_arguments:
        # Each malloc arena reserves 64 MiB of address space, which RLIMIT_AS
        # counts, so a few threads would use up a small limit.
        env["MALLOC_ARENA_MAX"] = "2"
    env.update(spec.env)
    env[VM_ID_ENV] = spec.vm_id
    return env


def _limit_arguments(cgroups: VmCgroups, memory_mb: int, sandbox: str) -> list[str]:
    """Return the agent arguments that apply the VM's memory and process limits."""
    arguments = []
    if cgroups.memory is None:
        arguments += ["--memory-limit", str(memory_mb * 1024 * 1024)]
    if sandbox == "none":
        # Without a sandbox the agent runs as the driver's user and joins the
        # cgroups itself, before it starts any child process.
        for cgroup in (cgroups.memory, cgroups.pids):
            if cgroup is not None:
                arguments += ["--cgroup-procs", str(cgroup / "cgroup.procs")]
    return arguments


def _own_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _system_link_arguments() -> list[str]:
    """Mirror the host's /bin, /lib and similar entries, symlinks or directories."""
    arguments: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host_path = Path("/") / name
        if host_path.is_symlink():
            arguments += ["--symlink", os.readlink(host_path), str(host_path)]
        elif host_path.is_dir():
            arguments += ["--ro-bind", str(host_path), str(host_path)]
    return arguments


def _bwrap_supports(bwrap: str, option: str) -> bool:
    try:
        completed = subprocess.run(
            [bwrap, "--help"], capture_output=True, timeout=PROBE_TIMEOUT_SECONDS
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option.encode() in completed.stdout + completed.stderr


def _grant_search_permission(path: Path, uid: int, gid: int) -> None:
    """Let uid and gid enter every directory from / down to path.

    bubblewrap resolves bind sources as the sandbox user, so each directory above
    a VM's agent.py (and home, where it is on the host) needs search permission.
    Directories the driver's user owns get the execute bit for others, which
    allows entering but not listing.
    Raises DriverError for a directory of another owner.
    """
    for directory in reversed([path, *path.parents]):
        info = os.stat(directory)
        if _can_search(info, uid, gid):
            continue
        if info.st_uid != os.geteuid():
            raise DriverError(
                f"the sandbox user cannot enter {directory}, which contains the VM "
                f"directories; run 'chmod o+x {directory}' or choose another "
                "data_dir"
            )
        os.chmod(directory, stat.S_IMODE(info.st_mode) | stat.S_IXOTH)
        logger.warning(
            "added search permission for others to %s so that the sandbox user can "
            "reach the VM files in %s",
            directory,
            path,
        )


def _can_search(info: os.stat_result, uid: int, gid: int) -> bool:
    # Only the first matching class of permission bits applies.
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _read_bwrap_info(fd: int, timeout: float) -> dict:
    """Read the JSON that bwrap writes to --info-fd and then closes."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([fd], [], [], max(remaining, 0))
        if not readable:
            raise DriverError(
                f"bubblewrap did not report its sandbox within {timeout:g} s"
            )
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    if not data:
        raise DriverError("bubblewrap exited before it started the sandbox")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise DriverError(f"bubblewrap reported invalid sandbox info: {exc}") from exc


def _join_cgroup(cgroup: Path, pids: list[int]) -> None:
    for pid in pids:
        (cgroup / "cgroup.procs").write_text(str(pid))


def _cgroup_members(cgroup: Path) -> set[int]:
    try:
        text = (cgroup / "cgroup.procs").read_text()
    except OSError:
        return set()
    return {int(line) for line in text.split()}


def _vm_cgroups(vm_id: str) -> list[Path]:
    """Return the cgroups a VM's processes can be in, derived from its id only."""
    pids = PIDS_CGROUP_ROOT / CGROUP_PARENT / vm_id
    return [MEMORY_CGROUP_ROOT / CGROUP_PARENT / vm_id, pids, pids / USER_CGROUP]


def _create_cgroup(path: Path) -> None:
    path.parent.mkdir(exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        # Left by a VM whose kill did not finish. rmdir fails with EBUSY while
        # the cgroup has processes.
        for child in _child_cgroups(path):
            child.rmdir()
        path.rmdir()
        path.mkdir()


def _child_cgroups(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return [
                Path(entry.path)
                for entry in entries
                if entry.is_dir(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return []


def _cgroup_tree_has_processes(path: Path) -> bool:
    try:
        text = (path / "cgroup.procs").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        # Unknown counts as busy, so the cgroup is kept.
        return True
    if text.strip():
        return True
    return any(_cgroup_tree_has_processes(child) for child in _child_cgroups(path))


def _remove_cgroup_tree(path: Path, timeout: float = 0.0) -> bool:
    """Remove a cgroup and its child cgroups, and return whether it is gone.

    rmdir fails with EBUSY until the last process of a cgroup has exited, so
    each rmdir is retried until timeout.
    """
    for child in _child_cgroups(path):
        _remove_cgroup_tree(child, timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if time.monotonic() >= deadline:
                logger.warning("cannot remove cgroup %s: %s", path, exc)
                return False
        time.sleep(MAX_POLL_INTERVAL_SECONDS)


@contextmanager
def _cgroup_parents_locked() -> Iterator[None]:
    """Hold a shared flock on each cgroup parent, creating the parents as needed."""
    with ExitStack() as stack:
        for root in (MEMORY_CGROUP_ROOT, PIDS_CGROUP_ROOT):
            fd = _open_cgroup_parent(root / CGROUP_PARENT, create=True)
            if fd is not None:
                stack.callback(os.close, fd)
                fcntl.flock(fd, fcntl.LOCK_SH)
        yield


@contextmanager
def _locked_cgroup_parent(parent: Path, timeout: float) -> Iterator[bool]:
    """Hold an exclusive flock on a cgroup parent, and yield whether it was taken.

    Yields False when the lock was not free within timeout, or the parent does
    not exist.
    """
    fd = _open_cgroup_parent(parent, create=False)
    if fd is None:
        yield False
        return
    try:
        yield _flock_exclusive(fd, timeout)
    finally:
        os.close(fd)


def _open_cgroup_parent(parent: Path, create: bool) -> int | None:
    """Open a cgroup parent, or return None where that hierarchy is unusable."""
    if not parent.parent.is_dir():
        return None
    try:
        if create:
            parent.mkdir(exist_ok=True)
        return os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def _flock_exclusive(fd: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        time.sleep(MAX_POLL_INTERVAL_SECONDS)


def _process_ids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _process_status(pid: int) -> tuple[str, int] | None:
    """Return the state letter and start time of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except OSError:
        return None
    # The command name in parentheses may contain spaces and parentheses.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def _start_time(pid: int) -> int | None:
    status = _process_status(pid)
    return status[1] if status else None


def _pid_namespace(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _environment_entries(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            return file.read().split(b"\0")
    except OSError:
        return []


def _find_processes(matcher: ProcessMatcher) -> list[int]:
    own = os.getpid()
    return [pid for pid in _process_ids() if pid != own and matcher.matches(pid)]


def _kill_if_matching(pid: int, matcher: ProcessMatcher) -> None:
    """Send SIGKILL to pid if it still belongs to the VM.

    The pidfd pins the process, so a PID reused after the check cannot be hit.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if matcher.matches(pid):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        # VM code may have removed permissions from its own directories.
        logger.info("retrying removal of %s after restoring permissions: %s", path, exc)
    try:
        _make_tree_removable(path)
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DriverError(f"cannot remove VM directory {path}: {exc}") from exc


def _make_tree_removable(path: Path) -> None:
    os.chmod(path, 0o700, follow_symlinks=False)
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _make_tree_removable(Path(entry.path))


def _append_output(fd: int, path: Path) -> None:
    """Append to path what bubblewrap and the agent wrote to the startup pipe."""
    os.set_blocking(fd, False)
    try:
        # A pipe buffers 64 KiB by default, so one read takes everything in it.
        data = os.read(fd, 65536)
    except BlockingIOError:
        return
    with open(path, "ab") as file:
        file.write(data)


def _read_tail(path: Path, size: int = 2000) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(file.tell() - size, 0))
            return file.read().decode(errors="replace").strip()
    except OSError:
        return ""
