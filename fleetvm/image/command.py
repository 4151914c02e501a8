"""The ``fleetvm image`` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from fleetvm.image import INITRAMFS_FILE, KERNEL_FILE
from fleetvm.settings import Settings


def add_image_parser(commands: argparse._SubParsersAction) -> None:
    image = commands.add_parser(
        "image", help="manage the guest image of the qemu driver"
    ).add_subparsers(dest="action", required=True)
    build = image.add_parser(
        "build",
        help="build the kernel and initramfs from Debian packages on this host",
    )
    build.add_argument(
        "--output",
        type=Path,
        help="directory to write (default: qemu.image_dir, or <data dir>/images/qemu)",
    )
    build.add_argument(
        "--kernel-deb",
        type=Path,
        help="kernel .deb to use instead of running apt-get download",
    )


def run_image_command(args: argparse.Namespace, settings: Settings) -> None:
    from fleetvm.image.build import build_image

    output = args.output or image_dir(settings)
    manifest = build_image(output, args.kernel_deb)
    files = manifest["files"]
    print(f"built the guest image in {output.expanduser().resolve()}")
    print(f"  {KERNEL_FILE}: {files[KERNEL_FILE]} bytes")
    print(f"  {INITRAMFS_FILE}: {files[INITRAMFS_FILE]} bytes")
    print(f"  unpacked root file system: {manifest['root_file_system_bytes']} bytes")
    for package, version in sorted(manifest["packages"].items()):
        print(f"  {package} {version}")


def image_dir(settings: Settings) -> Path:
    """Return the directory of the qemu driver's guest image."""
    if settings.qemu.image_dir is not None:
        return settings.qemu.image_dir.expanduser().resolve()
    return settings.resolved_data_dir / "images" / "qemu"
