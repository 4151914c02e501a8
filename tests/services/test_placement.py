"""Placement: a new VM goes to the live worker with room and the fewest VMs."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from fleetvm.db.engine import Database
from fleetvm.db.models import Session, User, Vm, VmStatus, Worker, utcnow
from fleetvm.errors import NoWorkerAvailable
from fleetvm.services.vms import pick_worker
from fleetvm.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, multinode={"dead_after_seconds": 10})


@pytest.fixture
def database(settings: Settings) -> Iterator[Database]:
    instance = Database(settings)
    instance.create_all()
    with instance.session() as db:
        db.add(User(id=1, username="alice"))
        db.add(
            Session(
                id="00000000-0000-0000-0000-000000000001",
                user_id=1,
                vm_lifetime_seconds=60,
                memory_mb=256,
                vcpu_count=1,
            )
        )
    yield instance
    instance.dispose()


def add_worker(
    database: Database,
    worker_id: str,
    capacity: int = 10,
    vms: int = 0,
    silent_seconds: float = 0,
    state: str = "up",
    vm_status: VmStatus = VmStatus.ACTIVE,
) -> None:
    with database.session() as db:
        db.add(
            Worker(
                id=worker_id,
                queue=f"vm_queue_{worker_id}",
                host="test",
                capacity=capacity,
                state=state,
                last_heartbeat=utcnow() - timedelta(seconds=silent_seconds),
            )
        )
        for index in range(vms):
            db.add(
                Vm(
                    id=f"vm-{worker_id}-{index}",
                    session_id="00000000-0000-0000-0000-000000000001",
                    worker_id=worker_id,
                    status=str(vm_status),
                )
            )


def pick(database: Database, settings: Settings) -> str:
    with database.session() as db:
        return pick_worker(db, settings)


def test_placement_picks_fewest_live_vms(database, settings) -> None:
    add_worker(database, "busy", vms=3)
    add_worker(database, "quiet", vms=1)
    add_worker(database, "ended", vms=5, vm_status=VmStatus.KILLED)

    assert pick(database, settings) == "ended"


def test_placement_counts_spawning_and_killing(database, settings) -> None:
    add_worker(database, "a", vms=2, vm_status=VmStatus.SPAWNING)
    add_worker(database, "b", vms=1, vm_status=VmStatus.KILLING)

    assert pick(database, settings) == "b"


def test_placement_skips_full_worker(database, settings) -> None:
    add_worker(database, "full", capacity=2, vms=2)
    add_worker(database, "roomy", capacity=10, vms=5)

    assert pick(database, settings) == "roomy"


@pytest.mark.parametrize(
    "silent_seconds, state",
    [
        pytest.param(11, "up", id="heartbeat-too-old"),
        pytest.param(0, "stopped", id="stopped"),
        pytest.param(0, "retired", id="retired"),
    ],
)
def test_placement_skips_worker_not_live(
    database, settings, silent_seconds: float, state: str
) -> None:
    add_worker(database, "gone", silent_seconds=silent_seconds, state=state)
    add_worker(database, "live", vms=4)

    assert pick(database, settings) == "live"


def test_placement_without_room_raises(database, settings) -> None:
    add_worker(database, "full", capacity=1, vms=1)
    add_worker(database, "gone", silent_seconds=60)

    with pytest.raises(NoWorkerAvailable, match="fleetvm worker --worker-id"):
        pick(database, settings)
