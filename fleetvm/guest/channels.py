#!/usr/bin/env python3
"""Carry many guest agent connections over one virtio-serial port.

The guest agent serves one request per Unix socket connection, and runs
requests of different connections at once. A virtio-serial port is a single
byte stream, so the QEMU driver multiplexes connections over it:

- On the host, ``channels.py host`` runs beside QEMU with the VM's directory as
  its working directory. It listens on ``agent.sock`` there, as the process
  driver's agent does, and connects to ``serial.sock``, the QEMU character
  device of the port. Clients of ``agent.sock`` cannot tell the difference.
- In the guest, ``channels.py guest`` runs as PID 1 after the init script. It
  reads the VM's settings from the host's first frame, starts the agent on a
  Unix socket, and opens one agent connection per host connection.

Like the agent, this file uses only the standard library of Python 3.11,
because the fleetvm package is not importable inside a VM.

Frames
    Each frame is a header of a 4-byte big-endian channel number, a 1-byte
    kind and a 4-byte big-endian payload length, followed by the payload.

    HELLO (host to guest, channel 0): JSON object with "env" (the agent's
        environment) and "home". The host sends it first on every connection.
        A later HELLO means the host side restarted, so the guest closes every
        open channel.
    OPEN (host to guest): a new connection on the channel; no payload.
    DATA (either way): bytes of the channel's connection.
    CLOSE (either way): the sender closed the channel's connection; no payload.

Every frame of a port is written whole under a lock, and one thread reads the
port, so a client that reads its socket slowly delays the other channels.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time

logger = logging.getLogger("fleetvm.guest.channels")

HEADER = struct.Struct(">IBI")
HELLO, OPEN, DATA, CLOSE = 1, 2, 3, 4
# Largest payload of one frame. Longer reads are split into several frames.
MAX_FRAME_BYTES = 64 * 1024
# Largest HELLO payload: an environment of up to 256 KiB, JSON-escaped.
MAX_HELLO_BYTES = 2 * 1024 * 1024
# Time the guest waits for the agent to listen on its socket.
AGENT_START_SECONDS = 60.0
# Time the host waits for QEMU to create the character device's socket.
SERIAL_CONNECT_SECONDS = 30.0
POLL_INTERVAL_SECONDS = 0.02
# Name of the virtio-serial port, as QEMU's virtserialport name= sets it.
PORT_NAME = "fleetvm.agent"


class ChannelError(Exception):
    """A malformed frame, or a port that closed in the middle of one."""


class FramedPort:
    """Frames over a byte stream: a socket on the host, a device in the guest."""

    def __init__(self, fd: int, wait_for_peer: bool = False) -> None:
        self._fd = fd
        # A guest port reads end of file while no host process has the
        # character device open, so the guest waits for one instead.
        self._wait_for_peer = wait_for_peer
        self._write_lock = threading.Lock()

    def send(self, channel: int, kind: int, payload: bytes = b"") -> None:
        data = HEADER.pack(channel, kind, len(payload)) + payload
        with self._write_lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]

    def receive(self) -> tuple[int, int, bytes] | None:
        """Return the next frame, or None at end of stream before a header."""
        header = self._read_exactly(HEADER.size, eof_ok=True)
        if header is None:
            return None
        channel, kind, length = HEADER.unpack(header)
        limit = MAX_HELLO_BYTES if kind == HELLO else MAX_FRAME_BYTES
        if length > limit:
            raise ChannelError(f"frame of {length} bytes exceeds the maximum {limit}")
        return channel, kind, self._read_exactly(length, eof_ok=False) or b""

    def _read_exactly(self, size: int, eof_ok: bool) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            chunk = os.read(self._fd, size - len(data))
            if not chunk and self._wait_for_peer:
                time.sleep(POLL_INTERVAL_SECONDS)
                continue
            if not chunk:
                if not data and eof_ok:
                    return None
                raise ChannelError(f"port closed after {len(data)} of {size} bytes")
            data += chunk
        return bytes(data)


class Connection:
    """The local socket of one channel, and the lock that guards its descriptor.

    Only the channel's pump thread closes the socket, after its last recv, and
    it does so under the lock. Other threads send to it or shut it down only
    under the lock and while it is open, so no thread ever uses a descriptor
    number that a newer socket has reused.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.closed = False

    def send(self, payload: bytes) -> bool:
        with self.lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(payload)
            except OSError:
                return False
        return True

    def shutdown(self) -> None:
        """Wake the pump's recv with end of file, so that the pump closes the socket."""
        with self.lock:
            if self.closed:
                return
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.sock.close()


class Switchboard:
    """The open channels of one port, each bound to a local stream socket."""

    def __init__(self, port: FramedPort) -> None:
        self.port = port
        self._lock = threading.Lock()
        self._connections: dict[int, Connection] = {}

    def register(self, channel: int, sock: socket.socket) -> Connection:
        connection = Connection(sock)
        with self._lock:
            self._connections[channel] = connection
        return connection

    def start_pump(self, channel: int, connection: Connection) -> None:
        thread = threading.Thread(
            target=self._pump, args=(channel, connection), name=f"channel-{channel}"
        )
        thread.daemon = True
        thread.start()

    def deliver(self, channel: int, payload: bytes) -> None:
        with self._lock:
            connection = self._connections.get(channel)
        if connection is not None and not connection.send(payload):
            self.close(channel, notify=True)

    def close(self, channel: int, notify: bool) -> None:
        with self._lock:
            connection = self._connections.pop(channel, None)
        if connection is None:
            return
        connection.shutdown()
        if notify:
            self.send_to_port(channel, CLOSE)

    def send_to_port(self, channel: int, kind: int, payload: bytes = b"") -> bool:
        """Send a frame and return True, or False when the port is closed."""
        try:
            self.port.send(channel, kind, payload)
        except OSError:
            return False
        return True

    def close_all(self) -> None:
        with self._lock:
            channels = list(self._connections)
        for channel in channels:
            self.close(channel, notify=False)

    def _is_open(self, channel: int, connection: Connection) -> bool:
        with self._lock:
            return self._connections.get(channel) is connection

    def _pump(self, channel: int, connection: Connection) -> None:
        """Forward what the local socket receives until it closes, then close it."""
        try:
            while True:
                try:
                    chunk = connection.sock.recv(MAX_FRAME_BYTES)
                except OSError:
                    chunk = b""
                if not chunk:
                    if self._is_open(channel, connection):
                        self.close(channel, notify=True)
                    return
                if not self._is_open(channel, connection):
                    return
                if not self.send_to_port(channel, DATA, chunk):
                    return
        finally:
            connection.close()


def run_host(serial_path: str, listen_path: str, hello_path: str) -> None:
    """Relay connections to ``listen_path`` over the port at ``serial_path``."""
    with open(hello_path, "rb") as file:
        hello = file.read()
    listener = _bind_unix(listen_path)
    serial = _connect_serial(serial_path)
    serve_host(FramedPort(serial.fileno()), listener, hello)
    # The port closed: QEMU exited, so the relay has nothing left to serve.
    logger.info("serial port closed, exiting")


def serve_host(port: FramedPort, listener: socket.socket, hello: bytes) -> None:
    """Send HELLO, then relay the listener's connections until the port closes."""
    board = Switchboard(port)
    port.send(0, HELLO, hello)
    thread = threading.Thread(target=_accept_loop, args=(listener, board))
    thread.daemon = True
    thread.start()
    _route_frames(board, on_open=None)


def _accept_loop(listener: socket.socket, board: Switchboard) -> None:
    channel = 0
    while True:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            if listener.fileno() == -1:
                return
            logger.warning("accepting a connection failed: %s", exc)
            time.sleep(POLL_INTERVAL_SECONDS)
            continue
        channel = channel % 0xFFFFFFFF + 1
        # Registered before OPEN, so that a CLOSE from the guest finds it.
        connection = board.register(channel, conn)
        opened = board.send_to_port(channel, OPEN)
        board.start_pump(channel, connection)
        if not opened:
            board.close(channel, notify=False)


def _connect_serial(path: str) -> socket.socket:
    deadline = time.monotonic() + SERIAL_CONNECT_SECONDS
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(POLL_INTERVAL_SECONDS)


def _route_frames(board: Switchboard, on_open) -> None:
    """Read frames until the port closes, and act on each."""
    ignored = 0
    while True:
        try:
            frame = board.port.receive()
        except (ChannelError, OSError):
            frame = None
        if frame is None:
            board.close_all()
            return
        channel, kind, payload = frame
        if kind == DATA:
            board.deliver(channel, payload)
        elif kind == CLOSE:
            board.close(channel, notify=False)
        elif kind == OPEN and on_open is not None:
            on_open(channel)
        elif kind == HELLO:
            # The host side restarted, so its old connections are gone.
            board.close_all()
        else:
            ignored += 1
            # The guest controls what it sends, so repeats are logged at 1, 10,
            # 100... frames and cannot fill the host's disk with the relay log.
            if math.log10(ignored).is_integer():
                logger.warning(
                    "ignored %d frames of unknown kinds, the last of kind %d",
                    ignored,
                    kind,
                )


def run_guest(port_name: str, agent_path: str, socket_path: str) -> None:
    """Start the agent with the host's settings and serve the port's channels."""
    fd = os.open(_find_port(port_name), os.O_RDWR | os.O_CLOEXEC)
    port = FramedPort(fd, wait_for_peer=True)
    hello = _receive_hello(port)
    agent = _start_agent(agent_path, socket_path, hello)
    _start_reaper(agent)
    serve_guest(port, socket_path)
    raise ChannelError("the host closed the serial port")


def serve_guest(port: FramedPort, socket_path: str) -> None:
    """Connect each channel the host opens to the agent, until the port closes."""
    board = Switchboard(port)

    def open_channel(channel: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            logger.warning("connecting to the agent failed: %s", exc)
            sock.close()
            board.send_to_port(channel, CLOSE)
            return
        board.start_pump(channel, board.register(channel, sock))

    _route_frames(board, on_open=open_channel)


def _find_port(name: str) -> str:
    """Return the device of the virtio-serial port called name, once it exists."""
    deadline = time.monotonic() + AGENT_START_SECONDS
    while time.monotonic() < deadline:
        try:
            entries = os.listdir("/sys/class/virtio-ports")
        except FileNotFoundError:
            entries = []
        for entry in entries:
            try:
                with open(f"/sys/class/virtio-ports/{entry}/name") as file:
                    found = file.read().strip()
            except OSError:
                continue
            if found == name and os.path.exists(f"/dev/{entry}"):
                return f"/dev/{entry}"
        time.sleep(POLL_INTERVAL_SECONDS)
    raise ChannelError(f"no virtio-serial port named {name} appeared")


def _receive_hello(port: FramedPort) -> dict:
    while True:
        frame = port.receive()
        if frame is None:
            raise ChannelError("the serial port closed before the host's settings")
        channel, kind, payload = frame
        if kind == HELLO:
            return json.loads(payload)
        logger.warning("ignoring frame of kind %d before HELLO", kind)


def _start_agent(agent_path: str, socket_path: str, hello: dict) -> subprocess.Popen:
    home = hello["home"]
    os.makedirs(home, exist_ok=True)
    argv = [sys.executable, "-I", "-S", agent_path, "serve"]
    argv += ["--socket", socket_path, "--home", home]
    agent = subprocess.Popen(argv, env=hello["env"], cwd=home)
    deadline = time.monotonic() + AGENT_START_SECONDS
    while not _accepts_connections(socket_path):
        if agent.poll() is not None:
            raise ChannelError(f"the agent exited with code {agent.returncode}")
        if time.monotonic() >= deadline:
            raise ChannelError(
                f"the agent did not listen within {AGENT_START_SECONDS} s"
            )
        time.sleep(POLL_INTERVAL_SECONDS)
    return agent


def _accepts_connections(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _start_reaper(agent: subprocess.Popen) -> None:
    """Reap orphans, which PID 1 inherits, and end the VM when the agent exits."""

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(POLL_INTERVAL_SECONDS)
                continue
            if pid == agent.pid:
                logger.error("the agent exited with status %d; powering off", status)
                os._exit(1)

    thread = threading.Thread(target=reap, name="reaper")
    thread.daemon = True
    thread.start()


def _bind_unix(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fleetvm agent channels")
    commands = parser.add_subparsers(dest="command", required=True)

    host = commands.add_parser("host", help="relay agent.sock over the serial port")
    host.add_argument("--serial", required=True, help="QEMU character device socket")
    host.add_argument("--listen", required=True, help="socket for agent clients")
    host.add_argument("--hello", required=True, help="JSON file sent as HELLO")

    guest = commands.add_parser("guest", help="serve the port inside the VM")
    guest.add_argument(
        "--port-name", default=PORT_NAME, help="name of the virtio-serial port"
    )
    guest.add_argument("--agent", required=True, help="path of agent.py")
    guest.add_argument("--socket", required=True, help="socket the agent binds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s channels[%(process)d] %(levelname)s %(message)s",
    )
    if args.command == "host":
        run_host(args.serial, args.listen, args.hello)
    else:
        run_guest(args.port_name, args.agent, args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
