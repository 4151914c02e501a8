"""Base class of drivers whose VMs serve the guest agent on ``agent.sock``.

The process driver's agent listens on ``<vms_dir>/<vm_id>/agent.sock`` itself,
and the qemu driver's relay listens there for the agent inside the guest.
Either way the same requests reach the same agent, so execute, upload,
download, is_alive and list_vms live here, with the per-VM lock that
serializes spawn and kill.
"""

from __future__ import annotations

import base64
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fleetvm.drivers.base import ExecResult, Language
from fleetvm.drivers.process.agent_client import (
    EXECUTE_RESPONSE_BYTES,
    SMALL_RESPONSE_BYTES,
    _agent_error,
    _base64_length,
    _connect,
    _content_field,
    _exec_result,
    _invalid_response,
    _path_field,
    _send_request,
)
from fleetvm.drivers.process.validation import (
    VM_ID_PATTERN,
    _check_code,
    _check_remote_path,
    _check_vm_id,
    _is_positive_number,
)
from fleetvm.errors import DriverError, InvalidRequest, PayloadTooLarge, VmNotRunning
from fleetvm.guest import agent as guest_agent
from fleetvm.settings import Settings

PING_TIMEOUT_SECONDS = 2.0
FILE_TRANSFER_TIMEOUT_SECONDS = 120.0
# The agent responds to an execute at most about 7.5 s after its timeout: 2 s for
# SIGINT to take effect, up to 5 s for a killed kernel to exit and 0.4 s for the
# rest of its output.
EXECUTE_MARGIN_SECONDS = 10.0
MAX_TIMEOUT_SECONDS = guest_agent.MAX_TIMEOUT_SECONDS


class AgentSocketDriver:
    """Agent requests and VM listing shared by the process and qemu drivers."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._vms_dir = settings.vms_dir

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

    def is_running(self, vm_id: str) -> bool:
        return self.is_alive(vm_id)

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
