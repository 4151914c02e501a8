"""VM driver that runs each VM as a sandboxed process tree on this host.

Every VM has a directory ``<vms_dir>/<vm_id>/`` that the driver's user owns, with
mode 0711, and that the VM cannot write:

- ``state.json``: how to find the VM's processes again (``VmState``). It is
  written before the VM runs any code of its own, with mode 0600, and a driver
  ignores one that another user owns or others can write.
- ``agent.pyc``: ``fleetvm/guest/agent.py`` compiled by the guest Python, which
  the VM runs (``agent.py``, the source, where it could not be compiled).
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

import fcntl
import logging
import os
import pwd
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

from fleetvm.drivers.base import KillResult, SpawnResult, VmSpec
from fleetvm.drivers.process.agent_client import _listen
from fleetvm.drivers.process.agent_socket import AgentSocketDriver
from fleetvm.drivers.process.cgroups import (
    AGENT_TASK_RESERVE,
    CGROUP_PARENT,
    STALE_CGROUP_LOCK_SECONDS,
    USER_CGROUP,
    VmCgroups,
    _cgroup_members,
    _cgroup_tree_has_processes,
    _child_cgroups,
    _create_cgroup,
    _join_cgroup,
    _locked_cgroup_parent,
    _open_cgroup_parent,
    _open_user_cgroup,
    _remove_cgroup_tree,
)
from fleetvm.drivers.process.procfs import (
    ProcessMatcher,
    _find_processes,
    _pid_namespace,
    _start_time,
    kill_until_gone,
)

# Re-exported, because tests use it as fleetvm.drivers.process._process_status.
from fleetvm.drivers.process.procfs import _process_status as _process_status
from fleetvm.drivers.process.sandbox import (
    PROBE_TIMEOUT_SECONDS,
    SANDBOX_AGENT_DIR,
    SANDBOX_HOME,
    VM_ID_ENV,
    AgentDescriptors,
    _agent_arguments,
    _bubblewrap_environment,
    _bwrap_supports,
    _credential_arguments,
    _grant_search_permission,
    _inherited,
    _limit_arguments,
    _own_user,
    _read_bwrap_info,
    _start_detached,
    _system_link_arguments,
    _vm_environment,
)
from fleetvm.drivers.process.state import VmState

# Re-exported, because tests use it as fleetvm.drivers.process.MAX_CODE_BYTES.
from fleetvm.drivers.process.validation import MAX_CODE_BYTES as MAX_CODE_BYTES
from fleetvm.drivers.process.validation import (
    VM_ID_PATTERN,
    _check_env,
    _check_vm_id,
)
from fleetvm.drivers.process.vm_dir import (
    HOME_DIR,
    LOG_FILE,
    _append_output,
    _open_log,
    _populate_vm_dir,
    _read_tail,
    _remove_tree,
    compile_agent,
)
from fleetvm.errors import DriverError, InvalidRequest, VmNotRunning
from fleetvm.settings import Settings

logger = logging.getLogger(__name__)

# Only this module reads the cgroup roots, so that replacing them on
# fleetvm.drivers.process, as tests do, changes every use. _vm_cgroups and
# _cgroup_parents_locked stay here for that reason.
MEMORY_CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
PIDS_CGROUP_ROOT = Path("/sys/fs/cgroup/pids")


class ProcessDriver(AgentSocketDriver):
    """Driver whose VMs are process trees, sandboxed by bubblewrap when possible."""

    name = "process"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._probe_lock = threading.Lock()
        self._sandbox: str | None = None
        self._bwrap = "bwrap"
        self._disable_userns = False
        self._tmpfs_size = False
        self._cgroup_warnings: set[str] = set()
        self._agent: Path | None = None
        self._agent_lock = threading.Lock()

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

    def is_running(self, vm_id: str) -> bool:
        """Return whether the VM's top process, bubblewrap or the agent, runs.

        It exits when the agent exits, so this reads one /proc file where a
        ping costs a connection and a request to the agent.
        """
        _check_vm_id(vm_id)
        state = VmState.read(self._vms_dir / vm_id)
        if state is None or state.pid is None or state.start_time is None:
            return self.is_alive(vm_id)
        status = _process_status(state.pid)
        return status is not None and status[0] != "Z" and status[1] == state.start_time

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

    def _agent_file(self) -> Path:
        """Return the agent file that new VMs get, compiling it on first use."""
        with self._agent_lock:
            if self._agent is None:
                directory = self._settings.resolved_data_dir / "agent"
                directory.mkdir(parents=True, exist_ok=True)
                os.chmod(directory, 0o755)
                self._agent = compile_agent(self._settings.vm.guest_python, directory)
            return self._agent

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
            _populate_vm_dir(vm_dir, credentials, self._host_home, self._agent_file())
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
            members = [process.pid, int(info["child-pid"])]
            for cgroup in (state.cgroup, state.pids_cgroup):
                if cgroup is not None:
                    _join_cgroup(Path(cgroup), members)
            # Written after the join, because kill reads a state with a PID as
            # proof that the cgroups contain every process of the VM.
            state.write(vm_dir)
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
        agent = self._agent_file().name
        sandbox_agent = f"{SANDBOX_AGENT_DIR}/{agent}"
        mounts += ["--ro-bind", str(vm_dir / agent), sandbox_agent]
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
        argv += ["--", self._settings.vm.guest_python, "-I", "-S", sandbox_agent]
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
        agent = str(vm_dir / self._agent_file().name)
        argv = [self._settings.vm.guest_python, "-I", "-S", agent]
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

    def _matcher(
        self, vm_id: str, state: VmState | None, pid_namespace: int | None = None
    ) -> ProcessMatcher:
        members: set[int] = set()
        for cgroup in _vm_cgroups(vm_id):
            members |= _cgroup_members(cgroup)
        if state is not None:
            pid_namespace = state.pid_namespace
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
            members_complete=_members_complete(state),
        )

    def _end_processes(self, vm_id: str, state: VmState | None) -> int:
        """SIGKILL every process of the VM and wait until none is left.

        Returns how many processes were found running. Raises DriverError when
        some survive vm.kill.confirm_timeout_seconds.
        """
        learned_namespace: int | None = None
        if state is None:
            # Without a state file, the VM's PID namespace is learnt from the
            # processes its environment variable finds. The namespace also
            # contains processes that dropped the variable, and they die only
            # after its init, so the kill must wait for them too.
            first = _find_processes(self._matcher(vm_id, None))
            learned_namespace = _sandbox_namespace(first)
        killed = kill_until_gone(
            vm_id,
            lambda: self._matcher(vm_id, state, learned_namespace),
            self._settings.kill.confirm_timeout_seconds,
        )
        return len(killed)

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


def _vm_cgroups(vm_id: str) -> list[Path]:
    """Return the cgroups a VM's processes can be in, derived from its id only."""
    pids = PIDS_CGROUP_ROOT / CGROUP_PARENT / vm_id
    return [MEMORY_CGROUP_ROOT / CGROUP_PARENT / vm_id, pids, pids / USER_CGROUP]


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


def _members_complete(state: VmState | None) -> bool:
    """Return whether the VM's cgroups contain every process of the VM.

    A bubblewrap VM joins its pids cgroup before its sandbox starts, and the
    state records its PID only after that. Its sandbox user cannot move a
    process out of the cgroup. A plain VM may run as the worker's own user,
    which can leave the cgroup, so it gets no shortcut.
    """
    return (
        state is not None
        and state.pid is not None
        and state.pids_cgroup is not None
        and state.isolation.startswith("bubblewrap")
    )


def _sandbox_namespace(pids: list[int]) -> int | None:
    """Return the one PID namespace other than the host's that ``pids`` use."""
    host = _pid_namespace(os.getpid())
    namespaces = {_pid_namespace(pid) for pid in pids} - {host, None}
    return namespaces.pop() if len(namespaces) == 1 else None
