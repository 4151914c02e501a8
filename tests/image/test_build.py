"""Tests of `fleetvm image build` and of the image it writes."""

from __future__ import annotations

import gzip
import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fleetvm.image import INITRAMFS_FILE, KERNEL_FILE, MANIFEST_FILE
from fleetvm.image.initramfs import FileTree
from tests.qemu_image import cached_image_dir, require_qemu


def read_cpio(path: Path) -> dict[str, tuple[int, bytes]]:
    """Return each entry of a gzip-compressed newc archive: mode and content."""
    data = gzip.decompress(path.read_bytes())
    entries = {}
    position = 0
    while True:
        header = data[position : position + 110]
        assert header[:6] == b"070701", f"bad magic at {position}"
        mode = int(header[14:22], 16)
        size = int(header[54:62], 16)
        name_size = int(header[94:102], 16)
        position += 110
        name = data[position : position + name_size - 1].decode()
        position += name_size + (-(110 + name_size) % 4)
        content = data[position : position + size]
        position += size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, content)


@pytest.fixture(scope="module")
def image_dir() -> Path:
    require_qemu()
    return cached_image_dir()


def test_file_tree_round_trip(tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("from a file")
    tree = FileTree()
    tree.add_file("/opt/a/source.txt", source, 0o600)
    tree.add_bytes("/etc/motd", b"hello", 0o644)
    tree.add_symlink("/bin", "usr/bin")
    tree.write_cpio_gz(tmp_path / "out.cpio.gz")

    entries = read_cpio(tmp_path / "out.cpio.gz")

    assert entries["opt/a/source.txt"] == (stat.S_IFREG | 0o600, b"from a file")
    assert entries["etc/motd"] == (stat.S_IFREG | 0o644, b"hello")
    assert entries["bin"] == (stat.S_IFLNK | 0o777, b"usr/bin")
    assert stat.S_ISDIR(entries["opt/a"][0])
    assert stat.S_ISDIR(entries["."][0])


def test_image_manifest_lists_packages(image_dir):
    manifest = json.loads((image_dir / MANIFEST_FILE).read_text())
    packages = manifest["packages"]

    assert any(name.startswith("linux-image-") for name in packages)
    assert "busybox-static" in packages
    assert "bash" in packages
    assert "libc6" in packages
    assert "virtio_console.ko" in manifest["kernel_modules"]
    assert manifest["files"][KERNEL_FILE] == (image_dir / KERNEL_FILE).stat().st_size


def test_image_contains_guest_files(image_dir):
    entries = read_cpio(image_dir / INITRAMFS_FILE)

    init_mode, init_script = entries["init"]
    assert init_mode & 0o111
    assert b"channels.py guest" in init_script
    assert "opt/fleetvm/agent.py" in entries
    assert "opt/fleetvm/channels.py" in entries
    assert "usr/bin/bash" in entries
    assert entries["usr/bin/python3"][1].startswith(b"python3.")
    assert not any(re.match(r"usr/lib/python3\.\d+/test/", name) for name in entries)


def test_cli_image_build_reports_failure(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "fleetvm.cli", "image", "build"]
        + ["--output", str(tmp_path / "image")]
        + ["--kernel-deb", str(tmp_path / "missing.deb")],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 2
    assert "dpkg-deb" in completed.stderr
    assert not (tmp_path / "image").exists()
