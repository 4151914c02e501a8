"""The instavm SDK from PyPI, pointed at a real `fleetvm serve`."""

from __future__ import annotations

import base64

from instavm import InstaVM

from tests.harness import Server, processes_with_cmdline, vm_processes


def test_sdk_session_flow(server: Server, alice_key: str, tmp_path) -> None:
    client = InstaVM(api_key=alice_key, base_url=server.url, timeout=120)
    session_id = client.session_id
    assert session_id

    client.execute("x = 41")
    result = client.execute("print(x + 1)")
    assert result["stdout"] == "42\n"

    client.execute("sleep 987654 &", language="bash")
    assert processes_with_cmdline("sleep 987654")

    local = tmp_path / "data.bin"
    payload = bytes(range(256)) * 4
    local.write_bytes(payload)
    uploaded = client.upload_file(str(local), "inbox/data.bin")
    assert uploaded["size"] == len(payload)
    check = client.execute("print(len(open('inbox/data.bin', 'rb').read()))")
    assert check["stdout"] == f"{len(payload)}\n"

    downloaded = client.download_file("inbox/data.bin")
    assert downloaded["content"] == payload

    status = client.get_session_status()
    assert status["vm_status"] == "active"
    assert status["vm_alive"] is True
    assert client.is_session_active() is True
    vm_id = status["vm_id"]

    killed = client.kill()
    assert killed["outcome"] == "killed"
    assert killed["vm_id"] == vm_id
    assert processes_with_cmdline("sleep 987654") == []
    assert vm_processes(vm_id) == []


def test_sdk_download_base64_shape(server: Server, alice_key: str) -> None:
    client = InstaVM(api_key=alice_key, base_url=server.url, timeout=120)
    client.execute("open('hello.txt', 'w').write('hi there')")

    response = client.session.post(
        f"{server.url}/download",
        data={"filename": "hello.txt", "session_id": client.session_id},
        headers={"X-API-Key": alice_key},
    )

    assert response.status_code == 200
    assert base64.b64decode(response.json()["content"]) == b"hi there"
    client.kill()
