"""The per-VM locks of a worker: exclusive while held, dropped when unused."""

from __future__ import annotations

from fleetvm.worker.vms import VmManager


def make_manager() -> VmManager:
    # The locks touch neither the database nor the driver.
    return VmManager(database=None, driver=None, worker_id="w1")  # type: ignore[arg-type]


def test_lock_is_exclusive_per_vm() -> None:
    manager = make_manager()

    with manager.locked("vm-a") as first:
        with manager.locked("vm-a", blocking=False) as second:
            assert second is False
        with manager.locked("vm-b", blocking=False) as other:
            assert other is True
        assert first is True


def test_unused_locks_are_dropped() -> None:
    manager = make_manager()

    with manager.locked("vm-a"), manager.locked("vm-b"):
        assert len(manager._locks) == 2
    for number in range(100):
        with manager.locked(f"vm-{number}"):
            pass

    assert len(manager._locks) == 0
