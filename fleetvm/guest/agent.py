#!/usr/bin/env python3
"""Guest agent of a fleetvm VM: runs Python and bash code and transfers files.

The process driver starts ``agent.py serve`` inside each VM. The file must stay
self-contained and use only the standard library of Python 3.11, because the
fleetvm package is not importable inside a VM. The driver imports this file for
``send_message`` and ``recv_message``, so both sides share one implementation of
the protocol.

Protocol
    The agent accepts connections on a Unix stream socket: one it binds itself
    (``--socket PATH``) or a listening socket inherited from the driver
    (``--listen-fd N``). A connection carries one request and then one response.
    Each message is a 4-byte big-endian length followed by that many bytes of a
    UTF-8 JSON object. Every connection gets its own thread, so the agent responds
    to a ping while a command runs. Python requests run one at a time because
    they share one interpreter, and bash requests run in parallel.

    {"op": "ping"}
        -> {"ok": true, "pid": int, "uid": int, "home": str}
    {"op": "execute", "language": "python" | "bash", "code": str, "timeout": float}
        -> {"ok": true, "stdout": str, "stderr": str, "exit_code": int,
            "execution_time": float, "timed_out": bool, "namespace_reset": bool,
            "stdout_truncated": bool, "stderr_truncated": bool}
    {"op": "upload", "path": str, "content": str (base64)}
        -> {"ok": true, "path": str}
    {"op": "download", "path": str, "max_bytes": int (optional)}
        -> {"ok": true, "path": str, "content": str (base64)}

    A failed request gets {"ok": false, "error": CODE, "message": str}, where CODE
    is invalid_request, not_found, is_a_directory, permission_denied, too_large or
    internal_error. Relative paths are relative to the home directory, upload
    creates missing parent directories, and the returned path is absolute.

Execution
    Python code runs in a long-lived kernel process (``agent.py kernel``), so the
    names one request defines stay for the next. Bash code runs as ``bash -c`` in a
    new process group, in the home directory. Output written at the file
    descriptor level, by subprocesses for example, is captured too. Each stream
    keeps at most ``--output-limit`` bytes (1 MiB by default) and ends with a note
    that says how many bytes were dropped.

    The exit code is 0 on success. Python gives 1 for an uncaught exception, whose
    traceback goes to stderr, and the code of a SystemExit. Bash gives the shell's
    exit status, or 128 + N after signal N. A request that exceeds its timeout gets
    timed_out true and exit code 124, as GNU timeout does.

    On timeout, bash's process group gets SIGKILL. The kernel's process group gets
    SIGINT, which raises KeyboardInterrupt in the running code. A kernel that has
    not replied 2 seconds later is killed and restarted, so every name is lost: the
    response has namespace_reset true and a note on stderr. A kernel that died for
    another reason (os._exit, the memory limit) is reported in the same way.
"""

from __future__ import annotations

import argparse
import base64
import builtins
import errno
import json
import linecache
import logging
import math
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
import types

logger = logging.getLogger("fleetvm.guest.agent")

HEADER = struct.Struct(">I")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_OUTPUT_LIMIT = 1024 * 1024
DEFAULT_MAX_DOWNLOAD_BYTES = 128 * 1024 * 1024
TIMEOUT_EXIT_CODE = 124
INTERRUPT_GRACE_SECONDS = 2.0
# Maximum time a client has to send its request, and to read the response.
SOCKET_TIMEOUT_SECONDS = 120.0
# After a reply, the kernel's end-of-output markers are already in the pipes, so
# this wait only covers the reader threads being scheduled.
MARKER_WAIT_SECONDS = 2.0
# Output that background processes of a dead kernel still hold open is not
# waited for longer than this.
ORPHAN_OUTPUT_WAIT_SECONDS = 0.2
# Time a process group has to exit after SIGKILL before the agent stops waiting.
KILL_WAIT_SECONDS = 5.0
# Maximum time spent reading what an exited bash command left in one pipe.
DRAIN_SECONDS = 0.5
# Interval of exit checks where pidfd_open (Linux 5.3) is missing.
POLL_INTERVAL_SECONDS = 0.05
# Linux rejects a single argument longer than 128 KiB (MAX_ARG_STRLEN), so longer
# bash code goes through a temporary script file.
MAX_BASH_ARGUMENT_BYTES = 100_000
OOM_SCORE_ADJ = 500
READ_CHUNK_BYTES = 65536
MARKER_PREFIX = b"\x00\x00fleetvm-end:"
BASH = "/bin/bash"


class ProtocolError(Exception):
    """A message that is malformed, oversized or cut short."""


class RequestError(Exception):
    """A failed request, with the error code that the client receives."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def send_message(sock: socket.socket, message: dict) -> None:
    """Send one length-prefixed JSON message."""
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            f"message of {len(body)} bytes exceeds the maximum of "
            f"{MAX_MESSAGE_BYTES} bytes"
        )
    sock.sendall(HEADER.pack(len(body)))
    sock.sendall(body)


def recv_message(sock: socket.socket) -> dict | None:
    """Receive one message, or return None if the peer closed before sending one."""
    header = _recv_exactly(sock, HEADER.size, eof_ok=True)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_MESSAGE_BYTES:
        raise ProtocolError(
            f"message of {length} bytes exceeds the maximum of "
            f"{MAX_MESSAGE_BYTES} bytes"
        )
    body = _recv_exactly(sock, length, eof_ok=False)
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"message is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    return message


def _recv_exactly(sock: socket.socket, size: int, eof_ok: bool) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:])
        if count == 0:
            if received == 0 and eof_ok:
                return None
            raise ConnectionError(f"connection closed after {received} of {size} bytes")
        received += count
    return buffer


class CappedBuffer:
    """Bytes of one output stream, up to a limit, and the count of bytes dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.omitted = 0

    def append(self, chunk: bytes) -> None:
        room = max(self.limit - len(self.data), 0)
        self.data += chunk[:room]
        self.omitted += max(len(chunk) - room, 0)

    def text(self, stream_name: str) -> str:
        text = self.data.decode("utf-8", errors="replace")
        if self.omitted:
            text += (
                f"\n[fleetvm] {self.omitted} more bytes of {stream_name} were "
                f"dropped: the limit is {self.limit} bytes per stream.\n"
            )
        return text


def _discard_until_eof(fd: int) -> None:
    # Background processes keep writing to the pipe after the command ended, and
    # reading keeps them from failing with SIGPIPE.
    try:
        os.set_blocking(fd, True)
        while os.read(fd, READ_CHUNK_BYTES):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard_in_background(fd: int) -> None:
    threading.Thread(
        target=_discard_until_eof, args=(fd,), name="discard-output", daemon=True
    ).start()


def _shell_exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _raise_oom_score(pid: int) -> None:
    # Under the VM's memory limit the kernel's OOM killer should pick user code
    # before the agent, which the VM cannot work without.
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as file:
            file.write(str(OOM_SCORE_ADJ))
    except OSError:
        pass


def _kill_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _execution_result(
    stdout: CappedBuffer,
    stderr: CappedBuffer,
    exit_code: int,
    started: float,
    timed_out: bool,
    namespace_reset: bool,
) -> dict:
    return {
        "stdout": stdout.text("stdout"),
        "stderr": stderr.text("stderr"),
        "exit_code": exit_code,
        "execution_time": time.monotonic() - started,
        "timed_out": timed_out,
        "namespace_reset": namespace_reset,
        "stdout_truncated": stdout.omitted > 0,
        "stderr_truncated": stderr.omitted > 0,
    }


class BashRunner:
    """Runs bash commands, each in its own process group in the home directory."""

    def __init__(self, home: str, output_limit: int) -> None:
        self._home = home
        self._output_limit = output_limit

    def execute(self, code: str, timeout: float) -> dict:
        if "\0" in code:
            raise RequestError("invalid_request", "bash code contains a NUL character")
        started = time.monotonic()
        argv, script_path = self._argv(code)
        try:
            return self._run(argv, started, timeout)
        finally:
            if script_path is not None:
                os.unlink(script_path)

    def _argv(self, code: str) -> tuple[list[str], str | None]:
        if len(code.encode("utf-8", errors="surrogatepass")) <= MAX_BASH_ARGUMENT_BYTES:
            return [BASH, "-c", code], None
        import tempfile

        fd, path = tempfile.mkstemp(prefix="fleetvm-", suffix=".sh")
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as file:
            file.write(code)
        return [BASH, path], path

    def _run(self, argv: list[str], started: float, timeout: float) -> dict:
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        try:
            process = subprocess.Popen(
                argv,
                cwd=self._home,
                stdin=subprocess.DEVNULL,
                stdout=stdout_write,
                stderr=stderr_write,
                start_new_session=True,
            )
        except OSError:
            os.close(stdout_read)
            os.close(stderr_read)
            raise
        finally:
            os.close(stdout_write)
            os.close(stderr_write)
        _raise_oom_score(process.pid)

        stdout = CappedBuffer(self._output_limit)
        stderr = CappedBuffer(self._output_limit)
        buffers = {stdout_read: stdout, stderr_read: stderr}
        timed_out = _pump_until_exit(process, buffers, started + timeout)
        if timed_out or process.returncode is None:
            exit_code = TIMEOUT_EXIT_CODE
        else:
            exit_code = _shell_exit_code(process.returncode)
        return _execution_result(
            stdout, stderr, exit_code, started, timed_out, namespace_reset=False
        )


def _pump_until_exit(
    process: subprocess.Popen, buffers: dict[int, CappedBuffer], deadline: float
) -> bool:
    """Copy the process's output into buffers until it exits or the deadline.

    At the deadline the process group gets SIGKILL. Returns whether that happened.
    Every pipe in buffers is closed, or handed to a thread that reads it to the end.
    """
    selector = selectors.DefaultSelector()
    for fd in buffers:
        selector.register(fd, selectors.EVENT_READ)
    try:
        pidfd = os.pidfd_open(process.pid)
    except OSError:
        pidfd = None
    if pidfd is not None:
        selector.register(pidfd, selectors.EVENT_READ)

    open_fds = set(buffers)
    timed_out = False
    try:
        while process.poll() is None:
            now = time.monotonic()
            if not timed_out and now >= deadline:
                timed_out = True
                _kill_group(process.pid, signal.SIGKILL)
            limit = deadline + KILL_WAIT_SECONDS if timed_out else deadline
            if now >= limit:
                # A process stuck in the kernel after SIGKILL is reaped later.
                threading.Thread(target=process.wait, daemon=True).start()
                break
            wait = limit - now
            if pidfd is None:
                wait = min(wait, POLL_INTERVAL_SECONDS)
            for key, _ in selector.select(wait):
                if key.fd != pidfd:
                    _read_into(key.fd, buffers, open_fds, selector)
        _drain_after_exit(buffers, open_fds)
    finally:
        selector.close()
        if pidfd is not None:
            os.close(pidfd)
    return timed_out


def _read_into(
    fd: int,
    buffers: dict[int, CappedBuffer],
    open_fds: set[int],
    selector: selectors.BaseSelector,
) -> None:
    chunk = os.read(fd, READ_CHUNK_BYTES)
    if chunk:
        buffers[fd].append(chunk)
        return
    selector.unregister(fd)
    open_fds.discard(fd)
    os.close(fd)


def _drain_after_exit(buffers: dict[int, CappedBuffer], open_fds: set[int]) -> None:
    # The process has exited, so everything it wrote is already in the pipes.
    # Only background processes that inherited a pipe can keep it open, and the
    # time limit stops a reader that cannot keep up with one of them.
    for fd in open_fds:
        deadline = time.monotonic() + DRAIN_SECONDS
        os.set_blocking(fd, False)
        at_eof = False
        while time.monotonic() < deadline:
            try:
                chunk = os.read(fd, READ_CHUNK_BYTES)
            except BlockingIOError:
                break
            if not chunk:
                at_eof = True
                break
            buffers[fd].append(chunk)
        if at_eof:
            os.close(fd)
        else:
            _discard_in_background(fd)
    open_fds.clear()


class MarkedStreamReader:
    """Thread that reads one output pipe of the Python kernel until it closes.

    Between ``begin`` and ``finish`` it keeps the bytes that come before the
    marker, up to the output limit. The kernel writes the marker after a request's
    code has finished, so everything before it belongs to that request. Bytes
    outside that window, such as output of background threads, are dropped.
    """

    def __init__(self, fd: int, limit: int, name: str) -> None:
        self._fd = fd
        self._limit = limit
        self._condition = threading.Condition()
        self._buffer = CappedBuffer(limit)
        self._marker = b""
        self._marker_candidate = b""
        self._capturing = False
        self._marker_seen = False
        self._closed = False
        threading.Thread(target=self._read_until_eof, name=name, daemon=True).start()

    def begin(self, marker: bytes) -> None:
        with self._condition:
            self._buffer = CappedBuffer(self._limit)
            self._marker = marker
            self._marker_candidate = b""
            self._capturing = True
            self._marker_seen = False

    def wait_for_marker(self, timeout: float) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._marker_seen or self._closed, timeout)

    def wait_for_eof(self, timeout: float) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._closed, timeout)

    def finish(self) -> CappedBuffer:
        with self._condition:
            if self._capturing and not self._marker_seen:
                self._buffer.append(self._marker_candidate)
            self._capturing = False
            self._marker_candidate = b""
            return self._buffer

    def _read_until_eof(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, READ_CHUNK_BYTES)
            except OSError:
                chunk = b""
            with self._condition:
                if not chunk:
                    self._closed = True
                    self._condition.notify_all()
                    break
                self._feed(chunk)
        os.close(self._fd)

    def _feed(self, chunk: bytes) -> None:
        if not self._capturing or self._marker_seen:
            return
        data = self._marker_candidate + chunk
        index = data.find(self._marker)
        if index >= 0:
            self._buffer.append(data[:index])
            self._marker_candidate = b""
            self._marker_seen = True
            self._condition.notify_all()
            return
        # The end of the data may be the start of a marker split across reads.
        keep = min(len(data), len(self._marker) - 1)
        self._buffer.append(data[: len(data) - keep])
        self._marker_candidate = data[len(data) - keep :]


class PythonKernel:
    """Kernel process that keeps the namespace of Python requests.

    Requests run one at a time under a lock. A kernel that was killed or died is
    reported once, as namespace_reset, and a new one is started in its place.
    """

    def __init__(self, agent_path: str, home: str, output_limit: int) -> None:
        self._agent_path = agent_path
        self._home = home
        self._output_limit = output_limit
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._stdout: MarkedStreamReader | None = None
        self._stderr: MarkedStreamReader | None = None

    def start(self) -> None:
        """Start the kernel unless one runs, so that the next request is fast."""
        with self._lock:
            if self._process is None:
                self._start()

    def execute(self, code: str, timeout: float) -> dict:
        """Run code in the kernel and return the execution result.

        Time spent waiting for an earlier request counts toward the timeout.
        """
        started = time.monotonic()
        if not self._lock.acquire(timeout=timeout):
            return _queued_too_long(started)
        try:
            namespace_reset = self._restart_if_dead()
            result = self._run(code, started, started + timeout)
        finally:
            self._lock.release()
        if result["namespace_reset"]:
            threading.Thread(
                target=self.start, name="kernel-start", daemon=True
            ).start()
        result["namespace_reset"] = result["namespace_reset"] or namespace_reset
        if namespace_reset:
            result["stderr"] = (
                "[fleetvm] The Python kernel had stopped and was restarted before "
                "this code ran, so names defined earlier are gone.\n" + result["stderr"]
            )
        return result

    def _restart_if_dead(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            logger.warning(
                "kernel %d exited with %s while idle; starting a new one",
                self._process.pid,
                self._process.returncode,
            )
            self._discard()
            self._start()
            return True
        if self._process is None:
            self._start()
        return False

    def _start(self) -> None:
        parent, child = socket.socketpair()
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        argv = [sys.executable, self._agent_path, "kernel"]
        argv += ["--control-fd", str(child.fileno())]

        try:
            process = subprocess.Popen(
                argv,
                cwd=self._home,
                stdin=subprocess.DEVNULL,
                stdout=stdout_write,
                stderr=stderr_write,
                pass_fds=(child.fileno(),),
                start_new_session=True,
            )
        except OSError:
            parent.close()
            os.close(stdout_read)
            os.close(stderr_read)
            raise
        finally:
            child.close()
            os.close(stdout_write)
            os.close(stderr_write)

        _raise_oom_score(process.pid)
        self._process = process
        self._control = parent
        limit = self._output_limit
        self._stdout = MarkedStreamReader(stdout_read, limit, "kernel-stdout")
        self._stderr = MarkedStreamReader(stderr_read, limit, "kernel-stderr")
        logger.info("started Python kernel %d", process.pid)

    def _discard(self) -> None:
        # The reader threads keep draining the old pipes until they close.
        if self._control is not None:
            self._control.close()
        self._process = None
        self._control = None

    def _run(self, code: str, started: float, deadline: float) -> dict:
        token = os.urandom(16).hex()
        marker = MARKER_PREFIX + token.encode("ascii") + b"\x00"
        self._stdout.begin(marker)
        self._stderr.begin(marker)
        try:
            send_message(self._control, {"code": code, "marker": token})
        except OSError:
            reply, timed_out = None, False
        else:
            reply, timed_out = self._wait_for_reply(deadline)

        if reply is not None:
            return self._finish_reply(reply, started, timed_out)
        return self._finish_lost_kernel(started, timed_out)

    def _wait_for_reply(self, deadline: float) -> tuple[dict | None, bool]:
        """Wait for the kernel's reply, interrupting it at the deadline.

        Returns the reply, or None if the kernel died or was killed, and whether
        the deadline passed.
        """
        timed_out = False
        if not self._readable(deadline - time.monotonic()):
            timed_out = True
            logger.info("Python request timed out; sending SIGINT to the kernel")
            _kill_group(self._process.pid, signal.SIGINT)
            if not self._readable(INTERRUPT_GRACE_SECONDS):
                logger.warning(
                    "kernel %d ignored SIGINT for %.1f s; killing it",
                    self._process.pid,
                    INTERRUPT_GRACE_SECONDS,
                )
                return None, True
        try:
            return recv_message(self._control), timed_out
        except (OSError, ProtocolError) as exc:
            logger.warning("lost the connection to the kernel: %s", exc)
            return None, timed_out

    def _readable(self, timeout: float) -> bool:
        with selectors.DefaultSelector() as selector:
            selector.register(self._control, selectors.EVENT_READ)
            return bool(selector.select(max(timeout, 0.0)))

    def _finish_reply(self, reply: dict, started: float, timed_out: bool) -> dict:
        if reply.get("stdout_marker"):
            self._stdout.wait_for_marker(MARKER_WAIT_SECONDS)
        if reply.get("stderr_marker"):
            self._stderr.wait_for_marker(MARKER_WAIT_SECONDS)
        exit_code = TIMEOUT_EXIT_CODE if timed_out else int(reply["exit_code"])
        return _execution_result(
            self._stdout.finish(),
            self._stderr.finish(),
            exit_code,
            started,
            timed_out,
            namespace_reset=False,
        )

    def _finish_lost_kernel(self, started: float, timed_out: bool) -> dict:
        process = self._process
        _kill_group(process.pid, signal.SIGKILL)
        try:
            returncode = process.wait(KILL_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            returncode = None
            threading.Thread(target=process.wait, daemon=True).start()
        self._stdout.wait_for_eof(ORPHAN_OUTPUT_WAIT_SECONDS)
        self._stderr.wait_for_eof(ORPHAN_OUTPUT_WAIT_SECONDS)
        stdout = self._stdout.finish()
        stderr = self._stderr.finish()
        self._discard()

        if timed_out:
            exit_code = TIMEOUT_EXIT_CODE
            reason = (
                f"did not stop within {INTERRUPT_GRACE_SECONDS:g} s of the interrupt "
                "and was killed"
            )
        else:
            exit_code = 1 if returncode is None else _shell_exit_code(returncode)
            reason = f"exited with code {exit_code}"
        logger.warning("Python kernel %d %s", process.pid, reason)
        result = _execution_result(
            stdout, stderr, exit_code, started, timed_out, namespace_reset=True
        )
        result["stderr"] = _append_line(
            result["stderr"],
            f"[fleetvm] The Python kernel {reason}. It was restarted, so names "
            "defined earlier are gone.",
        )
        return result


def _append_line(text: str, line: str) -> str:
    if text and not text.endswith("\n"):
        text += "\n"
    return text + line + "\n"


def _queued_too_long(started: float) -> dict:
    stderr = CappedBuffer(DEFAULT_OUTPUT_LIMIT)
    stderr.append(
        b"[fleetvm] Timed out waiting for the Python code that is already running "
        b"in this VM.\n"
    )
    return _execution_result(
        CappedBuffer(0), stderr, TIMEOUT_EXIT_CODE, started, True, False
    )


def _resolve_path(home: str, path: object) -> str:
    if not isinstance(path, str) or not path:
        raise RequestError("invalid_request", "path must be a non-empty string")
    if "\0" in path:
        raise RequestError("invalid_request", "path contains a NUL character")
    return os.path.abspath(os.path.join(home, path))


def _file_error(exc: OSError, action: str, path: str) -> RequestError:
    if exc.errno == errno.ENOENT:
        return RequestError("not_found", f"file {path} not found")
    if exc.errno == errno.EISDIR:
        return RequestError("is_a_directory", f"{path} is a directory, not a file")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        code = "permission_denied"
    elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return RequestError(
            "invalid_request", f"{action} {path} failed: a parent is not a directory"
        )
    elif exc.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL):
        code = "invalid_request"
    else:
        code = "internal_error"
    return RequestError(code, f"{action} {path} failed: {exc.strerror}")


def upload_file(home: str, path: object, encoded: object) -> str:
    """Write a base64-encoded file, creating its parent directories."""
    target = _resolve_path(home, path)
    if not isinstance(encoded, str):
        raise RequestError("invalid_request", "content must be a base64 string")
    try:
        content = base64.b64decode(encoded, validate=True)
    except ValueError as exc:
        raise RequestError("invalid_request", f"content is not base64: {exc}") from exc
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as file:
            file.write(content)
    except OSError as exc:
        raise _file_error(exc, "writing", target) from exc
    return target


def _check_regular_file(fd: int, path: str) -> None:
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        raise RequestError("is_a_directory", f"{path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise RequestError("invalid_request", f"{path} is not a regular file")


def download_file(home: str, path: object, max_bytes: int) -> tuple[str, bytes]:
    """Read a regular file of at most max_bytes bytes."""
    target = _resolve_path(home, path)
    try:
        # O_NONBLOCK keeps a FIFO from blocking the open, and the check below
        # rejects it.
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _file_error(exc, "opening", target) from exc
    try:
        _check_regular_file(fd, target)
    except RequestError:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as file:
        try:
            content = file.read(max_bytes + 1)
        except OSError as exc:
            raise _file_error(exc, "reading", target) from exc
    if len(content) > max_bytes:
        raise RequestError(
            "too_large", f"{target} is larger than the maximum of {max_bytes} bytes"
        )
    return target, content


class Agent:
    """Request handlers of the guest agent."""

    def __init__(self, home: str, kernel: PythonKernel, bash: BashRunner) -> None:
        self._home = home
        self._kernel = kernel
        self._bash = bash
        self._handlers = {
            "ping": self._ping,
            "execute": self._execute,
            "upload": self._upload,
            "download": self._download,
        }

    def handle_connection(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(SOCKET_TIMEOUT_SECONDS)
            try:
                request = recv_message(conn)
            except (OSError, ProtocolError) as exc:
                logger.warning("rejected a request: %s", exc)
                self._send(conn, _error("invalid_request", str(exc)))
                return
            if request is None:
                return
            self._send(conn, self.dispatch(request))

    def dispatch(self, request: dict) -> dict:
        op = request.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            return _error("invalid_request", f"unknown op {op!r}; expected {known}")
        try:
            return {"ok": True, **handler(request)}
        except RequestError as exc:
            return _error(exc.code, exc.message)
        except Exception as exc:
            logger.exception("request %s failed", op)
            return _error("internal_error", f"{op} failed in the guest agent: {exc!r}")

    def _send(self, conn: socket.socket, response: dict) -> None:
        try:
            send_message(conn, response)
        except (OSError, ProtocolError) as exc:
            logger.warning("could not send a response: %s", exc)

    def _ping(self, request: dict) -> dict:
        return {"pid": os.getpid(), "uid": os.getuid(), "home": self._home}

    def _execute(self, request: dict) -> dict:
        language = request.get("language")
        code = request.get("code")
        timeout = request.get("timeout")
        if not isinstance(code, str):
            raise RequestError("invalid_request", "code must be a string")
        if not _is_positive_number(timeout):
            raise RequestError(
                "invalid_request", f"timeout must be a positive number, not {timeout!r}"
            )
        if language == "python":
            return self._kernel.execute(code, float(timeout))
        if language == "bash":
            return self._bash.execute(code, float(timeout))
        raise RequestError(
            "invalid_request", f"unknown language {language!r}; expected python, bash"
        )

    def _upload(self, request: dict) -> dict:
        return {
            "path": upload_file(self._home, request.get("path"), request.get("content"))
        }

    def _download(self, request: dict) -> dict:
        max_bytes = request.get("max_bytes", DEFAULT_MAX_DOWNLOAD_BYTES)
        if (
            not isinstance(max_bytes, int)
            or isinstance(max_bytes, bool)
            or max_bytes < 0
        ):
            raise RequestError("invalid_request", "max_bytes must be an integer >= 0")
        path, content = download_file(self._home, request.get("path"), max_bytes)
        return {"path": path, "content": base64.b64encode(content).decode("ascii")}


def _is_positive_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0


def _error(code: str, message: str) -> dict:
    return {"ok": False, "error": code, "message": message}


class InterruptGate:
    """SIGINT handler that raises KeyboardInterrupt only while user code runs."""

    def __init__(self) -> None:
        self.enabled = False

    def handle(self, signum: int, frame: object) -> None:
        if self.enabled:
            raise KeyboardInterrupt


def run_kernel(control_fd: int) -> None:
    """Run Python requests from the agent until it closes the control socket.

    File descriptors 1 and 2 are the agent's output pipes. After each request the
    kernel writes the request's marker to both, then replies on the control socket.
    """
    os.set_inheritable(control_fd, False)
    control = socket.socket(fileno=control_fd)
    saved_stdout = os.dup(1)
    saved_stderr = os.dup(2)
    namespace = _new_main_namespace()
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    gate = InterruptGate()
    signal.signal(signal.SIGINT, gate.handle)

    cell_number = 0
    while True:
        request = recv_message(control)
        if request is None:
            return
        cell_number += 1
        # Earlier code may have redirected or closed the standard descriptors.
        os.dup2(saved_stdout, 1)
        os.dup2(saved_stderr, 2)
        try:
            exit_code = _run_cell(request["code"], namespace, cell_number, gate)
        except KeyboardInterrupt:
            exit_code = 1
        _flush_standard_streams()
        marker = MARKER_PREFIX + request["marker"].encode("ascii") + b"\x00"
        reply = {
            "exit_code": exit_code,
            "stdout_marker": _write_all(saved_stdout, marker),
            "stderr_marker": _write_all(saved_stderr, marker),
        }
        send_message(control, reply)


def _new_main_namespace() -> dict:
    # User code gets a fresh __main__ module, so that pickle and multiprocessing
    # find the classes and functions it defines.
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    sys.argv = [""]
    sys.path[0] = ""
    return module.__dict__


def _run_cell(code: str, namespace: dict, cell_number: int, gate: InterruptGate) -> int:
    filename = f"<cell-{cell_number}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        compiled = compile(code, filename, "exec")
    except (SyntaxError, ValueError) as exc:
        sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
        return 1

    gate.enabled = True
    try:
        exec(compiled, namespace)
    except SystemExit as exc:
        gate.enabled = False
        return _system_exit_code(exc)
    except BaseException as exc:
        gate.enabled = False
        traceback.print_exception(type(exc), exc, _user_traceback(exc), file=sys.stderr)
        return 1
    finally:
        gate.enabled = False
    return 0


def _user_traceback(exc: BaseException) -> types.TracebackType | None:
    # The first entry is _run_cell's exec call, and a KeyboardInterrupt raised by
    # the interrupt gate ends with the gate's frame. Neither is the user's code.
    first = exc.__traceback__.tb_next if exc.__traceback__ else None
    entry = first
    while entry is not None and entry.tb_next is not None:
        if entry.tb_next.tb_frame.f_code is InterruptGate.handle.__code__:
            entry.tb_next = None
            break
        entry = entry.tb_next
    return first


def _system_exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            # User code may have replaced or closed a stream.
            pass


def _write_all(fd: int, data: bytes) -> bool:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        return False
    return True


def _bind_unix(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    # A socket path is limited to 107 bytes, so long paths are reached through
    # a descriptor of their directory.
    directory = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        listener.bind(f"/proc/self/fd/{directory}/{os.path.basename(path)}")
    finally:
        os.close(directory)
    listener.listen(64)
    return listener


def _listener(args: argparse.Namespace) -> socket.socket:
    if args.socket is not None:
        return _bind_unix(args.socket)
    os.set_inheritable(args.listen_fd, False)
    return socket.socket(fileno=args.listen_fd)


def _apply_limits(args: argparse.Namespace) -> None:
    if args.cgroup_procs is not None:
        with open(args.cgroup_procs, "w") as file:
            file.write(str(os.getpid()))
    if args.memory_limit is not None:
        import resource

        limit = args.memory_limit
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve(args: argparse.Namespace) -> None:
    """Accept connections forever, one thread per connection."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s agent[%(process)d] %(levelname)s %(message)s",
    )
    # Joining the memory cgroup comes first, before any child process exists.
    _apply_limits(args)
    home = os.path.abspath(args.home)
    os.chdir(home)
    listener = _listener(args)

    kernel = PythonKernel(os.path.abspath(__file__), home, args.output_limit)
    threading.Thread(target=kernel.start, name="kernel-start", daemon=True).start()
    agent = Agent(home, kernel, BashRunner(home, args.output_limit))
    logger.info("serving, home %s", home)
    while True:
        conn, _ = listener.accept()
        threading.Thread(
            target=agent.handle_connection, args=(conn,), name="request", daemon=True
        ).start()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fleetvm guest agent")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="serve requests on a socket")
    source = serve_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--socket", help="path of the Unix socket to bind")
    source.add_argument(
        "--listen-fd", type=int, help="inherited descriptor of a listening socket"
    )
    serve_parser.add_argument("--home", required=True, help="home directory of the VM")
    serve_parser.add_argument(
        "--output-limit",
        type=int,
        default=DEFAULT_OUTPUT_LIMIT,
        help="maximum bytes kept per output stream of one command",
    )
    serve_parser.add_argument(
        "--cgroup-procs", help="cgroup.procs file that the agent adds itself to"
    )
    serve_parser.add_argument(
        "--memory-limit",
        type=int,
        help="RLIMIT_AS of the agent and its children, in bytes",
    )

    kernel_parser = commands.add_parser("kernel", help="run as the Python kernel")
    kernel_parser.add_argument("--control-fd", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.command == "kernel":
        run_kernel(args.control_fd)
    else:
        serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
