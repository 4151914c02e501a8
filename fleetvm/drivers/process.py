"""VM driver that runs each VM as a sandboxed process tree on this host.

Every VM has a directory ``<vms_dir>/<vm_id>/`` that the driver's user owns:

- ``state.json``: how to find the VM's processes again (``VmState``). It is
  written before the VM runs any code of its own.
- ``agent.py``: the copy of ``fleetvm/guest/agent.py`` that the VM runs.
- ``agent.sock``: the guest agent's listening socket. The driver creates it and
  passes it to the agent as an inherited descriptor.
- ``agent.log``: stderr of bubblewrap and of the agent.
- ``home/``: the VM's home directory, owned by the user the VM runs as.

Isolation, chosen by ``vm.sandbox``: with bubblewrap the agent runs as
``vm.sandbox_user`` (when the driver is root) in new user, PID, network, IPC, UTS
and cgroup namespaces. Its file system contains read-only /usr and /etc, a private
/tmp and its own home at /home/sandbox, and no other host files. Without a sandbox
the agent runs as the driver's user with FLEETVM_VM_ID in its environment. Either
way memory is limited by a cgroup v1 memory cgroup when the host allows it, and
by RLIMIT_AS otherwise.

TODO: vcpu_count is not enforced, and there is no limit on processes or disk
use. A cgroup v1 cpu quota and pids.max would cover the first two.

A VM is started in a new session and is not killed when the worker exits, so a
driver started later finds it again through ``state.json`` and /proc.
"""

from __future__ import annotations

import base64
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fleetvm.drivers.base import ExecResult, KillResult, Language, SpawnResult, VmSpec
from fleetvm.errors import (
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
CGROUP_PARENT = "fleetvm"
PING_TIMEOUT_SECONDS = 2.0
PROBE_TIMEOUT_SECONDS = 10.0
FILE_TRANSFER_TIMEOUT_SECONDS = 120.0
# The agent responds to an execute at most about 7.5 s after its timeout: 2 s for
# SIGINT to take effect, up to 5 s for a killed kernel to exit and 0.4 s for the
# rest of its output.
EXECUTE_MARGIN_SECONDS = 10.0
MAX_POLL_INTERVAL_SECONDS = 0.05


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
    cgroup: str | None = None
    created_at: float = 0.0

    def write(self, vm_dir: Path) -> None:
        temporary = vm_dir / (STATE_FILE + ".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, vm_dir / STATE_FILE)

    @classmethod
    def read(cls, vm_dir: Path) -> VmState | None:
        """Return the VM's state, or None when state.json is missing or invalid."""
        path = vm_dir / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("ignoring unreadable VM state %s: %s", path, exc)
            return None


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
        self._memory_cgroup_warned = False

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
        with self._vm_lock(vm_dir):
            try:
                _populate_vm_dir(vm_dir, credentials)
                state = self._start(vm_dir, spec, sandbox)
                deadline = started + self._settings.vm.spawn_timeout_seconds
                self._wait_until_ready(vm_id, deadline)
            except Exception as exc:
                raise self._abort_spawn(vm_id, vm_dir, exc) from exc
        logger.info(
            "spawned VM %s with isolation %s in %.0f ms",
            vm_id,
            state.isolation,
            (time.monotonic() - started) * 1000,
            extra={"vm_id": vm_id},
        )
        return SpawnResult(vm_id=vm_id, isolation=state.isolation, pid=state.pid)

    def is_alive(self, vm_id: str) -> bool:
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
        if not isinstance(code, str):
            raise InvalidRequest("code must be a string")
        if not _is_positive_number(timeout):
            raise InvalidRequest(f"timeout must be a positive number, not {timeout!r}")
        request = {
            "op": "execute",
            "language": language,
            "code": code,
            "timeout": timeout,
        }
        response = self._call(vm_id, request, timeout + EXECUTE_MARGIN_SECONDS)
        return ExecResult(
            stdout=response["stdout"],
            stderr=response["stderr"],
            exit_code=int(response["exit_code"]),
            execution_time=float(response["execution_time"]),
            timed_out=bool(response["timed_out"]),
        )

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
        return response["path"]

    def download(self, vm_id: str, remote_path: str) -> bytes:
        _check_vm_id(vm_id)
        _check_remote_path(remote_path)
        request = {
            "op": "download",
            "path": remote_path,
            "max_bytes": self._settings.api.max_upload_bytes,
        }
        response = self._call(vm_id, request, FILE_TRANSFER_TIMEOUT_SECONDS)
        return base64.b64decode(response["content"])

    def kill(self, vm_id: str) -> KillResult:
        _check_vm_id(vm_id)
        vm_dir = self._vms_dir / vm_id
        with self._vm_lock(vm_dir) as exists:
            state = VmState.read(vm_dir) if exists else None
            killed = self._end_processes(vm_id, state)
            self._remove_cgroups(vm_id, state)
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
        binds = ["--ro-bind", str(self._vms_dir), "/mnt"]
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
        # while the sandbox user reaches the homes bound into its sandbox.
        os.chmod(self._vms_dir, 0o711)
        if credentials is not None:
            _grant_search_permission(self._vms_dir, *credentials)

    def _bubblewrap_argv(self, binds: list[str]) -> list[str]:
        argv = [self._bwrap, "--unshare-all", "--unshare-user"]
        if self._disable_userns:
            argv.append("--disable-userns")
        argv += ["--new-session", "--hostname", "fleetvm"]
        argv += ["--ro-bind", "/usr", "/usr", *_system_link_arguments()]
        argv += ["--ro-bind", "/etc", "/etc", "--proc", "/proc", "--dev", "/dev"]
        argv += ["--tmpfs", "/tmp", *binds]
        return argv

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

    def _start(self, vm_dir: Path, spec: VmSpec, sandbox: str) -> VmState:
        cgroup = self._create_memory_cgroup(spec.vm_id, spec.memory_mb)
        limit = "memcg" if cgroup is not None else "rlimit"
        isolation = f"{sandbox}+{limit}"
        initial = VmState(
            vm_id=spec.vm_id,
            isolation=isolation,
            cgroup=str(cgroup) if cgroup is not None else None,
            created_at=time.time(),
        )
        # Written before any process starts, so that a kill from another worker
        # finds the cgroup even if this one dies during the spawn.
        initial.write(vm_dir)
        limit_arguments = _limit_arguments(cgroup, spec.memory_mb, sandbox)
        listener = _listen(vm_dir)
        log_fd = os.open(
            vm_dir / LOG_FILE,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
            0o600,
        )
        try:
            if sandbox == "bubblewrap":
                return self._start_bubblewrap(
                    vm_dir, spec, initial, listener, log_fd, limit_arguments
                )
            return self._start_plain(
                vm_dir, spec, initial, listener, log_fd, limit_arguments
            )
        finally:
            listener.close()
            os.close(log_fd)

    def _start_bubblewrap(
        self,
        vm_dir: Path,
        spec: VmSpec,
        initial: VmState,
        listener: socket.socket,
        log_fd: int,
        limit_arguments: list[str],
    ) -> VmState:
        credentials = self._sandbox_credentials()
        user = pwd.getpwuid(credentials[0]).pw_name if credentials else _own_user()
        env = _vm_environment(spec, SANDBOX_HOME, user, limit_arguments)
        info_read, info_write = os.pipe()
        block_read, block_write = os.pipe()
        try:
            argv = self._bubblewrap_vm_argv(
                vm_dir, listener.fileno(), info_write, block_read, limit_arguments
            )
            pass_fds = (info_write, block_read, listener.fileno())
            try:
                process = _start_detached(
                    argv, env, log_fd, pass_fds, credentials, spec.vm_id
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
            if state.cgroup is not None:
                _join_cgroup(Path(state.cgroup), [process.pid, int(info["child-pid"])])
            os.write(block_write, b"1")
        finally:
            os.close(info_read)
            os.close(block_write)
        return state

    def _bubblewrap_vm_argv(
        self,
        vm_dir: Path,
        listen_fd: int,
        info_fd: int,
        block_fd: int,
        limit_arguments: list[str],
    ) -> list[str]:
        binds = ["--bind", str(vm_dir / HOME_DIR), SANDBOX_HOME]
        binds += ["--ro-bind", str(vm_dir / AGENT_FILE), SANDBOX_AGENT]
        binds += ["--chdir", SANDBOX_HOME]
        # bwrap reports the sandbox's PID and namespaces on the info descriptor,
        # then waits for a byte on the block descriptor before it sets up the
        # sandbox. The VM joins its cgroup during that wait.
        binds += ["--info-fd", str(info_fd), "--block-fd", str(block_fd)]
        argv = self._bubblewrap_argv(binds)
        argv += ["--", self._settings.vm.guest_python, "-I", "-S", SANDBOX_AGENT]
        argv += ["serve", "--listen-fd", str(listen_fd), "--home", SANDBOX_HOME]
        argv += limit_arguments
        return argv

    def _start_plain(
        self,
        vm_dir: Path,
        spec: VmSpec,
        initial: VmState,
        listener: socket.socket,
        log_fd: int,
        limit_arguments: list[str],
    ) -> VmState:
        home = str(vm_dir / HOME_DIR)
        argv = [self._settings.vm.guest_python, "-I", "-S", str(vm_dir / AGENT_FILE)]
        argv += ["serve", "--listen-fd", str(listener.fileno()), "--home", home]
        argv += limit_arguments
        env = _vm_environment(spec, home, _own_user(), limit_arguments)
        process = _start_detached(
            argv, env, log_fd, (listener.fileno(),), None, spec.vm_id
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
        try:
            path.parent.mkdir(exist_ok=True)
            try:
                path.mkdir()
            except FileExistsError:
                # Left by a VM whose kill did not finish. rmdir fails with EBUSY
                # while the cgroup has processes.
                path.rmdir()
                path.mkdir()
            limit = memory_mb * 1024 * 1024
            (path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as exc:
            if not self._memory_cgroup_warned:
                self._memory_cgroup_warned = True
                logger.warning(
                    "cannot create memory cgroup %s, so VMs get RLIMIT_AS instead: %s",
                    path,
                    exc,
                    extra={"vm_id": vm_id},
                )
            _remove_cgroup(path)
            return None
        return path

    def _wait_until_ready(self, vm_id: str, deadline: float) -> None:
        # The listening socket exists before the agent starts, so the ping
        # connects at once and its reply shows the agent is serving.
        remaining = deadline - time.monotonic()
        try:
            self._call(vm_id, {"op": "ping"}, max(remaining, 0.001))
        except VmNotRunning as exc:
            raise DriverError(f"the agent of VM {vm_id} exited during startup") from exc

    def _abort_spawn(self, vm_id: str, vm_dir: Path, exc: Exception) -> DriverError:
        """Kill what a failed spawn started and return the error to raise."""
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
            self._remove_cgroups(vm_id, VmState.read(vm_dir))
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
        cgroups = {MEMORY_CGROUP_ROOT / CGROUP_PARENT / vm_id}
        if state is not None and state.cgroup is not None:
            cgroups.add(Path(state.cgroup))
        members: set[int] = set()
        for cgroup in cgroups:
            members |= _cgroup_members(cgroup)
        return ProcessMatcher(
            environment_entry=f"{VM_ID_ENV}={vm_id}".encode(),
            pid_namespace=state.pid_namespace if state else None,
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

    def _remove_cgroups(self, vm_id: str, state: VmState | None) -> None:
        paths = {MEMORY_CGROUP_ROOT / CGROUP_PARENT / vm_id}
        if state is not None and state.cgroup is not None:
            paths.add(Path(state.cgroup))
        for path in paths:
            _remove_cgroup(path, self._settings.kill.confirm_timeout_seconds)

    def _call(self, vm_id: str, request: dict, timeout: float) -> dict:
        """Send a request to the VM's agent and return its successful response."""
        response = self._request(vm_id, request, timeout)
        if response.get("ok"):
            return response
        raise _agent_error(vm_id, response)

    def _request(self, vm_id: str, request: dict, timeout: float) -> dict:
        op = request["op"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            _connect(sock, self._vms_dir / vm_id, vm_id)
            try:
                guest_agent.send_message(sock, request)
                response = guest_agent.recv_message(sock)
            except TimeoutError as exc:
                raise DriverError(
                    f"the agent of VM {vm_id} did not respond to {op} within "
                    f"{timeout:g} s"
                ) from exc
            except ConnectionError as exc:
                raise VmNotRunning(f"VM {vm_id} stopped during {op}: {exc}") from exc
            except guest_agent.ProtocolError as exc:
                raise DriverError(
                    f"invalid {op} message for VM {vm_id}: {exc}"
                ) from exc
        if response is None:
            raise VmNotRunning(f"VM {vm_id} stopped during {op}")
        return response


@dataclass(frozen=True)
class ProcessMatcher:
    """Tests whether a host process belongs to one VM.

    A process belongs to the VM if it is in the VM's PID namespace or memory
    cgroup, is the recorded top process, or has FLEETVM_VM_ID=<vm_id> in its
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


def _populate_vm_dir(vm_dir: Path, credentials: tuple[int, int] | None) -> None:
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
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME_PATTERN.fullmatch(name):
            raise InvalidRequest(
                f"invalid environment variable name {name!r}: use letters, digits "
                "and '_', not starting with a digit"
            )
        if not isinstance(value, str) or "\0" in value:
            raise InvalidRequest(
                f"invalid value of environment variable {name}: it must be a string "
                "without NUL characters"
            )


def _check_remote_path(path: object) -> None:
    if not isinstance(path, str) or not path:
        raise InvalidRequest("path must be a non-empty string")
    if "\0" in path:
        raise InvalidRequest("path must not contain a NUL character")


def _is_positive_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0


def _agent_error(vm_id: str, response: dict) -> Exception:
    code = response.get("error")
    message = f"VM {vm_id}: {response.get('message', 'the agent gave no message')}"
    if code == "not_found":
        return VmFileNotFound(message)
    if code in ("invalid_request", "is_a_directory", "permission_denied"):
        return InvalidRequest(message)
    if code == "too_large":
        return PayloadTooLarge(message)
    return DriverError(message)


def _connect(sock: socket.socket, vm_dir: Path, vm_id: str) -> None:
    # A socket path is limited to 107 bytes, so the socket is reached through a
    # descriptor of its directory.
    try:
        dir_fd = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VmNotRunning(f"VM {vm_id} not found on this host") from None
    try:
        sock.connect(f"/proc/self/fd/{dir_fd}/{SOCKET_FILE}")
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise VmNotRunning(f"VM {vm_id} is not running: {exc.strerror}") from exc
    except TimeoutError as exc:
        raise DriverError(f"connecting to the agent of VM {vm_id} timed out") from exc
    finally:
        os.close(dir_fd)


def _listen(vm_dir: Path) -> socket.socket:
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
    return listener


def _start_detached(
    argv: list[str],
    env: dict[str, str],
    log_fd: int,
    pass_fds: tuple[int, ...],
    credentials: tuple[int, int] | None,
    vm_id: str,
) -> subprocess.Popen:
    """Start a VM's top process in a new session, with a thread that reaps it.

    No parent-death signal or shared session ends the process with the worker.
    NOTE: a service manager that kills the worker's whole cgroup, as systemd does
    with its default KillMode=control-group, still ends the VMs with it.
    """
    process = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log_fd,
        stderr=log_fd,
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


def _limit_arguments(cgroup: Path | None, memory_mb: int, sandbox: str) -> list[str]:
    """Return the agent arguments that apply the VM's memory limit."""
    if cgroup is None:
        return ["--memory-limit", str(memory_mb * 1024 * 1024)]
    if sandbox == "none":
        # Without a sandbox the agent runs as the driver's user and joins the
        # cgroup itself, before it starts any child process.
        return ["--cgroup-procs", str(cgroup / "cgroup.procs")]
    return []


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
    a VM home needs search permission for it. Directories the driver's user owns
    get the execute bit for others, which allows entering but not listing.
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
            "reach the VM homes in %s",
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


def _remove_cgroup(path: Path, timeout: float = 0.0) -> None:
    # rmdir fails with EBUSY until the last process of the cgroup has exited.
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                logger.warning("cannot remove memory cgroup %s: %s", path, exc)
                return
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


def _read_tail(path: Path, size: int = 2000) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(file.tell() - size, 0))
            return file.read().decode(errors="replace").strip()
    except OSError:
        return ""
