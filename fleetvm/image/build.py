"""Build the QEMU driver's guest image from Debian packages on the host.

Nothing is fetched except the kernel package, which ``apt-get download``
brings from the host's configured Debian mirror unless a ``.deb`` file is
given. Python, bash and busybox are copied from the host's installed packages,
as ``dpkg -L`` lists their files, with the shared libraries that ``ldd``
reports for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from fleetvm.errors import FleetvmError
from fleetvm.guest import agent as guest_agent
from fleetvm.guest import channels as guest_channels
from fleetvm.image import INITRAMFS_FILE, KERNEL_FILE, MANIFEST_FILE
from fleetvm.image.initramfs import FileTree

logger = logging.getLogger(__name__)

KERNEL_PACKAGE = "linux-image-cloud-amd64"
# Modules loaded in this order, after their dependencies: the virtio-mmio
# transport that microvm uses, the serial port, the network device for VMs with
# qemu.network on, and the random number generator fed by the host.
KERNEL_MODULES = ["virtio_mmio", "virtio_console", "virtio_net", "virtio_rng"]
# The guest's Python: Debian's interpreter, which the agent needs at 3.11+.
HOST_PYTHON = Path("/usr/bin/python3")
BUSYBOX = Path("/bin/busybox")
BASH = Path("/bin/bash")
# Parts of the standard library that a sandbox has no use for: tests, GUI
# toolkits, and tools that install packages or build extensions.
STDLIB_EXCLUDES = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
}
GUEST_DIR = "/opt/fleetvm"
MODULES_DIR = "/usr/lib/modules/fleetvm"
SOURCES = (
    Path(guest_agent.__file__),
    Path(guest_channels.__file__),
    Path(__file__),
    Path(__file__).with_name("initramfs.py"),
)

INIT_SCRIPT = """\
#!/bin/sh
# Init of a fleetvm QEMU guest. The kernel passes its unknown name=value
# parameters, such as fleetvm_disk_mb, as environment variables.
export PATH=/usr/local/bin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
size="${fleetvm_disk_mb:-256}m"
mount -t tmpfs -o "size=$size,mode=1777" tmpfs /tmp
mount -t tmpfs -o "size=$size,mode=0700" tmpfs /root
mount -t tmpfs -o mode=0755 tmpfs /run
while read -r module; do
    insmod "/usr/lib/modules/fleetvm/$module" || echo "init: insmod $module failed"
done < /etc/fleetvm/modules
if [ "$fleetvm_probe" = 1 ]; then
    poweroff -f
fi
ip link set lo up
if [ "$fleetvm_network" = 1 ]; then
    # QEMU's user-mode network: fixed guest address, gateway and DNS server.
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
    echo "nameserver 10.0.2.3" > /etc/resolv.conf
fi
exec /usr/bin/python3 -I -S /opt/fleetvm/channels.py guest \\
    --agent /opt/fleetvm/agent.py --socket /run/fleetvm-agent.sock
"""


class ImageBuildError(FleetvmError):
    """A missing tool or package on the host, or a failed build step."""


def build_image(output_dir: Path, kernel_deb: Path | None = None) -> dict:
    """Build the guest image into output_dir, replacing it, and return the manifest."""
    started = time.monotonic()
    output_dir = output_dir.expanduser().resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleetvm-image-") as work:
        work_dir = Path(work)
        if kernel_deb is None:
            kernel_deb = _download_kernel_package(work_dir)
        kernel_root = work_dir / "kernel"
        _run(["dpkg-deb", "-x", str(kernel_deb), str(kernel_root)])
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=output_dir.parent))
        os.chmod(staging, 0o755)
        try:
            manifest = _build_into(staging, kernel_root, kernel_deb)
            _replace_dir(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "built guest image in %s in %.0f s: initramfs %d bytes",
        output_dir,
        time.monotonic() - started,
        manifest["files"][INITRAMFS_FILE],
    )
    return manifest


def inputs_key() -> str:
    """Return a hash of what an image is built from, without building it.

    It covers the guest sources and the versions of the Debian packages, so an
    image whose manifest has the same key is up to date.
    """
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    packages = [_resolve_kernel_package(), *_userland_packages()]
    digest.update(json.dumps(_package_versions(packages), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _build_into(staging: Path, kernel_root: Path, kernel_deb: Path) -> dict:
    tree = FileTree()
    kernel = _find_kernel(kernel_root)
    shutil.copyfile(kernel, staging / KERNEL_FILE)
    modules = _add_kernel_modules(tree, kernel_root)
    libraries = _add_userland(tree)
    _add_guest_files(tree, modules)
    tree.write_cpio_gz(staging / INITRAMFS_FILE)

    kernel_package = _deb_field(kernel_deb, "Package")
    owners = _owning_packages(libraries)
    packages = _package_versions(sorted({*_userland_packages(), *owners}))
    packages[kernel_package] = _deb_field(kernel_deb, "Version")
    manifest = {
        "key": inputs_key(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": _python_version(),
        "packages": packages,
        "kernel_modules": modules,
        "root_file_system_bytes": tree.size(),
        "files": {
            name: (staging / name).stat().st_size
            for name in (KERNEL_FILE, INITRAMFS_FILE)
        },
    }
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _download_kernel_package(work_dir: Path) -> Path:
    package = _resolve_kernel_package()
    logger.info("downloading %s with apt-get", package)
    _run(["apt-get", "download", package], cwd=work_dir)
    debs = sorted(work_dir.glob(f"{package}_*.deb"))
    if not debs:
        raise ImageBuildError(f"apt-get download {package} produced no .deb file")
    return debs[-1]


def _resolve_kernel_package() -> str:
    """Return the versioned kernel package that the meta package depends on."""
    output = _run(["apt-cache", "depends", KERNEL_PACKAGE])
    match = re.search(r"Depends: (linux-image-\S+)", output)
    if match is None:
        raise ImageBuildError(
            f"apt-cache knows no package {KERNEL_PACKAGE}; run apt-get update, or "
            "pass the kernel package with --kernel-deb FILE"
        )
    return match.group(1)


def _find_kernel(kernel_root: Path) -> Path:
    kernels = sorted((kernel_root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageBuildError(
            f"the kernel package has no boot/vmlinuz-*: {kernel_root}"
        )
    return kernels[-1]


def _add_kernel_modules(tree: FileTree, kernel_root: Path) -> list[str]:
    """Add the needed modules, in load order, and return their file names."""
    (module_dir,) = (kernel_root / "lib" / "modules").iterdir()
    # depmod writes modules.dep when the package is installed, so the package
    # has none and the dependencies come from each module's .modinfo section.
    by_name = {
        path.name.removesuffix(".ko").replace("-", "_"): path
        for path in module_dir.rglob("*.ko")
    }
    ordered: list[Path] = []

    def visit(name: str) -> None:
        path = by_name.get(name)
        if path is None:
            raise ImageBuildError(f"the kernel package has no module {name}")
        for dependency in _module_dependencies(path):
            visit(dependency)
        if path not in ordered:
            ordered.append(path)

    for name in KERNEL_MODULES:
        visit(name)
    for path in ordered:
        tree.add_file(f"{MODULES_DIR}/{path.name}", path, 0o644)
    return [path.name for path in ordered]


def _module_dependencies(path: Path) -> list[str]:
    match = re.search(rb"\0depends=([^\0]*)\0", path.read_bytes())
    if match is None or not match.group(1):
        return []
    return match.group(1).decode().split(",")


def _add_userland(tree: FileTree) -> set[Path]:
    """Add Python, bash and busybox, and return the shared libraries they load."""
    for directory in ("/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64"):
        tree.add_dir(directory)
    for link in ("bin", "sbin", "lib", "lib64"):
        tree.add_symlink(f"/{link}", f"usr/{link}")
    for directory in ("/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/etc"):
        tree.add_dir(directory)

    python = HOST_PYTHON.resolve()
    executables = [python, _existing(BASH), _existing(BUSYBOX)]
    tree.add_file(f"/usr/bin/{python.name}", python)
    tree.add_symlink("/usr/bin/python3", python.name)
    tree.add_symlink("/usr/bin/python", python.name)
    tree.add_file("/usr/bin/bash", BASH)
    tree.add_file("/usr/bin/busybox", BUSYBOX)
    extensions = _add_stdlib(tree, python.name)
    libraries = _shared_libraries([*executables, *extensions])
    for library in libraries:
        _add_library(tree, library)
    _add_busybox_applets(tree)
    return libraries


def _add_stdlib(tree: FileTree, python_name: str) -> list[Path]:
    """Add the standard library and return its extension modules."""
    stdlib = Path("/usr/lib") / python_name
    extensions = []
    for package in _stdlib_packages(python_name):
        for line in _run(["dpkg", "-L", package]).splitlines():
            path = Path(line)
            if not path.is_relative_to(stdlib) or path == stdlib:
                continue
            if path.relative_to(stdlib).parts[0] in STDLIB_EXCLUDES:
                continue
            if _add_path(tree, path) and path.suffix == ".so":
                extensions.append(path)
            _add_bytecode(tree, path)
    return extensions


def _add_path(tree: FileTree, path: Path) -> bool:
    """Add a file, link or directory as it is on the host. True means a file."""
    if path.is_symlink():
        tree.add_symlink(str(path), os.readlink(path))
    elif path.is_dir():
        tree.add_dir(str(path))
    elif path.is_file():
        tree.add_file(str(path), path)
        return True
    return False


def _add_bytecode(tree: FileTree, path: Path) -> None:
    # Debian compiles the standard library when the package is installed. With
    # the bytecode in the image, the guest's Python does not compile on start.
    if path.suffix != ".py":
        return
    cache = path.parent / "__pycache__"
    tag = "cpython-" + path.parts[3].removeprefix("python").replace(".", "")
    for compiled in cache.glob(f"{path.stem}.{tag}*.pyc"):
        tree.add_file(str(compiled), compiled, 0o644)


def _shared_libraries(binaries: list[Path]) -> set[Path]:
    libraries: set[Path] = set()
    for binary in binaries:
        completed = subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, check=False
        )
        # A static binary makes ldd exit 1 with "not a dynamic executable".
        for match in re.finditer(r"(/\S+) \(0x", completed.stdout):
            libraries.add(Path(match.group(1)))
    return libraries


def _add_library(tree: FileTree, library: Path) -> None:
    # Debian's /lib is a link to /usr/lib, so libraries are stored under /usr.
    canonical = Path(os.path.realpath(library.parent)) / library.name
    real = Path(os.path.realpath(library))
    tree.add_file(str(real), real)
    if canonical != real:
        tree.add_symlink(str(canonical), os.path.relpath(real, canonical.parent))


def _add_busybox_applets(tree: FileTree) -> None:
    output = _run([str(BUSYBOX), "--list-full"])
    for applet in output.split():
        directory, _, name = applet.rpartition("/")
        path = "/usr/sbin/" + name if directory.endswith("sbin") else "/usr/bin/" + name
        if not tree.has(path) and not tree.has(path.replace("/usr/sbin", "/usr/bin")):
            tree.add_symlink(path, "/usr/bin/busybox")


def _add_guest_files(tree: FileTree, modules: list[str]) -> None:
    tree.add_bytes("/init", INIT_SCRIPT.encode(), 0o755)
    tree.add_file(f"{GUEST_DIR}/agent.py", Path(guest_agent.__file__), 0o644)
    tree.add_file(f"{GUEST_DIR}/channels.py", Path(guest_channels.__file__), 0o644)
    tree.add_bytes("/etc/fleetvm/modules", "".join(f"{m}\n" for m in modules).encode())
    tree.add_bytes("/etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n")
    tree.add_bytes("/etc/group", b"root:x:0:\n")
    tree.add_bytes("/etc/hostname", b"fleetvm\n")


def _stdlib_packages(python_name: str) -> list[str]:
    return [f"lib{python_name}-minimal", f"lib{python_name}-stdlib"]


def _userland_packages() -> list[str]:
    python_name = HOST_PYTHON.resolve().name
    packages = [f"{python_name}-minimal", *_stdlib_packages(python_name)]
    return [*packages, "bash", "busybox-static", "libc6"]


def _package_versions(packages: list[str]) -> dict[str, str]:
    versions = {}
    for package in packages:
        output = _run(["dpkg-query", "-W", "-f", "${Version}", package], check=False)
        versions[package] = output.strip() or "not installed"
    return versions


def _owning_packages(paths: set[Path]) -> set[str]:
    """Return the installed packages that contain paths, as ``dpkg -S`` finds them."""
    candidates = set()
    for path in paths:
        real = os.path.realpath(path)
        # dpkg records most libraries under /lib, which is a link to /usr/lib.
        candidates |= {str(path), real, real.replace("/usr/lib", "/lib", 1)}
    output = _run(["dpkg", "-S", *sorted(candidates)], check=False)
    packages = set()
    for line in output.splitlines():
        names, _, _ = line.partition(": ")
        for name in names.split(", "):
            packages.add(name.split(":")[0])
    return packages


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field]).strip()


def _python_version() -> str:
    return _run([str(HOST_PYTHON), "-c", "import sys; print(sys.version.split()[0])"])


def _existing(path: Path) -> Path:
    if not path.exists():
        package = "busybox-static" if path == BUSYBOX else "bash"
        raise ImageBuildError(f"{path} is missing; apt-get install {package}")
    return path


def _replace_dir(staging: Path, output_dir: Path) -> None:
    old = output_dir.with_name(output_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if output_dir.exists():
        output_dir.rename(old)
    staging.rename(output_dir)
    shutil.rmtree(old, ignore_errors=True)


def _run(argv: list[str], cwd: Path | None = None, check: bool = True) -> str:
    try:
        completed = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{argv[0]} is not installed: {exc}") from exc
    if check and completed.returncode != 0:
        raise ImageBuildError(
            f"{' '.join(argv)} failed with exit code {completed.returncode}: "
            f"{completed.stderr.strip()}"
        )
    return completed.stdout.strip()
