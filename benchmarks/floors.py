"""Floors: what fleetvm is built on, measured without fleetvm around it.

- a bare Celery round trip and task throughput on the same broker, with the
  same Celery settings and one queue per worker, as fleetvm has;
- a bare start and kill of the same bubblewrap sandbox and interpreter that
  the process driver runs, started and killed directly;
- one HTTP request to a bare FastAPI app on uvicorn, as fleetvm's API runs.
"""

from __future__ import annotations

import itertools
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from benchmarks.celery_floor import NOOP_TASK, make_floor_app
from fleetvm.drivers.process import ProcessDriver
from fleetvm.drivers.process.procfs import _pid_namespace, _process_ids
from fleetvm.drivers.process.sandbox import _read_bwrap_info
from fleetvm.settings import Settings, queue_name
from tests.harness import free_port, stop_process, wait_healthy

#: Threads of each floor worker, as many as a fleetvm worker runs by default.
FLOOR_WORKER_CONCURRENCY = 32


def elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


class CeleryFloor:
    """Bare Celery workers on the broker, each consuming a queue of its own."""

    def __init__(self, broker_url: str, workers: int, log_dir: Path) -> None:
        self.broker_url = broker_url
        self.app = make_floor_app(broker_url)
        run_id = secrets.token_hex(3)
        self.queues = [queue_name(f"floor{i}-{run_id}") for i in range(workers)]
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> CeleryFloor:
        env = {**os.environ, "FLEETVM_BENCH_BROKER_URL": self.broker_url}
        for queue in self.queues:
            argv = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "benchmarks.celery_floor",
                "worker",
                "--queues",
                queue,
                "--pool",
                "threads",
                "--concurrency",
                str(FLOOR_WORKER_CONCURRENCY),
                "--hostname",
                f"{queue}@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "WARNING",
            ]
            with open(self.log_dir / f"{queue}.log", "ab") as log:
                self.processes.append(
                    subprocess.Popen(
                        argv, env=env, stdout=log, stderr=log, start_new_session=True
                    )
                )
        try:
            # The first round trip on each queue waits until its worker consumes.
            for queue in self.queues:
                self.round_trip(queue, timeout=60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def round_trip(self, queue: str, timeout: float = 10) -> float:
        """Send the no-op task to the queue and wait for its result; ms."""
        started = time.perf_counter()
        result = self.app.send_task(NOOP_TASK, kwargs={"vm_id": "x"}, queue=queue)
        result.get(timeout=timeout)
        result.forget()
        return elapsed_ms(started)

    def throughput(self, clients: int, tasks: int) -> float:
        """Round trips per second with ``clients`` threads spread over the queues."""
        return run_concurrently(
            clients,
            tasks,
            lambda index: self.round_trip(self.queues[index % len(self.queues)]),
            # Opens the thread's result backend connection before the clock.
            lambda: self.round_trip(self.queues[0]),
        )


def run_concurrently(
    clients: int,
    count: int,
    call: Callable[[int], object],
    prepare: Callable[[], object] | None = None,
) -> float:
    """Run ``call(i)`` for each i below ``count`` on ``clients`` threads.

    Each thread first runs ``prepare``, to open its connections, and the clock
    starts once all of them are ready. Returns the calls per second.
    """
    ready = threading.Barrier(clients + 1)
    indexes = itertools.count()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            if prepare is not None:
                prepare()
        except BaseException as exc:
            errors.append(exc)
            ready.abort()
            return
        ready.wait()
        for index in indexes:
            if index >= count or errors:
                return
            try:
                call(index)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=work, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return count / elapsed


class BareSandbox:
    """The process driver's bubblewrap sandbox, started and killed directly.

    The sandboxed interpreter prints 1 and waits, so a start is measured up to
    the first output, as a fleetvm cold start is. A kill is SIGKILL to every
    process of the sandbox, found beforehand, until all of them have exited,
    as a fleetvm kill confirms.
    """

    CODE = "import sys; print(1, flush=True); sys.stdin.read()"

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="fvm-bare-", dir="/tmp"))
        try:
            self.driver = ProcessDriver(Settings(data_dir=self._dir))
            if self.driver.sandbox != "bubblewrap":
                raise RuntimeError(
                    "the process driver runs VMs without bubblewrap here (see "
                    "vm.sandbox and the log above), so there is no sandbox floor "
                    "to measure"
                )
        except BaseException:
            self.close()
            raise
        self._mounts = ["--tmpfs", "/home/sandbox", "--tmpfs", "/tmp"]
        self._mounts += ["--chdir", "/tmp"]
        self._command = [self.driver._settings.vm.guest_python, "-I", "-S"]
        self._command += ["-c", self.CODE]

    def start(self) -> tuple[float, BareVm]:
        """Start the sandbox and return the ms until it printed, and the sandbox."""
        info_read, info_write = os.pipe()
        # bubblewrap writes the sandbox's PID namespace to this descriptor.
        mounts = [*self._mounts, "--info-fd", str(info_write)]
        argv = [*self.driver._bubblewrap_argv(mounts), "--", *self._command]
        started = time.perf_counter()
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(info_write,),
            )
        finally:
            os.close(info_write)
        try:
            line = process.stdout.readline()
            took = elapsed_ms(started)
            info = _read_bwrap_info(info_read, 10)
        finally:
            os.close(info_read)
        vm = BareVm(process, int(info["pid-namespace"]))
        if line != b"1\n":
            self.kill(vm)
            raise RuntimeError(f"bare sandbox printed {line!r}, not 1")
        return took, vm

    @staticmethod
    def kill(vm: BareVm) -> float:
        """SIGKILL every process of the sandbox and return the ms until all exited."""
        pidfds = []
        for pid in vm.pids():
            try:
                pidfds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue  # exited before the kill
        started = time.perf_counter()
        for pidfd in pidfds:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # exited already, so its pidfd is readable
        poller = select.poll()
        for pidfd in pidfds:
            poller.register(pidfd, select.POLLIN)
        pending = len(pidfds)
        while pending:
            for pidfd, _ in poller.poll():
                poller.unregister(pidfd)
                pending -= 1
        took = elapsed_ms(started)
        for pidfd in pidfds:
            os.close(pidfd)
        vm.process.wait()
        vm.process.stdin.close()
        vm.process.stdout.close()
        return took

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


class BareVm:
    """A sandbox that BareSandbox started: bubblewrap and its PID namespace."""

    def __init__(self, process: subprocess.Popen, pid_namespace: int) -> None:
        self.process = process
        self.pid_namespace = pid_namespace

    def pids(self) -> list[int]:
        """Return bubblewrap's PID and those of every process in the sandbox."""
        in_sandbox = [
            pid for pid in _process_ids() if _pid_namespace(pid) == self.pid_namespace
        ]
        return [self.process.pid, *in_sandbox]


class ApiFloor:
    """``benchmarks.api_floor`` served by uvicorn on a free port of 127.0.0.1."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / "api-floor.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ApiFloor:
        argv = [sys.executable, "-m", "uvicorn", "benchmarks.api_floor:app"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--log-level", "warning"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=log, start_new_session=True
            )
        try:
            wait_healthy(self.url, self.process, self.log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            stop_process(self.process)


def api_request(client: httpx.Client) -> float:
    """Send one GET /health on a kept-alive connection and return its ms."""
    started = time.perf_counter()
    client.get("/health").raise_for_status()
    return elapsed_ms(started)
