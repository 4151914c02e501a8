"""Client side of the guest agent's socket protocol.

Every response has a size limit by operation, and every field the driver uses
is checked, because responses come from inside the VM.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fleetvm.drivers.base import ExecResult
from fleetvm.drivers.process.procfs import MAX_POLL_INTERVAL_SECONDS
from fleetvm.drivers.process.validation import MAX_PATH_BYTES, _is_unicode
from fleetvm.drivers.process.vm_dir import SOCKET_FILE
from fleetvm.errors import (
    Conflict,
    DriverError,
    InvalidRequest,
    PayloadTooLarge,
    VmFileNotFound,
    VmNotRunning,
)
from fleetvm.guest import agent as guest_agent

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
        cpu_time=_cpu_time_field(vm_id, response),
    )


def _cpu_time_field(vm_id: str, response: dict) -> float | None:
    # An agent that predates cpu_time leaves it out, as a VM adopted after an
    # upgrade still runs the old agent.
    cpu_time = response.get("cpu_time")
    if cpu_time is None:
        return None
    if isinstance(cpu_time, bool) or not isinstance(cpu_time, int | float):
        raise _invalid_response(vm_id, "execute", "cpu_time is not a number")
    if not math.isfinite(cpu_time) or cpu_time < 0:
        raise _invalid_response(vm_id, "execute", "cpu_time is out of range")
    return float(cpu_time)


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
