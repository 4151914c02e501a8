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
            "execution_time": float, "cpu_time": float | null, "timed_out": bool,
            "namespace_reset": bool, "stdout_truncated": bool,
            "stderr_truncated": bool}
    {"op": "upload", "path": str, "content": str (base64)}
        -> {"ok": true, "path": str}
    {"op": "download", "path": str, "max_bytes": int (optional)}
        -> {"ok": true, "path": str, "content": str (base64)}

    A failed request gets {"ok": false, "error": CODE, "message": str}, where CODE
    is invalid_request, not_found, is_a_directory, permission_denied, too_large,
    no_space, process_limit or internal_error. internal_error means the agent
    itself failed, and every other code is caused by the request or by the VM's
    own state.

Files
    Relative paths are relative to the home directory, and the returned path is
    absolute. Paths must be valid UTF-8 of at most 4095 bytes. Upload creates
    missing parent directories and replaces the file through a temporary file and
    a rename, so a failed upload leaves an existing file and the directory tree as
    they were. Upload and download accept only regular files. Symbolic links are
    followed, because the agent has no more rights than the code it runs.

Execution
    Python code runs in a long-lived kernel process (``agent.py kernel``), so the
    names one request defines stay for the next. Bash code runs as ``bash -c`` in a
    new process group, in the home directory. Output written at the file
    descriptor level, by subprocesses for example, is captured too. Each stream
    keeps at most ``--output-limit`` bytes (1 MiB by default) and ends with a note
    that states how many bytes were dropped.

    The exit code is 0 on success. Python gives 1 for an uncaught exception, whose
    traceback goes to stderr, and the code of a SystemExit modulo 256, as for a
    process. Bash gives the shell's exit status, or 128 + N after signal N. A
    request that exceeds its timeout gets timed_out true and exit code 124, as GNU
    timeout does.

    With ``--user-cgroup-fd`` the kernel and every bash command join that cgroup
    (a pids cgroup whose pids.max is the VM's process limit) before they run any
    code. The agent itself stays outside it, so a fork bomb cannot keep the agent
    from serving requests. When a command cannot start, it gets exit code 126 and
    the reason on stderr.

    cpu_time is the user plus system CPU time in seconds that the code used,
    counting the child processes it waited for but not those it left running.
    For bash it comes from wait4 on the command's process. For Python the agent
    reads the kernel's counters in /proc before and after the request, so code
    cannot forge it through the control socket. /proc counts in clock ticks,
    usually 10 ms. It is null when the agent could not measure it, for example
    when the kernel died during the request.

    On timeout, bash's process group gets SIGKILL. The kernel's process group gets
    SIGINT, which raises KeyboardInterrupt in the running code. A kernel that has
    not replied 2 seconds later is killed and restarted, so every name is lost: the
    response has namespace_reset true and a note on stderr. A kernel that died for
    another reason (os._exit, the memory limit) is reported in the same way.

Security
    The agent runs as the same user as the code it executes. It makes itself
    non-dumpable, so that code cannot ptrace it, read its memory or take its
    descriptors with pidfd_getfd, but code can still signal or kill it. The
    driver therefore treats every response as untrusted input.
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
# Maximum execute timeout, one day. Far longer ones overflow time_t conversions.
MAX_TIMEOUT_SECONDS = 86400.0
OOM_SCORE_ADJ = 500
READ_CHUNK_BYTES = 65536
MARKER_PREFIX = b"\x00\x00fleetvm-end:"
BASH = "/bin/bash"
# Linux PATH_MAX is 4096 bytes including the terminating NUL.
MAX_PATH_BYTES = 4095
# Error messages are cut to this length, because some quote the request.
MAX_MESSAGE_CHARS = 8192
# Kernel replies are a few small fields, so anything longer is not from the kernel.
MAX_KERNEL_REPLY_BYTES = 65536
# Shells use 126 for a command that was found but could not be started.
START_FAILED_EXIT_CODE = 126
# From <linux/prctl.h>.
PR_SET_DUMPABLE = 4


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


def recv_message(
    sock: socket.socket,
    max_bytes: int = MAX_MESSAGE_BYTES,
    deadline: float | None = None,
) -> dict | None:
    """Receive one message, or return None if the peer closed before sending one.

    A message body longer than max_bytes raises ProtocolError before any of it is
    read. With a deadline (a time.monotonic() value) the whole message must
    arrive by then, or TimeoutError is raised, so a slow sender cannot stretch
    the socket's timeout by sending a byte at a time.
    """
    header = _recv_exactly(sock, HEADER.size, eof_ok=True, deadline=deadline)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > max_bytes:
        raise ProtocolError(
            f"message of {length} bytes exceeds the maximum of {max_bytes} bytes"
        )
    body = _recv_exactly(sock, length, eof_ok=False, deadline=deadline)
    try:
        message = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"message is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    return message


def _recv_exactly(
    sock: socket.socket, size: int, eof_ok: bool, deadline: float | None
) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"only {received} of {size} bytes arrived before the deadline"
                )
            sock.settimeout(remaining)
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


class PipeDrainer:
    """One thread that reads pipes to their end and drops what it reads.

    Background processes keep writing to a command's pipes after the command
    ended, and reading keeps them from failing with SIGPIPE. One thread serves
    every such pipe, because a thread per pipe would let background processes
    use up the agent's share of the VM's process limit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[int] = []
        self._wake_read = -1
        self._wake_write = -1
        self._started = False

    def add(self, fd: int) -> None:
        """Take ownership of fd and read it until it reaches end of file."""
        os.set_blocking(fd, False)
        with self._lock:
            if not self._started and not self._start():
                # Writers to this pipe now get EPIPE, which beats blocking forever.
                os.close(fd)
                return
            self._pending.append(fd)
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            # The thread has wake-ups pending already and will see this fd.
            pass

    def _start(self) -> bool:
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._started = _start_thread(self._run, "drain-output")
        if not self._started:
            os.close(self._wake_read)
            os.close(self._wake_write)
        return self._started

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_read, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fd == self._wake_read:
                    os.read(self._wake_read, READ_CHUNK_BYTES)
                    self._register_pending(selector)
                else:
                    _discard_chunk(key.fd, selector)

    def _register_pending(self, selector: selectors.BaseSelector) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for fd in pending:
            selector.register(fd, selectors.EVENT_READ)


def _discard_chunk(fd: int, selector: selectors.BaseSelector) -> None:
    try:
        chunk = os.read(fd, READ_CHUNK_BYTES)
    except BlockingIOError:
        return
    except OSError:
        chunk = b""
    if not chunk:
        selector.unregister(fd)
        os.close(fd)


PIPE_DRAINER = PipeDrainer()


def _start_thread(target, name: str, *args: object) -> bool:
    """Start a daemon thread and return whether that worked.

    Starting fails when the VM has reached its process limit, which user code
    can cause, so callers degrade instead of letting the agent crash.
    """
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError as exc:
        logger.warning("cannot start thread %s: %s", name, exc)
        return False
    return True


def _child_setup(user_cgroup_fd: int | None):
    """Return the preexec_fn that moves a new child into the user code's cgroup.

    The child writes "0" (itself) to that cgroup's cgroup.procs between fork and
    exec, so it is inside before it runs any code. The descriptor was opened by
    the driver, so cgroup v1 checks the opener's rights and not the child's.
    """
    if user_cgroup_fd is None:
        return None

    def join_user_cgroup() -> None:
        try:
            os.write(user_cgroup_fd, b"0")
        except OSError:
            # The cgroup is gone because the VM is being killed. The child then
            # stays in the VM's cgroup, whose limit still applies.
            pass

    return join_user_cgroup


def _start_failed(started: float, program: str, exc: BaseException) -> dict:
    reason = getattr(exc, "strerror", None) or str(exc)
    stderr = CappedBuffer(DEFAULT_OUTPUT_LIMIT)
    stderr.append(
        f"[fleetvm] Could not start {program}: {reason}. The VM may have reached "
        "its process, memory or disk limit.\n".encode()
    )
    return _execution_result(
        CappedBuffer(0), stderr, START_FAILED_EXIT_CODE, started, False, False, 0.0
    )


def _shell_exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _exit_status(value: object) -> int:
    """Reduce a reported exit code to 0-255, as the kernel does for a process."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 1
    return value & 0xFF


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
    cpu_time: float | None = None,
) -> dict:
    return {
        "stdout": stdout.text("stdout"),
        "stderr": stderr.text("stderr"),
        "exit_code": exit_code,
        "execution_time": time.monotonic() - started,
        "cpu_time": cpu_time,
        "timed_out": timed_out,
        "namespace_reset": namespace_reset,
        "stdout_truncated": stdout.omitted > 0,
        "stderr_truncated": stderr.omitted > 0,
    }


class BashRunner:
    """Runs bash commands, each in its own process group in the home directory."""

    def __init__(
        self, home: str, output_limit: int, user_cgroup_fd: int | None = None
    ) -> None:
        self._home = home
        self._output_limit = output_limit
        self._user_cgroup_fd = user_cgroup_fd

    def execute(self, code: str, timeout: float) -> dict:
        if "\0" in code:
            raise RequestError("invalid_request", "bash code contains a NUL character")
        started = time.monotonic()
        try:
            argv, script_path = self._argv(code)
        except OSError as exc:
            return _start_failed(started, "bash", exc)
        try:
            return self._run(argv, started, timeout)
        finally:
            if script_path is not None:
                os.unlink(script_path)

    def _argv(self, code: str) -> tuple[list[str], str | None]:
        if len(code.encode("utf-8")) <= MAX_BASH_ARGUMENT_BYTES:
            return [BASH, "-c", code], None
        import tempfile

        fd, path = tempfile.mkstemp(prefix="fleetvm-", suffix=".sh")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(code)
        except OSError:
            os.unlink(path)
            raise
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
                preexec_fn=_child_setup(self._user_cgroup_fd),
            )
        except OSError as exc:
            os.close(stdout_read)
            os.close(stderr_read)
            return _start_failed(started, "bash", exc)
        finally:
            os.close(stdout_write)
            os.close(stderr_write)
        _raise_oom_score(process.pid)

        stdout = CappedBuffer(self._output_limit)
        stderr = CappedBuffer(self._output_limit)
        buffers = {stdout_read: stdout, stderr_read: stderr}
        timed_out, cpu_time = _pump_until_exit(process, buffers, started + timeout)
        if timed_out or process.returncode is None:
            exit_code = TIMEOUT_EXIT_CODE
        else:
            exit_code = _shell_exit_code(process.returncode)
        return _execution_result(
            stdout,
            stderr,
            exit_code,
            started,
            timed_out,
            namespace_reset=False,
            cpu_time=cpu_time,
        )


def _pump_until_exit(
    process: subprocess.Popen, buffers: dict[int, CappedBuffer], deadline: float
) -> tuple[bool, float | None]:
    """Copy the process's output into buffers until it exits or the deadline.

    At the deadline the process group gets SIGKILL. Returns whether that happened,
    and the CPU seconds of the process, or None if it did not exit in time.
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
    cpu_time = None
    try:
        while True:
            exited, cpu_time = _reap_with_usage(process)
            if exited:
                break
            now = time.monotonic()
            if not timed_out and now >= deadline:
                timed_out = True
                _kill_group(process.pid, signal.SIGKILL)
            limit = deadline + KILL_WAIT_SECONDS if timed_out else deadline
            if now >= limit:
                # A process stuck in the kernel after SIGKILL is reaped later.
                _start_thread(process.wait, "reap-bash")
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
    return timed_out, cpu_time


def _reap_with_usage(process: subprocess.Popen) -> tuple[bool, float | None]:
    """Reap the process if it has exited; return whether it has and its CPU seconds.

    Popen.poll discards the resource usage that the kernel reports when a child is
    reaped, so this calls wait4 itself and records the exit status in the Popen.
    The usage covers the process and the children it waited for.
    """
    if process.returncode is not None:
        return True, None
    try:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    except ChildProcessError:
        # Something else reaped it, so its status and usage are unknown.
        process.returncode = 0
        return True, None
    if pid == 0:
        return False, None
    process.returncode = os.waitstatus_to_exitcode(status)
    return True, usage.ru_utime + usage.ru_stime


def _process_cpu_seconds(pid: int) -> float | None:
    """Return the CPU seconds of a running process and the children it waited for.

    Reads utime, stime, cutime and cstime, fields 14 to 17 of /proc/PID/stat as
    proc(5) numbers them. Returns None when the process or /proc is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat_line = file.read()
        # The command name in brackets may contain spaces, so fields are counted
        # from the last ")", after which field 3 comes first.
        fields = stat_line[stat_line.rindex(b")") + 2 :].split()
        ticks = sum(int(value) for value in fields[11:15])
    except (OSError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


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
            PIPE_DRAINER.add(fd)
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
        self._name = name

    def start(self) -> None:
        """Start the reader thread, which then owns and closes the descriptor.

        Raises RuntimeError when no thread can be started.
        """
        threading.Thread(
            target=self._read_until_eof, name=self._name, daemon=True
        ).start()

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

    def __init__(
        self,
        agent_path: str,
        home: str,
        output_limit: int,
        user_cgroup_fd: int | None = None,
    ) -> None:
        self._agent_path = agent_path
        self._home = home
        self._output_limit = output_limit
        self._user_cgroup_fd = user_cgroup_fd
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._stdout: MarkedStreamReader | None = None
        self._stderr: MarkedStreamReader | None = None

    def start(self) -> None:
        """Start the kernel unless one runs, so that the next request is fast.

        A failure is only logged, because the next request tries again.
        """
        with self._lock:
            if self._process is None:
                try:
                    self._start()
                except (OSError, RuntimeError) as exc:
                    logger.warning("cannot start the Python kernel: %s", exc)

    def execute(self, code: str, timeout: float) -> dict:
        """Run code in the kernel and return the execution result.

        Time spent waiting for an earlier request counts toward the timeout.
        """
        started = time.monotonic()
        if not self._lock.acquire(timeout=timeout):
            return _queued_too_long(started)
        try:
            try:
                namespace_reset = self._restart_if_dead()
            except (OSError, RuntimeError) as exc:
                return _start_failed(started, "the Python kernel", exc)
            result = self._run(code, started, started + timeout)
        finally:
            self._lock.release()
        if result["namespace_reset"]:
            _start_thread(self.start, "kernel-start")
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
        """Start a kernel process and its two output readers.

        Raises OSError or RuntimeError, and then leaves no process or descriptor
        behind, when the VM has no room for another process or thread.
        """
        parent, child = socket.socketpair()
        stdout_read, stdout_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        argv = [sys.executable, self._agent_path, "kernel"]
        argv += ["--control-fd", str(child.fileno())]
        stdout = MarkedStreamReader(stdout_read, self._output_limit, "kernel-stdout")
        stderr = MarkedStreamReader(stderr_read, self._output_limit, "kernel-stderr")
        # Read ends that no reader thread owns yet. The readers start before the
        # kernel, and a started reader closes its end once the write end closes.
        unowned = [stdout_read, stderr_read]
        try:
            stdout.start()
            unowned.remove(stdout_read)
            stderr.start()
            unowned.remove(stderr_read)
            process = subprocess.Popen(
                argv,
                cwd=self._home,
                stdin=subprocess.DEVNULL,
                stdout=stdout_write,
                stderr=stderr_write,
                pass_fds=(child.fileno(),),
                start_new_session=True,
                preexec_fn=_child_setup(self._user_cgroup_fd),
            )
        except BaseException:
            parent.close()
            for fd in unowned:
                os.close(fd)
            raise
        finally:
            child.close()
            os.close(stdout_write)
            os.close(stderr_write)

        _raise_oom_score(process.pid)
        self._process = process
        self._control = parent
        self._stdout = stdout
        self._stderr = stderr
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
        pid = self._process.pid
        cpu_before = _process_cpu_seconds(pid)
        try:
            send_message(self._control, {"code": code, "marker": token})
        except OSError:
            reply, timed_out = None, False
        else:
            reply, timed_out = self._wait_for_reply(deadline)

        if reply is None:
            return self._finish_lost_kernel(started, timed_out)
        result = self._finish_reply(reply, started, timed_out)
        cpu_after = _process_cpu_seconds(pid)
        if cpu_before is not None and cpu_after is not None:
            result["cpu_time"] = max(cpu_after - cpu_before, 0.0)
        return result

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
            return recv_message(self._control, MAX_KERNEL_REPLY_BYTES), timed_out
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
        # User code can write to the control socket, so the reply is not trusted.
        exit_code = (
            TIMEOUT_EXIT_CODE if timed_out else _exit_status(reply.get("exit_code"))
        )
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
            _start_thread(process.wait, "reap-kernel")
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
        CappedBuffer(0), stderr, TIMEOUT_EXIT_CODE, started, True, False, 0.0
    )


def _resolve_path(home: str, path: object) -> str:
    if not isinstance(path, str) or not path:
        raise RequestError("invalid_request", "path must be a non-empty string")
    if "\0" in path:
        raise RequestError("invalid_request", "path contains a NUL character")
    _check_utf8(path, "path")
    target = os.path.abspath(os.path.join(home, path))
    size = len(target.encode("utf-8"))
    if size > MAX_PATH_BYTES:
        raise RequestError(
            "invalid_request",
            f"path is {size} bytes long as an absolute path, more than the maximum "
            f"of {MAX_PATH_BYTES} bytes",
        )
    return target


def _check_utf8(text: str, name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            "invalid_request",
            f"{name} is not valid Unicode: it contains a lone surrogate at "
            f"character {exc.start}",
        ) from None


PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY})
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Failures of the agent's own resources, not of the path it was given.
AGENT_ERRNOS = frozenset({errno.ENOMEM, errno.EMFILE, errno.ENFILE})


def _file_error(exc: OSError, action: str, path: str) -> RequestError:
    """Translate an error of a file operation on a requested path.

    Every errno not listed above is caused by the path or the VM's files, such
    as EIO from /proc/self/mem or ELOOP from a symbolic link loop, so it becomes
    invalid_request.
    """
    number = exc.errno
    if number == errno.ENOENT:
        return RequestError("not_found", f"file {path} not found")
    if number == errno.EISDIR:
        return RequestError("is_a_directory", f"{path} is a directory, not a file")
    if number == errno.ENOTDIR:
        return RequestError(
            "invalid_request", f"{action} {path} failed: a parent is not a directory"
        )
    if number in PERMISSION_ERRNOS:
        code = "permission_denied"
    elif number in NO_SPACE_ERRNOS:
        code = "no_space"
    elif number in AGENT_ERRNOS:
        code = "internal_error"
    else:
        code = "invalid_request"
    return RequestError(code, f"{action} {path} failed: {exc.strerror or exc}")


def _write_error(exc: OSError, path: str) -> RequestError:
    # The parent directory exists by now, so ENOENT means that it does not
    # allow new files, as in /proc, and not that a file is missing.
    if exc.errno == errno.ENOENT:
        return RequestError("invalid_request", f"writing {path} failed: {exc.strerror}")
    return _file_error(exc, "writing", path)


def upload_file(home: str, path: object, encoded: object) -> str:
    """Write a base64-encoded file, creating its parent directories.

    On failure the file and the directory tree stay as they were.
    """
    target = _resolve_path(home, path)
    if not isinstance(encoded, str):
        raise RequestError("invalid_request", "content must be a base64 string")
    try:
        content = base64.b64decode(encoded, validate=True)
    except ValueError as exc:
        raise RequestError("invalid_request", f"content is not base64: {exc}") from exc
    created = _make_parent_directories(os.path.dirname(target))
    try:
        _replace_file(target, content)
    except BaseException:
        _remove_directories(created)
        raise
    return target


def _make_parent_directories(directory: str) -> list[str]:
    """Create directory and its missing parents, and return the ones created.

    A loop, because the recursion of os.makedirs exceeds Python's recursion limit
    for a path about a thousand levels deep.
    """
    missing = []
    current = directory
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    created: list[str] = []
    try:
        for path in reversed(missing):
            _make_directory(path, directory)
            created.append(path)
    except RequestError:
        _remove_directories(created)
        raise
    return created


def _make_directory(path: str, requested: str) -> None:
    try:
        os.mkdir(path)
    except FileExistsError:
        # Another request may have created it since the check.
        if not os.path.isdir(path):
            raise RequestError(
                "invalid_request",
                f"creating {requested} failed: {path} exists and is not a directory",
            ) from None
    except OSError as exc:
        raise _file_error(exc, "creating directory", path) from exc


def _remove_directories(created: list[str]) -> None:
    for path in reversed(created):
        try:
            os.rmdir(path)
        except OSError:
            pass


def _replace_file(target: str, content: bytes) -> None:
    """Write content to a temporary file next to target and rename it over target.

    Only a regular file is replaced, and it keeps its permission bits. A symbolic
    link at target is followed, so its destination is replaced.
    """
    destination = os.path.realpath(target) if os.path.islink(target) else target
    mode = _regular_file_mode(destination, target)
    temporary = os.path.join(
        os.path.dirname(destination), f".fleetvm-upload-{os.urandom(8).hex()}"
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o666)
    except OSError as exc:
        raise _write_error(exc, target) from exc
    try:
        with os.fdopen(fd, "wb") as file:
            if mode is not None:
                os.fchmod(file.fileno(), mode)
            file.write(content)
        os.rename(temporary, destination)
    except OSError as exc:
        _unlink_quietly(temporary)
        raise _write_error(exc, target) from exc
    except BaseException:
        _unlink_quietly(temporary)
        raise


def _regular_file_mode(path: str, requested: str) -> int | None:
    """Return the permission bits of the regular file path, or None if it is missing.

    Raises RequestError for anything but a regular file, such as a FIFO, which
    would block a writer until some process opened it for reading.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _file_error(exc, "writing", requested) from exc
    if stat.S_ISDIR(info.st_mode):
        raise RequestError("is_a_directory", f"{requested} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise RequestError("invalid_request", f"{requested} is not a regular file")
    return stat.S_IMODE(info.st_mode)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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
        content = _read_at_most(fd, max_bytes + 1, target)
    finally:
        os.close(fd)
    if len(content) > max_bytes:
        raise RequestError(
            "too_large", f"{target} is larger than the maximum of {max_bytes} bytes"
        )
    return target, content


def _read_at_most(fd: int, size: int, path: str) -> bytes:
    data = bytearray()
    while len(data) < size:
        try:
            chunk = os.read(fd, min(size - len(data), 1024 * 1024))
        except OSError as exc:
            raise _file_error(exc, "reading", path) from exc
        if not chunk:
            break
        data += chunk
    return bytes(data)


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

    def reject_busy(self, conn: socket.socket) -> None:
        """Respond on the accepting thread when no request thread can start."""
        with conn:
            conn.settimeout(1.0)
            message = (
                "the guest agent cannot start a thread for the request: the VM has "
                "reached its process limit"
            )
            self._send(conn, _error("process_limit", message))

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
        _check_utf8(code, "code")
        if not _is_positive_number(timeout) or timeout > MAX_TIMEOUT_SECONDS:
            raise RequestError(
                "invalid_request",
                f"timeout must be a number of seconds above 0 and at most "
                f"{MAX_TIMEOUT_SECONDS:g}, not {timeout!r}",
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
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
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
        return exc.code & 0xFF
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
    for path in args.cgroup_procs:
        with open(path, "w") as file:
            file.write(str(os.getpid()))
    if args.memory_limit is not None:
        import resource

        limit = args.memory_limit
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _make_undumpable() -> None:
    """Keep processes of the same user from ptracing the agent or taking its fds.

    A non-dumpable process can only be ptraced, have its memory read or its
    descriptors taken with pidfd_getfd by a process with CAP_SYS_PTRACE in its
    user namespace, which user code in the sandbox does not have. The flag is
    reset when a child calls exec, so user code stays debuggable by itself.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        number = ctypes.get_errno()
        raise OSError(
            number, f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(number)}"
        )


def _redirect_output(log_fd: int | None) -> None:
    # The inherited stdout and stderr are a pipe that the driver reads only
    # while the VM starts, and only the agent has the log descriptor open.
    if log_fd is None:
        return
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)


def _user_cgroup_fd(args: argparse.Namespace) -> int | None:
    if args.user_cgroup_fd is None:
        return None
    os.set_inheritable(args.user_cgroup_fd, False)
    return args.user_cgroup_fd


def serve(args: argparse.Namespace) -> None:
    """Accept connections forever, one thread per connection."""
    # First of all, while the agent has no children, which is where user code runs.
    _make_undumpable()
    _redirect_output(args.log_fd)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s agent[%(process)d] %(levelname)s %(message)s",
    )
    # Joining the VM's cgroups comes first, before any child process exists.
    _apply_limits(args)
    home = os.path.abspath(args.home)
    os.chdir(home)
    listener = _listener(args)
    user_cgroup_fd = _user_cgroup_fd(args)

    kernel = PythonKernel(
        os.path.abspath(__file__), home, args.output_limit, user_cgroup_fd
    )
    _start_thread(kernel.start, "kernel-start")
    bash = BashRunner(home, args.output_limit, user_cgroup_fd)
    agent = Agent(home, kernel, bash)
    logger.info("serving, home %s", home)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            # EMFILE and ENOMEM are temporary, and the agent must outlive them.
            logger.warning("accepting a connection failed: %s", exc)
            time.sleep(POLL_INTERVAL_SECONDS)
            continue
        if not _start_thread(agent.handle_connection, "request", conn):
            agent.reject_busy(conn)


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
        "--cgroup-procs",
        action="append",
        default=[],
        help="cgroup.procs file that the agent adds itself to; may be repeated",
    )
    serve_parser.add_argument(
        "--user-cgroup-fd",
        type=int,
        help=(
            "inherited descriptor of the cgroup.procs file that the kernel and "
            "bash commands join"
        ),
    )
    serve_parser.add_argument(
        "--log-fd",
        type=int,
        help="inherited descriptor of the log file, which becomes stdout and stderr",
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
