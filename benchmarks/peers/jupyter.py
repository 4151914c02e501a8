"""Cold start, warm execute and kill latency of Jupyter Server's kernels API.

This is the peer that fleetvm's own latency figures are compared with. It starts a
private Jupyter Server on 127.0.0.1 (a free port, a random token, temporary root,
runtime, config, data and IPython directories) whose only kernel is this
interpreter's ipykernel. It drives the server over its REST API and over one kernel
websocket per kernel, and stops it on exit.

    .venv/bin/python -m benchmarks.peers.jupyter
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import httpx
import psutil
import websocket

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
KERNEL_NAME = "python3"
CODE = "print(1)"
EXPECTED_OUTPUT = "1\n"
WARM_EXECUTES_PER_KERNEL = 5

# Generous upper bounds, so that a hung server or kernel raises instead of
# blocking the benchmark. They are not expected latencies.
START_TIMEOUT = 60.0
REQUEST_TIMEOUT = 60.0
KILL_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
GONE_POLL_INTERVAL = 0.001
LOG_TAIL_LINES = 40


def _milliseconds_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _is_gone(process: psutil.Process) -> bool:
    """Return whether the process has exited, counting a zombie as exited.

    is_running() compares the start time too, so a reused PID also counts as gone.
    """
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class JupyterPeer:
    """Context manager that runs a private Jupyter Server for the benchmark.

    On entry it starts Jupyter Server on 127.0.0.1 with a free port, a random token,
    temporary root, runtime, config and data directories, no browser, and one
    kernel spec: this interpreter's python3 ipykernel. It returns once the server
    returns 200 for GET /api/status. On exit it stops the server and every kernel
    process the server started, then removes the temporary directory.
    """

    def __init__(self) -> None:
        self._token = secrets.token_hex(24)
        self._session_id = uuid.uuid4().hex
        self._workdir: Path | None = None
        self._log_path: Path | None = None
        self._log_file: BinaryIO | None = None
        self._info_file: Path | None = None
        self._server: subprocess.Popen | None = None
        self._http: httpx.Client | None = None
        self._base_url = ""
        self._channels: dict[str, websocket.WebSocket] = {}

    # Server lifecycle

    def __enter__(self) -> JupyterPeer:
        try:
            self._start_server()
            self._wait_until_ready()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _start_server(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="jupyter-peer-"))
        directories = {
            name: self._workdir / name
            for name in ("root", "runtime", "config", "data", "ipython")
        }
        for directory in directories.values():
            directory.mkdir(mode=0o700)

        # This kernel spec shadows any other "python3" spec because JUPYTER_PATH is
        # searched first. Its absolute interpreter path keeps the kernel in this venv.
        spec_dir = directories["data"] / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [
                sys.executable,
                "-m",
                "ipykernel_launcher",
                "-f",
                "{connection_file}",
            ],
            "display_name": "Python 3 (benchmark peer)",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))

        # The token sits in a config file inside a 0700 directory, not on the command
        # line, where any local user could read it with ps.
        config = {
            "ServerApp": {
                "ip": HOST,
                # Port 0 lets the OS pick a free port. The server writes the port it
                # got to jpserver-<pid>.json in the runtime directory.
                "port": 0,
                "port_retries": 0,
                "open_browser": False,
                # Jupyter Server exits at start-up as root unless allow_root is set.
                # CI runs the benchmarks as root, and this server listens only on
                # 127.0.0.1 and requires a random token.
                "allow_root": os.geteuid() == 0,
                "root_dir": str(directories["root"]),
                # jupyter_server_terminals is enabled by a config file in the venv.
                # Turning it off keeps the server to the REST and kernel APIs.
                "jpserver_extensions": {"jupyter_server_terminals": False},
                "terminals_enabled": False,
            },
            "IdentityProvider": {"token": self._token},
            "MappingKernelManager": {"default_kernel_name": KERNEL_NAME},
        }
        config_file = directories["config"] / "jupyter_server_config.json"
        config_file.write_text(json.dumps(config))

        environment = dict(os.environ)
        environment.update(
            JUPYTER_CONFIG_DIR=str(directories["config"]),
            JUPYTER_RUNTIME_DIR=str(directories["runtime"]),
            JUPYTER_DATA_DIR=str(directories["data"]),
            JUPYTER_PATH=str(directories["data"]),
            IPYTHONDIR=str(directories["ipython"]),
        )
        # A JUPYTER_TOKEN or JUPYTER_PORT from the caller's shell would override
        # the config file.
        for name in ("JUPYTER_TOKEN", "JUPYTER_PORT", "JUPYTER_PORT_RETRIES"):
            environment.pop(name, None)

        self._log_path = self._workdir / "server.log"
        self._log_file = self._log_path.open("wb")
        # A session of its own keeps a Ctrl-C in the terminal away from the server,
        # so that _stop() shuts it down in order.
        self._server = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server"],
            cwd=directories["root"],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._info_file = directories["runtime"] / f"jpserver-{self._server.pid}.json"

    def _wait_until_ready(self) -> None:
        assert self._server is not None and self._info_file is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._server.poll() is not None:
                raise RuntimeError(
                    f"Jupyter Server exited with code {self._server.returncode} "
                    f"during start-up.\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Jupyter Server timed out: GET /api/status did not return 200 "
                    f"within {START_TIMEOUT:.0f} s."
                    f"\n{self._log_tail()}"
                )
            if self._http is None and self._info_file.exists():
                self._connect(self._info_file)
            if self._http is not None:
                try:
                    if self._http.get("/api/status").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.05)

    def _connect(self, info_file: Path) -> None:
        try:
            info = json.loads(info_file.read_text())
        except json.JSONDecodeError:
            return  # The server is still writing the file.
        if info["hostname"] != HOST:
            raise RuntimeError(
                f"Jupyter Server listens on {info['hostname']}, expected {HOST}."
            )
        self._base_url = f"{HOST}:{info['port']}"
        # trust_env=False ignores proxy variables, so requests go to 127.0.0.1 only.
        self._http = httpx.Client(
            base_url=f"http://{self._base_url}",
            headers={"Authorization": f"token {self._token}"},
            timeout=REQUEST_TIMEOUT,
            trust_env=False,
        )

    def _log_tail(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        if self._log_path is None:
            return "(no server log)"
        try:
            lines = self._log_path.read_text(errors="replace").splitlines()
        except OSError as error:
            return f"(server log unreadable: {error})"
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        return f"Last {LOG_TAIL_LINES} lines of the server log:\n{tail}"

    def _stop(self) -> None:
        """Shut down the server, its kernels and the temporary directory."""
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

        if self._server is not None:
            # The server's children are listed before it stops, so that a kernel
            # that outlives the server can still be found and killed by its PID.
            try:
                children = psutil.Process(self._server.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            self._shut_down_server()
            for child in children:
                if not _is_gone(child):
                    logger.warning(
                        "Kernel process %d outlived the server; killing it", child.pid
                    )
                    child.kill()
                    child.wait(timeout=STOP_TIMEOUT)
            self._server = None

        if self._http is not None:
            self._http.close()
            self._http = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _shut_down_server(self) -> None:
        """Stop the server with POST /api/shutdown, then SIGTERM, then SIGKILL."""
        assert self._server is not None
        if self._server.poll() is not None:
            return
        if self._http is not None:
            try:
                self._http.post("/api/shutdown")
            except httpx.HTTPError as error:
                logger.warning("POST /api/shutdown failed: %s", error)
        try:
            self._server.wait(timeout=STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            logger.warning("Jupyter Server %d ignored /api/shutdown", self._server.pid)
        self._server.send_signal(signal.SIGTERM)
        try:
            self._server.wait(timeout=STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            logger.warning("Killing Jupyter Server %d after SIGTERM", self._server.pid)
        self._server.kill()
        self._server.wait()

    # Measured operations

    def cold_start(self) -> tuple[float, str]:
        """Start a kernel and run print(1) on it; return (milliseconds, kernel_id).

        The time covers POST /api/kernels, opening the kernel's websocket, and one
        execute_request until the stream output '1\\n', the execute_reply and the
        idle status arrive. The websocket
        stays open for warm_execute() and kill().
        """
        http = self._require_http()
        started = time.perf_counter()
        response = http.post("/api/kernels", json={"name": KERNEL_NAME})
        if response.status_code != 201:
            raise RuntimeError(
                f"POST /api/kernels failed with {response.status_code}: {response.text}"
            )
        kernel_id = response.json()["id"]
        self._channels[kernel_id] = websocket.create_connection(
            f"ws://{self._base_url}/api/kernels/{kernel_id}/channels"
            f"?session_id={self._session_id}",
            timeout=REQUEST_TIMEOUT,
            header=[f"Authorization: token {self._token}"],
            # No Origin header: the server checks the origin of browser clients only.
            suppress_origin=True,
            http_no_proxy=[HOST],
        )
        self._execute(kernel_id)
        return _milliseconds_since(started), kernel_id

    def warm_execute(self, kernel_id: str) -> float:
        """Run print(1) on a live kernel; return milliseconds until it completes.

        Completion is the stream output, the execute_reply and the idle status.
        """
        started = time.perf_counter()
        self._execute(kernel_id)
        return _milliseconds_since(started)

    def kill(self, kernel_id: str) -> float:
        """Shut down a kernel with DELETE and wait until its process has exited.

        The kernel's process is found before the timer starts, as the child process
        of the server whose command line names the kernel's connection file. The
        result is milliseconds from sending DELETE to confirming the process gone.

        A zombie counts as gone because it has exited. DELETE returns only after the
        server has reaped the kernel, so the wait after it usually ends at once. The
        server checks for the exit every 100 ms (jupyter_client 8.10 polls
        is_alive at that interval), so the figure moves in steps of about 100 ms.
        """
        http = self._require_http()
        process = self._find_kernel_process(kernel_id)
        started = time.perf_counter()
        response = http.delete(f"/api/kernels/{kernel_id}")
        if response.status_code != 204:
            raise RuntimeError(
                f"DELETE /api/kernels/{kernel_id} failed with {response.status_code}: "
                f"{response.text}"
            )
        deadline = time.monotonic() + KILL_TIMEOUT
        while not _is_gone(process):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Timed out: kernel {kernel_id} (PID {process.pid}) still runs "
                    f"{KILL_TIMEOUT:.0f} s after DELETE."
                )
            time.sleep(GONE_POLL_INTERVAL)
        elapsed = _milliseconds_since(started)

        channel = self._channels.pop(kernel_id, None)
        if channel is not None:
            channel.close()
        return elapsed

    # Helpers

    def _require_http(self) -> httpx.Client:
        if self._http is None:
            raise RuntimeError("JupyterPeer is not running; use it in a with block.")
        return self._http

    def _find_kernel_process(self, kernel_id: str) -> psutil.Process:
        """Find the kernel's process among the server's descendants.

        jupyter_client names the connection file kernel-<kernel id>.json and passes
        it to the kernel's command line with -f.
        """
        assert self._server is not None
        connection_file = f"kernel-{kernel_id}.json"
        for child in psutil.Process(self._server.pid).children(recursive=True):
            try:
                arguments = child.cmdline()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            if any(argument.endswith(connection_file) for argument in arguments):
                return child
        raise RuntimeError(
            f"No child process of Jupyter Server {self._server.pid} has the "
            f"connection file {connection_file} on its command line."
        )

    def _execute(self, kernel_id: str) -> None:
        """Run CODE on the kernel and wait for its stdout, execute_reply and idle.

        Messages follow the Jupyter messaging protocol 5.3 in the JSON form of the
        kernel websocket, where a "channel" field names the ZeroMQ channel. Messages
        whose parent_header.msg_id is another request's are skipped.

        NOTE: On Linux each execute includes a stall of about 40 ms. Jupyter Server
        2.21.1 does not set TCP_NODELAY on the kernel websocket, so Nagle's algorithm
        delays the second small frame (execute_input) until this client's delayed ACK
        goes out. The same execute through jupyter_client directly took 2-8 ms (one
        run of jupyter_client's blocking client on the 2-core benchmark machine).
        The figure is left as a stock client sees it.
        """
        channel = self._channels.get(kernel_id)
        if channel is None:
            raise RuntimeError(f"No websocket is open for kernel {kernel_id}.")
        msg_id = uuid.uuid4().hex
        request = {
            "header": {
                "msg_id": msg_id,
                "msg_type": "execute_request",
                "username": "benchmark",
                "session": self._session_id,
                "date": datetime.now(UTC).isoformat(),
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": {
                "code": CODE,
                "silent": False,
                "store_history": False,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
            "channel": "shell",
            "buffers": [],
        }
        channel.send(json.dumps(request))

        stdout = ""
        replied = False
        idle = False
        while not (stdout == EXPECTED_OUTPUT and replied and idle):
            message = json.loads(channel.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            msg_type = message["header"]["msg_type"]
            content = message["content"]
            if msg_type == "stream" and content["name"] == "stdout":
                stdout += content["text"]
                if not EXPECTED_OUTPUT.startswith(stdout):
                    raise RuntimeError(
                        f"Kernel {kernel_id} printed {stdout!r}, "
                        f"expected {EXPECTED_OUTPUT!r}."
                    )
            elif msg_type == "error":
                raise RuntimeError(
                    f"Kernel {kernel_id} raised {content['ename']}: {content['evalue']}"
                )
            elif msg_type == "execute_reply":
                if content["status"] != "ok":
                    raise RuntimeError(
                        f"Kernel {kernel_id} replied with status {content['status']}."
                    )
                replied = True
            elif msg_type == "status" and content["execution_state"] == "idle":
                idle = True
                if stdout != EXPECTED_OUTPUT:
                    raise RuntimeError(
                        f"Kernel {kernel_id} went idle after printing {stdout!r}, "
                        f"expected {EXPECTED_OUTPUT!r}."
                    )


def measure(
    samples: int, warmup: int = 2, progress: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Time `samples` kernel cycles on a private Jupyter Server, after `warmup` cycles.

    Returns {"cold start": [...], "warm execute": [...], "kill": [...]} in
    milliseconds. A kernel cycle is one cold start, 5 warm executes and one kill,
    so "warm execute" has 5 * samples values and the others have samples values.
    The warm-up cycles are not timed. progress() is called after every cycle,
    warm-up included, so samples + warmup times in all.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if warmup < 0:
        raise ValueError(f"warmup must not be negative, got {warmup}")

    figures: dict[str, list[float]] = {"cold start": [], "warm execute": [], "kill": []}
    with JupyterPeer() as peer:
        for cycle in range(warmup + samples):
            cold_start, kernel_id = peer.cold_start()
            warm_executes = [
                peer.warm_execute(kernel_id) for _ in range(WARM_EXECUTES_PER_KERNEL)
            ]
            kill = peer.kill(kernel_id)
            if cycle >= warmup:
                figures["cold start"].append(cold_start)
                figures["warm execute"].extend(warm_executes)
                figures["kill"].append(kill)
            if progress is not None:
                progress()
    return figures


def main() -> None:
    from benchmarks.report import percentile

    logging.basicConfig(level=logging.WARNING)
    figures = measure(10)
    for name, values in figures.items():
        print(
            f"{name:13s} p50 {statistics.median(values):7.1f} ms  "
            f"p99 {percentile(values, 0.99):7.1f} ms  ({len(values)} samples)"
        )


if __name__ == "__main__":
    main()
