"""Tests of the channel relay, with a socket pair in place of the serial port.

The host and guest halves run in threads of the test, and the guest half talks
to a real agent process, so every request crosses the same code as in a VM.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetvm.guest import agent as guest_agent
from fleetvm.guest import channels


def call(address: Path, request: dict, timeout: float = 30) -> dict | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        # Connected before the timeout is set, because a socket with a timeout
        # fails with EAGAIN instead of waiting while the listen queue is full.
        sock.connect(str(address))
        sock.settimeout(timeout)
        guest_agent.send_message(sock, request)
        return guest_agent.recv_message(sock)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Path]:
    """Start an agent and both relay halves, and yield the host-side socket path."""
    home = tmp_path / "home"
    home.mkdir()
    agent_socket = tmp_path / "agent-inside.sock"
    agent = subprocess.Popen(
        [sys.executable, "-I", "-S", guest_agent.__file__, "serve"]
        + ["--socket", str(agent_socket), "--home", str(home)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not agent_socket.exists() and time.monotonic() < deadline:
        time.sleep(0.02)

    host_end, guest_end = socket.socketpair()
    listener = channels._bind_unix(str(tmp_path / "agent.sock"))
    hello = b'{"env": {}, "home": "/root"}'
    host = threading.Thread(
        target=channels.serve_host,
        args=(channels.FramedPort(host_end.fileno()), listener, hello),
        daemon=True,
    )
    guest_port = channels.FramedPort(guest_end.fileno())

    def run_guest() -> None:
        channels._receive_hello(guest_port)
        channels.serve_guest(guest_port, str(agent_socket))

    guest = threading.Thread(target=run_guest, daemon=True)
    host.start()
    guest.start()
    try:
        yield tmp_path / "agent.sock"
    finally:
        agent.kill()
        agent.wait()
        host_end.shutdown(socket.SHUT_RDWR)
        guest_end.shutdown(socket.SHUT_RDWR)
        host.join(5)
        guest.join(5)
        listener.close()
        # The pumps close their sockets once the relay halves shut them down.
        time.sleep(0.2)
        host_end.close()
        guest_end.close()


def test_relay_ping(relay):
    response = call(relay, {"op": "ping"})

    assert response["ok"] is True


def test_relay_keeps_python_state(relay):
    call(relay, {"op": "execute", "language": "python", "code": "n = 6", "timeout": 10})
    response = call(
        relay,
        {"op": "execute", "language": "python", "code": "print(n * 7)", "timeout": 10},
    )

    assert response["stdout"] == "42\n"


def test_relay_large_download(relay, tmp_path):
    content = bytes(range(256)) * 4096
    (tmp_path / "home" / "big.bin").write_bytes(content)

    response = call(relay, {"op": "download", "path": "big.bin"})

    assert response["ok"] is True
    assert len(response["content"]) > channels.MAX_FRAME_BYTES


def test_relay_ping_during_long_command(relay):
    slow = {"op": "execute", "language": "bash", "code": "sleep 2", "timeout": 10}
    thread = threading.Thread(target=call, args=(relay, slow), daemon=True)
    thread.start()
    time.sleep(0.2)

    started = time.monotonic()
    response = call(relay, {"op": "ping"})

    assert response["ok"] is True
    assert time.monotonic() - started < 1.0
    thread.join(10)


def test_relay_survives_abandoned_connections(relay):
    """Clients that close before their response must not disturb the others."""
    errors: list[str] = []

    def abandon() -> None:
        for _ in range(30):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(relay))
                guest_agent.send_message(sock, {"op": "ping"})

    def execute() -> None:
        code = {"op": "execute", "language": "python", "code": "print(1)"}
        for _ in range(60):
            response = call(relay, {**code, "timeout": 10})
            if response is None or response.get("stdout") != "1\n":
                errors.append(repr(response))

    threads = [threading.Thread(target=abandon) for _ in range(3)]
    threads += [threading.Thread(target=execute) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == []


def test_frame_longer_than_maximum_rejected():
    left, right = socket.socketpair()
    with left, right:
        header = channels.HEADER.pack(1, channels.DATA, channels.MAX_FRAME_BYTES + 1)
        left.sendall(header)

        with pytest.raises(channels.ChannelError, match="exceeds the maximum"):
            channels.FramedPort(right.fileno()).receive()
