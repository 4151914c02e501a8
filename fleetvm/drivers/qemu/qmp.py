"""A minimal QMP client: enough to quit QEMU and read the guest's console.

QMP sends one JSON object per line. The server greets with {"QMP": ...}, and
accepts commands only after ``qmp_capabilities``. Events may arrive between a
command and its {"return": ...} or {"error": ...}, so they are skipped.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

QMP_SOCKET_FILE = "qmp.sock"
# Longest QMP line read; a greeting or a reply to these commands is far shorter.
MAX_LINE_BYTES = 64 * 1024


class QmpError(Exception):
    """QMP was not reachable, returned an error, or timed out."""


def quit_vm(vm_dir: Path, timeout: float) -> None:
    """Send ``quit`` to the QEMU of vm_dir. QEMU exits shortly after it replies."""
    run_command(vm_dir, "quit", {}, timeout)


def read_ring_buffer(vm_dir: Path, device: str, size: int, timeout: float) -> str:
    """Return up to size bytes of a ringbuf character device, as text."""
    arguments = {"device": device, "size": size, "format": "utf8"}
    reply = run_command(vm_dir, "ringbuf-read", arguments, timeout)
    return reply.get("return", "")


def run_command(vm_dir: Path, command: str, arguments: dict, timeout: float) -> dict:
    """Run one QMP command on the QEMU of vm_dir and return its reply."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        _connect(sock, vm_dir)
        reader = sock.makefile("rb")
        _read_reply(reader, deadline, greeting=True)
        sock.sendall(json.dumps({"execute": "qmp_capabilities"}).encode() + b"\n")
        _read_reply(reader, deadline)
        message = {"execute": command, "arguments": arguments}
        sock.sendall(json.dumps(message).encode() + b"\n")
        return _read_reply(reader, deadline)


def _connect(sock: socket.socket, vm_dir: Path) -> None:
    # A socket path is limited to 107 bytes, so QEMU binds it relative to the VM
    # directory and the client goes through a descriptor of that directory.
    try:
        dir_fd = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise QmpError(f"cannot open {vm_dir}: {exc}") from exc
    try:
        sock.connect(f"/proc/self/fd/{dir_fd}/{QMP_SOCKET_FILE}")
    except OSError as exc:
        raise QmpError(f"cannot connect to QMP in {vm_dir}: {exc}") from exc
    finally:
        os.close(dir_fd)


def _read_reply(reader, deadline: float, greeting: bool = False) -> dict:
    while time.monotonic() < deadline:
        try:
            line = reader.readline(MAX_LINE_BYTES)
        except OSError as exc:
            raise QmpError(f"reading from QMP failed: {exc}") from exc
        if not line:
            raise QmpError("QMP closed the connection")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise QmpError(f"QMP sent invalid JSON: {line[:200]!r}") from exc
        if greeting and "QMP" in message:
            return message
        if "error" in message:
            raise QmpError(f"QMP returned an error: {message['error']}")
        if "return" in message:
            return message
    raise QmpError("QMP did not reply in time")
