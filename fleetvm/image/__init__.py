"""Guest images of the QEMU driver, built from the host's Debian packages.

An image is a directory with three files:

- ``vmlinuz``: the kernel of a Debian ``linux-image-*-cloud-amd64`` package.
- ``initramfs.cpio.gz``: the whole root file system, which the guest keeps in
  memory. It contains the host's Debian Python, bash, busybox-static for the
  other commands, the shared libraries they need, the kernel modules of the
  virtio-mmio, virtio-serial, virtio-net and virtio-rng devices, the guest
  agent and the init script.
- ``manifest.json``: the Debian packages and versions that went in, the file
  sizes, and the key of the inputs, which shows whether an image is out of date.
"""

from __future__ import annotations

from pathlib import Path

KERNEL_FILE = "vmlinuz"
INITRAMFS_FILE = "initramfs.cpio.gz"
MANIFEST_FILE = "manifest.json"


def image_files(image_dir: Path) -> tuple[Path, Path]:
    """Return the kernel and initramfs paths of the image in image_dir."""
    return image_dir / KERNEL_FILE, image_dir / INITRAMFS_FILE
