"""Helpers that probe bubblewrap and start a VM's top process.

They build the arguments, environment and inherited descriptors of bubblewrap
and the agent, and start the process detached from the worker.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import select
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fleetvm.drivers.base import VmSpec
from fleetvm.drivers.process.agent_client import OUTPUT_LIMIT_BYTES
from fleetvm.drivers.process.cgroups import VmCgroups
from fleetvm.errors import DriverError

logger = logging.getLogger(__package__)

SANDBOX_HOME = "/home/sandbox"
#: Directory of the agent file inside the sandbox.
SANDBOX_AGENT_DIR = "/opt/fleetvm"
VM_ID_ENV = "FLEETVM_VM_ID"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROBE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class AgentDescriptors:
    """Descriptors that a new VM's top process inherits."""

    listener: int
    log: int
    # Write end of the pipe that receives stdout and stderr during startup.
    output: int
    # cgroup.procs of the pids cgroup that VM code runs in.
    user_cgroup: int | None


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
