"""Files of a VM directory: populating, logging, reading and removing them."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

from fleetvm.errors import DriverError
from fleetvm.guest import agent as guest_agent

logger = logging.getLogger(__package__)

AGENT_SOURCE = Path(guest_agent.__file__)
#: The agent's bytecode, which VMs run where the guest Python compiled it.
AGENT_BYTECODE_FILE = "agent.pyc"
#: The source file name that the bytecode records.
SANDBOX_AGENT_SOURCE = "/opt/fleetvm/agent.py"
SOCKET_FILE = "agent.sock"
LOG_FILE = "agent.log"
HOME_DIR = "home"


def _populate_vm_dir(
    vm_dir: Path, credentials: tuple[int, int] | None, host_home: bool, agent: Path
) -> None:
    """Create the VM's home where it is on the host, and copy the agent file in."""
    if host_home:
        home = vm_dir / HOME_DIR
        home.mkdir()
        os.chmod(home, 0o700)
        if credentials is not None:
            os.chown(home, *credentials)
    shutil.copyfile(agent, vm_dir / agent.name)
    os.chmod(vm_dir / agent.name, 0o644)


def compile_agent(guest_python: str, directory: Path) -> Path:
    """Return the agent compiled by the guest Python in directory, or its source.

    Python compiles a script on every start, but not a .pyc file, so the
    bytecode saves the agent and its kernel about 10 ms each at a VM's start.
    The guest Python compiles it, so the bytecode matches its version.
    """
    target = directory / AGENT_BYTECODE_FILE
    # The file name recorded in the bytecode is the sandbox's, because VM code
    # can read the file and need not learn where fleetvm is installed.
    script = (
        "import py_compile, sys\n"
        "py_compile.compile(sys.argv[1], cfile=sys.argv[2], dfile=sys.argv[3],"
        " doraise=True)"
    )
    argv = [guest_python, "-I", "-S", "-c", script, str(AGENT_SOURCE), str(target)]
    argv.append(SANDBOX_AGENT_SOURCE)
    try:
        subprocess.run(
            argv,
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        logger.warning(
            "cannot compile the guest agent with %s, so VMs run its source and "
            "start about 20 ms slower: %s %s",
            guest_python,
            exc,
            stderr.decode(errors="replace").strip(),
        )
        return AGENT_SOURCE
    os.chmod(target, 0o644)
    return target


def _open_log(vm_dir: Path, stack: ExitStack) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    fd = os.open(vm_dir / LOG_FILE, flags, 0o600)
    stack.callback(os.close, fd)
    return fd


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
