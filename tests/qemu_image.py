"""The QEMU guest image for tests, built once per set of inputs and kept.

Building takes a few seconds plus the kernel package's download, so images
are kept under FLEETVM_TEST_IMAGE_CACHE (default ~/.cache/fleetvm/test-images).
Each is in a directory named by the hash of its inputs, which are the guest
sources and the versions of the Debian packages that go in.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest

from fleetvm.image import MANIFEST_FILE

QEMU_BINARY = "qemu-system-x86_64"


def require_qemu() -> None:
    """Skip where QEMU is not installed, except in CI, where that is a failure."""
    if shutil.which(QEMU_BINARY) is not None:
        return
    message = f"{QEMU_BINARY} is not installed (Debian package qemu-system-x86)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def cached_image_dir() -> Path:
    """Return a directory with an up-to-date guest image, building it if needed."""
    from fleetvm.image.build import build_image, inputs_key

    default = Path.home() / ".cache" / "fleetvm" / "test-images"
    cache = Path(os.environ.get("FLEETVM_TEST_IMAGE_CACHE", default))
    cache.mkdir(parents=True, exist_ok=True)
    image_dir = cache / inputs_key()
    # Parallel test runs on one machine build the image once.
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (image_dir / MANIFEST_FILE).is_file():
            build_image(image_dir)
    return image_dir
