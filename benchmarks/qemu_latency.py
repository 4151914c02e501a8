"""Boot, warm execute and kill latency of the qemu driver, without the API.

Boots guests one after another with QemuDriver on a temporary data directory,
and prints the median and p99 of each figure:

- boot: ``spawn`` until the guest agent responds to a ping through the relay;
- first execute: the first ``print(1)``, which waits for the Python kernel;
- warm execute: later ``print(1)`` calls in the same guest;
- kill: QMP quit until QEMU and the relay are gone and the directory removed.

    .venv/bin/python -m benchmarks.qemu_latency [--boots 10] [--executes 20]
        [--accel tcg|kvm|auto] [--image-dir DIR]

Without --image-dir it uses the tests' cached image, and builds it if needed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from fleetvm.drivers.base import VmSpec
from fleetvm.drivers.qemu import QemuDriver
from fleetvm.settings import Settings


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def milliseconds_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def measure_one(driver: QemuDriver, vm_id: str, executes: int) -> dict[str, list]:
    started = time.perf_counter()
    driver.spawn(VmSpec(vm_id=vm_id, memory_mb=512, vcpu_count=1))
    figures: dict[str, list[float]] = {"boot": [milliseconds_since(started)]}

    started = time.perf_counter()
    driver.execute(vm_id, "python", "print(1)", 30)
    figures["first execute"] = [milliseconds_since(started)]
    figures["warm execute"] = []
    for _ in range(executes):
        started = time.perf_counter()
        result = driver.execute(vm_id, "python", "print(1)", 30)
        figures["warm execute"].append(milliseconds_since(started))
        if result.stdout != "1\n":
            raise RuntimeError(f"unexpected output {result.stdout!r}")

    started = time.perf_counter()
    driver.kill(vm_id)
    figures["kill"] = [milliseconds_since(started)]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=10)
    parser.add_argument("--executes", type=int, default=20)
    parser.add_argument("--accel", choices=["tcg", "kvm", "auto"], default="tcg")
    parser.add_argument("--image-dir", type=Path)
    args = parser.parse_args()

    if args.image_dir is None:
        from tests.qemu_image import cached_image_dir

        args.image_dir = cached_image_dir()
    data_dir = Path(tempfile.mkdtemp(prefix="fvm-bench-", dir="/tmp"))
    settings = Settings(
        data_dir=data_dir,
        vm={"driver": "qemu", "spawn_timeout_seconds": 120},
        qemu={"image_dir": args.image_dir, "accel": args.accel},
    )
    driver = QemuDriver(settings)
    print(f"accelerator: {driver.accel}")
    figures: dict[str, list[float]] = {}
    try:
        for number in range(args.boots):
            one = measure_one(driver, f"bench-{number}", args.executes)
            for name, values in one.items():
                figures.setdefault(name, []).extend(values)
    finally:
        for vm_id in driver.list_vms():
            driver.kill(vm_id)
        shutil.rmtree(data_dir, ignore_errors=True)

    for name, values in figures.items():
        print(
            f"{name:14s} p50 {statistics.median(values):8.1f} ms  "
            f"p99 {percentile(values, 0.99):8.1f} ms  ({len(values)} samples)"
        )


if __name__ == "__main__":
    main()
