"""Tests of the guest agent, run as a real process without a sandbox."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from fleetvm.guest import agent as guest_agent
from fleetvm.settings import VmSettings

AGENT_PATH = Path(guest_agent.__file__)
TEST_MARKER_ENV = "FLEETVM_AGENT_TEST"


def _guest_python() -> str:
    # The agent runs under the guest's Python in a VM, so test it with that one.
    python = VmSettings().guest_python
    return python if os.path.exists(python) else sys.executable


def _processes_with_marker(marker: str) -> list[int]:
    entry = f"{TEST_MARKER_ENV}={marker}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as file:
                if entry in file.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def _processes_with_arguments(*arguments: str) -> list[int]:
    expected = "\0".join(arguments).encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as file:
                if file.read() == expected:
                    found.append(int(name))
        except OSError:
            continue
    return found


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _connect(sock: socket.socket, path: Path) -> None:
    # Paths longer than 107 bytes do not fit in sockaddr_un.
    directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{directory}/{path.name}")
    finally:
        os.close(directory)


class AgentClient:
    """Client of one agent socket, speaking the agent's framing."""

    def __init__(self, socket_path: Path, home: Path) -> None:
        self.socket_path = socket_path
        self.home = home

    def request(self, message: dict, timeout: float = 30.0) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            _connect(sock, self.socket_path)
            guest_agent.send_message(sock, message)
            return guest_agent.recv_message(sock)

    def execute(self, language: str, code: str, timeout: float = 10.0) -> dict:
        request = {
            "op": "execute",
            "language": language,
            "code": code,
            "timeout": timeout,
        }
        return self.request(request, timeout + 15)


def _start_agent(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    home = tmp_path / "home"
    home.mkdir()
    marker = uuid.uuid4().hex
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), TEST_MARKER_ENV: marker}
    argv = [_guest_python(), "-I", "-S", str(AGENT_PATH), "serve"]
    argv += ["--socket", str(tmp_path / "agent.sock"), "--home", str(home), *extra]
    log = open(tmp_path / "agent.log", "wb")
    process = subprocess.Popen(
        argv, env=env, stdout=log, stderr=log, start_new_session=True
    )
    log.close()
    return process, marker


def _stop_agent(process: subprocess.Popen, marker: str) -> None:
    # The kernel and bash commands run in sessions of their own, so the agent's
    # process group does not reach them. Their inherited marker does. The agent
    # itself is non-dumpable, so a test run without root cannot read its
    # environment and kills it directly.
    process.kill()
    for pid in _processes_with_marker(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(10)


def _connect_client(tmp_path: Path, process: subprocess.Popen) -> AgentClient:
    client = AgentClient(tmp_path / "agent.sock", tmp_path / "home")

    def answers_ping() -> bool:
        try:
            return client.request({"op": "ping"}, timeout=2)["ok"]
        except OSError:
            return False

    if not _wait_for(answers_ping, timeout=20):
        log = (tmp_path / "agent.log").read_text(errors="replace")
        pytest.fail(f"agent did not answer ping; exit code {process.poll()}:\n{log}")
    return client


@pytest.fixture
def agent(tmp_path: Path):
    process, marker = _start_agent(tmp_path)
    try:
        yield _connect_client(tmp_path, process)
    finally:
        _stop_agent(process, marker)


@pytest.fixture
def small_output_agent(tmp_path: Path):
    process, marker = _start_agent(tmp_path, "--output-limit", "1000")
    try:
        yield _connect_client(tmp_path, process)
    finally:
        _stop_agent(process, marker)


def test_framing_round_trip():
    left, right = socket.socketpair()
    with left, right:
        guest_agent.send_message(left, {"op": "ping", "text": "é\u2603"})
        assert guest_agent.recv_message(right) == {"op": "ping", "text": "é\u2603"}


def test_framing_eof_returns_none():
    left, right = socket.socketpair()
    with right:
        left.close()
        assert guest_agent.recv_message(right) is None


def test_framing_truncated_body_raises():
    left, right = socket.socketpair()
    with right:
        left.sendall(struct.pack(">I", 100) + b'{"op"')
        left.close()
        with pytest.raises(ConnectionError):
            guest_agent.recv_message(right)


def test_framing_oversized_header_raises():
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack(">I", guest_agent.MAX_MESSAGE_BYTES + 1))
        with pytest.raises(guest_agent.ProtocolError):
            guest_agent.recv_message(right)


def test_framing_non_object_raises():
    left, right = socket.socketpair()
    with left, right:
        body = json.dumps([1, 2]).encode()
        left.sendall(struct.pack(">I", len(body)) + body)
        with pytest.raises(guest_agent.ProtocolError):
            guest_agent.recv_message(right)


def test_ping_returns_pid_and_home(agent):
    response = agent.request({"op": "ping"})

    assert response["ok"] is True
    assert response["uid"] == os.getuid()
    assert response["home"] == str(agent.home)
    assert response["pid"] > 1


def test_python_namespace_persists(agent):
    first = agent.execute("python", "x = 41")
    second = agent.execute("python", "print(x + 1)")

    assert first["exit_code"] == 0
    assert second["stdout"] == "42\n"
    assert second["exit_code"] == 0
    assert second["namespace_reset"] is False


def test_python_result_fields(agent):
    response = agent.execute("python", "import time; time.sleep(0.2)")

    assert response["ok"] is True
    assert response["timed_out"] is False
    assert response["stdout_truncated"] is False
    assert response["stderr_truncated"] is False
    assert 0.2 <= response["execution_time"] < 5


def test_python_captures_descriptor_output(agent):
    code = (
        "import os, sys\n"
        "print('from print')\n"
        "os.system('echo from-system; echo system-err >&2')\n"
        "os.write(1, b'raw\\n')\n"
        "print('to stderr', file=sys.stderr)\n"
    )
    response = agent.execute("python", code)

    assert response["stdout"] == "from print\nfrom-system\nraw\n"
    assert response["stderr"] == "system-err\nto stderr\n"


def test_python_traceback_exit_code(agent):
    response = agent.execute("python", "def f():\n    return 1 / 0\nf()")

    assert response["exit_code"] == 1
    assert "ZeroDivisionError: division by zero" in response["stderr"]
    assert 'File "<cell-1>", line 2, in f' in response["stderr"]
    assert "return 1 / 0" in response["stderr"]
    assert "agent.py" not in response["stderr"]


def test_python_syntax_error(agent):
    response = agent.execute("python", "def broken(:\n    pass")

    assert response["exit_code"] == 1
    assert "SyntaxError" in response["stderr"]
    assert "agent.py" not in response["stderr"]


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        pytest.param("import sys; sys.exit(3)", 3, id="int"),
        pytest.param("import sys; sys.exit()", 0, id="none"),
        pytest.param("raise SystemExit('bye')", 1, id="message"),
    ],
)
def test_python_system_exit(agent, code, exit_code):
    response = agent.execute("python", code)
    after = agent.execute("python", "print('alive')")

    assert response["exit_code"] == exit_code
    assert after["stdout"] == "alive\n"
    assert after["namespace_reset"] is False


def test_python_main_module_pickles(agent):
    code = (
        "import pickle\n"
        "class Point:\n"
        "    def __init__(self, x):\n"
        "        self.x = x\n"
        "print(pickle.loads(pickle.dumps(Point(7))).x)\n"
    )
    response = agent.execute("python", code)

    assert response["stderr"] == ""
    assert response["stdout"] == "7\n"


def test_python_timeout_interrupts(agent):
    agent.execute("python", "x = 5")
    started = time.monotonic()
    response = agent.execute("python", "import time\ntime.sleep(30)", timeout=0.5)
    elapsed = time.monotonic() - started
    after = agent.execute("python", "print(x)")

    assert response["timed_out"] is True
    assert response["exit_code"] == guest_agent.TIMEOUT_EXIT_CODE
    assert "KeyboardInterrupt" in response["stderr"]
    assert "agent.py" not in response["stderr"]
    assert response["namespace_reset"] is False
    assert elapsed < 2.0
    assert after["stdout"] == "5\n"


def test_python_ignored_interrupt_resets(agent):
    agent.execute("python", "x = 5")
    code = (
        "import signal, time\n"
        "print('before', flush=True)\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "time.sleep(30)\n"
    )
    response = agent.execute("python", code, timeout=0.5)
    after = agent.execute("python", "print(x)")

    assert response["timed_out"] is True
    assert response["namespace_reset"] is True
    assert response["exit_code"] == guest_agent.TIMEOUT_EXIT_CODE
    assert response["stdout"] == "before\n"
    assert "restarted" in response["stderr"]
    assert "NameError" in after["stderr"]
    assert after["namespace_reset"] is False


def test_python_kernel_exit_resets(agent):
    agent.execute("python", "x = 5")
    response = agent.execute(
        "python", "import os\nprint('bye', flush=True)\nos._exit(7)"
    )
    after = agent.execute("python", "print('alive')")

    assert response["exit_code"] == 7
    assert response["namespace_reset"] is True
    assert response["stdout"] == "bye\n"
    assert "restarted" in response["stderr"]
    assert after["stdout"] == "alive\n"


def test_python_kernel_killed_while_idle(agent):
    agent.execute("python", "import os\nx = 5")
    kernel_pid = int(agent.execute("python", "print(os.getpid())")["stdout"])
    os.kill(kernel_pid, signal.SIGKILL)
    _wait_for(lambda: not os.path.exists(f"/proc/{kernel_pid}/cmdline"), 2)

    response = agent.execute("python", "print('alive')")

    assert response["stdout"] == "alive\n"
    assert response["namespace_reset"] is True
    assert "restarted" in response["stderr"]


def test_python_output_truncated(small_output_agent):
    response = small_output_agent.execute("python", "print('a' * 5000)")

    assert response["stdout_truncated"] is True
    assert response["stdout"].startswith("a" * 1000 + "\n[fleetvm] 4001 more bytes")
    assert len(response["stdout"]) < 1200
    assert response["exit_code"] == 0


def test_bash_output_truncated(small_output_agent):
    response = small_output_agent.execute(
        "bash", "head -c 5000 /dev/zero | tr '\\0' b >&2"
    )

    assert response["stderr_truncated"] is True
    assert response["stderr"].startswith("b" * 1000 + "\n[fleetvm] 4000 more bytes")
    assert response["stdout_truncated"] is False


def test_python_requests_queue(agent):
    results = {}

    def run_slow() -> None:
        results["slow"] = agent.execute("python", "import time; time.sleep(1.5)", 10)

    thread = threading.Thread(target=run_slow)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    ping = agent.request({"op": "ping"})
    ping_seconds = time.monotonic() - started
    queued = agent.execute("python", "print('late')", timeout=0.3)
    thread.join()

    assert ping["ok"] is True
    assert ping_seconds < 0.5
    assert queued["timed_out"] is True
    assert "already running" in queued["stderr"]
    assert results["slow"]["exit_code"] == 0


def test_bash_exit_code_and_directory(agent):
    response = agent.execute("bash", "echo hello; pwd; echo oops >&2; exit 3")

    assert response["exit_code"] == 3
    assert response["stdout"] == f"hello\n{agent.home}\n"
    assert response["stderr"] == "oops\n"
    assert response["timed_out"] is False


def test_bash_signal_exit_code(agent):
    response = agent.execute("bash", "kill -TERM $$")

    assert response["exit_code"] == 128 + signal.SIGTERM


def test_bash_timeout_kills_group(agent):
    seconds = str(900_000 + os.getpid() % 1000)
    code = f"sleep {seconds} & echo started; sleep {seconds}"
    started = time.monotonic()
    response = agent.execute("bash", code, timeout=0.5)
    elapsed = time.monotonic() - started

    assert response["timed_out"] is True
    assert response["exit_code"] == guest_agent.TIMEOUT_EXIT_CODE
    assert response["stdout"] == "started\n"
    assert elapsed < 3
    assert _wait_for(lambda: not _processes_with_arguments("sleep", seconds))


def test_bash_background_process_returns(agent):
    seconds = str(800_000 + os.getpid() % 1000)
    started = time.monotonic()
    response = agent.execute("bash", f"nohup sleep {seconds} & echo started")
    elapsed = time.monotonic() - started

    assert response["exit_code"] == 0
    assert response["stdout"] == "started\n"
    assert elapsed < 3
    assert _wait_for(lambda: len(_processes_with_arguments("sleep", seconds)) == 1)


def test_bash_background_writer_returns(agent):
    started = time.monotonic()
    response = agent.execute("bash", "yes & echo started")
    elapsed = time.monotonic() - started

    assert response["exit_code"] == 0
    assert response["stdout"].startswith("started\n")
    assert elapsed < 3


def test_bash_long_script(agent):
    code = "x=1\n" * 40_000 + "echo done $x"
    response = agent.execute("bash", code)

    assert len(code) > guest_agent.MAX_BASH_ARGUMENT_BYTES
    assert response["stdout"] == "done 1\n"
    assert response["exit_code"] == 0


def test_bash_nul_rejected(agent):
    response = agent.execute("bash", "echo a\0b")

    assert response["ok"] is False
    assert response["error"] == "invalid_request"


def test_bash_runs_in_parallel(agent):
    started = time.monotonic()
    threads = [
        threading.Thread(target=agent.execute, args=("bash", "sleep 1"))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert time.monotonic() - started < 2.5


def test_upload_download_binary(agent):
    content = bytes(range(256)) * 64 + b"\x00\xff"
    upload = agent.request(
        {
            "op": "upload",
            "path": "data/blob.bin",
            "content": base64.b64encode(content).decode(),
        }
    )
    download = agent.request({"op": "download", "path": "data/blob.bin"})

    assert upload["ok"] is True
    assert upload["path"] == str(agent.home / "data" / "blob.bin")
    assert (agent.home / "data" / "blob.bin").read_bytes() == content
    assert download["path"] == upload["path"]
    assert base64.b64decode(download["content"]) == content


def test_upload_absolute_path(agent, tmp_path):
    target = tmp_path / "elsewhere" / "file.txt"
    response = agent.request(
        {
            "op": "upload",
            "path": str(target),
            "content": base64.b64encode(b"x").decode(),
        }
    )

    assert response["path"] == str(target)
    assert target.read_bytes() == b"x"


def test_upload_invalid_base64(agent):
    response = agent.request({"op": "upload", "path": "f", "content": "not base64!"})

    assert response["ok"] is False
    assert response["error"] == "invalid_request"


def test_upload_onto_directory(agent):
    (agent.home / "folder").mkdir()
    response = agent.request({"op": "upload", "path": "folder", "content": ""})

    assert response["ok"] is False
    assert response["error"] == "is_a_directory"


def test_upload_under_file(agent):
    (agent.home / "plain").write_text("x")
    response = agent.request({"op": "upload", "path": "plain/child", "content": ""})

    assert response["ok"] is False
    assert response["error"] == "invalid_request"
    assert "not a directory" in response["message"]


def test_download_missing_file(agent):
    response = agent.request({"op": "download", "path": "missing.txt"})

    assert response["ok"] is False
    assert response["error"] == "not_found"
    assert str(agent.home / "missing.txt") in response["message"]


def test_download_directory(agent):
    response = agent.request({"op": "download", "path": "."})

    assert response["ok"] is False
    assert response["error"] == "is_a_directory"


def test_download_fifo(agent):
    os.mkfifo(agent.home / "pipe")
    response = agent.request({"op": "download", "path": "pipe"}, timeout=5)

    assert response["ok"] is False
    assert response["error"] == "invalid_request"


def test_download_too_large(agent):
    (agent.home / "big.bin").write_bytes(b"x" * 101)
    response = agent.request({"op": "download", "path": "big.bin", "max_bytes": 100})

    assert response["ok"] is False
    assert response["error"] == "too_large"


@pytest.mark.parametrize(
    "request_message",
    [
        pytest.param({"op": "reboot"}, id="unknown-op"),
        pytest.param({}, id="missing-op"),
        pytest.param(
            {"op": "execute", "language": "ruby", "code": "1", "timeout": 1},
            id="unknown-language",
        ),
        pytest.param(
            {"op": "execute", "language": "python", "code": "1", "timeout": 0},
            id="zero-timeout",
        ),
        pytest.param(
            {"op": "execute", "language": "python", "code": "1", "timeout": True},
            id="bool-timeout",
        ),
        pytest.param(
            {"op": "execute", "language": "python", "code": 1, "timeout": 1},
            id="code-not-string",
        ),
        pytest.param({"op": "download", "path": ""}, id="empty-path"),
        pytest.param({"op": "download", "path": "a\0b"}, id="nul-path"),
        pytest.param({"op": "download", "path": "\ud800"}, id="surrogate-path"),
        pytest.param(
            {"op": "upload", "path": "\udc80", "content": ""}, id="surrogate-upload"
        ),
        pytest.param(
            {"op": "execute", "language": "bash", "code": "echo \ud800", "timeout": 5},
            id="surrogate-bash",
        ),
        pytest.param(
            {"op": "execute", "language": "python", "code": "'\ud800'", "timeout": 5},
            id="surrogate-python",
        ),
        pytest.param(
            {"op": "execute", "language": "python", "code": "1", "timeout": 1e300},
            id="huge-timeout",
        ),
        pytest.param({"op": "download", "path": "x" * 5000}, id="long-path"),
        pytest.param({"op": "download", "path": "/proc/self/mem"}, id="eio"),
        pytest.param({"op": "download", "path": "x" * 300}, id="long-name"),
        pytest.param(
            {"op": "download", "path": "f", "max_bytes": -1}, id="negative-max"
        ),
    ],
)
def test_invalid_request_rejected(agent, request_message):
    response = agent.request(request_message)

    assert response["ok"] is False
    assert response["error"] == "invalid_request"
    assert response["message"]


def test_malformed_message_rejected(agent):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        _connect(sock, agent.socket_path)
        body = b"{not json"
        sock.sendall(struct.pack(">I", len(body)) + body)
        response = guest_agent.recv_message(sock)

    assert response["ok"] is False
    assert response["error"] == "invalid_request"


def test_agent_binds_long_socket_path(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    process, marker = _start_agent(deep)
    try:
        client = _connect_client(deep, process)
        response = client.execute("python", "print('ok')")
    finally:
        _stop_agent(process, marker)

    assert len(str(deep / "agent.sock")) > 108
    assert response["stdout"] == "ok\n"


def test_capped_buffer_counts_dropped_bytes():
    buffer = guest_agent.CappedBuffer(3)
    buffer.append(b"abcdef")
    buffer.append(b"gh")

    assert bytes(buffer.data) == b"abc"
    assert buffer.omitted == 5
    assert buffer.text("stdout").startswith("abc\n[fleetvm] 5 more bytes of stdout")


def test_framing_max_bytes_raises():
    left, right = socket.socketpair()
    with left, right:
        guest_agent.send_message(left, {"text": "x" * 100})
        with pytest.raises(guest_agent.ProtocolError):
            guest_agent.recv_message(right, max_bytes=50)


def test_framing_deadline_raises():
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack(">I", 10) + b"{")
        deadline = time.monotonic() + 0.2
        with pytest.raises(TimeoutError):
            guest_agent.recv_message(right, deadline=deadline)


def test_upload_fifo_rejected(agent):
    os.mkfifo(agent.home / "pipe")
    response = agent.request({"op": "upload", "path": "pipe", "content": ""}, timeout=5)

    assert response["ok"] is False
    assert response["error"] == "invalid_request"
    assert "not a regular file" in response["message"]


def test_upload_deep_path(agent):
    relative = "d/" * 1000 + "f"
    content = base64.b64encode(b"deep").decode()
    response = agent.request({"op": "upload", "path": relative, "content": content})

    assert response["ok"] is True
    assert (agent.home / relative).read_bytes() == b"deep"


def test_upload_failure_removes_directories(agent):
    path = "new/sub/" + "x" * 300
    response = agent.request({"op": "upload", "path": path, "content": ""})

    assert response["ok"] is False
    assert response["error"] == "invalid_request"
    assert not (agent.home / "new").exists()


def test_upload_keeps_file_mode(agent):
    script = agent.home / "run.sh"
    script.write_text("old")
    script.chmod(0o751)
    content = base64.b64encode(b"new").decode()
    response = agent.request({"op": "upload", "path": "run.sh", "content": content})

    assert response["ok"] is True
    assert script.read_text() == "new"
    assert oct(script.stat().st_mode & 0o777) == "0o751"


def test_upload_through_symlink(agent):
    (agent.home / "target.txt").write_text("old")
    (agent.home / "link").symlink_to("target.txt")
    content = base64.b64encode(b"new").decode()
    response = agent.request({"op": "upload", "path": "link", "content": content})

    assert response["ok"] is True
    assert (agent.home / "link").is_symlink()
    assert (agent.home / "target.txt").read_text() == "new"


def test_upload_leaves_no_temporary_file(agent):
    content = base64.b64encode(b"x").decode()
    agent.request({"op": "upload", "path": "a.txt", "content": content})

    assert sorted(path.name for path in agent.home.iterdir()) == ["a.txt"]


def test_download_symlink_loop(agent):
    (agent.home / "loop").symlink_to("loop")
    response = agent.request({"op": "download", "path": "loop"})

    assert response["ok"] is False
    assert response["error"] == "invalid_request"
    assert str(agent.home / "loop") in response["message"]


def test_python_huge_exit_code(agent):
    response = agent.execute("python", "raise SystemExit(2**70 + 3)")

    assert response["exit_code"] == 3


def test_python_forged_kernel_reply(agent):
    # User code can write to the kernel's control socket, whose descriptor
    # number is on the kernel's command line.
    code = (
        "import json, os, struct\n"
        "args = open('/proc/self/cmdline', 'rb').read().split(b'\\0')\n"
        "fd = int(args[args.index(b'--control-fd') + 1])\n"
        "body = json.dumps({'exit_code': 'x'}).encode()\n"
        "os.write(fd, struct.pack('>I', len(body)) + body)\n"
    )
    response = agent.execute("python", code)

    assert response["ok"] is True
    assert response["exit_code"] == 1


def test_bash_background_pipes_one_thread(agent):
    pid = agent.request({"op": "ping"})["pid"]
    agent.execute("bash", "true")
    before = len(os.listdir(f"/proc/{pid}/task"))
    for _ in range(4):
        agent.execute("bash", "sleep 300 &")

    # Request threads end just after their response, so give them a moment.
    def added_threads() -> int:
        return len(os.listdir(f"/proc/{pid}/task")) - before

    assert _wait_for(lambda: added_threads() <= 1, timeout=2)


PYTHON_BUSY_HALF_SECOND = (
    "import time\n"
    "start = time.process_time()\n"
    "while time.process_time() - start < 0.5:\n"
    "    pass\n"
)
# A subshell is a child that bash waits for, so its CPU time counts too. The
# loop is a fixed amount of work: 0.59 s of CPU time, measured with `time bash
# -c` on the host these tests were written on, even when the host is busy.
BASH_BUSY_SUBSHELL = "( for ((i = 0; i < 500000; i++)); do :; done )"


@pytest.mark.parametrize(
    ("language", "code"),
    [
        pytest.param("python", PYTHON_BUSY_HALF_SECOND, id="python"),
        pytest.param("bash", BASH_BUSY_SUBSHELL, id="bash-subshell"),
    ],
)
def test_cpu_time_busy_loop(agent, language, code):
    response = agent.execute(language, code)

    assert response["exit_code"] == 0, response["stderr"]
    assert response["cpu_time"] >= 0.2
    assert response["cpu_time"] <= response["execution_time"] + 0.1


@pytest.mark.parametrize(
    ("language", "code"),
    [
        pytest.param("python", "import time; time.sleep(0.5)", id="python"),
        pytest.param("bash", "sleep 0.5", id="bash"),
    ],
)
def test_cpu_time_sleep_near_zero(agent, language, code):
    response = agent.execute(language, code)

    assert response["exit_code"] == 0, response["stderr"]
    assert response["execution_time"] >= 0.5
    assert 0 <= response["cpu_time"] < 0.15


def test_cpu_time_python_counts_waited_child(agent):
    code = (
        "import subprocess, sys\n"
        f"subprocess.run([sys.executable, '-c', {PYTHON_BUSY_HALF_SECOND!r}])\n"
    )

    response = agent.execute("python", code)

    assert response["exit_code"] == 0, response["stderr"]
    assert response["cpu_time"] >= 0.3


def test_cpu_time_lost_kernel_is_null(agent):
    response = agent.execute("python", "import os; os._exit(3)")

    assert response["namespace_reset"] is True
    assert response["cpu_time"] is None
